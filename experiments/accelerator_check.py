r"""One command that checks this project on one accelerator and writes what it measured.

In at most ``--budget_s`` seconds (default 450: the whole check fits an 8-minute window),
phase by phase, each with a deadline (a phase that ends early leaves its time to the next;
work that would not fit is skipped and listed as skipped):

1. **device and versions** (jax, jaxlib, flax, optax, orbax, Python, the PJRT platform
   version, ``nvidia-smi`` where there is one);
2. **correctness tests on the device**: the tests marked ``@pytest.mark.accelerator``
   (losses, the SAM transformation, step properties, the step against an independent
   reference), in a subprocess; tests that fail are rerun once with
   ``JAX_DEFAULT_MATMUL_PRECISION=highest``, which tells a reduced-precision (TF32) matmul
   from a real bug;
3. **step time** of every method through ``experiments/benchmark.py``: ``simple_cnn`` at
   batch 512 and 2048, float32 and bfloat16; ``wrn28_10`` and ``resnet18`` (CIFAR shapes,
   bfloat16, batch 256 and 512; methods dropped from the end of the list when they would not
   fit the phase). Per method: step time (``--pipelined``: steps dispatched back to back,
   one sync per repeat, median over repeats), ratio to base (within one run), compile
   time, XLA memory, GFLOP per step (XLA ``cost_analysis``) and **MFU** = FLOPs / step time /
   the device's peak (table :data:`PEAK_TFLOPS`, reported with the value used);
4. **loop rate**: the real training loop (``train_and_evaluate``, Fashion-MNIST, base, batch
   512, checkpoints on) against the bare jitted train step on a batch already on the device;
5. **bfloat16 vs float32 accuracy**: the same short SADT-T1 Fashion-MNIST run in both;
6. **Fashion-MNIST comparison** with the time left: ``base``, ``base_2x`` and ``sadt_t1`` on
   the full training set for ``--compare_epochs`` (30) epochs, seeds 0, 1, 2 (a seed's
   three methods before the next seed; a run that would not fit is skipped).

Targets, checked and reported as ✓/✗ (:data:`TARGETS`): sam <= 2.05, sadt_t1 and sadt_t3
<= 2.1, sadt_t2 <= 2.8 times the base step; wrn28_10 bfloat16 base step >= 40 % MFU; the loop
>= 95 % of the bare step's rate.

Outputs, rewritten after every phase (a killed check keeps what it measured):
``<out_root>/<device_kind>/check.json`` and ``report.md``.

Needs jax, flax, optax, orbax-checkpoint, numpy, pytest, and ml_collections for the phases
that run the training loop (4-6); never TensorFlow, tensorflow-datasets or clu. On a machine
without network whose image lacks ml_collections, prepare its pure-Python package and the
Fashion-MNIST files here (``--prepare``: ``pip download --no-deps`` into ``.accel_deps/``,
the IDX files into ``.accel_data/``, both git-ignored); this script puts
``.accel_deps/site`` on ``sys.path`` by itself::

    python experiments/accelerator_check.py --prepare
    # then, on the accelerator machine, from the repository root (with .accel_deps and
    # .accel_data copied along):
    python experiments/accelerator_check.py --data_dir .accel_data/fashion-mnist

``--smoke`` runs the same code on the CPU with tiny sizes, one case or run where the full
check has several, and a budget large enough that nothing is skipped
(``tests/test_accelerator_check.py``): about 90 s of CPU time (5 min of wall time on the
2-core development machine while ~10 other processes competed for it).

On the project's lent device machine (results come back only from ``$OUT``)::

    python experiments/accelerator_check.py --data_dir .accel_data/fashion-mnist \
        --out_root "$OUT"          # carry: .accel_deps, .accel_data; then copy the folder
                                   # $OUT/<device_kind>/ to results/accelerator/
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import glob
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPS_DIR = os.path.join(REPO, ".accel_deps")
DEPS_SITE = os.path.join(DEPS_DIR, "site")
DATA_DIR = os.path.join(REPO, ".accel_data", "fashion-mnist")
SYSTEM_FMNIST = "/usr/share/datasets/fashion-mnist"
for _path in (DEPS_SITE, REPO):
    if os.path.isdir(_path) and _path not in sys.path:
        sys.path.insert(0, _path)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import benchmark  # noqa: E402

#: Step-time ratios to base (upper bounds) and rates (lower bounds) to meet.
TARGETS = {
    "sam": 2.05,
    "sadt_t1": 2.1,
    "sadt_t3": 2.1,
    "sadt_t2": 2.8,
    "wrn28_10_bf16_mfu": 0.40,
    "loop_vs_bare_rate": 0.95,
}

#: Dense peak TFLOP/s per chip: (bfloat16, float32 as XLA runs it by default), first match
#: of the key in ``device_kind`` wins. NVIDIA: tensor-core peaks from the data sheets (SXM
#: parts); float32 is the TF32 tensor-core peak because XLA's default precision lets
#: cuBLAS/cuDNN use TF32 for float32 dots and convolutions (with
#: ``jax_default_matmul_precision=highest`` the H100/H200 float32 peak is ~67). TPU: float32
#: matmuls run as bfloat16 passes at default precision, so the bfloat16 peak is used.
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H100 PCIe": (756.0, 378.0),
    "H200": (989.4, 494.7),
    "H100": (989.4, 494.7),
    "GH200": (989.4, 494.7),
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "L4": (121.0, 60.0),
    "RTX 4090": (165.2, 82.6),
    "RTX 3090": (71.0, 35.6),
    "V100": (125.0, 15.7),
    "TPU v6 lite": (918.0, 918.0),
    "TPU v5 lite": (197.0, 197.0),
    "TPU v5p": (459.0, 459.0),
    "TPU v5": (459.0, 459.0),
    "TPU v4": (275.0, 275.0),
}

#: Where each phase must end, as a fraction of the budget (absolute: slack carries over).
PHASE_ENDS = {
    "tests": 0.25,
    "speed_simple_cnn": 0.45,
    "speed_large": 0.70,
    "loop_rate": 0.77,
    "precision": 0.84,
    "comparison": 1.0,
}

SPEED_METHODS = (
    "base",
    "sam",
    "sadt_t1",
    "sadt_t3",
    "sadt_t2",
    "base_2x",
    "sadt_ema",
    "sadt_t1_1u",
    "gc",
    "agc",
)
LARGE_METHODS = ("base", "sadt_t1", "sam", "sadt_t3", "sadt_t2")


@dataclasses.dataclass(frozen=True)
class SpeedCase:
    """One ``benchmark.py`` run: a model at a batch size and dtype, several methods."""

    model: str
    shape: tuple[int, int, int]
    batch: int
    dtype: str
    methods: tuple[str, ...]
    model_kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        return f"{self.model} b{self.batch} {self.dtype}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of every phase: :func:`full_plan` on an accelerator, :func:`smoke_plan` on CPU."""

    budget_s: float
    tests_k: str | None
    speed_simple: tuple[SpeedCase, ...]
    speed_large: tuple[SpeedCase, ...]
    bench_steps: int
    bench_warmup: int
    bench_repeats: int
    guess_s_per_method: dict[str, float]
    batch_size: int
    eval_batch_size: int
    loop_epochs: int
    precision_method: str
    precision_epochs: int
    compare_methods: tuple[str, ...]
    compare_seeds: tuple[int, ...]
    compare_epochs: int
    max_train_examples: int | None
    num_validation: int


def full_plan(budget_s: float = 450.0, compare_epochs: int = 30) -> Plan:
    """The check as run on an accelerator."""
    simple = tuple(
        SpeedCase("simple_cnn", (28, 28, 1), b, d, SPEED_METHODS)
        for b, d in ((512, "float32"), (512, "bfloat16"), (2048, "float32"), (2048, "bfloat16"))
    )
    large = tuple(
        SpeedCase(m, (32, 32, 3), b, "bfloat16", LARGE_METHODS if b == 256 else LARGE_METHODS[:2])
        for b in (256, 512)
        for m in ("wrn28_10", "resnet18")
    )
    return Plan(
        budget_s=budget_s,
        tests_k=None,
        speed_simple=simple,
        speed_large=large,
        bench_steps=20,
        bench_warmup=3,
        bench_repeats=3,
        guess_s_per_method={"simple_cnn": 5.0, "resnet18": 15.0, "wrn28_10": 30.0},
        batch_size=512,
        eval_batch_size=1000,
        loop_epochs=3,
        precision_method="sadt_t1",
        precision_epochs=3,
        compare_methods=("base", "base_2x", "sadt_t1"),
        compare_seeds=(0, 1, 2),
        compare_epochs=compare_epochs,
        max_train_examples=None,
        num_validation=3000,
    )


def smoke_plan(budget_s: float = 600.0) -> Plan:
    """The same phases with tiny sizes, one case or run where the full plan has several."""
    simple = (
        SpeedCase("simple_cnn", (8, 8, 1), 8, "float32", ("base", "sadt_t1")),
        SpeedCase("simple_cnn", (8, 8, 1), 8, "bfloat16", ("base",)),
    )
    large = (
        SpeedCase(
            "wrn28_10", (8, 8, 3), 4, "bfloat16", ("base",), (("depth", 10), ("widen_factor", 1))
        ),
    )
    return Plan(
        budget_s=budget_s,
        tests_k="test_cross_entropy_closed_form",
        speed_simple=simple,
        speed_large=large,
        bench_steps=2,
        bench_warmup=1,
        bench_repeats=1,
        guess_s_per_method={"simple_cnn": 3.0, "resnet18": 5.0, "wrn28_10": 5.0},
        batch_size=32,
        eval_batch_size=100,
        loop_epochs=2,
        precision_method="base",
        precision_epochs=1,
        compare_methods=("base", "base_2x"),
        compare_seeds=(0,),
        compare_epochs=1,
        max_train_examples=96,
        num_validation=100,
    )


# ---- time budget ---------------------------------------------------------------------


class Clock:
    """Seconds since the start, and each phase's absolute deadline."""

    def __init__(self, budget_s: float):
        self.t0 = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self, phase: str) -> float:
        """Seconds until ``phase``'s deadline."""
        return PHASE_ENDS[phase] * self.budget_s - self.elapsed()


def peak_tflops(device_kind: str, dtype: str) -> tuple[float | None, str]:
    """``(peak TFLOP/s, the table key used)`` for ``dtype`` on ``device_kind``."""
    for key, (bf16, f32) in PEAK_TFLOPS.items():
        if key.lower() in device_kind.lower():
            return (bf16 if dtype == "bfloat16" else f32), key
    return None, "unknown device: no MFU"


def slug(device_kind: str) -> str:
    """``'NVIDIA H200'`` -> ``'nvidia_h200'`` (the output folder's name)."""
    return re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_") or "unknown"


# ---- phase 1: device and versions ---------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        from importlib import metadata

        return metadata.version(module)
    except Exception:  # noqa: BLE001 - not installed, or no metadata
        return None


def device_info() -> dict[str, Any]:
    """The device, the memory it reports, the software versions."""
    import jaxlib

    dev = jax.devices()[0]
    info: dict[str, Any] = {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device": str(dev),
        "device_count": jax.device_count(),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": benchmark._git_commit(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            **{
                m: _version(m)
                for m in ("flax", "optax", "orbax-checkpoint", "numpy", "ml_collections")
            },
        },
    }
    with contextlib.suppress(Exception):
        info["platform_version"] = dev.client.platform_version
    with contextlib.suppress(Exception):
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            info["memory_limit_gib"] = stats["bytes_limit"] / 2**30
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(Exception):
            info["nvidia_smi"] = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
    return info


# ---- phase 2: correctness tests on the device ---------------------------------------------

_RESULT = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def accelerator_test_files() -> list[str]:
    """Test files with at least one ``@pytest.mark.accelerator`` (relative to the repo)."""
    out = []
    for path in sorted(glob.glob(os.path.join(REPO, "tests", "test_*.py"))):
        with open(path) as f:
            if "pytest.mark.accelerator" in f.read():
                out.append(os.path.relpath(path, REPO))
    return out


def _pytest(args: list[str], timeout_s: float, log_path: str, extra_env=None) -> dict[str, Any]:
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO, DEPS_SITE if os.path.isdir(DEPS_SITE) else "", env.get("PYTHONPATH")) if p
    )
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "accelerator"]
    cmd += ["--durations=15"]
    t0 = time.monotonic()
    timed_out = False
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(
                cmd + args,
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=max(timeout_s, 1.0),
            ).returncode
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
    with open(log_path) as log:
        text = log.read()
    outcomes = {m.group(1): m.group(2) for m in map(_RESULT.match, text.splitlines()) if m}
    counts: dict[str, int] = {}
    for o in outcomes.values():
        counts[o.lower()] = counts.get(o.lower(), 0) + 1
    return {
        "returncode": rc,
        "timed_out": timed_out,
        "wall_s": time.monotonic() - t0,
        "counts": counts,
        "failed": sorted(t for t, o in outcomes.items() if o in ("FAILED", "ERROR")),
        "log": os.path.basename(log_path),
        "tail": text[-3000:] if rc not in (0, None) else "",
    }


def run_tests(plan: Plan, clock: Clock, out_dir: str) -> dict[str, Any]:
    """The ``accelerator``-marked tests in a subprocess; failures rerun at highest precision."""
    files = accelerator_test_files()
    selection = files + (["-k", plan.tests_k] if plan.tests_k else [])
    res = _pytest(selection, clock.left("tests"), os.path.join(out_dir, "pytest.log"))
    res["files"] = files
    if res["failed"] and clock.left("tests") > 10:
        again = _pytest(
            res["failed"],
            clock.left("tests"),
            os.path.join(out_dir, "pytest_highest_precision.log"),
            {"JAX_DEFAULT_MATMUL_PRECISION": "highest"},
        )
        res["rerun_highest_precision"] = {k: again[k] for k in ("counts", "failed", "timed_out")}
    return res


# ---- phase 3: step time, MFU -----------------------------------------------------------------

_SPEED_KEYS = (
    "step_ms",
    "ratio_to_base",
    "compile_s",
    "images_per_s",
    "gflop_per_step",
    "achieved_tflops",
    "mfu",
    "xla_total_mb",
    "xla_temp_mb",
    "peak_mem_mb",
    "final_loss",
)


def _benchmark_argv(case: SpeedCase, methods: Sequence[str], plan: Plan, peak) -> list[str]:
    argv = [
        f"--model={case.model}",
        "--dataset_shape=" + ",".join(map(str, case.shape)),
        f"--batch_size={case.batch}",
        f"--dtype={case.dtype}",
        "--methods=" + ",".join(methods),
        f"--steps={plan.bench_steps}",
        f"--warmup={plan.bench_warmup}",
        f"--repeats={plan.bench_repeats}",
        "--pipelined",
    ]
    if case.model_kwargs:
        argv.append("--model_kwargs=" + json.dumps(dict(case.model_kwargs)))
    if peak:
        argv.append(f"--peak_tflops={peak}")
    return argv


def run_speed(
    cases: Sequence[SpeedCase], phase: str, plan: Plan, clock: Clock, device_kind: str
) -> dict[str, Any]:
    """``benchmark.run`` per case; methods that would not fit the phase are dropped."""
    out: dict[str, Any] = {}
    seconds_per_method = dict(plan.guess_s_per_method)
    for case in cases:
        per_method = seconds_per_method.get(case.model, 30.0)
        fits = int(clock.left(phase) // per_method)
        methods = case.methods[: max(fits, 0)]
        if not methods:
            out[case.name] = {"skipped": f"no time left in phase {phase}"}
            continue
        peak, peak_key = peak_tflops(device_kind, case.dtype)
        argv = _benchmark_argv(case, methods, plan, peak)
        t0 = time.monotonic()
        res = benchmark.run(benchmark.parse_args(argv), argv)
        wall = time.monotonic() - t0
        seconds_per_method[case.model] = wall / len(methods)
        out[case.name] = {
            "model": case.model,
            "shape": list(case.shape),
            "batch_size": case.batch,
            "dtype": case.dtype,
            "model_kwargs": dict(case.model_kwargs),
            "peak_tflops": peak,
            "peak_source": peak_key,
            "wall_s": wall,
            "command": "python experiments/benchmark.py " + " ".join(argv),
            "dropped_methods": list(case.methods[len(methods) :]),
            "methods": {m: {k: res[m].get(k) for k in _SPEED_KEYS} for m in methods},
        }
    return out


# ---- phases 4-6: the training loop on Fashion-MNIST --------------------------------------


def fmnist_config(plan: Plan, data_dir: str, method: str, *, seed: int = 0, **overrides):
    """``configs/fashion_mnist.py:<method>`` at the plan's sizes (needs ml_collections)."""
    from configs import fashion_mnist

    config = fashion_mnist.get_config(method)
    config.seed = seed
    config.batch_size = plan.batch_size
    config.eval_batch_size = plan.eval_batch_size
    config.data.data_dir = data_dir
    config.data.num_validation = plan.num_validation
    config.data.max_train_examples = plan.max_train_examples
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def train(config, workdir: str) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    """``train_and_evaluate`` with its output in ``workdir/log.txt``: (summary, timing, wall)."""
    from sadt_jax.train import train_and_evaluate

    os.makedirs(workdir, exist_ok=True)
    t0 = time.monotonic()
    with open(os.path.join(workdir, "log.txt"), "w") as log, contextlib.redirect_stdout(log):
        summary = train_and_evaluate(config, workdir)
    wall = time.monotonic() - t0
    with open(os.path.join(workdir, "timing.jsonl")) as f:
        timing = [json.loads(line) for line in f if line.strip()]
    return summary, timing, wall


def bare_step_ms(config, repeats: int = 3) -> float:
    """Median ms per step of the loop's jitted train step on one batch already on the device.

    Built exactly as ``train_and_evaluate`` builds it (mesh, shardings, augmentation);
    ``steps_per_epoch`` steps are dispatched back to back, synchronising once at the end.
    """
    from sadt_jax.data import load_dataset, pipeline
    from sadt_jax.train import builders, steps

    ds = load_dataset(
        "fashion_mnist",
        data_dir=config.data.data_dir,
        num_validation=config.data.num_validation,
        max_train_examples=config.data.max_train_examples,
    )
    n_steps = pipeline.steps_per_epoch(ds.num_train, config.batch_size)
    sadt_config = builders.resolve_sadt_config(config)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    model = builders.build_model(config, ds.num_classes)
    tx = builders.build_optimizer(config, n_steps)
    init = lambda: builders.init_state(config, model, ds.image_shape, tx, sadt_config)
    state = jax.jit(init, out_shardings=replicated)()
    sums = jax.jit(steps.init_metric_sums, out_shardings=replicated)()
    step = steps.make_train_step(
        sadt_config,
        aug_key=builders.run_keys(config)[2],
        state_sharding=replicated,
        augment_name=config.data.augment,
        mean=ds.mean,
        std=ds.std,
        num_classes=ds.num_classes,
        cutmix_alpha=config.data.cutmix_alpha,
    )
    idx = pipeline.train_batch_indices(ds.num_train, config.batch_size, seed=0, epoch=0)[0]
    batch = {
        "image": jax.device_put(ds.train_images[idx], data),
        "label": jax.device_put(ds.train_labels[idx], data),
    }
    for _ in range(2):
        state, sums = step(state, sums, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n_steps):
            state, sums = step(state, sums, batch)
        jax.block_until_ready((state, sums))
        times.append((time.perf_counter() - t0) / n_steps)
    return 1e3 * statistics.median(times)


def run_loop_rate(plan: Plan, data_dir: str, work: str) -> dict[str, Any]:
    """Loop ms/step (epochs after the first: no compilation) against the bare step."""
    config = fmnist_config(plan, data_dir, "base", num_epochs=plan.loop_epochs)
    summary, timing, wall = train(config, os.path.join(work, "loop_rate"))
    spe = summary["steps_per_epoch"]
    later = [r["epoch_time_s"] / spe for r in timing[1:]] or [timing[0]["epoch_time_s"] / spe]
    loop_ms = 1e3 * statistics.median(later)
    bare_ms = bare_step_ms(config)
    return {
        "method": "base",
        "batch_size": plan.batch_size,
        "steps_per_epoch": spe,
        "epochs": len(timing),
        "loop_ms_per_step": loop_ms,
        "bare_ms_per_step": bare_ms,
        "loop_vs_bare_rate": bare_ms / loop_ms,
        "data_time_fraction": summary.get("data_time_fraction"),
        "first_epoch_s": timing[0]["epoch_time_s"],
        "checkpoints": sorted(os.listdir(os.path.join(work, "loop_rate", "checkpoints"))),
        "wall_s": wall,
    }


def _run_row(summary: dict[str, Any], wall: float) -> dict[str, Any]:
    return {
        "final_test_accuracy": summary["final"]["test_accuracy"],
        "best_val_epoch": summary["best_val"].get("epoch"),
        "best_val_test_accuracy": summary["best_val"].get("test_accuracy"),
        "train_time_s": summary["train_time_s"],
        "median_epoch_time_s": summary["median_epoch_time_s"],
        "wall_s": wall,
    }


def run_precision(plan: Plan, data_dir: str, work: str) -> dict[str, Any]:
    """The same short run in float32 and bfloat16."""
    out: dict[str, Any] = {"method": plan.precision_method, "epochs": plan.precision_epochs}
    for dtype in ("float32", "bfloat16"):
        config = fmnist_config(
            plan,
            data_dir,
            plan.precision_method,
            num_epochs=plan.precision_epochs,
            **{"model.dtype": dtype, "ckpt.enabled": False},
        )
        summary, _, wall = train(config, os.path.join(work, f"precision_{dtype}"))
        out[dtype] = _run_row(summary, wall)
    out["bf16_minus_f32_pp"] = 100 * (
        out["bfloat16"]["final_test_accuracy"] - out["float32"]["final_test_accuracy"]
    )
    return out


def _cost(row: dict[str, Any], epochs: int) -> tuple[float, float]:
    """``(seconds per epoch, fixed seconds)`` of a finished run (compilation in the latter)."""
    per_epoch = 1.15 * (row["median_epoch_time_s"] or 0.0) + 0.05  # + evaluation
    return per_epoch, max(row["wall_s"] - per_epoch * epochs, 0.0)


def run_comparison(
    plan: Plan, data_dir: str, work: str, clock: Clock, costs: dict[str, tuple[float, float]]
) -> dict[str, Any]:
    """base, base_2x, sadt_t1 x seeds at the converged budget, while time is left.

    ``costs``: ``{method: (seconds per epoch, fixed seconds)}`` of earlier runs, to skip a
    run that would not fit (a method not run yet is costed as the dearest one known);
    updated as runs finish.
    """
    runs: dict[str, dict[str, Any]] = {}
    skipped = []
    for seed in plan.compare_seeds:
        for method in plan.compare_methods:
            per_epoch, fixed = costs.get(method) or max(costs.values(), default=(0.0, 0.0))
            estimate = per_epoch * plan.compare_epochs + fixed
            if estimate > clock.left("comparison"):
                left = max(clock.left("comparison"), 0.0)
                skipped.append(f"{method} seed {seed} (needs ~{estimate:.0f} s, {left:.0f} s left)")
                continue
            config = fmnist_config(
                plan,
                data_dir,
                method,
                seed=seed,
                num_epochs=plan.compare_epochs,
                **{"ckpt.enabled": False},
            )
            summary, _, wall = train(config, os.path.join(work, f"compare_{method}_{seed}"))
            row = {"method": method, "seed": seed, **_run_row(summary, wall)}
            runs[f"{method}/{seed}"] = row
            costs[method] = _cost(row, plan.compare_epochs)
    return {
        "epochs": plan.compare_epochs,
        "max_train_examples": plan.max_train_examples,
        "runs": runs,
        "by_method": aggregate_runs(runs),
        "skipped": skipped,
    }


def aggregate_runs(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation of the test accuracies per method, over seeds."""
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in runs.values()):
        rows = [r for r in runs.values() if r["method"] == method]
        agg: dict[str, Any] = {"seeds": [r["seed"] for r in rows]}
        for key in ("final_test_accuracy", "best_val_test_accuracy", "train_time_s"):
            vals = [r[key] for r in rows if r[key] is not None]
            agg[key + "_mean"] = float(np.mean(vals)) if vals else None
            agg[key + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        out[method] = agg
    return out


# ---- targets and the report ------------------------------------------------------------------


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every measured target: ``{"target", "where", "value", "bound", "ok"}``."""
    checks = []
    for phase in ("speed_simple_cnn", "speed_large"):
        for name, case in (results.get(phase) or {}).items():
            for method, r in (case.get("methods") or {}).items():
                if method in ("sam", "sadt_t1", "sadt_t3", "sadt_t2") and r.get("ratio_to_base"):
                    bound = TARGETS[method]
                    checks.append(
                        {
                            "target": f"{method} step <= {bound:g} x base",
                            "where": name,
                            "value": r["ratio_to_base"],
                            "ok": r["ratio_to_base"] <= bound,
                        }
                    )
            base = (case.get("methods") or {}).get("base") or {}
            if case.get("model") == "wrn28_10" and case.get("dtype") == "bfloat16":
                bound = TARGETS["wrn28_10_bf16_mfu"]
                mfu = base.get("mfu")
                checks.append(
                    {
                        "target": f"wrn28_10 bf16 base MFU >= {bound:.0%}",
                        "where": name,
                        "value": mfu,
                        "ok": None if mfu is None else mfu >= bound,
                    }
                )
    loop = results.get("loop_rate") or {}
    if "loop_vs_bare_rate" in loop:
        bound = TARGETS["loop_vs_bare_rate"]
        checks.append(
            {
                "target": f"loop >= {bound:.0%} of the bare step's rate",
                "where": f"simple_cnn base b{loop['batch_size']}",
                "value": loop["loop_vs_bare_rate"],
                "ok": loop["loop_vs_bare_rate"] >= bound,
            }
        )
    return checks


def _f(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _mark(ok) -> str:
    return "–" if ok is None else ("✓" if ok else "✗")


def _report_speed(results: dict[str, Any]) -> list[str]:
    lines = []
    for phase in ("speed_simple_cnn", "speed_large"):
        for name, case in (results.get(phase) or {}).items():
            if "methods" not in case:
                lines += [f"\n**{name}**: {case.get('skipped') or case.get('error')}"]
                continue
            lines += [
                f"\n**{name}** (shape {'x'.join(map(str, case['shape']))}, peak "
                f"{_f(case['peak_tflops'], 'g')} TFLOP/s from {case['peak_source']!r}; "
                f"`{case['command']}`)\n",
                "| method | step ms | ratio to base | compile s | GFLOP/step | TFLOP/s | MFU "
                "| XLA total MB |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for m, r in case["methods"].items():
                lines.append(
                    f"| {m} | {_f(r['step_ms'], '.3f')} | {_f(r['ratio_to_base'], '.2f')} "
                    f"| {_f(r['compile_s'], '.1f')} | {_f(r['gflop_per_step'], '.1f')} "
                    f"| {_f(r['achieved_tflops'], '.1f')} | {_f(r['mfu'], '.1%')} "
                    f"| {_f(r['xla_total_mb'], '.0f')} |"
                )
            if case.get("dropped_methods"):
                lines.append(f"\n(not timed, no time left: {', '.join(case['dropped_methods'])})")
    return lines


def _report_training(results: dict[str, Any]) -> list[str]:
    lines = []
    loop = results.get("loop_rate") or {}
    if "loop_ms_per_step" in loop:
        lines += [
            "\n## Loop rate\n",
            f"Real loop (Fashion-MNIST, base, batch {loop['batch_size']}, epochs after the first): "
            f"{loop['loop_ms_per_step']:.3f} ms/step; bare jitted step on a device-resident "
            f"batch: {loop['bare_ms_per_step']:.3f} ms/step; loop at "
            f"**{loop['loop_vs_bare_rate']:.1%}** of the bare rate (host data time "
            f"{_f(loop['data_time_fraction'], '.1%')} of the epoch). Checkpoints written: "
            f"{', '.join(loop['checkpoints'])}.",
        ]
    prec = results.get("precision") or {}
    if "float32" in prec:
        lines += [
            f"\n## bfloat16 vs float32 ({prec['method']}, {prec['epochs']} epochs, seed 0)\n",
            "| dtype | final test acc | best-val test acc | median epoch s |",
            "|---|---|---|---|",
        ]
        for d in ("float32", "bfloat16"):
            r = prec[d]
            lines.append(
                f"| {d} | {_f(r['final_test_accuracy'], '.2%')} "
                f"| {_f(r['best_val_test_accuracy'], '.2%')} "
                f"| {_f(r['median_epoch_time_s'], '.2f')} |"
            )
        lines.append(f"\nbfloat16 − float32: {prec['bf16_minus_f32_pp']:+.2f} pp")
    comp = results.get("comparison") or {}
    if "by_method" in comp:
        lines += [
            f"\n## Fashion-MNIST comparison ({comp['epochs']} epochs)\n",
            "| method | seeds | final test acc (mean ± sd) | best-val test acc (mean ± sd) "
            "| train s (mean) |",
            "|---|---|---|---|---|",
        ]
        for m, a in comp["by_method"].items():
            lines.append(
                f"| {m} | {','.join(map(str, a['seeds']))} "
                f"| {_f(a['final_test_accuracy_mean'], '.2%')} ± "
                f"{_f(a['final_test_accuracy_std'], '.2%')} "
                f"| {_f(a['best_val_test_accuracy_mean'], '.2%')} ± "
                f"{_f(a['best_val_test_accuracy_std'], '.2%')} "
                f"| {_f(a['train_time_s_mean'], '.1f')} |"
            )
        if comp["skipped"]:
            lines.append(f"\nSkipped (time budget): {'; '.join(comp['skipped'])}")
    return lines


def markdown_report(results: dict[str, Any]) -> str:
    """``report.md``: device, tests, targets, step times, loop, precision, comparison."""
    dev = results.get("device") or {}
    lines = [
        f"# Accelerator check: {dev.get('device_kind', '?')}\n",
        f"{dev.get('date_utc', '')}, commit {dev.get('git_commit')}, "
        f"{'SMOKE (tiny sizes) ' if results['smoke'] else ''}"
        f"command `{results['command']}`, {results['elapsed_s']:.0f} s of the "
        f"{results['budget_s']:.0f} s budget.\n",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in (dev.get("versions") or {}).items()),
    ]
    for key in ("platform_version", "nvidia_smi", "memory_limit_gib"):
        if key in dev:
            lines.append(f"\n{key}: `{dev[key]}`")
    tests = results.get("tests") or {}
    if "counts" in tests:
        lines += [
            "\n## Tests on the device\n",
            f"`pytest -m accelerator` over {', '.join(tests['files'])}: {tests['counts']}"
            + (" — TIMED OUT" if tests["timed_out"] else ""),
        ]
        if tests["failed"]:
            lines.append("\nFailed: " + ", ".join(tests["failed"]))
        if "rerun_highest_precision" in tests:
            r = tests["rerun_highest_precision"]
            lines.append(f"\nRerun with JAX_DEFAULT_MATMUL_PRECISION=highest: {r['counts']}")
    lines += ["\n## Targets\n", "| target | where | value | ok |", "|---|---|---|---|"]
    for c in results.get("targets") or []:
        value = c["value"]
        shown = "–" if value is None else (f"{value:.1%}" if "%" in c["target"] else f"{value:.2f}")
        lines.append(f"| {c['target']} | {c['where']} | {shown} | {_mark(c['ok'])} |")
    lines += ["\n## Step time"] + _report_speed(results) + _report_training(results)
    lines += ["\n## Phases\n", "| phase | seconds | outcome |", "|---|---|---|"]
    for name, p in (results.get("phases") or {}).items():
        lines.append(f"| {name} | {p['wall_s']:.1f} | {p['outcome']} |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: str, results: dict[str, Any]) -> None:
    results["targets"] = check_targets(results)
    with open(os.path.join(out_dir, "check.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown_report(results))


# ---- preparing a machine without network -------------------------------------------------


def prepare(data_src: str) -> None:
    """``.accel_deps/site`` (ml_collections, pure Python) and ``.accel_data/fashion-mnist``."""
    version = _version("ml_collections")
    spec = f"ml_collections=={version}" if version else "ml_collections"
    wheels = os.path.join(DEPS_DIR, "wheels")
    os.makedirs(wheels, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    subprocess.run([*pip, "-d", wheels, spec], check=True)
    shutil.rmtree(DEPS_SITE, ignore_errors=True)
    for whl in glob.glob(os.path.join(wheels, "*.whl")):
        with zipfile.ZipFile(whl) as z:
            z.extractall(DEPS_SITE)
    os.makedirs(DATA_DIR, exist_ok=True)
    for name in sorted(os.listdir(data_src)):
        if "idx" in name:
            shutil.copy(os.path.join(data_src, name), DATA_DIR)
    print(f"prepared {DEPS_SITE} ({spec}) and {DATA_DIR}; carry .accel_deps and .accel_data")


# ---- the check ----------------------------------------------------------------------------------


def _phase(results, name: str, fn: Callable[[], Any], done_when=None) -> Any:
    """Runs one phase; an exception is recorded (with its traceback's tail), not raised."""
    t0 = time.monotonic()
    try:
        value = fn()
        outcome = "ok" if done_when is None else done_when(value)
    except Exception as e:  # noqa: BLE001 - one phase failing must not lose the others
        value = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        outcome = "error: " + value["error"].splitlines()[0][:200]
    results[name] = value
    results["phases"][name] = {"wall_s": time.monotonic() - t0, "outcome": outcome}
    print(f"[accelerator_check] {name}: {outcome} ({time.monotonic() - t0:.1f} s)", flush=True)
    return value


def run_check(plan: Plan, data_dir: str, out_root: str, argv: Sequence[str], smoke: bool):
    """Runs every phase; returns the results dict (also written to ``out_dir``)."""
    clock = Clock(plan.budget_s)
    info = device_info()
    out_dir = os.path.join(out_root, slug(info["device_kind"]) + ("_smoke" if smoke else ""))
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="accelerator_check_")  # training workdirs, removed at the end
    results: dict[str, Any] = {
        "command": " ".join(["python", "experiments/accelerator_check.py", *argv]),
        "smoke": smoke,
        "budget_s": plan.budget_s,
        "plan": dataclasses.asdict(plan),
        "targets_bounds": TARGETS,
        "device": info,
        "phases": {},
    }

    def save():
        results["elapsed_s"] = clock.elapsed()
        write_outputs(out_dir, results)

    try:
        _run_phases(results, plan, clock, data_dir, out_dir, work, save)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown_report(results))
    print(f"[accelerator_check] wrote {out_dir}/report.md and check.json", flush=True)
    return results


def _run_phases(results, plan: Plan, clock: Clock, data_dir, out_dir, work, save) -> None:
    kind = results["device"]["device_kind"]
    _phase(results, "tests", lambda: run_tests(plan, clock, out_dir), _tests_outcome)
    save()
    for phase, cases in (
        ("speed_simple_cnn", plan.speed_simple),
        ("speed_large", plan.speed_large),
    ):
        _phase(results, phase, lambda c=cases, p=phase: run_speed(c, p, plan, clock, kind))
        save()
    _phase(results, "loop_rate", lambda: run_loop_rate(plan, data_dir, work))
    save()
    if clock.left("precision") > 0:
        _phase(results, "precision", lambda: run_precision(plan, data_dir, work))
    else:
        results["phases"]["precision"] = {"wall_s": 0.0, "outcome": "skipped: no time left"}
    save()
    costs = _costs_so_far(results)
    _phase(
        results,
        "comparison",
        lambda: run_comparison(plan, data_dir, work, clock, costs),
        lambda v: f"{len(v['runs'])} runs, {len(v['skipped'])} skipped",
    )
    save()


def _tests_outcome(res: dict[str, Any]) -> str:
    state = "timed out" if res["timed_out"] else ("ok" if res["returncode"] == 0 else "failures")
    return f"{state} {res['counts']}"


def _costs_so_far(results: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Cost model of a training run by method, from the float32 precision run."""
    prec = results.get("precision") or {}
    if "float32" not in prec:
        return {}
    return {prec["method"]: _cost(prec["float32"], prec["epochs"])}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=None, help="Fashion-MNIST IDX folder.")
    p.add_argument("--out_root", default=None, help="Default: results/accelerator.")
    p.add_argument("--smoke", action="store_true", help="Tiny sizes, for the CPU (CI).")
    p.add_argument("--budget_s", type=float, default=None, help="Default: 450 (smoke 600).")
    p.add_argument("--compare_epochs", type=int, default=30)
    p.add_argument("--prepare", action="store_true", help="Fill .accel_deps and .accel_data.")
    args = p.parse_args(argv)
    if args.data_dir is None:
        args.data_dir = DATA_DIR if os.path.isdir(DATA_DIR) else SYSTEM_FMNIST
    if args.out_root is None:
        args.out_root = os.path.join(REPO, "results", "accelerator")
    if args.budget_s is not None and args.budget_s <= 0:
        p.error("--budget_s must be positive")
    if args.compare_epochs < 1:
        p.error("--compare_epochs must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.prepare:
        prepare(args.data_dir)
        return None
    if args.smoke:
        plan = smoke_plan(args.budget_s or 600.0)
    else:
        plan = full_plan(args.budget_s or 450.0, args.compare_epochs)
    return run_check(plan, os.path.abspath(args.data_dir), args.out_root, argv, args.smoke)


if __name__ == "__main__":
    main()
