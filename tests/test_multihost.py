"""Two processes joined by ``jax.distributed.initialize`` train like one process.

The test launches ``python -m sadt_jax.main`` twice on this machine, joined on
127.0.0.1 with gloo CPU collectives (one CPU device each), preempts the pair
with a SIGTERM to process 1 only (JAX's preemption service makes both save the
same step; orbax writes one multi-process checkpoint), resumes it, and compares
with one process over two simulated CPU devices: same global batch, seed and
device count, so the same final parameters (within 1e-5; in practice bitwise).
Against one device the parameters differ by up to ~1e-4 after 16 Adam steps
(reduction order, amplified by Adam's normalisation), hence the two devices.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import time

import cli_runs
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    not os.path.isdir(cli_runs.FMNIST_DIR),
    reason="Fashion-MNIST not installed: sudo apt-get install dataset-fashion-mnist",
)

TIMEOUT = 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_pair(args: list[str], env: dict[str, str], logs: str) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for i in range(2):
        flags = [
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        ]
        with open(f"{logs}.{i}.out", "w") as out, open(f"{logs}.{i}.err", "w") as err:
            procs.append(
                subprocess.Popen(args + flags, env=env, cwd=cli_runs.REPO, stdout=out, stderr=err)
            )
    return procs


def _wait(procs: list[subprocess.Popen]) -> list[int]:
    deadline = time.monotonic() + TIMEOUT
    return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]


def _rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_processes_preempted_and_resumed_match_one_process(tmp_path):
    data_dir = cli_runs.tiny_fashion_mnist(str(tmp_path / "data"))
    env = cli_runs.env(str(tmp_path / "jax_cache"))
    workdir = str(tmp_path / "pair")
    args = cli_runs.cli_args(workdir, data_dir)
    logs = str(tmp_path / "log")
    procs: list[subprocess.Popen] = []
    pids = []
    try:
        # 1. Both train; SIGTERM reaches process 1 only, early in epoch 1.
        procs = _launch_pair(args, env, logs + "1")
        pids += [p.pid for p in procs]
        deadline = time.monotonic() + TIMEOUT
        while "epoch 1/2 step 2/8" not in cli_runs.read_text(logs + "1.0.out"):
            assert all(p.poll() is None for p in procs), cli_runs.read_text(logs + "1.0.err")
            assert time.monotonic() < deadline, "no training progress"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)
        assert _wait(procs) == [143, 143], cli_runs.read_text(logs + "1.1.err")[-3000:]
        for i in range(2):
            assert "preempted: SIGTERM: checkpoint saved at step" in cli_runs.read_text(
                f"{logs}1.{i}.err"
            )
        # One checkpoint for both processes, at the step they agreed on (usually in
        # epoch 1; how far they got before the notice spread is up to timing).
        step = cli_runs.checkpoint_steps(workdir)[-1]
        assert 2 <= step < 16, step

        # 2. The pair resumes and finishes.
        procs = _launch_pair(args, env, logs + "2")
        pids += [p.pid for p in procs]
        assert _wait(procs) == [0, 0], cli_runs.read_text(logs + "2.1.err")[-3000:]
        assert f"Resuming from the checkpoint at step {step}" in cli_runs.read_text(
            logs + "2.0.out"
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    # Only process 0 writes the run's files and reports.
    for launch in ("1", "2"):
        assert "Training base" in cli_runs.read_text(f"{logs}{launch}.0.out")
        assert "Training base" not in cli_runs.read_text(f"{logs}{launch}.1.out")
    assert "== Summary" not in cli_runs.read_text(logs + "2.1.out")
    events = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    writers = {int(re.search(r"\.(\d+)\.\d+\.v2$", e).group(1)) for e in events}  # pids
    assert writers and writers <= {pids[0], pids[2]}, (writers, pids)
    assert [r["epoch"] for r in _rows(workdir)] == [1, 2]

    # 3. One process, two simulated devices, never interrupted.
    single = str(tmp_path / "single")
    proc = cli_runs.run(
        cli_runs.cli_args(single, data_dir),
        env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 cpu device(s), 1 process(es)" in proc.stdout

    got, want = cli_runs.final_params(workdir), cli_runs.final_params(single)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5, err_msg=k)
    for a, b in zip(_rows(workdir), _rows(single), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_unreachable_coordinator_is_one_line_within_the_timeout(tmp_path):
    port = _free_port()  # nothing listens there
    workdir = str(tmp_path / "run")
    args = cli_runs.cli_args(workdir, str(tmp_path / "data")) + [
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        "--process_id=1",
        "--distributed_timeout_s=2",
    ]
    start = time.monotonic()
    proc = cli_runs.run(args, env=cli_runs.env(), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert f"the coordinator at 127.0.0.1:{port} cannot be reached" in line, line
    assert "--distributed_timeout_s" in line
    assert time.monotonic() - start < 60
    assert not os.path.exists(workdir)
