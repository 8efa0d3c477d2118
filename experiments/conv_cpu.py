r"""CPU timings of ``conv_impl`` ('xla' vs 'matmul') and ``pool_impl`` ('xla' vs 'reshape').

All variants of a table run in one process, interleaved round-robin (one call of each
variant per round, starting one variant later each round; ``--repeats`` rounds after
``--warmup`` untimed calls), so machine drift on a shared CPU hits them alike; the tables
report the median (and min) wall time with ``block_until_ready`` and XLA's static temp
memory (``memory_analysis()``).

Parts (``--parts``, comma-separated):

* ``layers``: one convolution at the simple CNN's shapes (and a few others), forward,
  input gradient, kernel gradient and both gradients (``jax.vjp``), 'xla' vs 'matmul';
* ``pools``: 2x2 max-pool forward + backward, ``nn.max_pool`` vs the reshape pool;
* ``model``: simple_cnn forward + backward (training-mode BatchNorm, cross-entropy,
  ``jax.value_and_grad`` over the parameters) at ``--batch_size`` on 28x28x1, for every
  (conv_impl, pool_impl) pair, and the largest gradient difference to ('xla', 'xla');
* ``chunks``: the same model step with conv 'matmul' for several
  ``_layers.CONV_CHUNK_BYTES`` (batch-chunk size of the im2col kernel gradient);
* ``steps``: parameters after ``--train_steps`` real training steps (``sadt_update`` with
  Adam, experiments/benchmark.py's setup) of each of ``--methods``, per implementation
  pair, compared leaf by leaf with ('xla', 'xla');
* ``train``: full training-step times of ``--methods`` with ('xla', 'xla') and
  ('matmul', 'reshape'), benchmark.py's runners, all in one round-robin
  (``--repeats`` rounds of ``--train_steps`` steps after ``--warmup`` steps).

Run::

    PYTHONPATH=. python experiments/conv_cpu.py --parts layers,pools,model --repeats 10
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sadt_jax import losses
from sadt_jax.models import _layers, get_model

DN = ("NHWC", "HWIO", "NHWC")

#: (name, batch, height, width, in, out, kernel, stride)
LAYERS = (
    ("simple_cnn conv1", 512, 28, 28, 1, 64, 3, 1),
    ("simple_cnn conv2", 512, 14, 14, 64, 64, 3, 1),
    ("simple_cnn conv3", 512, 7, 7, 64, 64, 3, 1),
    ("profile layer 28x28 64->64", 512, 28, 28, 64, 64, 3, 1),
    ("CIFAR stem 32x32 3->64", 512, 32, 32, 3, 64, 3, 1),
    ("3x3 stride 2, 16x16 64->128", 512, 16, 16, 64, 128, 3, 2),
    ("1x1 stride 2, 16x16 64->128", 512, 16, 16, 64, 128, 1, 2),
)
POOLS = ((512, 28, 28, 64), (512, 14, 14, 64), (512, 7, 7, 64))


def _time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int):
    """Median / min ms per variant, calls interleaved round-robin."""
    for _ in range(warmup):
        for f in fns.values():
            jax.block_until_ready(f())
    times = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeats):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:  # rotate the order
            f = fns[k]
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(1e3 * (time.perf_counter() - t0))
    return {
        k: {"median_ms": statistics.median(v), "min_ms": min(v), "all_ms": v}
        for k, v in times.items()
    }


def _temp_mb(compiled) -> float:
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def _xla_conv(x, w, stride):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=DN)


def _matmul_conv(x, w, stride):
    return _layers.conv2d_matmul(x, w, (stride, stride), "SAME")


def layers_part(args) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for name, b, h, w_, cin, cout, k, s in LAYERS:
        x = jnp.asarray(rng.standard_normal((b, h, w_, cin)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
        y_shape = jax.eval_shape(lambda x, w, s=s: _xla_conv(x, w, s), x, w).shape
        dy = jnp.asarray(rng.standard_normal(y_shape), jnp.float32)
        fns, compiled, out = {}, {}, {}
        for impl, conv in (("xla", _xla_conv), ("matmul", _matmul_conv)):
            conv = functools.partial(conv, stride=s)
            parts = {
                "forward": lambda x, w, dy, conv=conv: conv(x, w),
                "input_grad": lambda x, w, dy, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](dy),
                "kernel_grad": lambda x, w, dy, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](dy),
                "both_grads": lambda x, w, dy, conv=conv: jax.vjp(conv, x, w)[1](dy),
            }
            for part, f in parts.items():
                c = jax.jit(f).lower(x, w, dy).compile()
                compiled[(impl, part)] = c
                fns[(impl, part)] = functools.partial(c, x, w, dy)
                if part == "both_grads":
                    out[impl] = c(x, w, dy)
        t = _time_interleaved({f"{i}/{p}": f for (i, p), f in fns.items()}, args.repeats, 1)
        flop = 2 * int(np.prod(y_shape)) * k * k * cin
        diffs = {}
        for idx, label in ((0, "input_grad"), (1, "kernel_grad")):
            a, r = np.asarray(out["matmul"][idx]), np.asarray(out["xla"][idx])
            diffs[label] = float(np.max(np.abs(a - r)) / np.max(np.abs(r)))
        row = {"layer": name, "shape": [b, h, w_, cin, cout, k, s], "gflop_per_pass": flop / 1e9}
        for (impl, part), c in compiled.items():
            m = t[f"{impl}/{part}"]
            row[f"{impl}/{part}_ms"] = m["median_ms"]
            row[f"{impl}/{part}_min_ms"] = m["min_ms"]
            row[f"{impl}/{part}_temp_mb"] = _temp_mb(c)
        row["max_rel_diff"] = diffs
        rows.append(row)
        print(
            f"{name:32s} kernel grad xla {row['xla/kernel_grad_ms']:7.1f} ms, matmul "
            f"{row['matmul/kernel_grad_ms']:7.1f} ms; both grads xla "
            f"{row['xla/both_grads_ms']:7.1f}, matmul {row['matmul/both_grads_ms']:7.1f} ms; "
            f"rel diff {diffs}",
            flush=True,
        )
    return rows


def pools_part(args) -> list[dict]:
    rows = []
    rng = np.random.default_rng(1)

    def xla_pool(x):
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")

    def reshape_pool(x):
        return _layers.max_pool_2x2(x, "reshape")

    for shape in POOLS:
        # ReLU-like input: many exact zeros, hence ties.
        x = jnp.asarray(np.maximum(rng.standard_normal(shape), 0), jnp.float32)
        dy = jnp.asarray(rng.standard_normal(jax.eval_shape(xla_pool, x).shape), jnp.float32)
        fns, compiled, outs = {}, {}, {}
        for impl, pool in (("xla", xla_pool), ("reshape", reshape_pool)):
            for part, f in {
                "forward": lambda x, dy, pool=pool: pool(x),
                "forward_backward": lambda x, dy, pool=pool: jax.vjp(pool, x)[1](dy),
            }.items():
                c = jax.jit(f).lower(x, dy).compile()
                compiled[f"{impl}/{part}"] = c
                fns[f"{impl}/{part}"] = functools.partial(c, x, dy)
            outs[impl] = compiled[f"{impl}/forward_backward"](x, dy)
        t = _time_interleaved(fns, args.repeats, 1)
        row = {"shape": list(shape)}
        for k, c in compiled.items():
            row[f"{k}_ms"] = t[k]["median_ms"]
            row[f"{k}_temp_mb"] = _temp_mb(c)
        row["grads_identical"] = bool(jnp.array_equal(outs["xla"][0], outs["reshape"][0]))
        rows.append(row)
        print(
            f"pool {shape}: fwd+bwd xla {row['xla/forward_backward_ms']:.1f} ms, reshape "
            f"{row['reshape/forward_backward_ms']:.1f} ms, identical {row['grads_identical']}",
            flush=True,
        )
    return rows


def _model_step(conv_impl: str, pool_impl: str, batch_size: int):
    model = get_model("simple_cnn", 10, conv_impl=conv_impl, pool_impl=pool_impl)
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch_size, 28, 28, 1))
    y = jax.random.randint(ky, (batch_size,), 0, 10)
    variables = jax.jit(lambda k: model.init(k, x[:1], train=False))(kp)

    def loss(params, batch_stats, x, y):
        logits, _ = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return losses.cross_entropy(logits, y)

    step = jax.jit(jax.value_and_grad(loss))
    args = (variables["params"], variables["batch_stats"], x, y)
    compiled = step.lower(*args).compile()
    return compiled, args


def model_part(args) -> list[dict]:
    variants = [("xla", "xla"), ("matmul", "xla"), ("xla", "reshape"), ("matmul", "reshape")]
    compiled, fns, outs = {}, {}, {}
    for conv_impl, pool_impl in variants:
        key = f"conv={conv_impl},pool={pool_impl}"
        c, a = _model_step(conv_impl, pool_impl, args.batch_size)
        compiled[key] = c
        fns[key] = functools.partial(c, *a)
        outs[key] = c(*a)
    t = _time_interleaved(fns, args.repeats, args.warmup)
    ref_loss, ref_grads = outs["conv=xla,pool=xla"]
    rows = []
    for key, c in compiled.items():
        loss_val, grads = outs[key]
        diff = max(
            float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True)
        )
        rows.append(
            {
                "variant": key,
                "median_ms": t[key]["median_ms"],
                "min_ms": t[key]["min_ms"],
                "all_ms": t[key]["all_ms"],
                "temp_mb": _temp_mb(c),
                "loss_abs_diff": float(abs(loss_val - ref_loss)),
                "max_leaf_rel_grad_diff": diff,
            }
        )
        print(
            f"{key:28s} median {t[key]['median_ms']:8.1f} ms (min {t[key]['min_ms']:.1f}), temp "
            f"{_temp_mb(c):.0f} MB, max rel grad diff {diff:.1e}",
            flush=True,
        )
    return rows


def chunks_part(args) -> list[dict]:
    sizes = [int(float(v) * 2**20) for v in args.chunk_mib.split(",")]
    default = _layers.CONV_CHUNK_BYTES
    fns, compiled = {}, {}
    try:
        for size in sizes:
            _layers.CONV_CHUNK_BYTES = size
            key = f"{size / 2**20:g} MiB"
            c, a = _model_step("matmul", "reshape", args.batch_size)
            compiled[key], fns[key] = c, functools.partial(c, *a)
    finally:
        _layers.CONV_CHUNK_BYTES = default
    t = _time_interleaved(fns, args.repeats, args.warmup)
    rows = []
    for key, c in compiled.items():
        rows.append({"chunk": key, "median_ms": t[key]["median_ms"], "temp_mb": _temp_mb(c)})
        print(f"chunk {key:12s} median {t[key]['median_ms']:8.1f} ms, temp {_temp_mb(c):.0f} MB")
    return rows


def steps_part(args) -> list[dict]:
    """Parameters after ``--train_steps`` real ``sadt_update`` steps (Adam), per impl pair."""
    from experiments import benchmark  # the benchmark's exact model, batch and step

    # Last variant: ('xla', 'xla') on images changed by one float32 ulp: the effect that
    # round-off alone has on the parameters after a few Adam steps.
    variants = [("xla", "xla"), ("matmul", "xla"), ("matmul", "reshape"), ("xla", "xla+ulp")]
    rows, params = [], {}
    for method in args.methods.split(","):
        for conv_impl, pool_impl in variants:
            bargs = benchmark.parse_args(
                [
                    f"--batch_size={args.batch_size}",
                    f"--conv_impl={conv_impl}",
                    f"--pool_impl={pool_impl.removesuffix('+ulp')}",
                    f"--methods={method}",
                ]
            )
            model, variables, batch = benchmark._setup(bargs)
            if pool_impl.endswith("+ulp"):
                batch = {**batch, "image": jnp.nextafter(batch["image"], jnp.inf)}
            runner = benchmark._method_runner(method, model, variables, batch, bargs)
            runner.run(args.train_steps)
            params[(method, conv_impl, pool_impl)] = jax.device_get(runner.carry[0].params)
        ref = params[(method, "xla", "xla")]
        for conv_impl, pool_impl in variants[1:]:
            got = params[(method, conv_impl, pool_impl)]
            flat_ref = traverse_util.flatten_dict(ref, sep="/")
            flat_got = traverse_util.flatten_dict(got, sep="/")
            per_leaf = {k: float(np.max(np.abs(flat_got[k] - v))) for k, v in flat_ref.items()}
            worst = max(per_leaf, key=per_leaf.get)
            row = {
                "method": method,
                "variant": f"conv={conv_impl},pool={pool_impl}",
                "steps": args.train_steps,
                "max_abs_diff": per_leaf[worst],
                "worst_leaf": worst,
                "max_abs_param": max(float(np.max(np.abs(v))) for v in flat_ref.values()),
                "max_abs_diff_per_leaf": per_leaf,
            }
            rows.append(row)
            print(
                f"{method} {row['variant']}: max abs param diff after {args.train_steps} steps "
                f"{row['max_abs_diff']:.2e} (at {worst}); top leaves "
                f"{sorted(per_leaf.items(), key=lambda kv: -kv[1])[:4]}",
                flush=True,
            )
    return rows


def train_part(args) -> list[dict]:
    """Full training steps (benchmark.py's runners), every (method, impl) in one process."""
    from experiments import benchmark

    runners = []
    for method in args.methods.split(","):
        for conv_impl, pool_impl in (("xla", "xla"), ("matmul", "reshape")):
            bargs = benchmark.parse_args(
                [
                    f"--batch_size={args.batch_size}",
                    f"--conv_impl={conv_impl}",
                    f"--pool_impl={pool_impl}",
                    f"--methods={method}",
                ]
            )
            model, variables, batch = benchmark._setup(bargs)
            r = benchmark._method_runner(method, model, variables, batch, bargs)
            r.name = f"{method} conv={conv_impl},pool={pool_impl}"
            r.run(args.warmup)
            runners.append(r)
    benchmark._round_robin(runners, args.train_steps, args.repeats)
    rows = []
    for r in runners:
        rows.append(
            {
                "variant": r.name,
                "median_ms": 1e3 * statistics.median(r.times),
                "min_ms": 1e3 * min(r.times),
                "per_repeat_ms": [1e3 * t for t in r.per_repeat],
                "num_timed_steps": len(r.times),
                "temp_mb": _temp_mb(r.compiled),
                "cores_busy": r.cpu_s / r.wall_s,
            }
        )
        print(
            f"{r.name:36s} median {rows[-1]['median_ms']:8.1f} ms (min {rows[-1]['min_ms']:.1f},"
            f" {len(r.times)} steps), temp {rows[-1]['temp_mb']:.0f} MB, "
            f"cores busy {rows[-1]['cores_busy']:.2f}",
            flush=True,
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="layers,pools,model")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument(
        "--chunk_mib",
        default="0.25,0.5,1,2,4,8,16,1e6",
        help="CONV_CHUNK_BYTES values (MiB) for the chunks part; 1e6: the whole batch.",
    )
    p.add_argument("--methods", default="base,sadt_t1", help="Methods for the steps part.")
    p.add_argument("--train_steps", type=int, default=3, help="Steps for the steps part.")
    p.add_argument("--out", default=None, help="Write the results as JSON here.")
    args = p.parse_args(argv)
    results = {"loadavg_start": os.getloadavg()}
    parts = {
        "layers": layers_part,
        "pools": pools_part,
        "model": model_part,
        "chunks": chunks_part,
        "steps": steps_part,
        "train": train_part,
    }
    for part in args.parts.split(","):
        results[part] = parts[part](args)
    results["loadavg_end"] = os.getloadavg()
    results["jax"] = jax.__version__
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
