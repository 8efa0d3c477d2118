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
* 2: bad input, found before anything is computed: invalid flags or config, a
  workdir holding a run with another config, missing or corrupt data, no
  readable checkpoint;
* 3: the loss or the state became NaN/Inf (every checkpoint on disk is finite;
  the message names the step and the last good checkpoint);
* 143: preempted by SIGTERM (a checkpoint was saved: rerun the same command to
  resume, bit-exactly).
"""

from __future__ import annotations

import logging
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
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
    if _NUM_PROC.value < 1 or not 0 <= _PROC_ID.value < _NUM_PROC.value:
        return (
            f"--process_id={_PROC_ID.value} must lie in [0, --num_processes="
            f"{_NUM_PROC.value}) and --num_processes must be >= 1"
        )
    return None


def _init_distributed() -> None:
    """Joins the multi-host job (before anything initialises a JAX backend)."""
    import jax

    if _COORD.value is None and not _DISTRIBUTED.value:
        return
    # Only the CPU backend reads this; it makes CPU processes use gloo collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if _COORD.value is not None:
        jax.distributed.initialize(
            coordinator_address=_COORD.value,
            num_processes=_NUM_PROC.value,
            process_id=_PROC_ID.value,
        )
    else:
        jax.distributed.initialize()


def _error(message: object) -> None:
    for line in str(message).strip().splitlines():
        print(f"error: {line}", file=sys.stderr)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag or config reported in one line (exit 2).

    A config file that raises (e.g. an unknown method in ``--config=file.py:name``)
    reaches absl as a traceback inside the flag error; only its last line is kept.
    """
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        flag = re.match(r"flag (--\S+?)=", lines[0]) if lines else None
        last = re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", lines[-1]) if lines else str(e)
        _error(f"{flag.group(1)}: {last}" if flag and len(lines) > 1 else last)
    except (AttributeError, KeyError) as e:  # --config.<field> naming no field
        msg: object = e
        while isinstance(msg, BaseException) and msg.args:
            msg = msg.args[0]
        key, *hint = str(msg).splitlines()
        key = key.strip("'\"")
        bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and f".{key}" in a]
        _error(
            f"{bad[0] if bad else '--config'}: the config has no field {key!r}"
            + (f" ({' '.join(hint).strip()})" if hint else "")
            + "; unknown keys fail: check the spelling against the config file"
        )
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


def main(argv) -> int:
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    problem = _check_distributed_flags()
    if problem:
        _error(problem)
        return EXIT_BAD_INPUT
    _simulated_devices_workaround()
    _init_distributed()
    from sadt_jax.data import DatasetError
    from sadt_jax.train import ConfigError, NonFiniteLossError, Preempted, train_and_evaluate
    from sadt_jax.train.checkpointing import CheckpointError

    try:
        _CONFIG.value.method  # noqa: B018 - a config file that failed to load raises here
    except OSError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        _error(f"--config: cannot load the config file: {lines[-1] if lines else e}")
        return EXIT_BAD_INPUT
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value)
    except (ConfigError, DatasetError, CheckpointError) as e:
        _error(e)
        return EXIT_BAD_INPUT
    except NonFiniteLossError as e:
        _error(e)
        return EXIT_NONFINITE
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
