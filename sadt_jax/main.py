r"""Entry point: ``python -m sadt_jax.main --config=configs/<family>.py:<method> --workdir=DIR``.

Thin by design: parse flags, set up (multi-host) JAX, call
:func:`sadt_jax.train.train_and_evaluate`. Any config field can be overridden:
``--config.sadt.rho=2e-3 --config.num_epochs=10``.

Multi-host: start one process per host with the same flags plus
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or rely on
the cluster's auto-detection on TPU/SLURM by passing ``--distributed``). On CPU
the processes use gloo collectives.

Exit codes (each failure is reported as ``error: ...`` lines on stderr, one per
problem, without a traceback):

* 0: finished;
* 2: bad input, found before anything is computed: invalid flags or config (a
  config file that does not load), a workdir that is not a writable folder, is
  in use by another run (its pid is named), holds checkpoints of another config
  or a run already past this config's end, damaged records (``config.json``,
  ``metrics.jsonl``), missing or corrupt data, no readable checkpoint, an
  unreachable multi-host coordinator; also a write that fails during training
  (disk full): the checkpoints already on disk are intact, rerun to resume;
* 3: the loss or the state became NaN/Inf (every checkpoint on disk is finite;
  the message names the step and the last good checkpoint);
* 130: interrupted by SIGINT (Ctrl-C; a checkpoint was saved, as for SIGTERM;
  a second Ctrl-C stops at once without saving);
* 143: preempted by SIGTERM (a checkpoint was saved: rerun the same command to
  resume, bit-exactly).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time

from absl import app, flags
from ml_collections import config_flags

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130
EXIT_PREEMPTED = 143

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/fashion_mnist.py:sadt_t1."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics, summary).")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir whose stored config differs from --config."
)
_COORD = flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0.")
_NUM_PROC = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROC_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with cluster auto-detection."
)
_DIST_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout_s",
    300,
    "Multi-host: seconds to wait for the coordinator and the other processes to join.",
)
flags.mark_flags_as_required(["config", "workdir"])


def _check_distributed_flags() -> str | None:
    """One line saying what is wrong with the multi-host flags, or ``None``."""
    if _COORD.value is None:
        if _NUM_PROC.value is not None or _PROC_ID.value is not None:
            return "--num_processes and --process_id need --coordinator_address=HOST:PORT"
        return None
    if _DISTRIBUTED.value:
        return "pass either --coordinator_address or --distributed, not both"
    if _NUM_PROC.value is None or _PROC_ID.value is None:
        return "--coordinator_address needs --num_processes and --process_id"
    if _DIST_TIMEOUT.value < 1:
        return f"--distributed_timeout_s={_DIST_TIMEOUT.value} must be >= 1"
    if _NUM_PROC.value < 1 or not 0 <= _PROC_ID.value < _NUM_PROC.value:
        return (
            f"--process_id={_PROC_ID.value} must lie in [0, --num_processes="
            f"{_NUM_PROC.value}) and --num_processes must be >= 1"
        )
    return None


def _wait_for_coordinator(address: str, timeout_s: float) -> str | None:
    """Waits until ``HOST:PORT`` accepts a TCP connection; a line saying why not, or ``None``.

    JAX aborts the process (no Python exception) when the coordinator cannot be
    reached, so processes other than 0 check that it listens first.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return f"--coordinator_address={address!r} is not HOST:PORT"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return None
        except OSError as e:
            if time.monotonic() >= deadline:
                return (
                    f"the coordinator at {address} cannot be reached ({e.strerror or e}) after "
                    f"{timeout_s:g} s (--distributed_timeout_s); start process 0 first, or check "
                    "--coordinator_address"
                )
            time.sleep(0.5)


def _init_distributed() -> str | None:
    """Joins the multi-host job (before anything initialises a JAX backend).

    Returns:
      ``None``, or a line saying why the job could not be joined.
    """
    import jax

    if _COORD.value is None and not _DISTRIBUTED.value:
        return None
    # Only the CPU backend reads this; it makes CPU processes use gloo collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if _COORD.value is None:
        jax.distributed.initialize(initialization_timeout=_DIST_TIMEOUT.value)
        return None
    if _PROC_ID.value != 0:
        problem = _wait_for_coordinator(_COORD.value, _DIST_TIMEOUT.value)
        if problem:
            return problem
    jax.distributed.initialize(
        coordinator_address=_COORD.value,
        num_processes=_NUM_PROC.value,
        process_id=_PROC_ID.value,
        initialization_timeout=_DIST_TIMEOUT.value,
    )
    return None


def _error(message: object) -> None:
    for line in str(message).strip().splitlines():
        print(f"error: {line}", file=sys.stderr)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag or config reported in one line (exit 2).

    The line is :func:`sadt_jax.train.validation.flag_error_message`'s, which the suite
    runner's pre-flight check also prints.
    """
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - also whatever the config file's get_config() raised
        from sadt_jax.train.validation import flag_error_message

        _error(flag_error_message(e, argv))
    sys.exit(EXIT_BAD_INPUT)


def _simulated_devices_workaround() -> None:
    """Simulated CPU devices (``--xla_force_host_platform_device_count``) can deadlock in
    a collective's rendezvous on few cores (jaxlib 0.10.2) while several programs are in
    flight or Eigen's thread pool is busy; synchronous dispatch and single-threaded Eigen
    avoid it. Real accelerators and plain CPU runs are left untouched."""
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in xla_flags:
        return
    if "xla_cpu_multi_thread_eigen" not in xla_flags:
        os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_cpu_multi_thread_eigen=false"
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    XLA:CPU allocates each step's temporary buffers (hundreds of MiB for a CNN at batch
    512) afresh; by default glibc hands large blocks back to the kernel on free, so every
    step page-faults them in again (~55,000 faults and ~0.1 s of system time per
    release simple-CNN step, measured). One malloc arena, no ``mmap``-served blocks and no
    trimming make those buffers reusable (results/conv_cpu.md). Call it at the entry
    point before JAX starts its thread pools; the process keeps its peak memory. No-op
    (returns False) where glibc's ``mallopt`` is unavailable. Called after a JAX backend has
    started, it still applies but warns: the threads started by then keep their own malloc
    arenas, so their buffers page-fault as before (measured: ~30,000 faults per step).
    """
    import ctypes
    import ctypes.util

    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        logging.warning(
            "keep_freed_memory() called after a JAX backend started: threads already running "
            "keep their own malloc arenas; call it at the entry point, before any JAX array"
        )

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (AttributeError, OSError):
        return False
    # M_ARENA_MAX = -8, M_MMAP_MAX = -4, M_TRIM_THRESHOLD = -1 (glibc malloc.h).
    settings = ((-8, 1), (-4, 0), (-1, 2**31 - 1))
    return all(mallopt(param, value) == 1 for param, value in settings)


def _check_config() -> str | None:
    """A line saying why ``--config`` did not load as a config, or ``None``."""
    import ml_collections

    try:
        config = _CONFIG.value
    except OSError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return f"--config: cannot load the config file: {lines[-1] if lines else e}"
    if not isinstance(config, ml_collections.ConfigDict):
        return (
            f"--config: get_config() returned a {type(config).__name__}, not an "
            "ml_collections.ConfigDict; build it with configs/common.py's base_config()"
        )
    return None


def _run() -> int:
    """Trains; maps each expected failure to its exit code and ``error:`` lines."""
    from sadt_jax.data import DatasetError
    from sadt_jax.io import CorruptFileError
    from sadt_jax.train import ConfigError, NonFiniteLossError, Preempted, train_and_evaluate
    from sadt_jax.train.checkpointing import CheckpointError
    from sadt_jax.train.workdir import WorkdirError

    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value)
    except (ConfigError, DatasetError, WorkdirError, CorruptFileError) as e:
        _error(e)
        return EXIT_BAD_INPUT
    except CheckpointError as e:  # none readable, or one could not be written
        _error(e)
        _exit_now(EXIT_BAD_INPUT)
    except NonFiniteLossError as e:
        _error(e)
        return EXIT_NONFINITE
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED if e.signum == signal.SIGINT else EXIT_PREEMPTED
    except KeyboardInterrupt:
        _error("interrupted (a second Ctrl-C, or several processes): no checkpoint was saved")
        return EXIT_INTERRUPTED
    except OSError as e:  # disk full, permissions changed under the run, ...
        where = f" ({e.filename})" if e.filename else ""
        _error(
            f"cannot write in --workdir={_WORKDIR.value}: {e.strerror or e}{where}; the "
            "checkpoints already on disk are intact: free space or fix permissions and rerun "
            "the same command to resume"
        )
        _exit_now(EXIT_BAD_INPUT)
    return 0


def _quiet_thread_failure(args) -> None:
    """Background threads (orbax, tensorstore) that fail print one line, not a traceback;
    the failure reaches the main thread too and is reported there."""
    text = str(args.exc_value).strip().splitlines()
    print(
        f"warning: background thread {getattr(args.thread, 'name', '?')} failed: "
        f"{args.exc_type.__name__}: {(text[0] if text else '')[:200]}",
        file=sys.stderr,
    )


def _quiet_unraisable(args) -> None:
    """``sys.unraisablehook``: one line, not a traceback, for errors nothing can catch, e.g.
    tensorstore callbacks into orbax's closed event loops after a failed write (the failure
    itself is reported as an ``error:`` line)."""
    text = str(args.exc_value).strip().splitlines()
    line = f"warning: ignored {args.exc_type.__name__}: {(text[0] if text else '')[:200]}"
    if line not in _SEEN_WARNINGS:  # such callbacks fail by the dozen
        _SEEN_WARNINGS.add(line)
        print(line, file=sys.stderr)


_SEEN_WARNINGS: set[str] = set()


class _NoTracebacks(logging.Filter):
    """Drops the traceback of a library's error log record, keeping its one-line message."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _exit_now(code: int) -> None:
    """Exits without the interpreter's shutdown, where a failed write's leftover background
    tasks (orbax's event loops) print tracebacks about a closed event loop."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv) -> int:
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    # A failed orbax write (e.g. disk full) also leaves "Task exception was never retrieved"
    # tracebacks from asyncio; the failure itself is reported as one error: line.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    threading.excepthook = _quiet_thread_failure
    sys.unraisablehook = _quiet_unraisable
    # orbax logs a failed background write with its traceback; one line is enough.
    logging.getLogger("absl").addFilter(_NoTracebacks())
    problem = _check_distributed_flags() or _check_config()
    if not problem and not _WORKDIR.value:
        problem = "--workdir is empty; name the run's output folder"
    if problem:
        _error(problem)
        return EXIT_BAD_INPUT
    _simulated_devices_workaround()
    keep_freed_memory()
    problem = _init_distributed()
    if problem:
        _error(problem)
        return EXIT_BAD_INPUT
    return _run()


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
