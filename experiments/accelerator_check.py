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
import dataclasses
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

# The same paths as experiments.accelerator.plan's, needed here before anything is imported:
# the repository (for ``experiments``) and the carried dependencies (ml_collections).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPS_SITE = os.path.join(REPO, ".accel_deps", "site")
for _path in (DEPS_SITE, REPO):
    if os.path.isdir(_path) and _path not in sys.path:
        sys.path.insert(0, _path)

from experiments.accelerator.phases import (  # noqa: E402
    aggregate_runs,
    device_info,
    package_version,
    run_comparison,
    run_cost,
    run_loop_rate,
    run_precision,
    run_speed,
    run_tests,
)
from experiments.accelerator.plan import (  # noqa: E402
    DATA_DIR,
    DEPS_DIR,
    PHASE_ENDS,
    SYSTEM_FMNIST,
    TARGETS,
    Clock,
    Plan,
    full_plan,
    peak_tflops,
    slug,
    smoke_plan,
)
from experiments.accelerator.report import check_targets, markdown_report, write_outputs  # noqa: E402

__all__ = [
    "PHASE_ENDS",
    "REPO",
    "aggregate_runs",
    "check_targets",
    "main",
    "peak_tflops",
    "run_check",
    "slug",
]


# ---- preparing a machine without network -------------------------------------------------


def prepare(data_src: str) -> None:
    """``.accel_deps/site`` (ml_collections, pure Python) and ``.accel_data/fashion-mnist``."""
    version = package_version("ml_collections")
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
    return {prec["method"]: run_cost(prec["float32"], prec["epochs"])}


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
