"""Smoke test of experiments/benchmark.py on a tiny setting (no speed is asserted)."""

from __future__ import annotations

import json
import math

import pytest

from experiments import benchmark

METHOD_KEYS = ("step_ms", "ratio_to_base", "compile_s", "peak_mem_mb", "images_per_s")


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_benchmark_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    params = tmp_path / "params.npz"
    argv = [
        "--model=simple_cnn",
        "--dataset_shape=8,8,1",
        "--batch_size=8",
        "--steps=2",
        "--warmup=1",
        "--repeats=2",
        "--methods=base,sadt_t2",
        "--compare_optax_sam",
        f"--params_out={params}",
        f"--params_ref={params}",  # Compared with itself after saving: plumbing only.
        "--params_steps=1",
        f"--out={out}",
    ]
    benchmark.main(argv)
    results = json.loads(out.read_text())

    assert {"base", "sadt_t2", "_meta", "_optax_sam", "_params_check"} <= set(results)
    for name in ("base", "sadt_t2"):
        r = results[name]
        for key in METHOD_KEYS:
            assert _positive(r[key]), (name, key, r[key])
        assert r["num_timed_steps"] == 4
        assert len(r["step_ms_per_repeat"]) == 2
        assert math.isfinite(r["final_loss"])
    assert results["base"]["ratio_to_base"] == 1.0

    meta = results["_meta"]
    for key in ("machine", "versions", "command", "XLA_FLAGS", "peak_mem_source"):
        assert key in meta
    assert meta["versions"]["jax"]
    assert meta["settings"]["batch_size"] == 8

    o = results["_optax_sam"]
    for key in ("ours_step_ms", "optax_step_ms", "ratio_ours_to_optax"):
        assert _positive(o[key])
    # Both SAM implementations take the same step.
    assert o["max_abs_param_diff_after_1_step"] < 1e-5

    for name in ("base", "sadt_t2"):
        assert results["_params_check"][name]["max_abs_diff"] == 0.0

    table = capsys.readouterr().out
    assert "| base |" in table and "ratio to base" in table


def test_markdown_table_targets():
    row = {"step_ms": 10.0, "compile_s": 1.0, "peak_mem_mb": 5.0, "images_per_s": 100.0}
    results = {
        "base": {**row, "ratio_to_base": 1.0},
        "sam": {**row, "step_ms": 30.0, "ratio_to_base": 3.0},
        "_meta": {},
    }
    table = benchmark.markdown_table(results)
    assert "| sam | 30.0 | 3.00 | ≤ 2.05 ✗ |" in table
    assert "_meta" not in table


def test_parse_args_validation():
    args = benchmark.parse_args(["--dataset_shape=32,32,3", "--methods=base,sam"])
    assert args.shape == (32, 32, 3) and args.method_list == ["base", "sam"]
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--methods=base,nope"])
