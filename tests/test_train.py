"""End-to-end tests of the runner: configs -> train_and_evaluate -> workdir outputs.

Mirrors flax's examples: a few real steps on a Fashion-MNIST subset and on mock
CIFAR-10 (``tfds.testing.mock_data``), resume from a checkpoint, and the same
training on 8 simulated CPU devices as on 1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import cifar10, fashion_mnist
from sadt_jax.train import train_and_evaluate

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FMNIST_DIR),
    reason="Fashion-MNIST not installed: sudo apt-get install dataset-fashion-mnist",
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(config, *, steps=4, batch=32, train=256):
    config.num_steps = steps
    config.batch_size = batch
    config.eval_batch_size = 200
    config.log_every_steps = 2
    config.data.max_train_examples = train
    config.data.num_validation = 200
    config.data.max_test_examples = 500  # all 9,800 would dominate a few-step run
    return config


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@needs_fmnist
@pytest.mark.parametrize("method", ["sadt_t1", "sadt_t2", "base"])
def test_fashion_mnist_end_to_end(tmp_path, method):
    config = tiny(fashion_mnist.get_config(method))
    summary = train_and_evaluate(config, str(tmp_path))
    assert summary["method"] == method
    assert summary["steps"] == 4 and summary["epochs"] == 1
    assert 0.0 <= summary["final"]["test_accuracy"] <= 1.0
    assert summary["best_val"]["epoch"] == 1
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1]
    assert np.isfinite(rows[0]["train_loss"]) and rows[0]["step"] == 4
    for name in ("summary.json", "config.json", "timing.jsonl"):
        assert (tmp_path / name).exists()
    if method == "base":
        assert rows[0]["train_kd"] == 0.0
    else:
        assert rows[0]["train_kd"] > 0.0


def test_mock_cifar10_end_to_end(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = tiny(cifar10.get_config("sadt_t3,b512"), steps=2, batch=16, train=64)
    config.data.num_validation = 20
    with tfds.testing.mock_data(num_examples=100):
        summary = train_and_evaluate(config, str(tmp_path))
    assert summary["dataset"] == "cifar10" and summary["steps"] == 2
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(rows) == 1 and "val_accuracy" in rows[0]


@needs_fmnist
def test_resume_continues_at_the_right_step(tmp_path):
    config = tiny(fashion_mnist.get_config("sadt_t1"), steps=6, train=64)  # 2 steps per epoch
    config.num_steps = 4
    first = train_and_evaluate(config, str(tmp_path))
    assert first["steps"] == 4 and first["epochs"] == 2
    config.num_steps = 6  # extending the run is allowed by the workdir guard
    second = train_and_evaluate(config, str(tmp_path))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert second["epochs"] == 3

    # The same 6 steps in one go give the same metrics, bit for bit.
    fresh = tmp_path / "fresh"
    train_and_evaluate(config, str(fresh))
    assert read_jsonl(fresh / "metrics.jsonl") == rows


_DEVICES_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    import orbax.checkpoint as ocp
    from configs import fashion_mnist
    from sadt_jax.train import train_and_evaluate
    workdir, method = sys.argv[1], sys.argv[2]
    c = fashion_mnist.get_config(method)
    c.num_steps = 3; c.batch_size = 64; c.eval_batch_size = 200; c.log_every_steps = 1
    c.data.max_train_examples = 256; c.data.num_validation = 200; c.data.max_test_examples = 200
    # SGD, not Adam: Adam divides by sqrt(v), which turns float round-off in near-zero
    # gradients into lr-sized differences; sharding equivalence is what is tested here.
    c.optim.optimizer = "sgd"; c.optim.learning_rate = 0.01
    # Average pooling: with max-pooling, a near-tie (values 1e-7 apart after BatchNorm, whose
    # sums run in another order when sharded) sends a whole gradient entry elsewhere.
    c.model.pool = "avg"
    train_and_evaluate(c, workdir)
    step = max(int(d) for d in __import__("os").listdir(workdir + "/checkpoints") if d.isdigit())
    tree = ocp.StandardCheckpointer().restore(f"{workdir}/checkpoints/{step}/state")
    leaves = jax.tree_util.tree_flatten_with_path(tree["state"]["params"])[0]
    np.savez(workdir + "/params.npz", **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})
    print(json.dumps({"devices": jax.device_count()}))
    """
)


@needs_fmnist
@pytest.mark.parametrize(
    "method",
    # sam on 8 devices is also checked step by step in tests/test_parallel.py (mesh and pmap).
    ["sadt_t1", pytest.param("sam", marks=pytest.mark.slow)],
)
def test_eight_devices_train_like_one(tmp_path, method):
    outs = {}
    for n in (1, 8):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
        # Simulated CPU devices can deadlock in a collective's rendezvous on 2 cores (seen
        # with jaxlib 0.10.2) unless dispatch is synchronous and Eigen single-threaded;
        # sadt_jax.main applies the same two settings when it sees simulated devices.
        # On a loaded machine a device thread can also reach the rendezvous later than XLA's
        # 40 s abort deadline while still progressing: allow it 180 s.
        env["XLA_FLAGS"] = (
            f"--xla_force_host_platform_device_count={n} --xla_cpu_multi_thread_eigen=false "
            "--xla_cpu_collective_call_terminate_timeout_seconds=180"
        )
        env["JAX_CPU_ENABLE_ASYNC_DISPATCH"] = "false"
        workdir = str(tmp_path / f"d{n}")
        for _attempt in range(3):
            shutil.rmtree(workdir, ignore_errors=True)
            proc = subprocess.run(
                [sys.executable, "-c", _DEVICES_SCRIPT, workdir, method],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=600,
            )
            # XLA:CPU aborts (SIGABRT) when a simulated device's thread never reaches a
            # collective's rendezvous, a scheduling deadlock of jaxlib 0.10.2 on few cores;
            # it is not a result of this code, so that one failure mode is retried.
            if not (proc.returncode == -6 and "rendezvous" in proc.stderr):
                break
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1])["devices"] == n
        outs[n] = dict(np.load(os.path.join(workdir, "params.npz")))
    assert outs[1].keys() == outs[8].keys()
    for k in outs[1]:
        np.testing.assert_allclose(outs[8][k], outs[1][k], atol=1e-5, rtol=0, err_msg=k)


@needs_fmnist
def test_bfloat16_compute_keeps_float32_master_params(tmp_path):
    config = tiny(fashion_mnist.get_config("sadt_t1"), steps=3)
    config.model.dtype = "bfloat16"
    summary = train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(read_jsonl(tmp_path / "metrics.jsonl")[0]["train_loss"])
    assert summary["config"]["model"]["dtype"] == "bfloat16"
    tree = ocp.StandardCheckpointer().restore(str(tmp_path / "checkpoints" / "3" / "state"))
    dtypes = {np.asarray(x).dtype for x in jax.tree.leaves(tree["state"]["params"])}
    assert dtypes == {np.dtype("float32")}


@needs_fmnist
def test_teacher_every_k_steps_mixes_base_and_teacher_steps(tmp_path):
    config = tiny(fashion_mnist.get_config("sadt_t1"), steps=4)
    config.teacher_every = 2  # steps 0 and 2 sample teachers; 1 and 3 are plain base steps
    train_and_evaluate(config, str(tmp_path))
    row = read_jsonl(tmp_path / "metrics.jsonl")[0]
    every = tmp_path / "every1"
    config.teacher_every = 1
    train_and_evaluate(config, str(every))
    full = read_jsonl(every / "metrics.jsonl")[0]
    # Half the steps have no teacher: the mean perturbation norm is about half of the full run's.
    assert 0.3 * full["train_perturbation_norm"] < row["train_perturbation_norm"]
    assert row["train_perturbation_norm"] < 0.7 * full["train_perturbation_norm"]


def test_select_best_uses_validation_loss_only():
    from sadt_jax.train.loop import select_best

    rows = [
        {"epoch": e, "test_loss": t, "test_accuracy": 0.5, "step": e}
        for e, t in ((1, 0.9), (2, 0.1), (3, 0.5))
    ]
    assert select_best(rows) is None  # no validation split: nothing to select on, never test
    for row, val in zip(rows, (0.4, 0.3, 0.3), strict=True):
        row.update(val_loss=val, val_accuracy=1 - val)
    best = select_best(rows)
    assert best["epoch"] == 2 and best["val_loss"] == 0.3  # the first of equal losses
    assert best["test_loss"] == 0.1
