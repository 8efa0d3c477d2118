"""The main job runs where TensorFlow, tensorflow-datasets, clu and tensorboard are absent.

Each run goes through ``python -m sadt_jax.main`` in a subprocess that cannot import those
packages (``sys.modules[name] = None``: ``import`` fails and ``importlib.util.find_spec``
returns ``None``, as when they are not installed; an audit hook notes every attempt on
stderr), as on an accelerator image that has only jax, flax, optax, orbax-checkpoint,
ml_collections and numpy. The run must train, checkpoint, write its metrics, say in one line
that TensorBoard event files are skipped, and never even try to import TensorFlow (so the
main job prints no TensorFlow banner where TensorFlow is installed).
"""

from __future__ import annotations

import json
import os
import struct
import sys

import pytest

from sadt_jax.train import writers
from tests import cli_runs

BLOCKED = ("tensorflow", "tensorflow_datasets", "clu", "tensorboard")

# Runs a module as __main__ with BLOCKED made unimportable: python -c WRAPPER MODULE ARGS...
WRAPPER = f"""
import runpy, sys
BLOCKED = {BLOCKED!r}
for name in BLOCKED:
    sys.modules[name] = None  # as if not installed: imports fail, find_spec() returns None
def _note(event, args):
    if event == "import" and str(args[0]).split(".")[0] in BLOCKED:
        print("refused import: " + str(args[0]), file=sys.stderr, flush=True)
sys.addaudithook(_note)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""

TIMEOUT = 300

needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(cli_runs.FMNIST_DIR), reason="Fashion-MNIST IDX files not installed"
)


def _blocked_cli(args: list[str]) -> list[str]:
    """``cli_runs.cli_args``'s command with the blocked packages refused."""
    assert args[:3] == [sys.executable, "-m", "sadt_jax.main"]
    return [sys.executable, "-c", WRAPPER, "sadt_jax.main", *args[3:]]


def _refused(stderr: str) -> set[str]:
    prefix = "refused import: "
    return {line[len(prefix) :].split(".")[0] for line in stderr.splitlines() if prefix in line}


@needs_fmnist
def test_main_job_without_tensorflow(tmp_path):
    data_dir = cli_runs.tiny_fashion_mnist(str(tmp_path / "data"), num_train=128, num_test=120)
    workdir = str(tmp_path / "run")
    args = cli_runs.cli_args(workdir, data_dir, method="sadt_t1", epochs=1)
    proc = cli_runs.run(_blocked_cli(args), env=cli_runs.env(), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Trained, evaluated, checkpointed, wrote its metrics.
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [1]
    assert rows[0]["step"] == 4 and 0.0 <= rows[0]["test_accuracy"] <= 1.0
    assert cli_runs.checkpoint_steps(workdir) == [4]
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["epochs"] == 1

    # One line about the missing event files, and nothing imported TensorFlow or clu.
    assert proc.stdout.count(writers.SKIPPED_LINE) == 1, proc.stdout
    assert not any(n.startswith("events.out.tfevents") for n in os.listdir(workdir))
    refused = _refused(proc.stderr)
    assert "tensorboard" in refused  # the wrapper did refuse something
    assert not refused & {"tensorflow", "tensorflow_datasets", "clu"}, refused
    assert "oneDNN" not in proc.stdout + proc.stderr


def test_tfds_dataset_without_tensorflow_is_one_error_line(tmp_path):
    args = cli_runs.cli_args(str(tmp_path / "run"), str(tmp_path), "--config.data.name=cifar10")
    proc = cli_runs.run(_blocked_cli(args), env=cli_runs.env(), timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "needs tensorflow-datasets" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def _records(path: str) -> list[bytes]:
    """The payloads of a TFRecord file (length, CRC, data, CRC; CRCs not checked)."""
    out = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            out.append(f.read(length))
            f.read(4)
    return out


def test_scalar_writer_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.compat.proto import event_pb2

    writer = writers.create_writer(str(tmp_path))
    assert writer.writes_events
    writer.write_scalars(3, {"loss": 1.5, "acc": 0.25})
    writer.flush()
    writer.close()
    (name,) = os.listdir(tmp_path)
    assert name.startswith("events.out.tfevents.") and name.endswith(f".{os.getpid()}.0.v2")
    events = [event_pb2.Event.FromString(r) for r in _records(str(tmp_path / name))]
    assert events[0].file_version == "brain.Event:2"
    values = {v.tag: v.simple_value for v in events[1].summary.value}
    assert events[1].step == 3 and values == {"loss": 1.5, "acc": 0.25}


def test_progress_reporter_rate(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.compat.proto import event_pb2

    writer = writers.create_writer(str(tmp_path))
    report = writers.ProgressReporter(writer, every_secs=10.0)
    report(0, 100.0)
    report(5, 105.0)  # too soon
    report(20, 110.0)
    writer.close()
    (name,) = os.listdir(tmp_path)
    events = [event_pb2.Event.FromString(r) for r in _records(str(tmp_path / name))][1:]
    assert [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events] == [
        (20, {"steps_per_sec": 2.0})
    ]
    assert not writers.create_writer(str(tmp_path / "other"), is_main=False).writes_events
    assert not os.path.exists(tmp_path / "other")
