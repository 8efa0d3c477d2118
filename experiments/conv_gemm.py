r"""CPU timings of ``conv_impl='gemm'`` against 'matmul' and XLA's convolution.

All variants of a table run in one process, interleaved round-robin (the starting variant
rotates each round), after one untimed call; median wall time with
``block_until_ready``. Only ratios inside one table mean anything on a shared machine.

Parts (``--parts``):

* ``layers``: one 3x3 convolution at the release simple CNN's shapes (batch 512: 28x28
  1->64, 13x13 64->64 and 5x5 64->64, 'VALID'), forward, input gradient, kernel gradient
  and all three (``jax.vjp``), for ``--variants`` (``xla``: ``lax.conv_general_dilated``;
  ``matmul``; ``gemm_fwd`` / ``gemm_dx``: only that part as GEMMs; ``gemm``), with the
  largest difference to XLA's result relative to its largest magnitude;
* ``blocks``: the release simple CNN's two ``pool(relu(conv + b))`` blocks (28x28 1->64
  and 13x13 64->64, batch 512), forward and forward + backward (the gradients a training
  step needs: no input gradient for the first block), computed layer by layer
  (``conv_impl='gemm'``, ``pool_impl='reshape'``) and fused (``_fused.conv_relu_pool``),
  and with ``--with_tf`` by TensorFlow (``tf.nn`` ops under ``tf.function``) in the same
  process;
* ``model``: the release simple CNN (dropout 0.3) forward + backward and the real
  ``base`` / ``sadt_t1`` training steps (experiments/benchmark.py's runners) per
  ``--impls`` entry ``conv_impl[:dtype[:block_impl[:fold]]]`` (``fold``: ``fold`` or
  ``nofold``, ``SimpleCNN.fold_bn``; default ``fold``), with each step's process CPU
  time, ``cores_busy`` (CPU time / wall time while timing) and ``round_ratio`` (the
  median over rounds of the step's round median over the first entry's, same method).

Run::

    PYTHONPATH=. python experiments/conv_gemm.py --parts layers --repeats 7
    PYTHONPATH=. python experiments/conv_gemm.py --parts model --impls matmul,gemm --repeats 6
    PYTHONPATH=. python experiments/conv_gemm.py --parts blocks --with_tf --repeats 9
    PYTHONPATH=. python experiments/conv_gemm.py --parts model --repeats 6 --steps 3 \
        --impls gemm:float32:layers,gemm:float32:fused
    PYTHONPATH=. python experiments/conv_gemm.py --parts model --repeats 12 --steps 2 \
        --impls gemm:float32:fused:nofold,gemm:float32:fused:fold
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402

from sadt_jax import losses  # noqa: E402
from sadt_jax.main import keep_freed_memory  # noqa: E402
from sadt_jax.models import _fused, _layers  # noqa: E402

SPEC = ("NHWC", "HWIO", "NHWC")
#: (name, height = width, in_features, padding) of the release simple CNN, out = 64.
LAYERS = (("conv1 28x28 1->64", 28, 1), ("conv2 13x13 64->64", 13, 64), ("conv3 5x5 64->64", 5, 64))
VARIANTS = {
    "xla": None,
    "matmul": ("xla", "xla"),
    "gemm_fwd": ("gemm", "xla"),
    "gemm_dx": ("xla", "gemm"),
    "gemm": ("gemm", "gemm"),
}


def _conv(variant):
    if VARIANTS[variant] is None:
        return lambda x, w: jax.lax.conv_general_dilated(
            x, w, (1, 1), "VALID", dimension_numbers=SPEC
        )
    fwd, dx = VARIANTS[variant]
    return lambda x, w: _layers.conv2d_matmul(x, w, (1, 1), "VALID", forward=fwd, input_grad=dx)


def _interleaved(fns: dict, args: tuple, repeats: int) -> dict[str, float]:
    compiled = {k: jax.jit(f).lower(*args).compile() for k, f in fns.items()}
    for c in compiled.values():
        jax.block_until_ready(c(*args))
    times = {k: [] for k in compiled}
    keys = list(compiled)
    for r in range(repeats):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[k](*args))
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}, compiled


def layers(variants, repeats, batch):
    parts = {
        "fwd": lambda f: lambda x, w, dy: f(x, w),
        "dx": lambda f: lambda x, w, dy: jax.vjp(lambda a: f(a, w), x)[1](dy)[0],
        "dW": lambda f: lambda x, w, dy: jax.vjp(lambda b: f(x, b), w)[1](dy)[0],
        "fwd+dx+dW": lambda f: lambda x, w, dy: jax.vjp(f, x, w)[1](dy),
    }
    out = {}
    for name, hw, cin in LAYERS:
        k = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(k[0], (batch, hw, hw, cin))
        w = 0.1 * jax.random.normal(k[1], (3, 3, cin, 64))
        dy = jax.random.normal(k[2], (batch, hw - 2, hw - 2, 64))
        for part, make in parts.items():
            if part == "dx" and cin == 1:
                continue  # the first layer's input gradient is never needed
            ms, compiled = _interleaved({v: make(_conv(v)) for v in variants}, (x, w, dy), repeats)
            ref = compiled["xla"](x, w, dy) if "xla" in compiled else None
            row = {}
            for v in variants:
                row[v] = {"ms": ms[v]}
                if ref is not None:
                    got = compiled[v](x, w, dy)
                    row[v]["rel_diff"] = max(
                        float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True)
                    )
            out[f"{name} {part}"] = row
            cells = "  ".join(
                f"{v} {r['ms']:6.1f}" + (f" ({r['rel_diff']:.0e})" if "rel_diff" in r else "")
                for v, r in row.items()
            )
            print(f"{name:20s} {part:10s} {cells}", flush=True)
    return out


def _timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median ms of zero-argument callables, interleaved round-robin after two warm-ups."""
    for f in fns.values():
        f(), f()
    times, keys = {k: [] for k in fns}, list(fns)
    for r in range(repeats):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _jax_blocks(x, w, b):
    """Layer-by-layer and fused block, forward and forward + backward, as callables."""

    def layers(x, w, b):
        z = _layers.conv2d_matmul(x, w, (1, 1), "VALID", forward="auto", input_grad="gemm") + b
        return _layers.max_pool_2x2(jax.nn.relu(z), "reshape", padding="VALID")

    def fused(x, w, b):
        return _fused.conv_relu_pool(x, w, b, "VALID", "VALID")

    out = {}
    for name, f in (("layers", layers), ("fused", fused)):

        def fwd_bwd(x, w, b, f=f):
            if x.shape[-1] == 1:  # the first layer: no input gradient
                y, vjp = jax.vjp(lambda w, b: f(x, w, b), w, b)
            else:
                y, vjp = jax.vjp(f, x, w, b)
            return vjp(y)

        for part, g in (("fwd", f), ("fwd+bwd", fwd_bwd)):
            c = jax.jit(g).lower(x, w, b).compile()
            out[f"{name} {part}"] = lambda c=c: jax.block_until_ready(c(x, w, b))
    return out


def _tf_blocks(x, w):
    import tensorflow as tf

    xt, wt, bt = tf.constant(x), tf.Variable(w), tf.Variable(tf.zeros(w.shape[-1]))

    def block(x):
        z = tf.nn.bias_add(tf.nn.conv2d(x, wt, 1, "VALID"), bt)
        return tf.nn.max_pool2d(tf.nn.relu(z), 2, 2, "VALID")

    @tf.function
    def fwd():
        return block(xt)

    @tf.function
    def fwd_bwd():
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = block(xt)
        wrt = [wt, bt] if x.shape[-1] == 1 else [xt, wt, bt]
        return tape.gradient(y, wrt, output_gradients=y)

    return {
        "tf fwd": lambda: fwd().numpy(),
        "tf fwd+bwd": lambda: [g.numpy() for g in fwd_bwd()],
    }


def blocks(repeats, batch, with_tf):
    out = {}
    for name, hw, cin in LAYERS[:2]:
        k = jax.random.split(jax.random.key(0), 2)
        x = jax.random.normal(k[0], (batch, hw, hw, cin))
        w = 0.1 * jax.random.normal(k[1], (3, 3, cin, 64))
        fns = _jax_blocks(x, w, jnp.zeros(64))
        if with_tf:
            fns.update(_tf_blocks(np.asarray(x), np.asarray(w)))
        out[name] = _timed(fns, repeats)
        cells = "  ".join(f"{k} {v:6.1f}" for k, v in out[name].items())
        print(f"{name:20s} {cells}", flush=True)
    return out


def model(impls, methods, repeats, steps):
    runners, fwd_bwd = [], {}
    for entry in impls:
        parts = entry.split(":")  # conv_impl[:dtype[:block_impl[:fold]]]
        impl, dtype, block, fold = parts + ["float32", "auto", "fold"][len(parts) - 1 :]
        if fold not in ("fold", "nofold"):
            raise ValueError(f"--impls entry {entry!r}: the fourth field is fold or nofold")
        model_kwargs = dict(benchmark.KERAS_ANCHOR_MODEL, block_impl=block, fold_bn=fold == "fold")
        args = benchmark.parse_args(
            ["--conv_impl", impl, "--dtype", dtype, "--batch_size", "512"]
            + ["--model_kwargs", json.dumps(model_kwargs)]
        )
        net, variables, batch = benchmark._setup(args)
        others = {k: v for k, v in variables.items() if k != "params"}

        def loss(params, batch, net=net, others=others):
            logits = net.apply(
                {"params": params, **others},
                batch["image"],
                train=True,
                mutable=list(others),
                rngs={"dropout": jax.random.key(0)},
            )[0]
            return losses.cross_entropy(logits, batch["label"])

        step = jax.jit(jax.value_and_grad(loss)).lower(variables["params"], batch).compile()
        fwd_bwd[entry] = (step, variables["params"], batch, [])
        for m in methods:
            r = benchmark._method_runner(m, net, variables, batch, args)
            r.name = f"{m} {entry}"
            r.run(1)
            runners.append(r)
    for step, params, batch, _ in fwd_bwd.values():
        jax.block_until_ready(step(params, batch))
    for i in range(repeats):
        for step, params, batch, ts in (
            fwd_bwd.values() if i % 2 == 0 else reversed(fwd_bwd.values())
        ):
            t0 = time.perf_counter()
            jax.block_until_ready(step(params, batch))
            ts.append(time.perf_counter() - t0)
        for r in runners if i % 2 == 0 else reversed(runners):
            r.timed(steps)
    out = {}
    for entry, (_, _, _, ts) in fwd_bwd.items():
        out[f"fwd+bwd {entry}"] = 1e3 * statistics.median(ts)
    first = {}  # method -> the first --impls entry's runner
    for r in runners:
        first.setdefault(r.name.split()[0], r)
    for r in runners:
        out[f"round_ratio {r.name}"] = r.round_ratio(first[r.name.split()[0]])
    for r in runners:
        out[f"step {r.name}"] = 1e3 * statistics.median(r.times)
        out[f"cpu_ms {r.name}"] = 1e3 * r.cpu_s / max(r.steps_timed, 1)
        out[f"cores_busy {r.name}"] = r.cpu_s / r.wall_s if r.wall_s else float("nan")
    for k, v in out.items():
        unit = "" if k.startswith(("cores_busy", "round_ratio")) else " ms"
        print(f"{k:40s} {v:8.2f}{unit}", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="layers,model")
    p.add_argument("--variants", default="xla,matmul,gemm_fwd,gemm_dx,gemm")
    p.add_argument("--impls", default="matmul,gemm")
    p.add_argument("--methods", default="base,sadt_t1")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=2, help="Model part: steps per round.")
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--with_tf", action="store_true", help="Blocks part: TensorFlow too.")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    keep_freed_memory()  # as benchmark.py and the training entry point
    results = {"loadavg_start": os.getloadavg()}
    for part in a.parts.split(","):
        if part == "layers":
            results["layers"] = layers(a.variants.split(","), a.repeats, a.batch_size)
        elif part == "blocks":
            results["blocks"] = blocks(a.repeats, a.batch_size, a.with_tf)
        elif part == "model":
            results["model"] = model(a.impls.split(","), a.methods.split(","), a.repeats, a.steps)
        else:
            p.error(f"unknown part {part!r}: use layers, blocks and/or model")
    results["loadavg_end"] = os.getloadavg()
    print(f"load average {results['loadavg_start'][0]:.1f} -> {results['loadavg_end'][0]:.1f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
