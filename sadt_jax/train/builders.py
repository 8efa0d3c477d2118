"""From an ml_collections config to the objects the loop needs.

Kept apart from the loop so that tests, the benchmark and the experiment suites
build exactly what a run builds: the :class:`SADTConfig` of the method (preset
plus ``config.sadt`` overrides), the base optimizer, the model, the duration.
:func:`build_run` is the one place that turns a (validated) config into a
:class:`Run`: dataset, duration, mesh, model, optimizer, method and the initial
state; the loop and ``experiments/restore.py`` both use it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sadt_jax import models
from sadt_jax.algorithm.methods import make_optimizer, method_config
from sadt_jax.algorithm.state import TrainState
from sadt_jax.algorithm.step import SADTConfig
from sadt_jax.data import Dataset
from sadt_jax.train import protocol, steps

__all__ = [
    "Run",
    "build_model",
    "build_optimizer",
    "build_run",
    "init_state",
    "num_train_steps",
    "resolve_sadt_config",
    "run_keys",
]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SCHEDULES = ("exponential", "cosine", "constant")


def resolve_sadt_config(config: Any) -> SADTConfig:
    """The method's preset with every non-``None`` ``config.sadt`` field applied.

    T2's leaf paths default to the model's (:func:`sadt_jax.models.t2_teacher_paths`).
    """
    overrides = {k: v for k, v in config.sadt.items() if v is not None}
    mult = overrides.pop("t2_multiplicative_path", None)
    add = overrides.pop("t2_additive_path", None)
    default_mult, default_add = models.t2_teacher_paths(config.model.name)
    overrides["t2_paths"] = (mult or default_mult, add or default_add)
    return method_config(config.method, **overrides)


def num_train_steps(config: Any, steps_per_epoch: int) -> int:
    """Total training steps: ``num_steps`` if set, else ``num_epochs * steps_per_epoch``."""
    if config.get("num_steps") is not None:
        return int(config.num_steps)
    return int(config.num_epochs) * steps_per_epoch


def build_optimizer(config: Any, steps_per_epoch: int) -> optax.GradientTransformation:
    """The base optimizer U of ``config.method`` with ``config.optim``'s schedule.

    Schedules count optimizer updates; two-update methods make two per batch, so
    the cosine schedule's length is scaled to match (the exponential one is left
    as in the release, which decays twice as fast under two updates).
    """
    o = config.optim
    if o.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {o.schedule!r}; valid: {', '.join(SCHEDULES)}")
    updates_per_step = 2 if resolve_sadt_config(config).two_updates else 1
    total = num_train_steps(config, steps_per_epoch) * updates_per_step
    warmup = int(o.warmup_epochs * steps_per_epoch * updates_per_step)
    lr: Any = o.learning_rate
    decay_rate = o.decay_rate
    if o.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, max(warmup, 0), max(total, 1))
        decay_rate = 1.0
    elif o.schedule == "constant":
        decay_rate = 1.0
    if warmup and o.schedule != "cosine":
        lr = optax.join_schedules(
            [
                optax.linear_schedule(0.0, o.learning_rate, warmup),
                optax.exponential_decay(
                    o.learning_rate, o.decay_steps, decay_rate, staircase=o.staircase
                ),
            ],
            [warmup],
        )
    return make_optimizer(
        config.method,
        optimizer=o.optimizer,
        learning_rate=lr,
        decay_rate=decay_rate,
        decay_steps=o.decay_steps,
        staircase=o.staircase,
        momentum=o.momentum,
        nesterov=o.nesterov,
        weight_decay=o.weight_decay,
        adam_eps=o.adam_eps,
        adam_eps_placement=o.get("adam_eps_placement", "optax"),
        agc_clip=o.agc_clip,
    )


def build_model(config: Any, num_classes: int):
    """The flax module named by ``config.model``."""
    kwargs: dict[str, Any] = {"dtype": DTYPES[config.model.dtype]}
    for field in ("dropout_rate", "pool"):
        if config.model.get(field) is not None:
            kwargs[field] = config.model[field]
    return models.get_model(config.model.name, num_classes, **kwargs)


def sadt_config_dict(cfg: SADTConfig) -> dict[str, Any]:
    """JSON-friendly view of a :class:`SADTConfig`."""
    out = dataclasses.asdict(cfg)
    if callable(out["rho"]):
        out["rho"] = repr(out["rho"])
    if out["t2_paths"] is not None:
        out["t2_paths"] = list(out["t2_paths"])
    return out


def steps_to_epochs(steps: int, steps_per_epoch: int) -> int:
    return math.ceil(steps / steps_per_epoch)


def run_keys(config: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(init_key, run_key, aug_key)`` of a run.

    The initial weights depend on ``init_seed`` (default: ``seed``) only, never on
    the method, so every method of one seed in a grid starts from the same weights.
    """
    init_seed = config.seed if config.get("init_seed") is None else config.init_seed
    run_key, aug_key = jax.random.split(jax.random.PRNGKey(config.seed))
    return jax.random.PRNGKey(init_seed), run_key, aug_key


def init_state(
    config: Any,
    model: Any,
    image_shape: tuple[int, ...],
    tx: optax.GradientTransformation,
    sadt_config: SADTConfig,
) -> TrainState:
    """The run's initial :class:`TrainState` (call under ``jax.jit`` / ``jax.eval_shape``)."""
    init_key, run_key, _ = run_keys(config)
    variables = model.init(init_key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        variables=variables,
        tx=tx,
        key=run_key,
        ema_teacher=sadt_config.uses_ema,
    )


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a run is built from, derived once from its config.

    Attributes:
      config: the run's config.
      sadt_config: the method (:func:`resolve_sadt_config`).
      dataset: the loaded dataset.
      steps_per_epoch: batches per epoch (the last partial batch is dropped).
      total_steps: the training length in steps (:func:`num_train_steps`).
      num_epochs: epochs started, the last one possibly partial.
      model: the flax module.
      tx: the base optimizer.
      mesh: a 1-D mesh over all devices, axis ``"data"``.
      aug_key: base key of the augmentation stream.
    """

    config: Any
    sadt_config: SADTConfig
    dataset: Dataset
    steps_per_epoch: int
    total_steps: int
    num_epochs: int
    model: Any
    tx: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    aug_key: jax.Array

    @property
    def replicated(self) -> NamedSharding:
        """Sharding of the state: a full copy on every device."""
        return NamedSharding(self.mesh, P())

    @property
    def data_sharding(self) -> NamedSharding:
        """Sharding of a global batch: split over the ``data`` axis."""
        return NamedSharding(self.mesh, P("data"))

    @property
    def plan_sharding(self) -> NamedSharding:
        """Sharding of an epoch's index plan ``(steps, b)``: split on the batch dimension."""
        return NamedSharding(self.mesh, P(None, "data"))

    def place_train_data(self) -> dict[str, jax.Array]:
        """The training images and labels on every device of the mesh (once per run).

        Every process already holds the whole training set in memory; each device gets a
        full copy (uint8 images: 47 MB for Fashion-MNIST, 150 MB for CIFAR), from which the
        train step gathers its batches (:func:`sadt_jax.train.steps.gather_batch`).

        Returns:
          ``{"image": (N, H, W, C) uint8, "label": (N,)}``, replicated.
        """
        ds = self.dataset
        return {
            "image": _replicate(ds.train_images, self.replicated),
            "label": _replicate(ds.train_labels, self.replicated),
        }

    def place_plan(self, first_step: int, block: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """One block of an epoch's index plan on the devices (once per epoch).

        Args:
          first_step: the global step (``state.step``) of the block's first row.
          block: this process's share ``{"index": (steps, b), ...}`` of the block
            (:func:`sadt_jax.data.pipeline.plan_blocks`); the processes' shares, in process
            order, make the global plan, as their local batches make a global batch.

        Returns:
          The block's arrays, sharded over the ``data`` axis on their batch dimension, and
          ``"first_step"``, an ``int32`` scalar replicated.
        """
        placed = {
            k: jax.make_array_from_process_local_data(self.plan_sharding, v)
            for k, v in block.items()
        }
        placed["first_step"] = _replicate(np.asarray(first_step, np.int32), self.replicated)
        return placed

    def _init_state(self) -> TrainState:
        return init_state(
            self.config, self.model, self.dataset.image_shape, self.tx, self.sadt_config
        )

    def init_state(self) -> TrainState:
        """The initial state, replicated over the mesh."""
        # jit, not device_put: a device_put of local arrays to a multi-process sharding
        # makes arrays that orbax cannot save.
        return jax.jit(self._init_state, out_shardings=self.replicated)()

    def init_metric_sums(self) -> dict[str, jax.Array]:
        """Zeroed running metric sums, replicated over the mesh."""
        return jax.jit(steps.init_metric_sums, out_shardings=self.replicated)()

    def abstract_checkpoint(self) -> dict[str, Any]:
        """The shapes and shardings of a checkpoint's ``{"state", "metrics"}`` tree (no compute)."""

        def tree():
            return {"state": self._init_state(), "metrics": steps.init_metric_sums()}

        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated),
            jax.eval_shape(tree),
        )


def _replicate(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A full copy of a host array (the same in every process) on every device of ``sharding``."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def load_run_dataset(config: Any) -> Dataset:
    """The dataset as ``config.data`` describes it (split, subset, location, release split)."""
    return protocol.load_data(config)


def build_run(config: Any, *, dataset: Dataset | None = None) -> Run:
    """Builds a :class:`Run` from a validated config (loads the dataset unless given).

    Args:
      config: the run's config (checked by :mod:`sadt_jax.train.validation`).
      dataset: the dataset, if already loaded.

    Returns:
      The :class:`Run`; nothing is initialised or compiled yet.
    """
    ds = load_run_dataset(config) if dataset is None else dataset
    steps_per_epoch = protocol.steps_per_epoch(config, ds.num_train)  # partial batch kept or not
    total_steps = num_train_steps(config, steps_per_epoch)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    return Run(
        config=config,
        sadt_config=resolve_sadt_config(config),
        dataset=ds,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        num_epochs=steps_to_epochs(total_steps, steps_per_epoch),
        model=build_model(config, ds.num_classes),
        tx=build_optimizer(config, steps_per_epoch),
        mesh=mesh,
        aug_key=run_keys(config)[2],
    )
