"""The decisive suites: ablations of SADT-T1, an overfitting regime, and sharpness."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from experiments.suites.cells import Cell, train_cell
from experiments.suites.fashion_mnist import (
    FM_BATCH,
    FM_EPOCHS,
    FM_METHODS,
    FM_TRAIN_EXAMPLES,
    fashion_mnist_cells,
    fashion_mnist_method_cell,
)

# ---- Suite 7: ablations of SADT-T1, 10 seeds ------------------------------------------------

ABLATION_SEEDS = tuple(range(10))
#: ``cell name -> (method, overrides)``: every cell is the ``fashion_mnist`` suite's cell of
#: ``method`` with these ``--config.*`` overrides on top.
ABLATION_CELLS: dict[str, tuple[str, dict[str, Any]]] = {
    "base": ("base", {}),
    "base_2x": ("base_2x", {}),
    "base_lr2x": ("base", {"optim.learning_rate": 2e-4}),
    "base_steps2x": ("base", {"num_epochs": 2 * FM_EPOCHS}),
    "sadt_t1": ("sadt_t1", {}),
    "sadt_t1_kd0": ("sadt_t1", {"sadt.kd_weight": 0.0}),
    "sadt_t1_shared_mask": ("sadt_t1", {"sadt.teacher_dropout": "shared"}),
    "rdrop": ("rdrop", {}),
    "sadt_t1_nodrop": ("sadt_t1", {"model.dropout_rate": 0.0}),
    "base_nodrop": ("base", {"model.dropout_rate": 0.0}),
    "sam": ("sam", {}),
    # Added after seeds 0-4 had run: the equal-updates control without dropout, without
    # which sadt_t1_nodrop's gain over base_nodrop cannot be told from its second update.
    "base_2x_nodrop": ("base_2x", {"model.dropout_rate": 0.0}),
}


def ablation_cells(seeds: Sequence[int], smoke: bool = False) -> list[Cell]:
    """What makes SADT-T1 beat base, and why base_2x beats SADT-T1: 12 cells x 10 seeds.

    The ``fashion_mnist`` suite's budget and protocol (simple CNN, batch 256, the first
    7680 training images, 5 epochs = 150 steps, validation = the first 3000 test images),
    so ``base``, ``base_2x``, ``sadt_t1`` and ``sam`` *are* that suite's cells: they share
    its workdirs (``<root>/fashion_mnist/<method>_s<seed>``) and are trained once.
    Within a seed every cell starts from the same initial weights and sees the same
    batches (``config.seed`` draws both, independently of the method). Cells:

    * ``base``, ``base_2x`` (two CE updates per batch), ``base_lr2x`` (Adam 2e-4: a second
      update's step size without its second gradient), ``base_steps2x`` (10 epochs: twice
      the updates *and* twice the batches);
    * ``sadt_t1``; ``sadt_t1_kd0`` (KD weight 0: the second update reuses the clean
      gradient g); ``sadt_t1_shared_mask`` (the teacher pass reuses the clean pass's
      dropout mask); ``rdrop`` (teacher = theta' itself, only a fresh dropout mask:
      R-Drop-like consistency); ``sadt_t1_nodrop``, ``base_nodrop`` and ``base_2x_nodrop``
      (dropout off; the last is the equal-updates control for ``sadt_t1_nodrop``);
    * ``sam`` (rho 0.05).

    Tables: mean ± std, seed-paired differences with 95 % t confidence intervals against
    ``base`` and ``base_2x``, and their plots.

    Compute (an *estimate*): per seed 150 steps x ~17 (measured step ratios of
    results/benchmark.md) to ~20 (:data:`METHOD_COST`) Base-step equivalents
    (``base_steps2x`` counts twice) at ~0.38-0.5 s per Base step of 256 on 2 CPU cores, plus
    evaluation and start-up: ~25-36 minutes per seed, ~4.2-6 hours for the 10 seeds
    (``--dry_run`` prints the per-cell estimate of the conservative model).
    """
    cells = []
    for seed in seeds:
        for name, (method, extra) in ABLATION_CELLS.items():
            # A cell without overrides *is* the fashion_mnist suite's cell of its method:
            # it shares that suite's workdir, so those runs are not trained twice.
            cell = fashion_mnist_method_cell(
                "fashion_mnist" if not extra and name in FM_METHODS else "ablation",
                method,
                seed,
                setting=f"fashion_mnist/simple_cnn/b{FM_BATCH}",
                num_epochs=extra.get("num_epochs", FM_EPOCHS),
                max_train_examples=FM_TRAIN_EXAMPLES,
                log_every_steps=10,
                smoke=smoke,
            )
            overrides = dict(cell.overrides)
            seed_value = overrides.pop("seed")
            overrides.update({k: v for k, v in extra.items() if k != "num_epochs"})
            overrides["seed"] = seed_value
            cells.append(
                dataclasses.replace(
                    cell,
                    name=f"{name}_s{seed}",
                    group="ablation",
                    label=name,
                    overrides=tuple(overrides.items()),
                )
            )
    return cells


# ---- Suite 8: a small training set, trained until it overfits ------------------------------

OVERFIT_METHODS = ("base", "base_2x", "sam", "sadt_t1", "sadt_t3", "rdrop")
OVERFIT_SEEDS = (0, 1, 2, 3, 4)
OVERFIT_MODEL = "release_simple_cnn"
OVERFIT_TRAIN_EXAMPLES = 1024
OVERFIT_BATCH = 128  # 8 steps per epoch
OVERFIT_EPOCHS = 150  # 1,200 steps
OVERFIT_VALIDATION = 1000  # the first 1,000 test images
OVERFIT_TEST = 3000  # the next 3,000


def overfit_cells(seeds: Sequence[int], smoke: bool = False) -> list[Cell]:
    """A regime where a regulariser should show itself: 1,024 images, 150 epochs, 5 seeds.

    Methods: base, base_2x, sam, sadt_t1, sadt_t3, rdrop. The first 1,024 Fashion-MNIST
    training images, batch 128 (8 steps per epoch), 150 epochs (1,200 steps), no CutMix
    (``data.augment=none``, so the small set can be memorised), the paper's Adam 1e-4
    and the project protocol, with the release's simple CNN (``release_simple_cnn``:
    the authors' layer order, dropout 0.3 on the flattened features), whose fused CPU
    blocks make a step ~3.6x cheaper than the default layout's (results/benchmark.md).
    Every epoch evaluates validation (the first 1,000 test images) and test (the next
    3,000); the reported model is the epoch with the lowest validation loss, so the gap
    between "test acc @ best val loss" and "final test acc" says how much selection
    mattered. Seeds 0-4; within a seed the same initial weights and batches.

    Budget, from two probe runs at this setting (2 quiet CPU cores): Base's validation
    loss bottomed out at epoch ~90 (train accuracy 0.98 by epoch 100) and a two-update
    method memorises faster, so 150 epochs show the turn for every method. Base costs
    ~0.3 s of training and ~0.35 s of evaluation per epoch, the two-gradient methods
    ~0.8 s + 0.35 s: ~18 minutes per seed, ~1.5 hours for 5 seeds (``--dry_run`` prints
    the suites' conservative estimate). ``jax.vmap`` over seeds would not pay off on 2
    cores (a step already keeps both busy; a vmapped step does the same FLOPs), so seeds
    run one after another.
    """
    cells = []
    for seed in seeds:
        for method in OVERFIT_METHODS:
            overrides = {
                "model.name": OVERFIT_MODEL,
                "batch_size": OVERFIT_BATCH,
                "num_epochs": OVERFIT_EPOCHS,
                "data.max_train_examples": OVERFIT_TRAIN_EXAMPLES,
                "data.num_validation": OVERFIT_VALIDATION,
                "data.max_test_examples": OVERFIT_TEST,
                "data.augment": "none",
                "ckpt.every_epochs": 25,
                "log_every_steps": 80,
            }
            cells.append(
                train_cell(
                    "overfit",
                    f"{method}_s{seed}",
                    group="overfit",
                    setting=f"fashion_mnist/{OVERFIT_MODEL}/b{OVERFIT_BATCH}/{OVERFIT_TRAIN_EXAMPLES}",
                    label=method,
                    method=method,
                    seed=seed,
                    config=f"configs/fashion_mnist.py:{method}",
                    overrides=overrides,
                    dataset="fashion_mnist",
                    model=OVERFIT_MODEL,
                    batch_size=OVERFIT_BATCH,
                    num_epochs=OVERFIT_EPOCHS,
                    max_train_examples=OVERFIT_TRAIN_EXAMPLES,
                    smoke=smoke,
                )
            )
    return cells


# ---- Suite 4: sharpness of suite 2's final models ---------------------------------------

SHARPNESS_FLAGS = {
    "num_examples": 512,
    "num_iters": 20,
    "rhos": "0.01,0.05",
    "ascent_steps": 5,
}
SHARPNESS_SMOKE_FLAGS = {"num_examples": 64, "num_iters": 3, "rhos": "0.05", "ascent_steps": 2}


def sharpness_cells(seeds: Sequence[int], smoke: bool = False) -> list[Cell]:
    """Sharpness of the final ``fashion_mnist`` models (one measurement per run).

    For every cell of the ``fashion_mnist`` suite (same seeds), on a fixed batch —
    the first 512 training images, no augmentation, BatchNorm in inference mode,
    the same for every method and seed — ``experiments.sharpness`` restores the last
    checkpoint and computes the top Hessian eigenvalue (power iteration, at most 20
    Hessian-vector products, the same start vector everywhere) and the worst-case
    loss increase within L2 radius rho in {0.01, 0.05} (5 steps of projected
    normalized gradient ascent). The cell waits (is skipped, not failed) until its
    training run has a ``summary.json``. About 1-2 minutes per run on 2 CPU cores.
    """
    flags = SHARPNESS_SMOKE_FLAGS if smoke else SHARPNESS_FLAGS
    cells = []
    for src in fashion_mnist_cells(seeds, smoke=smoke):
        cells.append(
            Cell(
                suite="sharpness" + ("_smoke" if smoke else ""),
                name=src.name,
                group="sharpness",
                setting=src.setting,
                label=src.label,
                method=src.method,
                seed=src.seed,
                overrides=tuple(flags.items()),
                kind="sharpness",
                source=f"{src.suite}/{src.name}",
                model=src.model,
                dataset=src.dataset,
                batch_size=int(flags["num_examples"]),
                num_epochs=0,
            )
        )
    return cells
