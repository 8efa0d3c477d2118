"""Experiment suites: cell grids, the runner's skip/resume/failure logic, aggregation.

The runner is tested with a fake launcher (no training); the aggregation on small
synthetic workdirs with known numbers; the checkpoint restore and the sharpness
measurement on a two-step run of the real loop on a tiny synthetic dataset.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess

import numpy as np
import pytest

import sadt_jax
from experiments import aggregate, plots, run_suite, stats, suites, workdirs

# ---- Suites ------------------------------------------------------------------------------


def test_fashion_mnist_suite_grid():
    cells = suites.suite_cells("fashion_mnist")
    assert len(cells) == 27
    methods = [c.method for c in cells[:9]]
    assert methods == [*suites.PAPER_METHODS, "base_2x", "sadt_t1_1u"]
    assert [c.seed for c in cells] == [0] * 9 + [1] * 9 + [2] * 9  # seed-major
    assert len({c.name for c in cells}) == 27
    cmd = cells[4].command("runs", python="python")
    assert cmd[:4] == ["python", "-m", "sadt_jax.main", "--config=configs/fashion_mnist.py:sadt_t1"]
    assert f"--workdir={os.path.abspath('runs/fashion_mnist/sadt_t1_s0')}" in cmd
    assert "--config.data.num_validation=3000" in cmd and "--config.seed=0" in cmd
    # No init_seed override: the initial weights depend on the seed only.
    assert not any("init_seed" in a for a in cmd)


def test_paper_and_sensitivity_grids():
    paper = suites.suite_cells("paper")
    assert len(paper) == 2 * 4 * 7 * 2
    assert paper[0].config == "configs/cifar10.py:base,b512,release"
    assert ("model.name", "release_simple_cnn") in paper[0].overrides
    clean = suites.suite_cells("paper_clean")
    assert clean[0].config == "configs/cifar10.py:base,b512" and len(clean) == len(paper)
    assert ("model.name", "simple_cnn") in clean[0].overrides
    assert clean[0].workdir("r") == os.path.join("r", "paper_clean", paper[0].name)
    assert len(suites.suite_cells("paper", seeds=[0, 1])) == 224

    sens = suites.suite_cells("sensitivity")
    runs = suites.unique_runs(sens)
    assert len(sens) == 12 + 3 + 6 and len(runs) == 20  # T1 default shared by two groups
    assert {c.group for c in sens} == {"t1_rho_noise", "t3_noise", "batch"}
    names = [c.name for c in runs]
    assert "t1_rho5e-4_noise0_b256_s0" in names and "t3_noise1e-5_b256_s0" in names
    cmd = runs[0].command("r", python="python")
    assert "--config.sadt.rho=0.0005" in cmd and "--config.sadt.noise_std=0.0" in cmd


def test_fashion_mnist_long_grid():
    cells = suites.suite_cells("fashion_mnist_long")
    assert [c.name for c in cells[:3]] == ["base_s0", "base_2x_s0", "sadt_t1_s0"]
    cmd = cells[2].command("r", python="python")
    assert "--config.num_epochs=3" in cmd and not any("max_train_examples" in a for a in cmd)
    assert suites.get_suite("fashion_mnist_long").references == ("base", "base_2x")


def test_ablation_grid():
    cells = suites.suite_cells("ablation")
    names = [
        "base",
        "base_2x",
        "base_lr2x",
        "base_steps2x",
        "sadt_t1",
        "sadt_t1_kd0",
        "sadt_t1_shared_mask",
        "rdrop",
        "sadt_t1_nodrop",
        "base_nodrop",
        "sam",
        "base_2x_nodrop",
    ]
    assert [c.label for c in cells[:12]] == names
    assert len(cells) == 12 * 10 and sorted({c.seed for c in cells}) == list(range(10))
    assert suites.get_suite("ablation").references == ("base", "base_2x")
    by_name = {c.name: c for c in cells}
    fm = {c.name: c for c in suites.suite_cells("fashion_mnist")}
    # base, base_2x, sadt_t1 and sam are exactly the fashion_mnist suite's cells.
    for name in ("base", "base_2x", "sadt_t1", "sam"):
        a, b = by_name[f"{name}_s1"], fm[f"{name}_s1"]
        assert (a.config, a.overrides) == (b.config, b.overrides)
        # ... and share its workdir, so they are trained once for both suites.
        assert a.workdir("/r") == b.workdir("/r") == f"/r/fashion_mnist/{name}_s1"
        assert a.group == "ablation"
    assert by_name["rdrop_s1"].workdir("/r") == "/r/ablation/rdrop_s1"
    expected = {
        "base_lr2x": ("base", ("optim.learning_rate", 2e-4)),
        "base_steps2x": ("base", ("num_epochs", 10)),
        "sadt_t1_kd0": ("sadt_t1", ("sadt.kd_weight", 0.0)),
        "sadt_t1_shared_mask": ("sadt_t1", ("sadt.teacher_dropout", "shared")),
        "rdrop": ("rdrop", None),
        "sadt_t1_nodrop": ("sadt_t1", ("model.dropout_rate", 0.0)),
        "base_nodrop": ("base", ("model.dropout_rate", 0.0)),
    }
    base = dict(by_name["base_s3"].overrides)
    base_2x = dict(by_name["base_2x_s3"].overrides)
    nodrop_2x = by_name["base_2x_nodrop_s3"]
    assert nodrop_2x.config == "configs/fashion_mnist.py:base_2x"
    assert set(nodrop_2x.overrides) - set(base_2x.items()) == {("model.dropout_rate", 0.0)}
    for name, (method, override) in expected.items():
        cell = by_name[f"{name}_s3"]
        assert cell.config == f"configs/fashion_mnist.py:{method}" and cell.method == method
        diff = set(cell.overrides) - set(base.items())
        assert diff == ({override} if override else set()), name
    assert by_name["base_steps2x_s0"].num_epochs == 2 * by_name["base_s0"].num_epochs
    # Pairing within a seed: the same seed (= initial weights and batches), no init_seed.
    for seed in range(10):
        row = [c for c in cells if c.seed == seed]
        assert {dict(c.overrides)["seed"] for c in row} == {seed}
        assert not any("init_seed" in k for c in row for k, _ in c.overrides)
    cmd = by_name["sadt_t1_shared_mask_s0"].command("r", python="python")
    assert "--config.sadt.teacher_dropout=shared" in cmd
    assert "--config.optim.learning_rate=0.0002" in by_name["base_lr2x_s0"].command("r")


def test_overfit_grid_and_estimate():
    cells = suites.suite_cells("overfit")
    assert [c.method for c in cells[:6]] == [
        "base",
        "base_2x",
        "sam",
        "sadt_t1",
        "sadt_t3",
        "rdrop",
    ]
    assert sorted({c.seed for c in cells}) == [0, 1, 2, 3, 4]
    o = dict(cells[0].overrides)
    assert o["data.max_train_examples"] <= 2048 and o["num_epochs"] >= 100
    assert o["data.augment"] == "none" and o["model.name"] == "release_simple_cnn"
    assert (o["data.num_validation"], o["data.max_test_examples"]) == (1000, 3000)
    # Evaluating the whole test split every epoch would cost more.
    full_test = dataclasses.replace(
        cells[0], overrides=tuple((k, v) for k, v in o.items() if k != "data.max_test_examples")
    )
    assert suites.estimate_seconds(full_test, "cpu2") > suites.estimate_seconds(cells[0], "cpu2")
    hours = sum(suites.estimate_seconds(c, "cpu2") for c in cells) / 3600
    assert 1 < hours < 3  # the estimate experiments/README.md states


def test_estimate_counts_the_default_validation_split():
    """A cell that caps the test split but keeps the configs' 3,000 validation images."""
    from experiments.suites import cost

    cell = suites.suite_cells("overfit", seeds=[0])[0]
    o = {k: v for k, v in cell.overrides if k != "data.num_validation"}
    default_val = dataclasses.replace(cell, overrides=tuple(o.items()))
    assert cost._evaluated_images(default_val, 10_000) == 3000 + 3000
    assert cost._evaluated_images(cell, 10_000) == 1000 + 3000


@pytest.mark.parametrize("smoke", [False, True])
@pytest.mark.parametrize("name", sorted(suites.SUITES))
def test_every_suite_cell_passes_the_config_checks(name, smoke):
    """Each training cell's config and overrides parse and validate as sadt_jax.main would.

    A suite once kept an override of a field the configs had dropped; every run of it then
    failed at start-up while the grid's tests, which read the overrides, passed.
    """
    problems = [
        (c.name, p)
        for c in suites.unique_runs(suites.suite_cells(name, smoke=smoke))
        for p in c.config_problems()
    ]
    assert problems == []


def test_config_problems_names_the_bad_override():
    cell = suites.suite_cells("overfit", seeds=[0])[0]
    bad = dataclasses.replace(cell, overrides=cell.overrides + (("eval_every_epochs", 6),))
    # Worded as sadt_jax.main words it (one function), after the cell's config.
    assert bad.config_problems() == [
        "configs/fashion_mnist.py:base: --config.eval_every_epochs: the config has no field "
        "'eval_every_epochs'; unknown keys fail: check the spelling against the config file"
    ]
    # The unknown key is named even beside an override it is a prefix of.
    typo = dataclasses.replace(
        cell, overrides=cell.overrides + (("sadt.rho", 1e-3), ("sadt.rh", 1))
    )
    (line,) = typo.config_problems()
    assert line.startswith("configs/fashion_mnist.py:base: --config.sadt.rh: the config has no")
    wrong = dataclasses.replace(cell, overrides=cell.overrides + (("data.augment", "mixup"),))
    (line,) = wrong.config_problems()
    assert line.startswith("configs/fashion_mnist.py:base: data.augment='mixup' is not valid")


def test_run_suite_refuses_a_bad_override_before_running(tmp_path, capsys):
    launched = []
    rc = run_suite.main(
        ["--suite=overfit", f"--root={tmp_path}", "--seeds=0", "--override=config.nope=1"],
        launcher=lambda *a: launched.append(a) or 0,
    )
    err = capsys.readouterr().err
    assert rc == 2 and launched == [] and not os.listdir(tmp_path)
    assert err.startswith(
        "error: configs/fashion_mnist.py:base: --config.nope: the config has no field 'nope'"
    )
    assert "(overfit/base_s0)" in err


def test_gradient_evaluations_from_the_method():
    counts = {m: suites.gradient_evaluations(m) for m in sadt_jax.METHODS}
    expected = {"base": 1, "gc": 1, "agc": 1, "base_2x": 2, "sam": 2, "sadt_t1": 2}
    expected.update({"sadt_t2": 3, "sadt_t3": 2, "sadt_t1_1u": 2, "sadt_ema": 2, "rdrop": 2})
    assert counts == {m: expected[m] for m in counts}
    assert suites.gradient_evaluations("base", {"sadt.two_updates": True}) == 2
    with pytest.raises(ValueError, match="valid methods"):
        suites.gradient_evaluations("nope")
    te = suites.suite_cells("teacher_every")
    k4 = next(c for c in te if c.name == "sadt_t1_k4_s0")
    # Steps 0, 4, 8 are SADT-T1 steps (2 passes), the other 7 of 10 Base steps.
    assert suites.gradient_evaluations_at(k4, 10) == 3 * 2 + 7
    assert suites.gradient_evaluations_at(te[1], 10) == 20  # k = 1


def test_no_import_cycle_in_experiments():
    import ast

    folder = os.path.join(suites.REPO_ROOT, "experiments")
    graph = {}
    for f in os.listdir(folder):
        if f.endswith(".py"):
            tree = ast.parse(open(os.path.join(folder, f)).read())
            deps = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module:
                    if node.module == "experiments":
                        deps |= {a.name for a in node.names}
                    elif node.module.startswith("experiments."):
                        deps.add(node.module.split(".")[1])
                elif isinstance(node, ast.Import):
                    deps |= {
                        a.name.split(".")[1]
                        for a in node.names
                        if a.name.startswith("experiments.")
                    }
            graph[f[:-3]] = deps

    def visit(node, path):
        assert node not in path, f"import cycle: {' -> '.join([*path, node])}"
        for dep in graph.get(node, ()):
            visit(dep, [*path, node])

    for module in graph:
        visit(module, [])
    assert "run_suite" not in graph["aggregate"] and "aggregate" in graph["run_suite"]


def test_smoke_and_sharpness_cells():
    smoke = suites.suite_cells("fashion_mnist", [0], smoke=True, only=["base_s", "sadt_t1_s"])
    assert [c.name for c in smoke] == ["base_s0", "sadt_t1_s0"]
    assert smoke[0].suite == "fashion_mnist_smoke"
    assert ("num_steps", 8) in smoke[0].overrides
    sharp = suites.suite_cells("sharpness", [1])
    assert len(sharp) == 9 and sharp[0].source == "fashion_mnist/base_s1"
    cmd = sharp[0].command("runs", python="python")
    assert cmd[:3] == ["python", "-m", "experiments.sharpness"]
    assert cmd[4] == f"--out={os.path.abspath('runs/sharpness/base_s1/sharpness.json')}"


def test_fmt_number_and_estimates():
    assert [suites.fmt_number(x) for x in (5e-4, 1e-3, 0.0, 1e-5, 0.05, 256)] == [
        "5e-4",
        "1e-3",
        "0",
        "1e-5",
        "5e-2",
        "256",
    ]
    total = sum(suites.estimate_seconds(c, "cpu2") for c in suites.suite_cells("fashion_mnist"))
    assert total < 2 * 3600  # the budget the suite's docstring promises
    with pytest.raises(ValueError, match="valid suites"):
        suites.get_suite("nope")


# ---- Synthetic workdirs --------------------------------------------------------------------


def _write_run(workdir, cell, accs, *, epoch_time=10.0, test_offset=-0.01):
    """A finished run whose val accuracy per epoch is ``accs``."""
    os.makedirs(workdir, exist_ok=True)
    history, timing = [], []
    for e, a in enumerate(accs, 1):
        history.append(
            {
                "epoch": e,
                "step": 10 * e,
                "train_loss": 1.0 / e,
                "val_loss": 1.0 - a,
                "val_accuracy": a,
                "test_loss": 1.0 - a,
                "test_accuracy": a + test_offset,
            }
        )
        timing.append({"epoch": e, "train_time_s": epoch_time * e, "epoch_time_s": epoch_time})
    for name, rows in (("metrics.jsonl", history), ("timing.jsonl", timing)):
        with open(os.path.join(workdir, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    best = max(history, key=lambda r: r["val_accuracy"])
    summary = {
        "method": cell.method,
        "seed": cell.seed,
        "epochs": len(accs),
        "steps": 10 * len(accs),
        "final": {k: history[-1][k] for k in ("val_accuracy", "test_accuracy")},
        "best_val": {
            "epoch": best["epoch"],
            "val_loss": best["val_loss"],
            "val_accuracy": best["val_accuracy"],
            "test_accuracy": best["test_accuracy"],
        },
        "train_time_s": epoch_time * len(accs),
        "median_epoch_time_s": epoch_time,
        "versions": {"jax": "0.0-test", "sadt_jax": "0.1.0"},
        "devices": {"platform": "cpu", "device_kind": "cpu", "device_count": 1},
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f)


# Val accuracy per epoch for seeds 0, 1, 2.
BASE_ACCS = {0: [0.50, 0.60, 0.70], 1: [0.55, 0.65, 0.72], 2: [0.52, 0.62, 0.74]}
T1_ACCS = {0: [0.60, 0.75, 0.80], 1: [0.62, 0.71, 0.78], 2: [0.58, 0.76, 0.82]}


@pytest.fixture
def synthetic_suite(tmp_path):
    """fashion_mnist runs: base and sadt_t1 finished for seeds 0-2, sam partial, gc failed."""
    root = str(tmp_path / "runs")
    cells = {c.name: c for c in suites.suite_cells("fashion_mnist")}
    for seed in range(3):
        for name, accs in (("base", BASE_ACCS), ("sadt_t1", T1_ACCS)):
            cell = cells[f"{name}_s{seed}"]
            _write_run(
                cell.workdir(root), cell, accs[seed], epoch_time=10.0 * (1 + (name != "base"))
            )
    os.makedirs(os.path.join(cells["sam_s0"].workdir(root), "checkpoints"))
    gc = cells["gc_s0"].workdir(root)
    os.makedirs(gc)
    with open(os.path.join(gc, "suite_run.json"), "w") as f:
        json.dump({"attempts": [{"returncode": 3, "outcome": "failed: non-finite loss"}]}, f)
    return root


def _csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def test_aggregate_statistics(synthetic_suite, tmp_path):
    out = str(tmp_path / "results")
    written = aggregate.aggregate_suite("fashion_mnist", synthetic_suite, out, plots=False)
    assert written[0].endswith("REPORT.md")
    rows = {r["label"]: r for r in _csv_rows(os.path.join(out, "accuracy.csv"))}
    assert rows["base"]["n"] == "3" and rows["sadt_t1"]["n"] == "3"
    assert rows["sam"]["n"] == "0" and rows["sam"]["final_val_mean"] == ""
    finals = [BASE_ACCS[s][-1] for s in range(3)]
    assert float(rows["base"]["final_val_mean"]) == pytest.approx(np.mean(finals), abs=1e-6)
    assert float(rows["base"]["final_val_std"]) == pytest.approx(np.std(finals, ddof=1), abs=1e-6)
    assert float(rows["sadt_t1"]["best_val_test_mean"]) == pytest.approx(
        np.mean([0.79, 0.77, 0.81]), abs=1e-6
    )
    assert float(rows["sadt_t1"]["train_time_mean"]) == pytest.approx(60.0)

    md = open(os.path.join(out, "accuracy.md")).read()
    assert "72.00 ± 2.00" in md  # base final val: 70, 72, 74
    assert "python -m experiments.aggregate --suite=fashion_mnist" in md
    assert "same initial weights" in md and "0.0-test" in md

    conv = {r["label"]: r for r in _csv_rows(os.path.join(out, "convergence.csv"))}
    # 0.7: base reaches it at epoch 3 in all seeds; sadt_t1 at epoch 2 in all seeds.
    assert conv["base"]["reach_0.7_k"] == "3"
    assert float(conv["base"]["reach_0.7_epochs_mean"]) == 3.0
    assert float(conv["sadt_t1"]["reach_0.7_epochs_mean"]) == 2.0
    assert float(conv["sadt_t1"]["reach_0.7_time_mean"]) == pytest.approx(40.0)
    # Gradient evaluations: base 30 steps x 1 pass; sadt_t1 20 steps x 2 passes.
    assert float(conv["base"]["reach_0.7_passes_mean"]) == 30.0
    assert float(conv["sadt_t1"]["reach_0.7_passes_mean"]) == 40.0
    # 0.8: sadt_t1 seed 0 (epoch 3) and seed 2 (epoch 3); base never.
    assert conv["sadt_t1"]["reach_0.8_k"] == "2" and conv["base"]["reach_0.8_k"] == "0"
    assert "(2/3)" in open(os.path.join(out, "convergence.md")).read()

    vs = {r["label"]: r for r in _csv_rows(os.path.join(out, "vs_base.csv"))}
    diffs = [T1_ACCS[s][-1] - BASE_ACCS[s][-1] for s in range(3)]
    assert float(vs["sadt_t1"]["d_final_test_mean"]) == pytest.approx(np.mean(diffs), abs=1e-6)
    assert vs["sadt_t1"]["d_final_test_wins"] == "3"
    assert float(vs["sadt_t1"]["time_ratio_mean"]) == pytest.approx(2.0)

    states = {r["cell"]: r["state"] for r in _csv_rows(os.path.join(out, "runs.csv"))}
    assert states["base_s0"] == "done" and states["sam_s0"] == "partial"
    assert states["gc_s0"] == "failed" and states["agc_s0"] == "new"


def test_aggregate_regenerates_identically_and_plots(synthetic_suite, tmp_path):
    out = str(tmp_path / "results")
    aggregate.aggregate_suite("fashion_mnist", synthetic_suite, out)
    tables = sorted(f for f in os.listdir(out) if f.endswith((".md", ".csv")))
    first = {f: open(os.path.join(out, f)).read() for f in tables}
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert pngs == sorted(
        f"{k}_fashion_mnist.png"
        for k in (
            "curves_val",
            "curves_test",
            "loss_val",
            "acc_vs_grads",
            "acc_vs_time",
            "final",
            "bars",
            "vs_base",
        )
    )
    for p in pngs:
        with open(os.path.join(out, p), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (
        aggregate.main(
            [
                "--suite=fashion_mnist",
                f"--root={synthetic_suite}",
                f"--results_dir={out}",
            ]
        )
        == 0
    )
    second = {f: open(os.path.join(out, f)).read() for f in tables}
    assert first == second


def test_teacher_every_reuses_fashion_mnist_runs(synthetic_suite, tmp_path):
    cells = suites.suite_cells("teacher_every")
    assert [c.label for c in cells[:5]] == ["base", "k=1", "k=2", "k=4", "k=8"]
    # base and k=1 are the fashion_mnist suite's own workdirs; only k > 1 is new.
    assert (cells[0].suite, cells[0].name) == ("fashion_mnist", "base_s0")
    assert (cells[1].suite, cells[1].name) == ("fashion_mnist", "sadt_t1_s0")
    assert cells[2].workdir("r") == os.path.join("r", "teacher_every", "sadt_t1_k2_s0")
    assert "--config.teacher_every=2" in cells[2].command("r", python="python")
    assert suites.estimate_seconds(cells[4], "cpu2") < suites.estimate_seconds(cells[2], "cpu2")
    for seed in range(3):
        k2 = cells[5 * seed + 2]
        _write_run(k2.workdir(synthetic_suite), k2, [0.6, 0.7, 0.79], epoch_time=12.0)
    # A finished fashion_mnist run that is not a teacher_every cell must stay out.
    sam = {c.name: c for c in suites.suite_cells("fashion_mnist")}["sam_s0"]
    _write_run(sam.workdir(synthetic_suite), sam, [0.9, 0.9, 0.9])
    with open(os.path.join(sam.workdir(synthetic_suite), "suite_run.json"), "w") as f:
        json.dump({"cell": sam.to_json(), "attempts": []}, f)
    out = str(tmp_path / "results")
    aggregate.aggregate_suite("teacher_every", synthetic_suite, out, plots=False)
    rows = {r["label"]: r for r in _csv_rows(os.path.join(out, "accuracy.csv"))}
    assert set(rows) == {"base", "k=1", "k=2", "k=4", "k=8"}
    assert int(rows["k=2"]["n"]) == 3 and int(rows["k=1"]["n"]) == 3
    assert int(rows["k=4"]["n"]) == 0


def test_ablation_aggregation_outputs(tmp_path):
    """Synthetic ablation runs (rdrop included, whatever this checkout defines) aggregate
    into seed-paired tables with intervals against base and base_2x, and their plots."""
    root, out = str(tmp_path / "runs"), str(tmp_path / "results")
    cells = suites.suite_cells("ablation", seeds=[0, 1, 2])
    offsets = {"base": 0.0, "base_2x": 0.03, "rdrop": 0.02, "sadt_t1_kd0": 0.025}
    for c in cells:
        if c.label in offsets:
            accs = [0.5 + offsets[c.label] + 0.01 * c.seed + 0.02 * e for e in range(3)]
            _write_run(c.workdir(root), c, accs)
    aggregate.aggregate_suite("ablation", root, out, seeds=[0, 1, 2])
    vs = {r["label"]: r for r in _csv_rows(os.path.join(out, "vs_base_2x.csv"))}
    assert float(vs["rdrop"]["d_final_test_mean"]) == pytest.approx(-0.01, abs=1e-6)
    assert vs["rdrop"]["pairs"] == "3" and vs["sadt_t1_kd0"]["d_final_test_wins"] == "0"
    runs = _csv_rows(os.path.join(out, "runs.csv"))
    assert len(runs) == len(cells) == 36 and {r["seed"] for r in runs} == {"0", "1", "2"}
    for png in ("vs_base_ablation.png", "vs_base_2x_ablation.png", "acc_vs_grads_ablation.png"):
        assert os.path.getsize(os.path.join(out, png)) > 0


def test_claims_from_a_committed_runs_csv(tmp_path, capsys):
    from experiments import claims

    root, out = str(tmp_path / "runs"), str(tmp_path / "results")
    for c in suites.suite_cells("fashion_mnist"):
        if c.method in ("base", "sadt_t1"):
            accs = BASE_ACCS if c.method == "base" else T1_ACCS
            _write_run(c.workdir(root), c, accs[c.seed])
    aggregate.aggregate_suite("fashion_mnist", root, out, plots=False)
    path = os.path.join(out, "runs.csv")
    rows = claims.paired_rows(claims.read_table(path), ["base"], claims.METRIC)
    t1 = next(r for r in rows if r[1] == "sadt_t1")
    diffs = [T1_ACCS[s][-1] - BASE_ACCS[s][-1] for s in range(3)]
    assert t1[3]["base"].mean == pytest.approx(np.mean(diffs), abs=1e-6)
    assert claims.main([f"--runs={path}", "--reference=base"]) == 0
    text = capsys.readouterr().out
    d = stats.paired_difference(diffs)
    assert f"| {100 * d.mean:+.2f} ± {100 * d.std:.2f} | {stats.fmt_ci(d, scale=100.0)} |" in text
    assert "seed std of test_acc_@_best_val: 2.00–2.00 pp" in text  # 70/72/74, 78/80/82 - 1
    # From a paired summary (mean, std, pairs) the same interval.
    summary = tmp_path / "paired.csv"
    summary.write_text(
        f"# t\nlabel,pairs,d_x_mean,d_x_std\nsadt_t1,3,{np.mean(diffs)},{np.std(diffs, ddof=1)}\n"
    )
    assert claims.main([f"--paired_summary={summary}"]) == 0
    assert stats.fmt_ci(d, digits=4) in capsys.readouterr().out
    assert claims.main([]) == 2


def test_claims_minus_is_the_within_run_difference(tmp_path, capsys):
    from experiments import claims

    path = tmp_path / "runs.csv"
    lines = ["# runs", "cell,setting,label,seed,state,test_acc_@_best_val,final_test_acc"]
    selected = {"base": [0.78, 0.80, 0.79], "sadt_t1": [0.77, 0.78, 0.76]}
    final = {"base": [0.79, 0.80, 0.80], "sadt_t1": [0.80, 0.80, 0.80]}
    for label in selected:
        for seed in range(3):
            lines.append(
                f"{label}_s{seed},s,{label},{seed},done,{selected[label][seed]},{final[label][seed]}"
            )
    lines.append("sadt_t1_s3,s,sadt_t1,3,failed,,")  # unfinished runs do not count
    path.write_text("\n".join(lines) + "\n")
    rows = {
        label: d
        for _, label, d in claims.within_run_rows(
            claims.read_table(str(path)), "test_acc_@_best_val", "final_test_acc"
        )
    }
    d = stats.paired_difference([-0.03, -0.02, -0.04])
    assert rows["sadt_t1"].n == 3 and rows["sadt_t1"].mean == pytest.approx(d.mean)
    assert rows["sadt_t1"].wins == 0 and rows["base"].mean == pytest.approx(-0.02 / 3)
    assert claims.main([f"--runs={path}", "--reference=base", "--minus=final_test_acc"]) == 0
    text = capsys.readouterr().out
    assert f"| s | sadt_t1 | 3 | {100 * d.mean:+.2f} ± {100 * d.std:.2f} | " in text
    assert claims.main([f"--runs={path}", "--minus=nope"]) == 2
    assert "has no column 'nope'" in capsys.readouterr().err


def test_mean_std_edge_cases():
    assert stats.mean_std([]) == (None, None, 0)
    assert stats.mean_std([0.5, None]) == (0.5, None, 1)
    m, s, n = stats.mean_std([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and s == pytest.approx(1.0)
    assert stats.fmt_ms(0.5, None, scale=100) == "50.00"
    assert stats.fmt_ms(None, None) == "–"


def test_paired_difference_confidence_interval():
    from scipy import stats as scipy_stats

    d = stats.paired_difference([0.01, 0.02, 0.03, None])
    assert (d.n, d.wins) == (3, 3)
    assert d.mean == pytest.approx(0.02) and d.std == pytest.approx(0.01)
    half = 4.302652729749462 * 0.01 / math.sqrt(3)  # t_{2, 0.975}
    assert (d.ci_low, d.ci_high) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    p = scipy_stats.ttest_1samp([0.01, 0.02, 0.03], 0.0).pvalue
    assert d.p_value == pytest.approx(p)
    assert stats.fmt_ci(d, scale=100.0) == "[-0.48, +4.48]"
    one = stats.paired_difference([0.5])
    assert one.ci_low is None and one.p_value is None and stats.fmt_ci(one) == "–"
    assert stats.fmt_p(None) == "–" and stats.fmt_p(1e-5) == "<0.001"


def test_std_rounded_once_from_full_precision():
    # 0.009475 is 0.009 at 3 decimals: it must not go through 0.0095 to 0.010.
    assert stats.fmt_ms(0.108637, 0.009475, digits=3) == "0.109 ± 0.009"
    assert stats.fmt_ms(0.107308, 0.011475, digits=3) == "0.107 ± 0.011"
    assert stats.fmt_ms(-0.0118, 0.0021, scale=100.0, signed=True) == "-1.18 ± 0.21"
    assert stats.fmt_ms(0.0339, None, scale=100.0, signed=True) == "+3.39"


def test_reference_table_has_confidence_intervals(synthetic_suite, tmp_path):
    out = str(tmp_path / "results")
    aggregate.aggregate_suite("fashion_mnist", synthetic_suite, out, plots=False)
    vs = {r["label"]: r for r in _csv_rows(os.path.join(out, "vs_base.csv"))}
    diffs = [T1_ACCS[s][-1] - BASE_ACCS[s][-1] for s in range(3)]
    half = 4.302652729749462 * np.std(diffs, ddof=1) / math.sqrt(3)
    t1 = vs["sadt_t1"]
    assert float(t1["d_final_test_ci_low"]) == pytest.approx(np.mean(diffs) - half, abs=1e-6)
    assert float(t1["d_final_test_ci_high"]) == pytest.approx(np.mean(diffs) + half, abs=1e-6)
    assert 0 < float(t1["d_final_test_p"]) < 0.05
    md = open(os.path.join(out, "vs_base.md")).read()
    lo, hi = 100 * (np.mean(diffs) - half), 100 * (np.mean(diffs) + half)
    assert f"[{lo:+.2f}, {hi:+.2f}]" in md and "95 % CI" in md


def test_plot_helpers():
    assert plots.bar_limits([76.0, 80.0], [77.0, 81.0])[0] == 0.0  # not cut at 65 %
    assert plots.bar_limits([-2.0], [1.0])[0] == -2.0
    groups = {("g", "s", "a"): [], ("h", "s", "a"): []}
    cell = suites.suite_cells("fashion_mnist")[0]
    groups[("g", "s", "a")] = [workdirs.Run(cell, "done"), workdirs.Run(cell, "done")]
    groups[("h", "s", "a")] = [workdirs.Run(cell, "done"), workdirs.Run(cell, "partial")]
    assert "mean ± std" in aggregate._spread(groups, "g")
    assert "mean ± std" not in aggregate._spread(groups, "h")


def test_aggregate_sharpness(synthetic_suite, tmp_path):
    for cell in suites.suite_cells("sharpness"):
        if cell.method not in ("base", "sadt_t1"):
            continue
        os.makedirs(cell.workdir(synthetic_suite))
        lam = 10.0 + cell.seed if cell.method == "base" else 5.0
        with open(os.path.join(cell.workdir(synthetic_suite), "sharpness.json"), "w") as f:
            json.dump(
                {
                    "hessian": {
                        "top_eigenvalue": lam,
                        "converged": cell.name != "base_s2",
                        "num_iters": 20,
                    },
                    "worst_case_loss_increase": {"0.01": 0.1, "0.05": 0.5},
                    "loss": 0.3,
                },
                f,
            )
    out = str(tmp_path / "sharp")
    aggregate.aggregate_suite("sharpness", synthetic_suite, out)
    rows = {r["label"]: r for r in _csv_rows(os.path.join(out, "sharpness.csv"))}
    assert rows["base"]["n"] == "3" and float(rows["base"]["lambda_max_mean"]) == 11.0
    assert float(rows["base"]["lambda_max_std"]) == pytest.approx(1.0)
    assert float(rows["sadt_t1"]["worst_case_0.05_mean"]) == 0.5
    assert float(rows["sadt_t1"]["final_test_mean"]) == pytest.approx(np.mean([0.79, 0.77, 0.81]))
    assert rows["gc"]["n"] == "0"
    assert rows["base"]["converged"] == "2" and rows["sadt_t1"]["converged"] == "3"
    assert "| 2/3 |" in open(os.path.join(out, "sharpness.md")).read()
    assert os.path.exists(os.path.join(out, "sharpness_vs_accuracy.png"))
    per_run = {r["cell"]: r for r in _csv_rows(os.path.join(out, "runs.csv"))}
    assert float(per_run["base_s1"]["lambda_max"]) == 11.0
    assert per_run["base_s2"]["converged"] == "False" and per_run["base_s1"]["hvps"] == "20"
    assert float(per_run["sadt_t1_s0"]["worst_case_0.05"]) == 0.5
    assert per_run["gc_s0"]["lambda_max"] == ""
    # Seed-paired: sadt_t1 (5) minus base (10, 11, 12) = -5, -6, -7; flatter in 3 of 3.
    paired = {r["label"]: r for r in _csv_rows(os.path.join(out, "sharpness_vs_base.csv"))}
    assert "base" not in paired and paired["gc"]["pairs"] == "0"
    assert paired["sadt_t1"]["pairs"] == "3"
    assert float(paired["sadt_t1"]["d_lambda_max_mean"]) == pytest.approx(-6.0)
    assert float(paired["sadt_t1"]["d_lambda_max_std"]) == pytest.approx(1.0)
    assert paired["sadt_t1"]["d_lambda_max_lower"] == "3"
    assert paired["sadt_t1"]["d_worst_case_0.05_lower"] == "0"


# ---- The runner -----------------------------------------------------------------------------


class FakeLauncher:
    """Stands in for the subprocess: records calls, "trains" by writing a summary."""

    def __init__(self, fail=(), root=None):
        self.calls, self.fail, self.root = [], set(fail), root

    def __call__(self, argv, log_path, cwd):
        workdir = os.path.dirname(log_path)
        name = os.path.basename(workdir)
        self.calls.append(name)
        assert cwd == suites.REPO_ROOT and os.path.exists(log_path)
        if name in self.fail:
            return 3
        cell = next(c for c in suites.suite_cells("fashion_mnist", [0, 1]) if c.name == name)
        _write_run(workdir, cell, [0.5, 0.6])
        return 0


def test_runner_skips_resumes_records_failures(tmp_path, capsys):
    root = str(tmp_path / "runs")
    cells = suites.suite_cells("fashion_mnist", [0, 1], only=["base_s", "sadt_t1_s", "sam_s"])
    assert [c.name for c in cells] == ["base_s0", "sam_s0", "sadt_t1_s0"] + [
        "base_s1",
        "sam_s1",
        "sadt_t1_s1",
    ]
    _write_run(cells[0].workdir(root), cells[0], [0.5])  # finished: skipped
    os.makedirs(os.path.join(cells[2].workdir(root), "checkpoints"))  # interrupted: resumed
    launcher = FakeLauncher(fail={"sam_s0"})
    result = run_suite.run_cells(cells, root, launcher=launcher, python="python")
    assert launcher.calls == ["sam_s0", "sadt_t1_s0", "base_s1", "sam_s1", "sadt_t1_s1"]
    assert result["skipped"] == ["base_s0"] and result["failed"] == ["sam_s0"]
    assert result["done"] == ["sadt_t1_s0", "base_s1", "sam_s1", "sadt_t1_s1"]
    status = json.load(open(os.path.join(cells[1].workdir(root), "suite_run.json")))
    assert status["attempts"][-1]["returncode"] == 3
    assert "non-finite" in status["attempts"][-1]["outcome"]
    assert status["attempts"][-1]["command"][2] == "sadt_jax.main"
    head = subprocess.run(
        ["git", "-C", suites.REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert status["attempts"][-1]["git"]["commit"] == head and len(head) == 40
    assert "resuming" in capsys.readouterr().out
    assert run_suite.cell_state(cells[1], root) == "failed"
    runs_log = open(os.path.join(root, "fashion_mnist", "_runs.jsonl")).read().splitlines()
    assert len(runs_log) == 5

    # A second pass reruns only the failed cell.
    launcher = FakeLauncher()
    result = run_suite.run_cells(cells, root, launcher=launcher, python="python")
    assert launcher.calls == ["sam_s0"] and result["done"] == ["sam_s0"]
    status = json.load(open(os.path.join(cells[1].workdir(root), "suite_run.json")))
    assert [a["returncode"] for a in status["attempts"]] == [3, 0]


def test_runner_cli_dry_run_and_aggregation(tmp_path, capsys):
    root, out = str(tmp_path / "runs"), str(tmp_path / "results")
    args = [
        "--suite=fashion_mnist",
        f"--root={root}",
        "--seeds=0",
        "--only=base_s,sadt_t1_s",
        f"--results_dir={out}",
    ]
    launcher = FakeLauncher()
    assert run_suite.main([*args, "--dry_run"], launcher=launcher) == 0
    assert launcher.calls == [] and not os.path.exists(root)
    assert "--config=configs/fashion_mnist.py:sadt_t1" in capsys.readouterr().out

    rc = run_suite.main(args, launcher=launcher)
    assert launcher.calls == ["base_s0", "sadt_t1_s0"] and rc == 0
    rows = {r["label"]: r for r in _csv_rows(os.path.join(out, "accuracy.csv"))}
    assert rows["base"]["n"] == "1" and rows["gc"]["n"] == "0"
    commit = run_suite.git_info(suites.REPO_ROOT)["commit"]
    per_run = {r["cell"]: r for r in _csv_rows(os.path.join(out, "runs.csv"))}
    assert per_run["base_s0"]["git_commit"].removesuffix("+dirty") == commit
    assert per_run["gc_s0"]["git_commit"] == ""
    assert (
        f"Code (git commit, experiments.run_suite): {commit}"
        in open(os.path.join(out, "accuracy.md")).read()
    )
    # The tables name the aggregation command, which regenerates them identically.
    before = open(os.path.join(out, "accuracy.md")).read()
    assert f"--root={root} --seeds=0" in before
    assert run_suite.main([*args, "--aggregate_only"], launcher=launcher) == 0
    assert open(os.path.join(out, "accuracy.md")).read() == before
    assert launcher.calls == ["base_s0", "sadt_t1_s0"]

    failing = FakeLauncher(fail={"base_s1"})
    rc = run_suite.main(
        [*args[:2], "--seeds=1", "--only=base_s", f"--results_dir={out}"], launcher=failing
    )
    assert rc == 1


# ---- Restore and sharpness on a real (tiny) run ---------------------------------------------


def _tiny_dataset():
    from sadt_jax.data import Dataset

    rng = np.random.default_rng(0)

    def split(n):
        return rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8), rng.integers(0, 10, n).astype(
            np.int32
        )

    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = split(64), split(32), split(32)
    return Dataset(
        tr_x, tr_y, va_x, va_y, te_x, te_y, 10, (8, 8, 1), np.float32([120.0]), np.float32([70.0])
    )


def test_restore_and_sharpness_on_a_tiny_run(tmp_path, monkeypatch):
    import jax

    from configs import fashion_mnist
    from experiments import restore, sharpness
    from sadt_jax.train import loop, protocol, steps

    ds = _tiny_dataset()
    monkeypatch.setattr(protocol, "load_dataset", lambda *a, **k: ds)  # loop and restore
    config = fashion_mnist.get_config("base")
    config.batch_size, config.num_steps, config.eval_batch_size = 32, 2, 32
    config.data.augment = "none"  # less to compile
    workdir = str(tmp_path / "run")
    summary = loop.train_and_evaluate(config, workdir)

    run = restore.restore_run(workdir, dataset=ds)
    assert run.step == summary["steps"] == 2 and int(run.state.step) == 2
    assert run.config.method == "base"
    batch = {"image": ds.test_images, "label": ds.test_labels, "mask": np.ones(32, np.float32)}
    eval_fn = jax.jit(lambda st, b: steps.eval_sums(st, b, mean=ds.mean, std=ds.std))
    sums = jax.device_get(eval_fn(run.state, batch))
    assert float(sums["correct"]) / 32 == pytest.approx(summary["final"]["test_accuracy"])

    # The measurements themselves are tested in test_sharpness.py; here only the plumbing
    # (restore, batch, loss, JSON), with stand-ins that skip their long compilations.
    from sadt_jax import sharpness as measures

    def fake_eigenvalue(loss_fn, params, *, key, num_iters, tol):
        del key, tol
        return loss_fn(params), {"num_iters": num_iters, "converged": True, "residual": 0.0}

    def fake_worst_case(loss_fn, params, *, rho, num_steps):
        del num_steps
        return rho * loss_fn(params)

    monkeypatch.setattr(measures, "hessian_top_eigenvalue", fake_eigenvalue)
    monkeypatch.setattr(measures, "worst_case_loss_increase", fake_worst_case)
    out = tmp_path / "sharp" / "sharpness.json"
    rc = sharpness.main(
        [
            f"--workdir={workdir}",
            f"--out={out}",
            "--num_examples=16",
            "--num_iters=2",
            "--rhos=0.05",
            "--ascent_steps=1",
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["num_examples"] == 16 and result["checkpoint_step"] == 2
    loss = result["loss"]
    assert math.isfinite(loss) and result["hessian"]["top_eigenvalue"] == pytest.approx(loss)
    assert result["hessian"]["num_iters"] == 2
    assert result["worst_case_loss_increase"]["0.05"] == pytest.approx(0.05 * loss)


def test_aggregate_paper_pivot(tmp_path):
    """Paper layout: methods as rows, dataset/model/batch as columns."""
    root, out = str(tmp_path / "runs"), str(tmp_path / "results")
    cells = [
        c
        for c in suites.suite_cells("paper")
        if c.method in ("base", "sadt_t1")
        and c.model in ("simple_cnn", "resnet56")
        and c.dataset == "cifar10"
    ]
    for i, c in enumerate(cells):
        _write_run(c.workdir(root), c, [0.3, 0.4 + 0.01 * i])
    aggregate.aggregate_suite("paper", root, out, plots=False)
    md = open(os.path.join(out, "pivot_paper_final_test.md")).read()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    settings = [
        f"{d}/{m}/{v}"
        for d in suites.PAPER_DATASETS
        for m in suites.PAPER_MODELS
        for v in suites.PAPER_VARIANTS
    ]
    assert header == "| method | " + " | ".join(settings) + " |"  # all 16, even if missing
    rows = [line for line in md.splitlines() if line.startswith("| ") and "(n=" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| base", "| sadt_t1"]
    # base: 0.40 + 0.01 i (i = 0, 1, then 2, 3 for resnet56) minus the 0.01 test offset.
    assert rows[0].split(" | ")[1:3] == ["39.00 (n=1)", "41.00 (n=1)"]
    assert rows[0].split(" | ")[7:9] == ["43.00 (n=1)", "45.00 (n=1)"]
    groups = workdirs.group_runs(workdirs.collect_runs(suites.suite_cells("paper"), root))
    bars = plots.plot_bars(groups, "paper", os.path.join(out, "bars.png"), "paper")
    assert os.path.getsize(bars) > 0


def test_fashion_mnist_release_and_release_key_grids():
    cells = suites.suite_cells("fashion_mnist_release")
    assert len(cells) == 9 * 3
    assert {c.method for c in cells} == set(suites.PAPER_METHODS) | {"base_2x", "rdrop"}
    for c in cells:
        assert c.config == f"configs/fashion_mnist.py:{c.method},release"
        assert c.model == "release_simple_cnn" and c.num_epochs == 10
    key = suites.suite_cells("release_key")
    assert len(key) == 4 * 5 and {c.seed for c in key} == {0, 1, 2, 3, 4}
    # The same workdirs as fashion_mnist_release: seeds 0-2 are not run twice.
    release_dirs = {(c.suite, c.name) for c in cells}
    shared = [c for c in key if c.seed < 3]
    assert shared and all((c.suite, c.name) in release_dirs for c in shared)
    assert all(c.group == "release_key" for c in key)


def test_run_metric_prefers_the_tested_selected_weights():
    cell = suites.suite_cells("fashion_mnist_release", seeds=[0])[0]
    best_val = {"epoch": 10, "test_accuracy": 0.70, "val_accuracy": 0.71}
    selected = {"epoch": 6, "test_accuracy": 0.65, "val_accuracy": 0.66, "tested": True}
    run = workdirs.Run(cell, "done", summary={"best_val": best_val, "selected": selected})
    assert workdirs.run_metric(run, "best_val_test") == 0.65
    assert workdirs.run_metric(run, "best_epoch") == 6
    assert workdirs.run_metric(run, "best_val_val") == 0.66
    old = workdirs.Run(cell, "done", summary={"best_val": best_val})  # runs before best/
    assert workdirs.run_metric(old, "best_val_test") == 0.70
