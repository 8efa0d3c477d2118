"""Helpers for tests that drive ``python -m sadt_jax.main`` in subprocesses.

* :func:`tiny_fashion_mnist` writes a small IDX copy of Fashion-MNIST (a few hundred
  images) so that a run's data loading and evaluation cost next to nothing;
* :func:`cli_args` builds the command line of a tiny run;
* :func:`run`, :func:`run_until` run it to the end, or until a line of its output
  (or a file) appears and then send it a signal;
* :func:`final_params` reads the parameters of a workdir's newest orbax checkpoint.

Every subprocess gets ``JAX_PLATFORMS=cpu`` and a persistent compilation cache shared
by the test session, so only the first run of a config pays for compilation.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def write_idx(path: str, array: np.ndarray) -> None:
    """Writes a uint8 array as a gzip-compressed IDX file."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def tiny_fashion_mnist(directory: str, *, num_train: int = 256, num_test: int = 200) -> str:
    """The first ``num_train`` / ``num_test`` Fashion-MNIST images as IDX files in ``directory``."""
    from sadt_jax.data import read_idx

    os.makedirs(directory, exist_ok=True)
    for split, n in (("train", num_train), ("test", num_test)):
        for name in FILES[split]:
            array = read_idx(os.path.join(FMNIST_DIR, name))[:n]
            write_idx(os.path.join(directory, name), array)
    return directory


def cli_args(
    workdir: str, data_dir: str, *overrides: str, method: str = "base", epochs: int = 2
) -> list[str]:
    """Command line of a tiny run: 256 examples, batch 32 (8 steps per epoch), log every 2."""
    return [
        sys.executable,
        "-m",
        "sadt_jax.main",
        f"--config={REPO}/configs/fashion_mnist.py:{method}",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        f"--config.num_epochs={epochs}",
        "--config.batch_size=32",
        "--config.eval_batch_size=100",
        "--config.log_every_steps=2",
        "--config.data.num_validation=100",
        *overrides,
    ]


def env(cache_dir: str | None = None, **extra: str) -> dict[str, str]:
    """Environment of a run: CPU only, quiet TensorFlow, optional compilation cache."""
    out = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    out.pop("XLA_FLAGS", None)
    if cache_dir is not None:
        out.update(
            JAX_COMPILATION_CACHE_DIR=cache_dir,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    out.update(extra)
    return out


def run(
    args: list[str], *, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess:
    """Runs ``args`` to the end; stdout and stderr are captured as text."""
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_until(
    args: list[str],
    *,
    env: dict[str, str],
    line: str | None = None,
    path: str | None = None,
    sig: int = signal.SIGKILL,
    timeout: float = 300,
) -> tuple[int, str, str]:
    """Starts ``args``; sends ``sig`` once stdout has a line holding ``line`` (or ``path`` exists).

    Returns:
      ``(returncode, stdout, stderr)``. A process that finishes before the trigger is an error.
    """
    proc = subprocess.Popen(
        args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda s=s, b=b: b.extend(iter(s.readline, "")), daemon=True)
        for s, b in ((proc.stdout, out), (proc.stderr, err))
    ]
    for r in readers:
        r.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            if line is not None and any(line in o for o in list(out)):
                break
            if path is not None and os.path.exists(path):
                break
            if proc.poll() is not None:
                for r in readers:
                    r.join()
                raise AssertionError(
                    f"the run ended (rc {proc.returncode}) before the trigger "
                    f"{line or path!r}:\n{''.join(out)}\n{''.join(err)[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no trigger {line or path!r} within {timeout} s")
            time.sleep(0.02)
        proc.send_signal(sig)
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for r in readers:
        r.join()
    return rc, "".join(out), "".join(err)


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the committed checkpoints in ``workdir``, oldest first."""
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def checkpoint_tree(workdir: str, step: int | None = None) -> dict:
    """The ``{"state", "metrics"}`` tree of a checkpoint (default: the newest) as NumPy arrays."""
    import jax
    import orbax.checkpoint as ocp

    step = checkpoint_steps(workdir)[-1] if step is None else step
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    # Restore onto this process's first device, whatever topology saved the checkpoint.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        shapes = ckptr.metadata(path).item_metadata.tree
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), shapes
        )
        return ckptr.restore(path, target)


def flat(tree) -> dict[str, np.ndarray]:
    """``{path: array}`` of a pytree's leaves."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def final_params(workdir: str) -> dict[str, np.ndarray]:
    """Parameters of the newest checkpoint in ``workdir``, flattened."""
    return flat(checkpoint_tree(workdir)["state"]["params"])


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()
