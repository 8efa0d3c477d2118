r"""Entry point: ``python -m sadt_jax.main --config=configs/<family>.py:<method> --workdir=DIR``.

Thin by design: parse flags, set up (multi-host) JAX, call
:func:`sadt_jax.train.train_and_evaluate`. Any config field can be overridden:
``--config.sadt.rho=2e-3 --config.num_epochs=10``.

Multi-host: start one process per host with the same flags plus
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or rely on
the cluster's auto-detection on TPU/SLURM by passing ``--distributed``). On CPU
the processes use gloo collectives.

Exit codes: 0 finished; 2 invalid config or missing data (nothing computed);
3 non-finite loss (no bad checkpoint written); 143 preempted by SIGTERM (a
checkpoint was saved: rerun the same command to resume).
"""

from __future__ import annotations

import logging
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


def _init_distributed() -> None:
    import jax

    if _COORD.value is None and not _DISTRIBUTED.value:
        return
    if jax.default_backend() == "cpu" or _COORD.value and "127.0.0.1" in _COORD.value:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if _COORD.value is not None:
        jax.distributed.initialize(
            coordinator_address=_COORD.value,
            num_processes=_NUM_PROC.value,
            process_id=_PROC_ID.value,
        )
    else:
        jax.distributed.initialize()


def main(argv) -> int:
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    _init_distributed()
    from sadt_jax.data import DatasetError
    from sadt_jax.train import ConfigError, NonFiniteLossError, Preempted, train_and_evaluate

    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value)
    except (ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
