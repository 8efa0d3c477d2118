"""Cells and suites: a run as a command line, and a named grid of them.

See :mod:`experiments.suites` for what a cell and a suite are.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

#: The repository root (commands run from there).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_configs_importable() -> None:
    """Puts the repository root on ``sys.path`` (config files import ``configs.common``),
    for callers started from elsewhere."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)


#: The paper's seven methods, in the order of its tables.
PAPER_METHODS = ("base", "gc", "agc", "sam", "sadt_t1", "sadt_t2", "sadt_t3")
#: Our controls: Base with two updates per batch (as many updates as SADT) and
#: one-update SADT-T1 (as many updates as Base).
CONTROL_METHODS = ("base_2x", "sadt_t1_1u")
PAPER_MODELS = ("simple_cnn", "vgg16_bn", "inception_resnet", "resnet56")
#: The release's version of each paper model (``configs/common.py``), for the ``paper`` suite.
RELEASE_MODELS = {
    "simple_cnn": "release_simple_cnn",
    "vgg16_bn": "release_vgg16_bn",
    "inception_resnet": "release_inception_resnet",
    "resnet56": "release_resnet",
}
PAPER_DATASETS = ("cifar10", "cifar100")
#: configs/cifar10.py variants: batch size and epochs of the paper's two settings.
PAPER_VARIANTS = {"b512": (512, 200), "b2048": (2048, 370)}

#: Overrides that make any training cell tiny (``--smoke``): proves the pipeline end to
#: end (training, checkpoints, aggregation, plots) in about a minute per cell on a CPU.
SMOKE_OVERRIDES = {
    "batch_size": 128,
    "num_steps": 8,
    "data.max_train_examples": 512,
    "log_every_steps": 2,
}


def fmt_number(x: float) -> str:
    """Short, filename-safe number: 5e-4, 1e-3, 0, 0.05, 256."""
    if x == 0:
        return "0"
    if float(x).is_integer() and abs(x) >= 1:
        return str(int(x))
    s = f"{x:.0e}" if float(f"{x:.0e}") == x else repr(float(x))
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m[1] == "-" else "") + m[2], s)


def _cli_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    return str(v)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of a suite.

    Attributes:
      suite: the folder under the root (``fashion_mnist``, or ``fashion_mnist_smoke``).
      name: stable cell name; the workdir is ``<root>/<suite>/<name>``.
      group: the table/plot group the cell belongs to.
      setting: column label (dataset / model / batch, or a swept value).
      label: row label (the method, or a hyperparameter value).
      method: the method name (``sadt_jax.METHODS``).
      seed: ``config.seed`` (also the initial-weights seed).
      config: ``<config file>:<arg>`` as passed to ``--config`` (relative to the repo).
      overrides: ``(field, value)`` pairs passed as ``--config.<field>=<value>``;
        for ``kind="sharpness"`` they are flags of ``experiments.sharpness``.
      kind: ``"train"`` (``sadt_jax.main``) or ``"sharpness"`` (``experiments.sharpness``
        on the finished workdir of ``source``).
      source: for ``kind="sharpness"``: ``<suite>/<cell>`` of the run it measures.
      model, dataset, batch_size, num_epochs, max_train_examples: for the estimate.
    """

    suite: str
    name: str
    group: str
    setting: str
    label: str
    method: str
    seed: int
    config: str = ""
    overrides: tuple[tuple[str, Any], ...] = ()
    kind: str = "train"
    source: str | None = None
    model: str = "simple_cnn"
    dataset: str = "fashion_mnist"
    batch_size: int = 512
    num_epochs: float = 1
    max_train_examples: int | None = None

    @property
    def done_file(self) -> str:
        """The file whose presence means the cell is finished."""
        return "summary.json" if self.kind == "train" else "sharpness.json"

    def workdir(self, root: str) -> str:
        return os.path.join(root, self.suite, self.name)

    def source_workdir(self, root: str) -> str | None:
        return None if self.source is None else os.path.join(root, self.source)

    def command(self, root: str, python: str = sys.executable) -> list[str]:
        """The command line of this cell (run from the repository root)."""
        workdir = os.path.abspath(self.workdir(root))
        if self.kind == "train":
            argv = [python, "-m", "sadt_jax.main", f"--config={self.config}"]
            argv.append(f"--workdir={workdir}")
            argv += [f"--config.{k}={_cli_value(v)}" for k, v in self.overrides]
            return argv
        argv = [python, "-m", "experiments.sharpness"]
        argv.append(f"--workdir={os.path.abspath(self.source_workdir(root))}")
        argv.append(f"--out={os.path.join(workdir, self.done_file)}")
        argv += [f"--{k}={_cli_value(v)}" for k, v in self.overrides]
        return argv

    def config_problems(self) -> list[str]:
        """Why ``sadt_jax.main`` would refuse this cell's config, one line per problem.

        Parses ``--config`` and the overrides the way ``sadt_jax.main`` does (absl flags
        with ml_collections' config flag, so an override naming no field fails as it would
        there, and worded by the same
        :func:`~sadt_jax.train.validation.flag_error_message`) and applies
        :func:`sadt_jax.train.validation.validate_config`. Runners call
        it for every cell before running any, so a suite whose overrides the config no
        longer accepts stops at once instead of failing each run. Checks that need the data
        or the model (``validate_against_data``) are left to the run. ``[]`` for
        sharpness cells and valid configs.
        """
        if self.kind != "train":
            return []
        from absl import flags
        from ml_collections import config_flags

        from sadt_jax.train.validation import ConfigError, flag_error_message, validate_config

        make_configs_importable()
        file, sep, arg = self.config.partition(":")
        argv = ["run", f"--config={os.path.join(REPO_ROOT, file)}{sep}{arg}"]
        argv += [f"--config.{k}={_cli_value(v)}" for k, v in self.overrides]
        values = flags.FlagValues()
        # The override flags are declared from ``sys_argv`` (default: the process's own).
        config_flags.DEFINE_config_file(
            "config", None, "config file", flag_values=values, sys_argv=argv
        )
        try:
            with warnings.catch_warnings():  # ml_collections loads the file with load_module
                warnings.simplefilter("ignore", DeprecationWarning)
                values(argv)
        except Exception as e:  # noqa: BLE001 - worded as sadt_jax.main words it
            return [f"{self.config}: {flag_error_message(e, argv)}"]
        try:
            validate_config(values.config)
        except ConfigError as e:
            return [f"{self.config}: {line}" for line in str(e).splitlines()]
        return []

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["overrides"] = [list(kv) for kv in self.overrides]
        return d


@dataclasses.dataclass(frozen=True)
class Suite:
    """A named grid of cells.

    Attributes:
      name: the suite's name (and folder under the root and under ``results/``).
      make_cells: ``seeds -> cells``, in seed-major order.
      default_seeds: seeds used when none are given.
      hardware: key of :data:`BASE_SECONDS_PER_EXAMPLE` for the estimate.
      thresholds: validation accuracies of the convergence table.
      references: labels the other rows are compared with, seed by seed.
      kind: ``"train"`` or ``"sharpness"``.
    """

    name: str
    make_cells: Callable[..., list[Cell]]
    default_seeds: tuple[int, ...]
    hardware: str = "cpu2"
    thresholds: tuple[float, ...] = (0.5, 0.6, 0.7, 0.75, 0.8)
    references: tuple[str, ...] = ("base",)
    kind: str = "train"

    @property
    def doc(self) -> str:
        return (self.make_cells.__doc__ or "").strip()


def train_cell(
    suite: str,
    name: str,
    *,
    group: str,
    setting: str,
    label: str,
    method: str,
    seed: int,
    config: str,
    overrides: dict[str, Any],
    dataset: str,
    model: str,
    batch_size: int,
    num_epochs: float,
    max_train_examples: int | None = None,
    smoke: bool = False,
) -> Cell:
    overrides = dict(overrides)
    if smoke:
        setting += " (smoke)"
        overrides.update(SMOKE_OVERRIDES)
        batch_size = SMOKE_OVERRIDES["batch_size"]
        max_train_examples = SMOKE_OVERRIDES["data.max_train_examples"]
        num_epochs = SMOKE_OVERRIDES["num_steps"] / (max_train_examples // batch_size)
    overrides["seed"] = seed
    return Cell(
        suite=suite + ("_smoke" if smoke else ""),
        name=name,
        group=group,
        setting=setting,
        label=label,
        method=method,
        seed=seed,
        config=config,
        overrides=tuple(overrides.items()),
        model=model,
        dataset=dataset,
        batch_size=batch_size,
        num_epochs=num_epochs,
        max_train_examples=max_train_examples,
    )
