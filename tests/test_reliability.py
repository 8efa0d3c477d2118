"""Runs that survive: exact resume, preemption, divergence, damaged checkpoints, bad input.

Each test drives the real CLI (``python -m sadt_jax.main``) in subprocesses on a
256-image Fashion-MNIST copy (2 epochs x 8 steps of batch 32) and compares with
one uninterrupted reference run of the same command: the final parameters (read
from the newest orbax checkpoint) and ``metrics.jsonl`` must be bitwise equal.
The subprocesses share a persistent compilation cache, so only the first run of
a config compiles. The in-process tests at the end cover :class:`Checkpointer`
on a tiny tree.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import signal

import cli_runs
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sadt_jax.train.checkpointing import (
    Checkpointer,
    CheckpointError,
    NonFiniteStateError,
    abstract_like,
)

needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(cli_runs.FMNIST_DIR),
    reason="Fashion-MNIST not installed: sudo apt-get install dataset-fashion-mnist",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return cli_runs.tiny_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_runs.env(str(tmp_path_factory.mktemp("jax_cache")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, env):
    """Workdir of one uninterrupted run of the tiny command."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    proc = cli_runs.run(cli_runs.cli_args(workdir, data_dir), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cli_runs.checkpoint_steps(workdir) == [8, 16]
    return workdir


def assert_same_run(workdir: str, reference: str) -> None:
    """Same final checkpoint step, parameters and metrics.jsonl, bit for bit."""
    assert cli_runs.checkpoint_steps(workdir)[-1] == cli_runs.checkpoint_steps(reference)[-1]
    got, want = cli_runs.final_params(workdir), cli_runs.final_params(reference)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    metrics = cli_runs.read_text(os.path.join(workdir, "metrics.jsonl"))
    assert metrics == cli_runs.read_text(os.path.join(reference, "metrics.jsonl"))
    assert [json.loads(r)["epoch"] for r in metrics.splitlines()] == [1, 2]


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ---- Exact resume ---------------------------------------------------------------


@needs_fmnist
def test_sigkill_after_a_checkpoint_and_mid_epoch_then_resume_is_exact(
    reference, data_dir, env, tmp_path
):
    workdir = str(tmp_path / "run")
    args = cli_runs.cli_args(workdir, data_dir)
    # 1. Killed right after the epoch-1 checkpoint was written.
    rc, out, _ = cli_runs.run_until(args, env=env, line="checkpoint saved at step 8")
    assert rc == -signal.SIGKILL
    assert cli_runs.checkpoint_steps(workdir) == [8]
    # 2. Resumed, then killed in the middle of epoch 2 (nothing newer saved).
    rc, out, _ = cli_runs.run_until(args, env=env, line="epoch 2/2 step 4/8")
    assert rc == -signal.SIGKILL
    assert "Resuming from the checkpoint at step 8" in out
    assert cli_runs.checkpoint_steps(workdir) == [8]
    # 3. Resumed to the end: as if never interrupted.
    proc = cli_runs.run(args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resuming from the checkpoint at step 8" in proc.stdout
    assert_same_run(workdir, reference)


@needs_fmnist
def test_sigterm_saves_mid_epoch_exits_143_and_resumes_exactly(reference, data_dir, env, tmp_path):
    workdir = str(tmp_path / "run")
    args = cli_runs.cli_args(workdir, data_dir)
    rc, _, err = cli_runs.run_until(args, env=env, line="epoch 2/2 step 2/8", sig=signal.SIGTERM)
    assert rc == 143, err[-3000:]
    assert "Traceback" not in err
    assert "preempted: SIGTERM: checkpoint saved at step" in err
    steps = cli_runs.checkpoint_steps(workdir)
    assert steps[0] == 8 and 8 < steps[-1] < 16, steps  # a mid-epoch checkpoint
    tree = cli_runs.checkpoint_tree(workdir)
    assert int(tree["metrics"]["count"]) == steps[-1] - 8  # running sums of the epoch
    assert int(tree["state"]["step"]) == steps[-1]

    proc = cli_runs.run(args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Resuming from the checkpoint at step {steps[-1]}" in proc.stdout
    assert_same_run(workdir, reference)


# ---- Damaged checkpoints ---------------------------------------------------------


def _largest_files(step_dir: str) -> list[str]:
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
    return sorted(files, key=os.path.getsize, reverse=True)


def _garble(path: str, n: int = 64) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        chunk = f.read(n)
        f.seek(size // 2)
        f.write(bytes(b ^ 0x5A for b in chunk))


@needs_fmnist
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    reference, data_dir, env, tmp_path
):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    # Flip bytes inside the two largest array files of the newest checkpoint. Orbax
    # reads such files without complaint; the fingerprint saved with them notices.
    arrays = [p for p in _largest_files(os.path.join(workdir, "checkpoints", "16")) if "/d/" in p]
    for path in arrays[:2]:
        _garble(path)
    proc = cli_runs.run(cli_runs.cli_args(workdir, data_dir), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint 16" in proc.stderr and "damaged or unreadable" in proc.stderr
    assert "Resuming from the checkpoint at step 8" in proc.stdout
    assert os.path.isdir(os.path.join(workdir, "checkpoints.unreadable", "16"))
    assert_same_run(workdir, reference)


# ---- Divergence --------------------------------------------------------------------


@needs_fmnist
def test_nonfinite_loss_stops_naming_step_and_last_good_checkpoint(
    reference, data_dir, env, tmp_path
):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "16"))  # as if epoch 2 never ran
    args = cli_runs.cli_args(
        workdir, data_dir, "--config.optim.learning_rate=1e6", "--allow_config_change"
    )
    proc = cli_runs.run(args, env=env)
    assert proc.returncode == 3, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    step = re.search(r"non-finite loss or parameters at step (\d+)", line)
    assert step and 8 < int(step.group(1)) <= 16, line  # in epoch 2
    assert "last good checkpoint: step 8" in line
    # Every checkpoint on disk is finite.
    assert cli_runs.checkpoint_steps(workdir) == [8]
    for step in cli_runs.checkpoint_steps(workdir):
        leaves = cli_runs.flat(cli_runs.checkpoint_tree(workdir, step))
        for k, v in leaves.items():
            assert not np.issubdtype(v.dtype, np.floating) or np.isfinite(v).all(), k
    rows = cli_runs.read_text(os.path.join(workdir, "metrics.jsonl")).splitlines()
    assert len(rows) == 1  # epoch 2 never finished


# ---- Bad input: one line, exit 2, no traceback ---------------------------------------


@needs_fmnist
def test_workdir_holding_another_config_is_refused(reference, data_dir, env, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    before = _snapshot(workdir)
    proc = cli_runs.run(cli_runs.cli_args(workdir, data_dir, "--config.seed=1"), env=env)
    assert proc.returncode == 2
    (line,) = error_lines(proc.stderr)
    assert "different config" in line and "seed: 0 -> 1" in line
    assert "--allow_config_change" in line
    assert _snapshot(workdir) == before  # nothing touched


def _truncated_idx(directory: str) -> None:
    name = cli_runs.FILES["train"][0]
    with gzip.open(os.path.join(directory, name), "rb") as f:
        data = f.read()
    with gzip.open(os.path.join(directory, name), "wb") as f:
        f.write(data[: len(data) // 2])  # a valid gzip stream, half an IDX file


def _truncated_gzip(directory: str) -> None:
    path = os.path.join(directory, cli_runs.FILES["test"][0])
    os.truncate(path, os.path.getsize(path) // 2)


@needs_fmnist
@pytest.mark.parametrize(
    "fault, overrides, fix",
    [
        ("empty_dir", (), "apt-get install dataset-fashion-mnist"),
        ("truncated_idx", (), "reinstall"),
        ("truncated_gzip", (), "reinstall"),
        ("tfds_not_prepared", ("--config.data.name=cifar10",), "tfds build cifar10"),
    ],
)
def test_data_faults_are_one_clear_line(fault, overrides, fix, data_dir, env, tmp_path):
    faulty = str(tmp_path / "data")
    if fault in ("empty_dir", "tfds_not_prepared"):
        os.makedirs(faulty)
    else:
        shutil.copytree(data_dir, faulty)
        {"truncated_idx": _truncated_idx, "truncated_gzip": _truncated_gzip}[fault](faulty)
    workdir = str(tmp_path / "run")
    proc = cli_runs.run(cli_runs.cli_args(workdir, faulty, *overrides), env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert fix in line, line
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))


# ---- Checkpointer, in process ---------------------------------------------------------


def _tree(value: float) -> dict:
    return {
        "w": jnp.full((64, 32), value, jnp.float32),
        "b": jnp.arange(32, dtype=jnp.float32) * value,
        "step": jnp.array(int(value), jnp.int32),
        "key": jax.random.PRNGKey(0),
    }


def _saved(directory: str) -> Checkpointer:
    ckpt = Checkpointer(directory, max_to_keep=3)
    for step in (1, 2):
        ckpt.save(step, _tree(float(step)), {"epoch": step})
    ckpt.wait()
    return ckpt


def _truncate_largest(step_dir: str) -> None:
    path = _largest_files(os.path.join(step_dir, "state"))[0]
    os.truncate(path, os.path.getsize(path) // 2)


def _swap_contents(step_dir: str) -> None:
    """Silent corruption: well-formed array files whose values differ from the saved ones."""
    other = step_dir + ".other"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(other, _tree(3.0))
    shutil.rmtree(os.path.join(step_dir, "state"))
    shutil.move(other, os.path.join(step_dir, "state"))


def _break_meta(step_dir: str) -> None:
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
        f.write("{not json")


def _remove_manifest(step_dir: str) -> None:
    os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_truncate_largest, ""),
        (_swap_contents, "do not match the fingerprint"),
        (_break_meta, "JSONDecodeError"),
        pytest.param(
            _remove_manifest,
            "",  # orbax's event loop complains at garbage collection; harmless here
            marks=pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
        ),
    ],
)
def test_restore_skips_a_damaged_latest_checkpoint(damage, reason, tmp_path, caplog):
    directory = str(tmp_path / "checkpoints")
    _saved(directory).close()
    damage(os.path.join(directory, "2"))
    ckpt = Checkpointer(directory, max_to_keep=3)
    with caplog.at_level(logging.WARNING):
        tree, meta, step = ckpt.restore(abstract_like(_tree(0.0)))
    assert step == 1 and meta == {"epoch": 1}
    for k, v in _tree(1.0).items():
        assert np.array_equal(np.asarray(tree[k]), np.asarray(v)), k
    assert "checkpoint 2" in caplog.text and reason in caplog.text
    assert "damaged or unreadable" in caplog.text
    # The damaged one is moved aside, so the step can be saved again.
    assert ckpt.all_steps() == [1]
    assert os.listdir(str(tmp_path / "checkpoints.unreadable")) == ["2"]
    ckpt.save(2, _tree(2.0), {"epoch": 2})
    ckpt.close()


def test_restore_with_no_readable_checkpoint_raises_and_moves_nothing(tmp_path):
    directory = str(tmp_path / "checkpoints")
    _saved(directory).close()
    for step in ("1", "2"):
        _truncate_largest(os.path.join(directory, step))
    ckpt = Checkpointer(directory)
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        ckpt.restore(abstract_like(_tree(0.0)))
    assert ckpt.all_steps() == [1, 2]
    ckpt.close()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_save_refuses_a_nonfinite_tree(bad, tmp_path):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    tree = _tree(1.0)
    tree["b"] = tree["b"].at[3].set(bad)
    with pytest.raises(NonFiniteStateError):
        ckpt.save(1, tree, {})
    ckpt.close()
    assert ckpt.all_steps() == []


# ---- Extending, shortening, interrupting -----------------------------------------------


def _summary(workdir: str) -> dict:
    return json.loads(cli_runs.read_text(os.path.join(workdir, "summary.json")))


@needs_fmnist
def test_extending_from_a_partial_epoch_is_exact_and_shortening_is_refused(
    reference, data_dir, env, tmp_path
):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    # A run that failed before its first checkpoint left its config: another config may start.
    stored = json.loads(cli_runs.read_text(os.path.join(reference, "config.json")))
    stored["seed"] = 7
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(stored, f)
    args = cli_runs.cli_args(workdir, data_dir)
    for num_steps, ckpts, rows in ((3, [3], [3]), (11, [8, 11], [8, 11])):
        proc = cli_runs.run([*args, f"--config.num_steps={num_steps}"], env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert cli_runs.checkpoint_steps(workdir) == ckpts
        metrics = cli_runs.read_text(os.path.join(workdir, "metrics.jsonl")).splitlines()
        assert [json.loads(r)["step"] for r in metrics] == rows
        assert _summary(workdir)["steps"] == num_steps
    proc = cli_runs.run([*args, "--config.num_steps=16"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resuming from the checkpoint at step 11 (epoch 2, after 3 of its steps)" in proc.stdout
    assert_same_run(workdir, reference)  # 3 + 8 + 5 steps == 16 steps in one go, bit for bit

    # A finished run cannot be shortened; nothing is rewritten.
    before = {
        n: cli_runs.read_text(os.path.join(workdir, n)) for n in ("config.json", "metrics.jsonl")
    }
    proc = cli_runs.run([*args, "--config.num_steps=8"], env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert "already trained to step 16" in line and "cannot be shortened" in line, line
    for name, text in before.items():
        assert cli_runs.read_text(os.path.join(workdir, name)) == text, name


@needs_fmnist
def test_ctrl_c_saves_like_sigterm_exits_130_and_resumes_exactly(
    reference, data_dir, env, tmp_path
):
    workdir = str(tmp_path / "run")
    args = cli_runs.cli_args(workdir, data_dir)
    rc, _, err = cli_runs.run_until(args, env=env, line="epoch 2/2 step 2/8", sig=signal.SIGINT)
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err
    assert "preempted: SIGINT: checkpoint saved at step" in err
    assert 8 < cli_runs.checkpoint_steps(workdir)[-1] < 16
    proc = cli_runs.run(args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(workdir, reference)


# ---- The workdir: locked, writable, readable records ------------------------------------


def _fails(args: list[str], env: dict[str, str]) -> str:
    """Runs ``args``; asserts exit 2, no traceback and one ``error:`` line; returns it."""
    proc = cli_runs.run(args, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    return line


def _snapshot(folder: str) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@needs_fmnist
def test_a_workdir_in_use_is_refused_naming_the_holder(data_dir, env, tmp_path):
    import fcntl

    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    fd = os.open(workdir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running run does
        line = _fails(cli_runs.cli_args(workdir, data_dir), env)
    finally:
        os.close(fd)
    assert f"is in use by another run (pid {os.getpid()})" in line, line
    assert os.listdir(workdir) == []


@needs_fmnist
def test_unusable_workdirs_are_one_line(reference, data_dir, env, tmp_path):
    a_file = str(tmp_path / "file")
    with open(a_file, "w") as f:
        f.write("x")
    assert "is a file, not a folder" in _fails(cli_runs.cli_args(a_file, data_dir), env)
    line = _fails(cli_runs.cli_args("", data_dir), env)
    assert line == "error: --workdir is empty; name the run's output folder"
    # config.json damaged next to checkpoints: the run cannot tell what they belong to.
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write('{"seed": ')
    before = _snapshot(workdir)
    line = _fails(cli_runs.cli_args(workdir, data_dir), env)
    assert "config.json is not valid JSON" in line and "--allow_config_change" in line, line
    assert _snapshot(workdir) == before
    # metrics.jsonl damaged: refused, nothing rewritten.
    shutil.copy(os.path.join(reference, "config.json"), workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write("{not json\n")
    before = _snapshot(workdir)
    line = _fails(cli_runs.cli_args(workdir, data_dir), env)
    assert "metrics.jsonl line 3 is not valid JSON" in line, line
    assert _snapshot(workdir) == before


@needs_fmnist
def test_no_readable_checkpoint_is_a_short_error(reference, data_dir, env, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    for step in ("8", "16"):
        _truncate_largest(os.path.join(workdir, "checkpoints", step))
    proc = cli_runs.run(cli_runs.cli_args(workdir, data_dir), env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert lines and "no readable checkpoint" in lines[0], lines
    assert len(proc.stderr.splitlines()) < 40, proc.stderr  # the reason, not pages of logs
    assert cli_runs.checkpoint_steps(workdir) == [8, 16]  # nothing moved or deleted


@pytest.fixture
def tmpfs(tmp_path):
    """A fresh tmpfs mount (root only); yields ``(path, remount)``."""
    import subprocess

    path = str(tmp_path / "tmpfs")
    os.makedirs(path)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", path])
    if mounted.returncode:
        pytest.skip("cannot mount a tmpfs here")

    def remount(options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", path], check=True)

    try:
        yield path, remount
    finally:
        subprocess.run(["umount", "-l", path])


@needs_fmnist
def test_read_only_workdir_and_full_disk_are_one_line(reference, data_dir, env, tmpfs):
    path, remount = tmpfs
    workdir = os.path.join(path, "run")
    shutil.copytree(reference, workdir)
    before = _snapshot(workdir)
    # A finished run on a read-only file system.
    remount("ro")
    line = _fails(cli_runs.cli_args(workdir, data_dir), env)
    assert "is not writable" in line, line
    remount("rw")
    # A full disk while extending the run: refused with one line, the checkpoints intact.
    free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
    with open(os.path.join(path, "filler"), "wb") as f:
        f.write(b"\0" * (free - 64 * 1024))  # room for the records, not for a checkpoint
    args = cli_runs.cli_args(workdir, data_dir, epochs=3)
    proc = cli_runs.run(args, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert lines and "No space left on device" in " ".join(lines), lines
    assert cli_runs.checkpoint_steps(workdir) == [8, 16]
    saved = ("checkpoints/8/", "checkpoints/16/")
    assert {k: v for k, v in _snapshot(workdir).items() if k.startswith(saved)} == {
        k: v for k, v in before.items() if k.startswith(saved)
    }
    # Space freed: the same command resumes from step 16.
    os.remove(os.path.join(path, "filler"))
    proc = cli_runs.run(args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resuming from the checkpoint at step 16" in proc.stdout
    assert cli_runs.checkpoint_steps(workdir)[-1] == 24


def test_io_helpers_write_atomically_and_name_damaged_lines(tmp_path):
    from sadt_jax import io

    path = str(tmp_path / "rows.jsonl")
    assert io.read_jsonl(path) == [] and io.read_json(str(tmp_path / "none.json"), 5) == 5
    io.write_jsonl(path, [{"b": 1, "a": 2}, {"c": 3}])
    assert cli_runs.read_text(path) == '{"a": 2, "b": 1}\n{"c": 3}\n'
    assert io.read_jsonl(path) == [{"a": 2, "b": 1}, {"c": 3}]
    io.write_json(str(tmp_path / "x.json"), {"k": np.float32(1.5)})
    assert io.read_json(str(tmp_path / "x.json")) == {"k": "1.5"}
    assert sorted(os.listdir(tmp_path)) == ["rows.jsonl", "x.json"]  # no temporary files left
    with open(path, "a") as f:
        f.write("\n{oops\n")
    with pytest.raises(io.CorruptFileError, match=r"rows.jsonl line 4 is not valid JSON"):
        io.read_jsonl(path)
    # Survey readers (experiments/) treat a damaged record as missing instead.
    bad = str(tmp_path / "bad.json")
    assert io.write_text(bad, "{half") == bad
    assert io.read_json_lenient(bad, "missing") == "missing"
    assert io.read_json_lenient(str(tmp_path / "x.json")) == {"k": "1.5"}
    with pytest.raises(io.CorruptFileError):
        io.read_json(bad)
