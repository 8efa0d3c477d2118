"""The phases of the accelerator check: device, tests, step time, loop rate, precision, comparison.

Each returns a JSON-able dict; :func:`experiments.accelerator_check.run_check` records it.
"""

from __future__ import annotations

import contextlib
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
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from experiments import benchmark
from experiments.accelerator.plan import DEPS_SITE, REPO, Clock, Plan, SpeedCase, peak_tflops

# ---- phase 1: device and versions ---------------------------------------------------------


def package_version(module: str) -> str | None:
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
                m: package_version(m)
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


def run_cost(row: dict[str, Any], epochs: int) -> tuple[float, float]:
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
            costs[method] = run_cost(row, plan.compare_epochs)
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
