"""Compute estimates and gradient-evaluation counts of cells (*estimates*, not measurements)."""

from __future__ import annotations

import functools
import math
from typing import Any

from experiments.suites.cells import Cell, make_configs_importable

#: Step cost relative to the Base step (same batch). Base, GC and AGC: 1. SAM and
#: the two-gradient controls: two forward/backward passes. SADT-T1/T3: the
#: targets of the step-time issue (experiments/benchmark.py ``TARGETS``), close
#: to what we measured on 2 CPU cores (T1 2.2x, T2 2.8x, batch 256). T2 has two
#: teachers. These are estimates, not measurements of any particular run.
METHOD_COST = {
    "base": 1.0,
    "gc": 1.0,
    "agc": 1.0,
    "sam": 2.05,
    "sadt_t1": 2.15,
    "sadt_t2": 3.2,
    "sadt_t3": 2.15,
    "base_2x": 2.0,
    "sadt_t1_1u": 2.1,
    "sadt_ema": 2.5,
    "rdrop": 2.15,
}

#: Base-step seconds per training example (forward + backward + update).
#: * ``cpu2``: the simple CNN on Fashion-MNIST on 2 shared CPU cores, ~0.5 s per
#:   step of 256 (measured 0.35-1.5 s on a loaded machine; SADT-T1 at batch 512
#:   1.5-4 s).
#: * ``gpu``: one RTX 3090 / A100-class GPU, float32. The simple CNN is anchored on
#:   the authors' notebook (Base 1.9 s per CIFAR-10 epoch at batch 2048, i.e.
#:   3.8e-5 s/example); the other models are scaled by their XLA-counted training
#:   FLOPs per 32x32 image (simple_cnn 0.077, vgg16_bn 0.38, resnet56 0.72,
#:   inception_resnet 3.0 GFLOP) at an assumed 8 TFLOP/s sustained, never below
#:   the simple CNN's cost.
BASE_SECONDS_PER_EXAMPLE = {
    ("cpu2", "simple_cnn"): 0.5 / 256,
    # The release layout's fused blocks: measured 0.30 ms per image (Base at batch 512,
    # results/benchmark_release.json; 0.29 ms at batch 128), taken 1.5x for a shared machine.
    ("cpu2", "release_simple_cnn"): 0.45e-3,
    ("gpu", "simple_cnn"): 1.9 / 50_000,
    ("gpu", "vgg16_bn"): 0.378e9 / 8e12,
    ("gpu", "resnet56"): 0.715e9 / 8e12,
    ("gpu", "inception_resnet"): 3.01e9 / 8e12,
}
#: Per-run startup and compilation (seconds, times the method's step cost).
STARTUP_SECONDS = {"cpu2": 15.0, "gpu": 30.0}
#: Dataset sizes (train, test) for the estimates.
DATASET_SIZES = {"fashion_mnist": (60_000, 10_000), "cifar10": (50_000, 10_000)}
DATASET_SIZES["cifar100"] = DATASET_SIZES["cifar10"]


def estimate_seconds(cell: Cell, hardware: str) -> float:
    """Rough wall-clock estimate of one cell (see the module docstring): an *estimate*."""
    if cell.kind == "sharpness":
        # ~70 gradient evaluations on num_examples images (HVPs cost ~2 gradients).
        per_ex = BASE_SECONDS_PER_EXAMPLE.get((hardware, cell.model), 2e-3)
        return STARTUP_SECONDS.get(hardware, 30.0) + 70 * cell.batch_size * per_ex
    num_train, num_test = DATASET_SIZES.get(cell.dataset, (50_000, 10_000))
    if cell.max_train_examples:
        num_train = min(num_train, cell.max_train_examples)
    steps_per_epoch = max(num_train // cell.batch_size, 1)
    steps = math.ceil(cell.num_epochs * steps_per_epoch)
    per_ex = BASE_SECONDS_PER_EXAMPLE.get((hardware, cell.model))
    if per_ex is None:
        per_ex = BASE_SECONDS_PER_EXAMPLE[(hardware, "simple_cnn")]
    cost = METHOD_COST.get(cell.method, 2.0)
    every = int(dict(cell.overrides).get("teacher_every", 1))
    cost = (every - 1 + cost) / every  # Base steps between teacher steps
    train = steps * cell.batch_size * per_ex * cost
    evaluation = math.ceil(cell.num_epochs) * _evaluated_images(cell, num_test) * per_ex / 3
    return train + evaluation + STARTUP_SECONDS.get(hardware, 30.0) * cost


def _evaluated_images(cell: Cell, num_test: int) -> int:
    """Images evaluated after each epoch: the validation split plus the (capped) test split.

    A cell that does not set ``data.num_validation`` has the configs' shared default
    (``configs/common.py``); a variant that sets its own (CIFAR-10's ``sam_recipe``: 0) is
    not read, which matters only when the cell also caps the test split.
    """
    overrides = dict(cell.overrides)
    num_val = int(overrides.get("data.num_validation", _default_num_validation()))
    max_test = overrides.get("data.max_test_examples")
    rest = num_test - num_val
    return num_val + (rest if max_test is None else min(rest, int(max_test)))


@functools.cache
def _default_num_validation() -> int:
    make_configs_importable()
    from configs.common import base_config

    return int(base_config("base").data.num_validation)


def gradient_evaluations(method: str, overrides: dict[str, Any] | None = None) -> int:
    """Forward+backward passes per training step of ``method``, from its definition.

    Read off the method's :class:`~sadt_jax.algorithm.step.SADTConfig` (with the cell's
    ``sadt.*`` overrides applied): the clean pass is one; ``objective="base"`` with two
    updates adds a second cross-entropy gradient at theta' (``base_2x``); SAM adds the
    gradient at the perturbed point; SADT adds one distillation gradient per teacher
    (T2 samples two layer teachers, every other teacher family one). Passes that are
    forward only (an EMA teacher's prediction) and the KD weight (a zero weight still
    computes the pass) do not change the count. So: base, gc, agc 1; base_2x, sam,
    sadt_t1, sadt_t3, sadt_t1_1u, rdrop 2; sadt_t2 3.

    Args:
      method: a method name (``sadt_jax.METHODS``).
      overrides: the cell's ``--config.*`` overrides (only ``sadt.<field>`` ones matter).

    Returns:
      The number of gradient evaluations per step (``teacher_every`` is not applied).
    """
    from sadt_jax.algorithm.methods import METHODS

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    config = METHODS[method]
    sadt = {
        k.removeprefix("sadt."): v for k, v in (overrides or {}).items() if k.startswith("sadt.")
    }
    objective = sadt.get("objective", config.objective)
    if objective == "base":
        return 2 if sadt.get("two_updates", config.two_updates) else 1
    if objective == "sam":
        return 2
    teachers = sadt.get("teachers", config.teachers)
    return 1 + (2 if teachers == "t2" else 1)


def gradient_evaluations_at(cell: Cell, step: int) -> float:
    """Gradient evaluations a cell has spent after ``step`` training steps.

    With ``teacher_every = k`` the steps ``0, k, 2k, ...`` are the method's steps and the
    others Base steps (one gradient each).
    """
    overrides = dict(cell.overrides)
    per_step = gradient_evaluations(cell.method, overrides)
    every = int(overrides.get("teacher_every", 1))
    method_steps = -(-step // every)  # ceil
    return method_steps * per_step + (step - method_steps)


def num_steps(cell: Cell) -> int:
    """Training steps of a cell (0 for measurement cells)."""
    if cell.kind != "train":
        return 0
    num_train = DATASET_SIZES.get(cell.dataset, (50_000, 10_000))[0]
    if cell.max_train_examples:
        num_train = min(num_train, cell.max_train_examples)
    return math.ceil(cell.num_epochs * max(num_train // cell.batch_size, 1))
