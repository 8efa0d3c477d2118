"""Fashion-MNIST suites on 2 CPU cores: the methods, sensitivity, teacher_every, the release
protocol and a longer budget."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from experiments.suites.cells import (
    CONTROL_METHODS,
    PAPER_METHODS,
    Cell,
    fmt_number,
    train_cell,
)

# ---- Suite 2: Fashion-MNIST, 9 methods x 3 seeds on 2 CPU cores -------------------------

FM_BATCH = 256
FM_TRAIN_EXAMPLES = 7680  # 30 steps of 256 per epoch
FM_EPOCHS = 5
FM_SEEDS = (0, 1, 2)
FM_METHODS = PAPER_METHODS + CONTROL_METHODS


def fashion_mnist_method_cell(
    suite: str,
    method: str,
    seed: int,
    *,
    setting: str,
    num_epochs: float,
    max_train_examples: int | None,
    log_every_steps: int,
    smoke: bool,
) -> Cell:
    """One method of a Fashion-MNIST method grid (simple CNN, batch FM_BATCH, 3000 val)."""
    overrides: dict[str, Any] = {"batch_size": FM_BATCH, "num_epochs": num_epochs}
    if max_train_examples is not None:
        overrides["data.max_train_examples"] = max_train_examples
    overrides.update({"data.num_validation": 3000, "log_every_steps": log_every_steps})
    return train_cell(
        suite,
        f"{method}_s{seed}",
        group=suite,
        setting=setting,
        label=method,
        method=method,
        seed=seed,
        config=f"configs/fashion_mnist.py:{method}",
        overrides=overrides,
        dataset="fashion_mnist",
        model="simple_cnn",
        batch_size=FM_BATCH,
        num_epochs=num_epochs,
        max_train_examples=max_train_examples,
        smoke=smoke,
    )


def fashion_mnist_cells(seeds: Sequence[int], smoke: bool = False) -> list[Cell]:
    """Fashion-MNIST, the paper's simple CNN: 7 methods + 2 controls, 3 seeds, 2 CPU cores.

    Methods: base, gc, agc, sam, sadt_t1, sadt_t2, sadt_t3, and the controls base_2x
    (Base with two updates per batch: as many updates as SADT) and sadt_t1_1u
    (SADT-T1 with one update: as many as Base). Seeds 0, 1, 2. Everything else is
    ``configs/fashion_mnist.py``: Adam 1e-4 with the paper's decay, CutMix, dropout
    0.3, validation = the first 3000 test images (test = the other 7000).

    Budget, chosen so the 27 runs take well under 3 hours on 2 CPU cores: batch 256
    (half the paper's 512, so there are enough steps), the first 7680 training images
    (30 steps per epoch), 5 epochs = 150 steps per run.
    Estimate: one Base step of 256 costs ~0.5 s on 2 cores (measured 0.35-1.5 s
    under load); the 9 methods cost 1+1+1 (base, gc, agc) + 2.05 (sam) + 2.15 + 3.2
    + 2.15 (T1-T3) + 2.0 (base_2x) + 2.1 (T1_1u) = 16.7 Base steps per step index,
    so 3 seeds x 150 steps x 16.7 x 0.5 s = 3750 s of training, plus evaluation of
    10,000 images per epoch (~27 x 5 x 3 s = 400 s) and start-up/compilation
    (~27 x 30 s = 800 s): ~1.4 h in all; ~2.4 h if a Base step takes 1 s. The full
    60k images x 6 epochs at batch 256 would be ~8x more (10+ h).
    """
    return [
        fashion_mnist_method_cell(
            "fashion_mnist",
            method,
            seed,
            setting=f"fashion_mnist/simple_cnn/b{FM_BATCH}",
            num_epochs=FM_EPOCHS,
            max_train_examples=FM_TRAIN_EXAMPLES,
            log_every_steps=10,
            smoke=smoke,
        )
        for seed in seeds
        for method in FM_METHODS
    ]


# ---- Suite 3: sensitivity ----------------------------------------------------------------

SENS_TRAIN_EXAMPLES = 5120  # 20 steps of 256 per epoch
SENS_EPOCHS = 4
SENS_RHOS = (5e-4, 1e-3, 2e-3, 5e-3)
SENS_T1_NOISE = (0.0, 1e-4, 1e-3)
SENS_T3_NOISE = (1e-5, 1e-4, 1e-3)
SENS_BATCHES = (128, 256, 512)


def sensitivity_cells(seeds: Sequence[int], smoke: bool = False) -> list[Cell]:
    """SADT's hyperparameters on Fashion-MNIST (simple CNN), a smaller budget, 1 seed.

    Groups (each its own table and plots):

    * ``t1_rho_noise``: SADT-T1, rho in {5e-4, 1e-3, 2e-3, 5e-3} (rows) x noise std
      sigma in {0, 1e-4, 1e-3} (columns) at batch 256;
    * ``t3_noise``: SADT-T3, sigma in {1e-5, 1e-4, 1e-3} at batch 256;
    * ``batch``: sadt_t1 vs base at batch 128, 256, 512 (columns), the same number
      of epochs (so the same images, and 4x more steps at 128 than at 512).

    Budget: the first 5120 training images, 4 epochs (80 steps at batch 256). 20 runs
    per seed (SADT-T1 at rho 1e-3, sigma 1e-4, batch 256 is shared by the first and
    last groups): about 40 Base-step equivalents x 80 steps x 0.5 s = 1600 s of
    training + ~900 s of evaluation and start-up on 2 CPU cores, ~0.7 h per seed
    (an estimate).
    """
    common = {
        "num_epochs": SENS_EPOCHS,
        "data.max_train_examples": SENS_TRAIN_EXAMPLES,
        "data.num_validation": 3000,
        "log_every_steps": 10,
    }

    def cell(name, group, setting, label, method, seed, batch, sadt):
        overrides = {"batch_size": batch, **common, **{f"sadt.{k}": v for k, v in sadt.items()}}
        return train_cell(
            "sensitivity",
            f"{name}_b{batch}_s{seed}",
            group=group,
            setting=setting,
            label=label,
            method=method,
            seed=seed,
            config=f"configs/fashion_mnist.py:{method}",
            overrides=overrides,
            dataset="fashion_mnist",
            model="simple_cnn",
            batch_size=batch,
            num_epochs=SENS_EPOCHS,
            max_train_examples=SENS_TRAIN_EXAMPLES,
            smoke=smoke,
        )

    def t1_name(rho, noise):
        return f"t1_rho{fmt_number(rho)}_noise{fmt_number(noise)}"

    cells = []
    for seed in seeds:
        for noise in SENS_T1_NOISE:
            for rho in SENS_RHOS:
                cells.append(
                    cell(
                        t1_name(rho, noise),
                        "t1_rho_noise",
                        f"sigma={fmt_number(noise)}",
                        f"rho={fmt_number(rho)}",
                        "sadt_t1",
                        seed,
                        256,
                        {"rho": float(rho), "noise_std": float(noise)},
                    )
                )
        for noise in SENS_T3_NOISE:
            cells.append(
                cell(
                    f"t3_noise{fmt_number(noise)}",
                    "t3_noise",
                    "sadt_t3 b256",
                    f"sigma={fmt_number(noise)}",
                    "sadt_t3",
                    seed,
                    256,
                    {"noise_std": float(noise)},
                )
            )
        for batch in SENS_BATCHES:
            cells.append(cell("base", "batch", f"b{batch}", "base", "base", seed, batch, {}))
            cells.append(
                cell(
                    t1_name(1e-3, 1e-4),
                    "batch",
                    f"b{batch}",
                    "sadt_t1",
                    "sadt_t1",
                    seed,
                    batch,
                    {"rho": 1e-3, "noise_std": 1e-4},
                )
            )
    return cells


# ---- Suite 5: teacher sampling every k steps ----------------------------------------------

TE_KS = (2, 4, 8)


def teacher_every_cells(seeds: Sequence[int], smoke: bool = False) -> list[Cell]:
    """SADT-T1 with teachers every k steps (plain Base updates in between), Fashion-MNIST.

    ``config.teacher_every = k``: steps ``0, k, 2k, ...`` are SADT-T1 steps, the others
    are Base steps, so a run costs about ``((k - 1) + c) / k`` Base steps per step,
    where ``c`` is SADT-T1's step-cost ratio. Rows: ``base`` (k = inf), ``k=1``
    (SADT-T1 every step), ``k=2, 4, 8``. The budget and seeds are those of the
    ``fashion_mnist`` suite, and its ``base`` and ``sadt_t1`` cells *are* the k = inf
    and k = 1 rows (the same workdirs: they are not run twice), so only the
    3 x 3 = 9 runs with k > 1 are new: ~20 minutes on 2 CPU cores (an estimate).
    Wall-clock per run comes from the runs themselves (other work may have shared the
    cores); the benchmark's side-by-side step times (results/benchmark.md) are the
    controlled cost measurement.
    """
    cells = []
    for src in fashion_mnist_cells(seeds, smoke=smoke):
        if src.method == "base":
            cells.append(dataclasses.replace(src, group="teacher_every", label="base"))
        elif src.method == "sadt_t1":
            cells.append(dataclasses.replace(src, group="teacher_every", label="k=1"))
            for k in TE_KS:
                cells.append(
                    dataclasses.replace(
                        src,
                        suite="teacher_every" + ("_smoke" if smoke else ""),
                        name=f"sadt_t1_k{k}_s{src.seed}",
                        label=f"k={k}",
                        group="teacher_every",
                        overrides=src.overrides + (("teacher_every", k),),
                    )
                )
    return cells


# ---- Suite 5b: the release protocol on Fashion-MNIST ------------------------------------------

RELEASE_FM_METHODS = PAPER_METHODS + ("base_2x", "rdrop")
RELEASE_FM_EPOCHS = 10  # the release's selection rule only fires from epoch 4
RELEASE_KEY_METHODS = ("base", "base_2x", "sadt_t1", "rdrop")
RELEASE_KEY_SEEDS = (0, 1, 2, 3, 4)


def fashion_mnist_release_cells(seeds: Sequence[int], smoke: bool = False) -> list[Cell]:
    """The paper's seven methods, ``base_2x`` and ``rdrop`` under the release protocol.

    ``configs/fashion_mnist.py:<method>,release``: the release's simple CNN
    (``release_simple_cnn`` at 28x28x1), /255 scaling, Adam with Keras' epsilon placement
    recreated every epoch, the 1024-buffer shuffle with CutMix partners from a second
    stream and the partial last batch kept, KL on clipped probabilities, SAM's
    perturbed-pass BatchNorm update kept, selection on the last validation batch's loss
    from epoch 4 (initial weights as fallback), test = test images 3001-9999. The
    budget is the ``fashion_mnist`` suite's data (batch 256, the first 7680 training
    images: 30 steps per epoch) for 10 epochs (300 steps), so that the selection rule
    has epochs to choose from. Beside the ``fashion_mnist`` suite (project protocol) it
    answers: does the ranking change under the release's protocol?
    """
    cells = []
    for seed in seeds:
        for method in RELEASE_FM_METHODS:
            cell = fashion_mnist_method_cell(
                "fashion_mnist_release",
                method,
                seed,
                setting=f"fashion_mnist/release_simple_cnn/b{FM_BATCH}",
                num_epochs=RELEASE_FM_EPOCHS,
                max_train_examples=FM_TRAIN_EXAMPLES,
                log_every_steps=10,
                smoke=smoke,
            )
            cells.append(
                dataclasses.replace(
                    cell,
                    config=f"configs/fashion_mnist.py:{method},release",
                    model="release_simple_cnn",
                )
            )
    return cells


def release_key_cells(seeds: Sequence[int], smoke: bool = False) -> list[Cell]:
    """The key comparison (base, base_2x, sadt_t1, rdrop) under the release protocol, 5 seeds.

    The cells *are* those of ``fashion_mnist_release`` (same workdirs: seeds 0-2 are not
    run twice); this suite only adds seeds 3 and 4 of these four methods and tables of
    their own.
    """
    return [
        dataclasses.replace(c, group="release_key")
        for c in fashion_mnist_release_cells(seeds, smoke=smoke)
        if c.method in RELEASE_KEY_METHODS
    ]


# ---- Suite 6: a longer budget for the decisive comparison ------------------------------------

LONG_METHODS = ("base", "base_2x", "sadt_t1")
LONG_EPOCHS = 3


def fashion_mnist_long_cells(seeds: Sequence[int], smoke: bool = False) -> list[Cell]:
    """base vs base_2x vs SADT-T1 on all 60,000 Fashion-MNIST training images.

    The ``fashion_mnist`` suite's budget (150 steps at Adam 1e-4) leaves every run
    still improving at its last epoch, a regime where a second optimizer update per
    batch is worth a lot. This suite asks whether the ordering of SADT-T1 and its
    equal-updates control survives 4.7x more steps: batch 256, the full training set,
    3 epochs (702 steps), validation/test as in ``fashion_mnist``. ~30 minutes per
    seed on 2 CPU cores (an estimate: 5.15 Base-step equivalents x 702 steps x 0.5 s).
    """
    return [
        fashion_mnist_method_cell(
            "fashion_mnist_long",
            method,
            seed,
            setting=f"fashion_mnist/simple_cnn/b{FM_BATCH}/60k",
            num_epochs=LONG_EPOCHS,
            max_train_examples=None,
            log_every_steps=20,
            smoke=smoke,
        )
        for seed in seeds
        for method in LONG_METHODS
    ]
