"""experiments/accelerator_check.py: the ``--smoke`` run on the CPU, the targets and the peaks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from experiments import accelerator_check as ac
from tests import cli_runs

needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(cli_runs.FMNIST_DIR), reason="Fashion-MNIST IDX files not installed"
)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@needs_fmnist
def test_smoke_runs_every_phase(tmp_path):
    data_dir = cli_runs.tiny_fashion_mnist(str(tmp_path / "data"), num_train=96, num_test=200)
    out_root = tmp_path / "out"
    cmd = [
        sys.executable,
        os.path.join(ac.REPO, "experiments", "accelerator_check.py"),
        "--smoke",
        f"--data_dir={data_dir}",
        f"--out_root={out_root}",
    ]
    env = cli_runs.env(str(tmp_path / "jax_cache"))  # CPU; identical steps compile once
    proc = subprocess.run(cmd, env=env, cwd=ac.REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = os.listdir(out_root)
    assert folder == "cpu_smoke"
    results = json.loads((out_root / folder / "check.json").read_text())
    report = (out_root / folder / "report.md").read_text()
    assert sorted(os.listdir(out_root / folder)) == ["check.json", "pytest.log", "report.md"]

    # Every phase ran to the end; nothing was skipped for time.
    assert set(results["phases"]) == set(ac.PHASE_ENDS), results["phases"]
    for name, phase in results["phases"].items():
        assert phase["outcome"].startswith("ok") or name == "comparison", (name, phase)
    assert results["device"]["backend"] == "cpu" and results["device"]["versions"]["jax"]

    tests = results["tests"]
    assert tests["counts"] == {"passed": 1} and tests["returncode"] == 0
    assert "tests/test_step_reference.py" in tests["files"]

    for phase, plan_cases in (("speed_simple_cnn", 2), ("speed_large", 1)):
        cases = results[phase]
        assert len(cases) == plan_cases
        for case in cases.values():
            assert case["dropped_methods"] == []
            for r in case["methods"].values():
                for key in ("step_ms", "ratio_to_base", "compile_s", "gflop_per_step"):
                    assert _positive(r[key]), (phase, key, r)
                assert r["mfu"] is None  # no peak for a CPU
    assert results["speed_simple_cnn"]["simple_cnn b8 float32"]["methods"]["base"][
        "ratio_to_base"
    ] == pytest.approx(1.0)

    loop = results["loop_rate"]
    assert _positive(loop["loop_ms_per_step"]) and _positive(loop["bare_ms_per_step"])
    assert loop["checkpoints"] == ["3", "6"]  # 96 examples / batch 32, 2 epochs

    prec = results["precision"]
    for dtype in ("float32", "bfloat16"):
        assert 0.0 <= prec[dtype]["final_test_accuracy"] <= 1.0
    comp = results["comparison"]
    assert sorted(comp["runs"]) == ["base/0", "base_2x/0"] and comp["skipped"] == []

    targets = {t["target"]: t for t in results["targets"]}
    assert targets["sadt_t1 step <= 2.1 x base"]["where"] == "simple_cnn b8 float32"
    assert "loop >= 95% of the bare step's rate" in targets
    for heading in ("## Tests on the device", "## Targets", "## Loop rate", "## bfloat16 vs"):
        assert heading in report
    assert "## Fashion-MNIST comparison" in report and "| base_2x | 0 |" in report


def test_peak_table():
    assert ac.peak_tflops("NVIDIA H200", "bfloat16") == (989.4, "H200")
    assert ac.peak_tflops("NVIDIA H200", "float32") == (494.7, "H200")
    assert ac.peak_tflops("NVIDIA H100 PCIe", "bfloat16")[0] == 756.0
    assert ac.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16")[0] == 989.4
    assert ac.peak_tflops("TPU v5 lite", "bfloat16")[0] == 197.0
    assert ac.peak_tflops("cpu", "float32")[0] is None
    assert ac.slug("NVIDIA H200") == "nvidia_h200"


def _case(model, dtype, **ratios_and_mfu):
    mfu = ratios_and_mfu.pop("mfu", None)
    methods = {"base": {"ratio_to_base": 1.0, "mfu": mfu}}
    methods.update({m: {"ratio_to_base": r, "mfu": None} for m, r in ratios_and_mfu.items()})
    return {"model": model, "dtype": dtype, "methods": methods}


def test_targets_checked_against_the_bounds():
    results = {
        "speed_simple_cnn": {
            "simple_cnn b512 float32": _case(
                "simple_cnn", "float32", sam=2.06, sadt_t1=2.1, sadt_t3=1.9, sadt_t2=2.81
            )
        },
        "speed_large": {
            "wrn28_10 b256 bfloat16": _case("wrn28_10", "bfloat16", mfu=0.41),
            "wrn28_10 b512 bfloat16": _case("wrn28_10", "bfloat16", mfu=0.39),
            "resnet18 b256 bfloat16": _case("resnet18", "bfloat16", mfu=0.1),
        },
        "loop_rate": {"loop_vs_bare_rate": 0.949, "batch_size": 512},
    }
    got = {(c["target"], c["where"]): c["ok"] for c in ac.check_targets(results)}
    assert got == {
        ("sam step <= 2.05 x base", "simple_cnn b512 float32"): False,
        ("sadt_t1 step <= 2.1 x base", "simple_cnn b512 float32"): True,
        ("sadt_t3 step <= 2.1 x base", "simple_cnn b512 float32"): True,
        ("sadt_t2 step <= 2.8 x base", "simple_cnn b512 float32"): False,
        ("wrn28_10 bf16 base MFU >= 40%", "wrn28_10 b256 bfloat16"): True,
        ("wrn28_10 bf16 base MFU >= 40%", "wrn28_10 b512 bfloat16"): False,
        ("loop >= 95% of the bare step's rate", "simple_cnn base b512"): False,
    }


def test_aggregate_runs_over_seeds():
    runs = {
        f"{m}/{s}": {
            "method": m,
            "seed": s,
            "final_test_accuracy": acc,
            "best_val_test_accuracy": None,
            "train_time_s": 10.0,
        }
        for m, s, acc in (("base", 0, 0.90), ("base", 1, 0.92), ("sadt_t1", 0, 0.93))
    }
    agg = ac.aggregate_runs(runs)
    assert agg["base"]["seeds"] == [0, 1]
    assert agg["base"]["final_test_accuracy_mean"] == pytest.approx(0.91)
    assert agg["base"]["final_test_accuracy_std"] == pytest.approx(0.02**0.5 / 10)
    assert agg["base"]["best_val_test_accuracy_mean"] is None
    assert agg["sadt_t1"]["final_test_accuracy_std"] is None  # one seed: no spread
