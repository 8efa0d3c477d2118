"""The SADT paper's CIFAR grid, under the release's protocol and under the project's."""

from __future__ import annotations

from collections.abc import Sequence

from experiments.suites.cells import (
    PAPER_DATASETS,
    PAPER_METHODS,
    PAPER_MODELS,
    PAPER_VARIANTS,
    RELEASE_MODELS,
    Cell,
    train_cell,
)

# ---- Suite 1: the paper's tables --------------------------------------------------------


def paper_cells(seeds: Sequence[int], smoke: bool = False, protocol: str = "release") -> list[Cell]:
    """The SADT paper's tables: CIFAR-10/100 x 4 models x 7 methods x 2 batch settings.

    Cells: {cifar10, cifar100} x {simple_cnn, vgg16_bn, inception_resnet, resnet56} x
    {base, gc, agc, sam, sadt_t1, sadt_t2, sadt_t3} x {b512: batch 512, 200 epochs;
    b2048: batch 2048, 370 epochs} = 112 runs per seed (``configs/cifar10.py`` /
    ``cifar100.py``: Adam 1e-4 decayed 0.9 per 1000 updates, CutMix Beta(0.25, 0.25),
    validation = first 3000 test images). ``protocol="release"`` (suite ``paper``) adds the
    ``release`` switch: the authors' code's protocol and its four models (``release_*``);
    ``"clean"`` (suite ``paper_clean``) is the project's protocol and models. Default: one
    seed (the paper reports one).

    Needs tensorflow-datasets' cifar10/cifar100 prepared where it runs
    (``--config.data.data_dir`` through ``--override``), and a GPU or TPU.

    Compute (an *estimate*, ``run_suite --suite=paper --dry_run`` prints it per cell):
    per seed 1.6M training steps (b512: 97 steps x 200 epochs; b2048: 24 x 370, per
    model, dataset and method), about 13 base-step equivalents per (setting, step)
    over the 7 methods. On one RTX 3090 / A100-class GPU in float32, anchored on the
    authors' simple-CNN timings and scaled by training FLOPs per image for the other
    models: roughly 8 GPU-hours for the simple CNN (both datasets), 10 for VGG16-BN,
    19 for ResNet-56 and 77 for Inception-ResNet, ~115 GPU-hours per seed in all,
    dominated by Inception-ResNet. An H100 should need less; measure a few epochs
    before planning.
    """
    suite = "paper" if protocol == "release" else "paper_clean"
    option = ",release" if protocol == "release" else ""
    cells = []
    for seed in seeds:
        for dataset in PAPER_DATASETS:
            for model in PAPER_MODELS:
                name = RELEASE_MODELS[model] if protocol == "release" else model
                for variant, (batch, epochs) in PAPER_VARIANTS.items():
                    for method in PAPER_METHODS:
                        cells.append(
                            train_cell(
                                suite,
                                f"{dataset}_{model}_{variant}_{method}_s{seed}",
                                group=suite,
                                setting=f"{dataset}/{model}/{variant}",
                                label=method,
                                method=method,
                                seed=seed,
                                config=f"configs/{dataset}.py:{method},{variant}{option}",
                                overrides={"model.name": name},
                                dataset=dataset,
                                model=model,
                                batch_size=batch,
                                num_epochs=epochs,
                                smoke=smoke,
                            )
                        )
    return cells


def paper_clean_cells(seeds: Sequence[int], smoke: bool = False) -> list[Cell]:
    """The ``paper`` grid under the project's protocol and models (:func:`paper_cells`).

    Per-channel standardisation, one Adam state and one decaying schedule per run, a full
    permutation per epoch with the partial batch dropped, CutMix partners from the batch,
    selection on the full validation loss at any epoch, test = test images 3000-9999, and the
    project's ``simple_cnn``, ``vgg16_bn``, ``inception_resnet``, ``resnet56``.
    """
    return paper_cells(seeds, smoke=smoke, protocol="clean")
