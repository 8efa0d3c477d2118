"""Smoke test of experiments/benchmark.py on a tiny setting (no speed is asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from experiments import benchmark
from tests import cli_runs
from tests.test_no_tensorflow import WRAPPER

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


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="no TensorFlow")
def test_compare_keras_tiny(tmp_path, capsys):
    md, out = tmp_path / "keras.md", tmp_path / "keras.json"
    argv = [
        "--compare_keras",
        "--batch_size=4",
        "--steps=2",
        "--warmup=1",
        "--repeats=1",
        "--keras_rounds=1",
        f"--keras_md={md}",
        f"--out={out}",
    ]
    benchmark.main(argv)
    k = json.loads(out.read_text())["_keras"]
    for m in ("base", "sadt_t1"):
        for key in ("ours_step_ms", "keras_step_ms", "ratio_to_keras", "keras_ratio_to_base"):
            assert _positive(k[m][key]), (m, key, k[m])
        assert k[m]["ratio_to_keras"] == pytest.approx(k[m]["ratio_per_round"][0])
    # The same network on both sides: the release layout's parameter count at 28x28x1.
    assert k["_setup"]["keras_trainable_params"] == 405_048
    assert k["_setup"]["ours_meta"]["settings"]["model_kwargs"]["release_layout"] is True
    text = md.read_text()
    assert "| sadt_t1 |" in text and "ratio to Keras" in text
    assert "# Step time against tf.keras" in capsys.readouterr().out


def test_compare_keras_without_tensorflow_is_one_line(tmp_path):
    out = tmp_path / "k.json"
    module = "experiments.benchmark"
    tiny = ["--batch_size=4", "--steps=1", "--warmup=0", "--repeats=1", "--keras_rounds=1"]
    cmd = [sys.executable, "-c", WRAPPER, module, "--compare_keras", *tiny, f"--out={out}"]
    cmd.append(f"--keras_md={tmp_path / 'keras.md'}")
    proc = subprocess.run(
        cmd, env=cli_runs.env(), cwd=cli_runs.REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == benchmark.KERAS_SKIPPED
    assert json.loads(out.read_text()) == {"_keras": {"skipped": benchmark.KERAS_SKIPPED}}
    assert not (tmp_path / "keras.md").exists()


def test_xla_cpu_options_variants_and_passthrough():
    """experiments/xla_cpu_options.py: bad variants are one clear error; the options reach
    the compiler (an unknown option is refused by XLA, so a dropped dict would pass)."""
    from experiments import xla_cpu_options

    assert xla_cpu_options._parse_variant('noeigen={"xla_cpu_multi_thread_eigen": false}') == (
        "noeigen",
        {"xla_cpu_multi_thread_eigen": False},
    )
    for bad in ("noeigen", "x={not json}", "x=[1]", "={}"):
        with pytest.raises(SystemExit, match="error: variant"):
            xla_cpu_options._parse_variant(bad)
    args = benchmark.parse_args(["--dataset_shape=8,8,1", "--batch_size=4", "--num_classes=3"])
    model, variables, batch = benchmark._setup(args)
    with pytest.raises(Exception, match="xla_cpu_no_such_option"):
        benchmark._method_runner(
            "base", model, variables, batch, args, {"xla_cpu_no_such_option": True}
        )
    runner = benchmark._method_runner(
        "base", model, variables, batch, args, {"xla_cpu_multi_thread_eigen": False}
    )
    assert all(t > 0 for t in runner.run(1))


def test_round_ratio_is_the_median_of_per_round_ratios():
    """The figure conv_gemm.py and xla_cpu_options.py compare variants by."""
    import jax
    import jax.numpy as jnp

    from experiments.benchmark import _Runner

    def step(x, b):
        return x + b, x.sum()

    a, ref = (_Runner(n, jax.jit(step), (jnp.zeros(3),), jnp.ones(3)) for n in ("a", "ref"))
    a.per_repeat, ref.per_repeat = [2.0, 4.0, 18.0], [1.0, 1.0, 2.0]
    assert a.round_ratio(ref) == 4.0  # ratios 2, 4, 9 (their mean is 5)
    assert ref.round_ratio(ref) == 1.0
    ref.per_repeat = [1.0, 1.0]
    with pytest.raises(ValueError):  # rounds must pair up
        a.round_ratio(ref)
    a.timed(2)  # a real round records its median step time
    assert len(a.per_repeat) == 4 and a.per_repeat[-1] > 0
