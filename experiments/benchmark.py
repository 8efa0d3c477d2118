r"""Step-time benchmark of SADT and its baselines, in one process.

Every method runs the same model, the same initial weights and the same batch,
already on the device, through the real training step::

    config = sadt_jax.method_config(method)          # (+ t2_paths for sadt_t2)
    state = TrainState.create(apply_fn=model.apply, variables=..., tx=make_optimizer(method))
    step = jax.jit(functools.partial(sadt_update, config=config), donate_argnums=0)

and reports, per method:

* ``step_ms``: median wall time of one step (``block_until_ready`` after each),
  over ``--repeats`` x ``--steps`` timed steps after ``--warmup`` untimed ones;
  with ``--pipelined``, the median over repeats of (time of ``--steps`` steps
  dispatched back to back, one sync at the end) / ``--steps``: throughput, which
  is what matters on an accelerator, where a step takes about a millisecond.
  The methods are interleaved round-robin across repeats, so machine drift hits
  all of them alike; ``ratio_to_base`` is computed within this run.
* ``compile_s``: ``jit(...).lower(...)`` plus ``.compile()`` wall time.
* ``peak_mem_mb``: the process high-water mark right after the method's warm-up
  (device ``memory_stats()["peak_bytes_in_use"]`` where the backend has it, else
  the process max RSS from ``resource.getrusage``; ``_meta.peak_mem_source`` says
  which). It is cumulative: methods are warmed up in the order given. The
  per-method ``xla_temp_mb`` / ``xla_total_mb`` come from XLA's static
  ``memory_analysis()`` of the compiled step.
* ``images_per_s``, ``gflop_per_step`` (XLA ``cost_analysis()``),
  ``achieved_tflops`` (and ``mfu`` against ``--peak_tflops``), and
  ``cpu_cores_busy`` (process CPU time / wall time while timing).

Extras: ``--compare_optax_sam`` times ``optax.chain(sadt_jax.sam(0.05), adam)``
against ``optax.contrib.sam(adam, chain(normalize(), sgd(0.05)), opaque_mode=True)``
in the same plain jitted step; ``--breakdown`` times the base step's parts
(forward, forward + backward, full step); ``--params_out`` / ``--params_ref``
save and compare each method's parameters after ``--params_steps`` steps (to
check that an XLA flag leaves results unchanged).

Run (the issue's targets: sam <= 2.05 x base, sadt_t1 and sadt_t3 <= 2.15,
sadt_t2 <= 3.2, our sam no slower than optax.contrib.sam)::

    PYTHONPATH=. python experiments/benchmark.py --batch_size 512 --steps 10 \
        --repeats 2 --compare_optax_sam --out results/benchmark.json

    # XLA:CPU with oneDNN convolutions (set before JAX starts):
    XLA_FLAGS="--xla_cpu_use_thunk_runtime=false --xla_cpu_use_onednn=true" \
        PYTHONPATH=. python experiments/benchmark.py --methods base
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import sadt_jax
from sadt_jax import losses
from sadt_jax.models import get_model, t2_teacher_paths

DEFAULT_METHODS = ("base", "sam", "sadt_t1", "sadt_t2", "sadt_t3", "sadt_ema")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The simple CNN in the release's layout, as the Keras anchor builds it.
KERAS_ANCHOR_MODEL = {"release_layout": True, "dropout_rate": 0.3}
KERAS_SKIPPED = (
    "Keras anchor skipped: TensorFlow is not installed (`pip install tensorflow-cpu` to compare)"
)

#: Step-time targets (ratio to base) from the "Performance" issue.
TARGETS = {"sam": 2.05, "sadt_t1": 2.15, "sadt_t3": 2.15, "sadt_t2": 3.2}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line (``argv`` without the program name)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="simple_cnn")
    p.add_argument("--dataset_shape", default="28,28,1", help="H,W,C of the images (NHWC batches).")
    p.add_argument("--num_classes", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="Timed steps per method per repeat.")
    p.add_argument("--warmup", type=int, default=2, help="Untimed steps after compiling.")
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="Round-robin rounds over the methods; each times --steps steps per method.",
    )
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help="Comma-separated method names."
    )
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    p.add_argument(
        "--conv_impl",
        choices=("auto", "xla", "matmul", "gemm"),
        default="auto",
        help="Model conv_impl ('auto': 'gemm' on CPU, XLA's elsewhere; 'matmul': only the "
        "kernel gradient by GEMMs).",
    )
    p.add_argument(
        "--pool_impl",
        choices=("auto", "xla", "reshape"),
        default="auto",
        help="Model pool_impl (simple_cnn, vgg16_bn; passed only when not 'auto').",
    )
    p.add_argument(
        "--model_kwargs",
        default="{}",
        help='Extra model attributes as JSON, e.g. \'{"depth": 10, "widen_factor": 1}\'.',
    )
    p.add_argument(
        "--keep_freed_memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="glibc malloc keeps freed memory for reuse (sadt_jax.main.keep_freed_memory, as "
        "the training entry point does); --no-keep_freed_memory for the glibc default.",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="Write the results as JSON to this path.")
    p.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="Peak TFLOP/s of the device, for the model-FLOPs utilisation column.",
    )
    p.add_argument(
        "--compare_optax_sam",
        action="store_true",
        help="Also time sadt_jax.sam against optax.contrib.sam (opaque mode).",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="Also time forward, forward+backward and the full base step.",
    )
    p.add_argument(
        "--params_out", default=None, help="Save each method's params after --params_steps (npz)."
    )
    p.add_argument(
        "--params_ref",
        default=None,
        help="Compare each method's params after --params_steps with this npz.",
    )
    p.add_argument("--params_steps", type=int, default=3)
    p.add_argument(
        "--pipelined",
        action="store_true",
        help="Time each repeat's --steps steps as one block (dispatched back to back, one sync "
        "at the end: throughput, as a training loop runs) instead of one sync per step.",
    )
    p.add_argument(
        "--compare_keras",
        action="store_true",
        help="Only time base and sadt_t1 on the release's simple CNN against the same network "
        "in tf.keras (experiments/keras_anchor.py), in separate processes, alternated.",
    )
    p.add_argument("--keras_rounds", type=int, default=3, help="Rounds of --compare_keras.")
    p.add_argument(
        "--keras_md",
        default=os.path.join(_REPO, "results", "benchmark_keras.md"),
        help="Where --compare_keras writes its Markdown table.",
    )
    args = p.parse_args(argv)
    args.shape = tuple(int(s) for s in args.dataset_shape.split(","))
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        args.model_kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as e:
        p.error(f"--model_kwargs is not JSON ({e}): pass an object, e.g. '{{\"depth\": 10}}'")
    if not isinstance(args.model_kwargs, dict):
        p.error("--model_kwargs must be a JSON object, e.g. '{\"depth\": 10}'")
    for m in args.method_list:
        if m not in sadt_jax.METHODS:
            p.error(f"unknown method {m!r}; valid: {', '.join(sadt_jax.METHODS)}")
    if args.keras_rounds < 1:
        p.error("--keras_rounds must be >= 1")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--steps, --repeats and --batch_size must be >= 1, --warmup >= 0")
    return args


# ---- measurement helpers ----------------------------------------------------------


def _peak_memory_mb() -> tuple[float, str]:
    """Process high-water mark: device peak bytes if the backend reports it, else max RSS."""
    dev = jax.devices()[0]
    stats = None
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None.
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20, "device memory_stats()['peak_bytes_in_use']"
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS (getrusage)"


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cost(compiled) -> dict[str, float]:
    """FLOPs and bytes accessed from XLA's cost analysis (dict or list of dicts)."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return {}
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return {k: float(ca[k]) for k in ("flops", "bytes accessed") if ca and k in ca}


def _memory_analysis(compiled) -> dict[str, float]:
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return {}
    if ma is None:
        return {}
    mb = 2**20
    total = (
        ma.argument_size_in_bytes
        + ma.output_size_in_bytes
        + ma.temp_size_in_bytes
        - ma.alias_size_in_bytes
    )
    return {"xla_temp_mb": ma.temp_size_in_bytes / mb, "xla_total_mb": total / mb}


def _compile(fn: Callable, *args, compiler_options: dict | None = None) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile(compiler_options=compiler_options)
    return compiled, time.perf_counter() - t0


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


class _Runner:
    """A compiled step plus its (donated) carry; ``run(n)`` returns per-step seconds."""

    def __init__(self, name: str, jitted, carry: tuple, batch, compiler_options=None):
        self.name = name
        self.batch = batch
        self.compiled, self.compile_s = _compile(
            jitted, *carry, batch, compiler_options=compiler_options
        )
        self.carry = carry
        self.last_out = None
        self.times: list[float] = []
        self.per_repeat: list[float] = []
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self.steps_timed = 0

    def run(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            *carry, aux = self.compiled(*self.carry, self.batch)
            jax.block_until_ready((carry, aux))
            out.append(time.perf_counter() - t0)
            self.carry, self.last_out = tuple(carry), aux
        return out

    def run_pipelined(self, n: int) -> list[float]:
        """``n`` steps dispatched back to back, one sync at the end: ``[mean seconds]``."""
        t0 = time.perf_counter()
        for _ in range(n):
            *carry, aux = self.compiled(*self.carry, self.batch)
            self.carry, self.last_out = tuple(carry), aux
        jax.block_until_ready((self.carry, self.last_out))
        return [(time.perf_counter() - t0) / n]

    def timed(self, n: int, pipelined: bool = False) -> None:
        c0, w0 = _cpu_seconds(), time.perf_counter()
        t = self.run_pipelined(n) if pipelined else self.run(n)
        self.steps_timed += n
        self.cpu_s += _cpu_seconds() - c0
        self.wall_s += time.perf_counter() - w0
        self.times.extend(t)
        self.per_repeat.append(statistics.median(t))

    def round_ratio(self, reference: _Runner) -> float:
        """Median over rounds of this runner's round median over ``reference``'s.

        Rounds interleave the runners, so a load change hits both sides of a ratio alike:
        the figure to compare variants by on a shared machine.
        """
        ratios = [a / b for a, b in zip(self.per_repeat, reference.per_repeat, strict=True)]
        return statistics.median(ratios)


def _round_robin(
    runners: Sequence[_Runner], steps: int, repeats: int, pipelined: bool = False
) -> None:
    """``steps`` timed steps per runner per repeat; the order reverses every repeat
    (A B C, C B A, ...) so no method always runs first or after the same neighbour."""
    for i in range(repeats):
        for r in runners if i % 2 == 0 else reversed(runners):
            r.timed(steps, pipelined)


# ---- the benchmark -----------------------------------------------------------------


def _setup(args):
    impls = {"conv_impl": args.conv_impl, **args.model_kwargs}
    if args.pool_impl != "auto":
        impls["pool_impl"] = args.pool_impl
    model = get_model(args.model, args.num_classes, dtype=_DTYPES[args.dtype], **impls)
    k_init, k_x, k_y = jax.random.split(jax.random.key(args.seed), 3)
    images = jax.random.normal(k_x, (args.batch_size, *args.shape), jnp.float32)
    labels = jax.random.randint(k_y, (args.batch_size,), 0, args.num_classes)
    batch = jax.device_put({"image": images, "label": labels})
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(k_init, images[:1])
    variables = jax.block_until_ready(variables)
    return model, variables, batch


def _method_runner(name, model, variables, batch, args, compiler_options=None) -> _Runner:
    overrides = {}
    if name == "sadt_t2" or sadt_jax.METHODS[name].teachers == "t2":
        overrides["t2_paths"] = t2_teacher_paths(args.model)
    config = sadt_jax.method_config(name, **overrides)
    state = sadt_jax.TrainState.create(
        apply_fn=model.apply,
        variables=_copy(variables),  # Donation would delete buffers shared between methods.
        tx=sadt_jax.make_optimizer(name),
        key=jax.random.key(args.seed + 1),
        ema_teacher=config.uses_ema,
    )
    step = jax.jit(functools.partial(sadt_jax.sadt_update, config=config), donate_argnums=0)
    return _Runner(name, step, (state,), batch, compiler_options)


def _stats(r: _Runner, batch_size: int, peak_tflops: float | None) -> dict[str, Any]:
    med = statistics.median(r.times)
    q = np.percentile(r.times, [25, 75]) if len(r.times) > 1 else [med, med]
    out = {
        "step_ms": 1e3 * med,
        "step_ms_min": 1e3 * min(r.times),
        "step_ms_iqr": 1e3 * float(q[1] - q[0]),
        "step_ms_per_repeat": [1e3 * t for t in r.per_repeat],
        "num_timed_steps": r.steps_timed,
        "compile_s": r.compile_s,
        "images_per_s": batch_size / med,
        "cpu_cores_busy": r.cpu_s / r.wall_s if r.wall_s else None,
    }
    cost = _cost(r.compiled)
    if "flops" in cost:
        out["gflop_per_step"] = cost["flops"] / 1e9
        out["achieved_tflops"] = cost["flops"] / med / 1e12
        if peak_tflops:
            out["mfu"] = out["achieved_tflops"] / peak_tflops
    out.update(_memory_analysis(r.compiled))
    return out


def _optax_sam_comparison(model, variables, batch, args) -> dict[str, Any]:
    """sadt_jax.sam vs optax.contrib.sam (opaque) in the same plain jitted step.

    BatchNorm is handled identically: both losses normalise with the batch's
    statistics (training mode) and discard the statistics' updates.
    """
    others = {k: v for k, v in variables.items() if k != "params"}
    mutable = list(others)

    def loss(params, batch):
        v = {"params": params, **others}
        if mutable:
            logits, _ = model.apply(v, batch["image"], train=True, mutable=mutable)
        else:
            logits = model.apply(v, batch["image"], train=True)
        return losses.cross_entropy(logits, batch["label"])

    ours = optax.chain(sadt_jax.sam(0.05), optax.adam(1e-4))
    theirs = optax.contrib.sam(
        optax.adam(1e-4),
        optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
        opaque_mode=True,
    )

    def make_step(tx, two_arg_grad_fn):
        def step(params, opt_state, batch):
            value, g = jax.value_and_grad(loss)(params, batch)
            if two_arg_grad_fn:
                grad_fn = jax.grad(lambda p, _: loss(p, batch))
            else:
                grad_fn = jax.grad(lambda p: loss(p, batch))
            updates, opt_state = tx.update(g, opt_state, params, grad_fn=grad_fn)
            return optax.apply_updates(params, updates), opt_state, value

        return jax.jit(step, donate_argnums=(0, 1))

    runners = []
    for name, tx, two in (("sadt_jax.sam", ours, False), ("optax.contrib.sam", theirs, True)):
        params = _copy(variables["params"])
        runners.append(_Runner(name, make_step(tx, two), (params, tx.init(params)), batch))
    # Same result after one step (a correctness check of the comparison itself).
    first = []
    for r in runners:
        r.run(1)
        first.append(np.asarray(ravel_pytree(r.carry[0])[0]))
    for r in runners:
        r.run(args.warmup)
    _round_robin(runners, args.steps, args.repeats)
    a, b = (statistics.median(r.times) for r in runners)
    costs = [_cost(r.compiled) for r in runners]
    return {
        "ours_xla_cost": costs[0],
        "optax_xla_cost": costs[1],
        "ours_step_ms": 1e3 * a,
        "optax_step_ms": 1e3 * b,
        "ratio_ours_to_optax": a / b,
        "ratio_per_repeat": [x / y for x, y in zip(*(r.per_repeat for r in runners), strict=True)],
        "ours_compile_s": runners[0].compile_s,
        "optax_compile_s": runners[1].compile_s,
        "max_abs_param_diff_after_1_step": float(np.max(np.abs(first[0] - first[1]))),
        "bn": "training-mode batch statistics in both losses; running-stat updates discarded",
    }


def _breakdown(model, variables, batch, args) -> dict[str, float]:
    """Median ms of the base step's parts on the benchmark batch."""
    others = {k: v for k, v in variables.items() if k != "params"}
    mutable = list(others)

    def forward(params, batch):
        v = {"params": params, **others}
        if mutable:
            return model.apply(v, batch["image"], train=True, mutable=mutable)[0]
        return model.apply(v, batch["image"], train=True)

    def loss(params, batch):
        return losses.cross_entropy(forward(params, batch), batch["label"])

    def eval_forward(params, batch):
        return model.apply({"params": params, **others}, batch["image"], train=False)

    fns = {
        "forward_eval_ms": jax.jit(eval_forward),
        "forward_train_ms": jax.jit(forward),
        "forward_backward_ms": jax.jit(jax.value_and_grad(loss)),
    }
    params = variables["params"]
    out = {}
    for name, fn in fns.items():
        compiled, _ = _compile(fn, params, batch)
        jax.block_until_ready(compiled(params, batch))
        ts = []
        for _ in range(max(args.steps, 3)):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, batch))
            ts.append(time.perf_counter() - t0)
        out[name] = 1e3 * statistics.median(ts)
        cost = _cost(compiled)
        if "flops" in cost:
            out[name.replace("_ms", "_gflop")] = cost["flops"] / 1e9
    return out


def _git_commit() -> str | None:
    """``HEAD``'s short hash, with ``+dirty`` when tracked files have uncommitted changes."""

    def git(*cmd):
        return subprocess.run(
            ["git", *cmd],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except Exception:  # noqa: BLE001
        return None


def _meta(args, argv, peak_source) -> dict[str, Any]:
    dev = jax.devices()[0]
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    import jaxlib

    return {
        "machine": {
            "hostname": platform.node(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": affinity,
            "backend": jax.default_backend(),
            "device": str(dev),
            "device_kind": dev.device_kind,
            "num_devices": jax.device_count(),
        },
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "numpy": np.__version__,
            "sadt_jax": sadt_jax.__version__,
        },
        "command": shlex.join([sys.executable, sys.argv[0], *argv]),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "git_commit": _git_commit(),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {
            "model": args.model,
            "dataset_shape": list(args.shape),
            "num_classes": args.num_classes,
            "batch_size": args.batch_size,
            "dtype": args.dtype,
            "conv_impl": args.conv_impl,
            "pool_impl": args.pool_impl,
            "keep_freed_memory": args.keep_freed_memory and __name__ == "__main__",
            "model_kwargs": args.model_kwargs,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "pipelined": args.pipelined,
            "methods": args.method_list,
        },
        "peak_mem_source": peak_source,
        "peak_mem_note": "process high-water mark after each method's warm-up, methods "
        "warmed up in the order listed (cumulative); see xla_temp_mb for per-method",
    }


def markdown_table(results: dict[str, Any]) -> str:
    """The results as a Markdown table, ratios to base within the run."""
    rows = [
        "| method | step ms (median) | ratio to base | target | images/s | compile s "
        "| peak mem MB | XLA temp MB | GFLOP/step | cores busy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x, fmt):
        return "–" if x is None else format(x, fmt)

    for name, r in results.items():
        if name.startswith("_"):
            continue
        target = TARGETS.get(name)
        ratio = r.get("ratio_to_base")
        tcell = "–"
        if target is not None:
            tcell = f"≤ {target:g}" + ("" if ratio is None else (" ✓" if ratio <= target else " ✗"))
        rows.append(
            f"| {name} | {r['step_ms']:.1f} | {f(ratio, '.2f')} | {tcell} "
            f"| {r['images_per_s']:.0f} | {r['compile_s']:.1f} | {r['peak_mem_mb']:.0f} "
            f"| {f(r.get('xla_temp_mb'), '.0f')} | {f(r.get('gflop_per_step'), '.2f')} "
            f"| {f(r.get('cpu_cores_busy'), '.2f')} |"
        )
    lines = ["\n".join(rows)]
    if "_optax_sam" in results:
        o = results["_optax_sam"]
        lines.append(
            "\n| SAM step (plain jitted step) | step ms (median) |\n|---|---|\n"
            f"| sadt_jax.sam + adam | {o['ours_step_ms']:.1f} |\n"
            f"| optax.contrib.sam (opaque) + adam | {o['optax_step_ms']:.1f} |\n"
            f"| ratio ours / optax | {o['ratio_ours_to_optax']:.3f} |\n"
            "| ratio per repeat | " + ", ".join(f"{x:.3f}" for x in o["ratio_per_repeat"]) + " |"
        )
        oc, tc = o.get("ours_xla_cost", {}), o.get("optax_xla_cost", {})
        if "flops" in oc and "flops" in tc:
            lines.append(
                f"| XLA GFLOP / GB accessed, ours | {oc['flops'] / 1e9:.3f} / "
                f"{oc.get('bytes accessed', 0) / 1e9:.3f} |\n"
                f"| XLA GFLOP / GB accessed, optax | {tc['flops'] / 1e9:.3f} / "
                f"{tc.get('bytes accessed', 0) / 1e9:.3f} |"
            )
    if "_teacher_every" in results:
        te = results["_teacher_every"]
        lines.append(
            "\n| sadt_t1, teachers every k steps | ms per step (amortized) | ratio to base |\n"
            "|---|---|---|\n"
            + "\n".join(
                f"| k={k} | {v['step_ms']:.1f} | {v['ratio_to_base']:.2f} |" for k, v in te.items()
            )
            + "\n\n(derived: ((k - 1) x the base step + 1 x the sadt_t1 step) / k, from the "
            "medians above; the loop runs the two jitted steps as they are timed here)"
        )
    if "_breakdown" in results:
        b = results["_breakdown"]
        lines.append(
            "\n| base step part | ms (median) |\n|---|---|\n"
            + "\n".join(f"| {k[:-3]} | {v:.1f} |" for k, v in b.items() if k.endswith("_ms"))
        )
    return "\n".join(lines)


def run(args: argparse.Namespace, argv: Sequence[str] = ()) -> dict[str, Any]:
    """Runs the benchmark described by ``args``; returns the results dict."""
    model, variables, batch = _setup(args)
    runners = [_method_runner(m, model, variables, batch, args) for m in args.method_list]

    # Warm-up (and the params dump / check), one method at a time, in order.
    peak, params_after, peak_source = {}, {}, None
    for r in runners:
        n_warm = max(args.warmup, args.params_steps if (args.params_out or args.params_ref) else 0)
        for i in range(n_warm):
            r.run(1)
            if i + 1 == args.params_steps:
                params_after[r.name] = np.asarray(ravel_pytree(r.carry[0].params)[0])
        peak[r.name], peak_source = _peak_memory_mb()

    _round_robin(runners, args.steps, args.repeats, args.pipelined)

    results: dict[str, Any] = {}
    for r in runners:
        results[r.name] = _stats(r, args.batch_size, args.peak_tflops)
        results[r.name]["peak_mem_mb"] = peak[r.name]
        results[r.name]["final_loss"] = float(r.last_out["loss"])
    if "base" in results:
        base = results["base"]
        for res in results.values():
            res["ratio_to_base"] = res["step_ms"] / base["step_ms"]
            res["ratio_to_base_per_repeat"] = [
                a / b
                for a, b in zip(res["step_ms_per_repeat"], base["step_ms_per_repeat"], strict=True)
            ]
    else:
        for res in results.values():
            res["ratio_to_base"] = None
    if "base" in results and "sadt_t1" in results:
        b, t1 = results["base"]["step_ms"], results["sadt_t1"]["step_ms"]
        results["_teacher_every"] = {
            str(k): {"step_ms": ((k - 1) * b + t1) / k, "ratio_to_base": ((k - 1) * b + t1) / k / b}
            for k in (1, 2, 4, 8)
        }
    del runners  # Free the donated states before the extras.

    if args.compare_optax_sam:
        results["_optax_sam"] = _optax_sam_comparison(model, variables, batch, args)
    if args.breakdown:
        results["_breakdown"] = _breakdown(model, variables, batch, args)
    if args.params_out:
        np.savez(args.params_out, **params_after)
    if args.params_ref:
        ref = np.load(args.params_ref)
        check = {}
        for name, p in params_after.items():
            if name in ref:
                diff = np.abs(p - ref[name])
                check[name] = {
                    "max_abs_diff": float(diff.max()),
                    "max_rel_diff": float((diff / (np.abs(ref[name]) + 1e-6)).max()),
                    "max_param_abs": float(np.abs(ref[name]).max()),
                    "allclose_rtol1e-4_atol1e-6": bool(
                        np.allclose(p, ref[name], rtol=1e-4, atol=1e-6)
                    ),
                }
        results["_params_check"] = {"ref": args.params_ref, "steps": args.params_steps, **check}
    results["_meta"] = _meta(args, argv, peak_source)
    results["_meta"]["loadavg_end"] = os.getloadavg()
    return results


# ---- the Keras anchor ----------------------------------------------------------------


def _worker(cmd: list[str], out: str) -> dict[str, Any]:
    path = os.pathsep.join(filter(None, [_REPO, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [*cmd, f"--out={out}"]
    proc = subprocess.run(cmd, cwd=_REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def compare_keras(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """base and sadt_t1 here against tf.keras on the release's simple CNN, same batch.

    Each round runs this benchmark and ``experiments/keras_anchor.py`` in their own
    processes, one after the other, the order alternating between rounds. Per method:
    ``ratio_to_keras`` = median of our per-round step times / median of Keras'.
    """
    if importlib.util.find_spec("tensorflow") is None:
        print(KERAS_SKIPPED, flush=True)
        return {"_keras": {"skipped": KERAS_SKIPPED}}
    shape = ",".join(map(str, args.shape))
    common = [
        f"--dataset_shape={shape}",
        f"--num_classes={args.num_classes}",
        f"--batch_size={args.batch_size}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--repeats={args.repeats}",
        f"--seed={args.seed}",
    ]
    ours_cmd = [
        sys.executable,
        os.path.join(_REPO, "experiments", "benchmark.py"),
        "--model=simple_cnn",
        "--model_kwargs=" + json.dumps(KERAS_ANCHOR_MODEL),
        "--methods=base,sadt_t1",
        f"--conv_impl={args.conv_impl}",
        f"--pool_impl={args.pool_impl}",
        "--keep_freed_memory" if args.keep_freed_memory else "--no-keep_freed_memory",
        *common,
    ]
    keras_cmd = [sys.executable, os.path.join(_REPO, "experiments", "keras_anchor.py"), *common]
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.keras_rounds):
            order = (("ours", ours_cmd), ("keras", keras_cmd))
            got = {}
            for side, cmd in order if i % 2 == 0 else reversed(order):
                got[side] = _worker(cmd, os.path.join(tmp, f"{side}{i}.json"))
            rounds.append(got)
    out: dict[str, Any] = {}
    for m in ("base", "sadt_t1"):
        ours = [r["ours"][m]["step_ms"] for r in rounds]
        keras = [r["keras"][m]["step_ms"] for r in rounds]
        out[m] = {
            "ours_step_ms": statistics.median(ours),
            "keras_step_ms": statistics.median(keras),
            "ratio_to_keras": statistics.median(ours) / statistics.median(keras),
            "ratio_per_round": [a / b for a, b in zip(ours, keras, strict=True)],
            "ours_ratio_to_base": statistics.median(
                r["ours"][m]["step_ms"] / r["ours"]["base"]["step_ms"] for r in rounds
            ),
            "keras_ratio_to_base": statistics.median(
                r["keras"][m]["step_ms"] / r["keras"]["base"]["step_ms"] for r in rounds
            ),
        }
    out["_setup"] = {
        "ours_command": shlex.join(ours_cmd),
        "keras_command": shlex.join(keras_cmd),
        "rounds": args.keras_rounds,
        "ours_meta": rounds[0]["ours"]["_meta"],
        "keras_meta": rounds[0]["keras"]["_meta"],
        "keras_trainable_params": rounds[0]["keras"]["base"]["trainable_params"],
    }
    return {"_keras": out}


def keras_markdown(results: dict[str, Any], command: str) -> str:
    """``results/benchmark_keras.md``: our steps against tf.keras on the same network."""
    k = results["_keras"]
    s = k["_setup"]
    machine, versions = s["ours_meta"]["machine"], s["ours_meta"]["versions"]
    km = s["keras_meta"]
    rows = [
        "# Step time against tf.keras (same network, same batch)",
        "",
        f"The simple CNN in the release's layout (VALID convolutions, dropout 0.3, "
        f"{s['keras_trainable_params']:,} trainable parameters in Keras), batch "
        f"{km['batch_size']}, images {'x'.join(map(str, km['dataset_shape']))}, float32, Adam, "
        f"softmax cross-entropy. {s['rounds']} rounds; each runs ours and Keras in separate "
        "processes, one after the other, the order alternating. Step times are medians over "
        "rounds of each process's median.",
        "",
        "| method | ours ms | Keras ms | ratio to Keras | per round | ours / our base "
        "| Keras / Keras base |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in ("base", "sadt_t1"):
        r = k[m]
        rows.append(
            f"| {m} | {r['ours_step_ms']:.1f} | {r['keras_step_ms']:.1f} "
            f"| {r['ratio_to_keras']:.2f} | "
            + ", ".join(f"{x:.2f}" for x in r["ratio_per_round"])
            + f" | {r['ours_ratio_to_base']:.2f} | {r['keras_ratio_to_base']:.2f} |"
        )
    rows += [
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine['processor']}, {machine['cpus_usable']} usable cores, "
        f"{machine['device_kind']}; jax {versions['jax']}, TensorFlow {km['tensorflow']}, "
        f"Keras {km['keras']}; XLA_FLAGS={s['ours_meta']['XLA_FLAGS']!r}; "
        f"{s['ours_meta']['date_utc']}, commit {s['ours_meta']['git_commit']}.",
        "",
        f"Ours: `{s['ours_command']}`",
        "",
        f"Keras: `{s['keras_command']}`",
    ]
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point: parses ``argv``, runs, prints a Markdown table, writes ``--out``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.compare_keras:
        results = compare_keras(args, argv)
        if "skipped" not in results["_keras"]:
            md = keras_markdown(results, shlex.join(["python", "experiments/benchmark.py", *argv]))
            print(md)
            os.makedirs(os.path.dirname(os.path.abspath(args.keras_md)), exist_ok=True)
            with open(args.keras_md, "w") as f:
                f.write(md)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
        return results
    if args.keep_freed_memory and __name__ == "__main__":  # a program, not imported (tests)
        from sadt_jax.main import keep_freed_memory

        keep_freed_memory()
    load_start = os.getloadavg()
    results = run(args, argv)
    results["_meta"]["loadavg_start"] = load_start
    print(markdown_table(results))
    print(
        f"\n{args.model} {args.dataset_shape} batch {args.batch_size} {args.dtype}, "
        f"{jax.devices()[0].device_kind}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"load avg {load_start[0]:.1f} -> {results['_meta']['loadavg_end'][0]:.1f}"
    )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
