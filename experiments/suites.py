r"""Named experiment suites: grids of runs, each exactly a ``sadt_jax.main`` command.

A suite is a list of :class:`Cell`\ s. A cell is one run: a config file and
method (``configs/fashion_mnist.py:sadt_t1``), ``--config.<field>=<value>``
overrides (the seed among them) and a stable name, so its workdir is
``<root>/<suite>/<cell>`` and rerunning it resumes or skips it. Each cell also
carries where it goes in the tables: a ``group`` (one pivot table and one set of
plots), a ``setting`` (a column: dataset / model / batch) and a ``label`` (a row:
the method or the hyperparameter value).

**Initial weights.** Within a seed, every method of a suite starts from the same
initial weights: the loop draws them from ``config.init_seed`` or, when unset
(always here), ``config.seed``, independently of the method. Seeds differ in
initial weights, data order, CutMix and perturbation noise.

Suites (run them with ``python -m experiments.run_suite --suite=<name> --root=runs``;
``--dry_run`` prints the commands and a compute estimate):

* ``paper``: the SADT paper's tables under the protocol of the authors' released code
  (:func:`paper_cells`); ``paper_clean``: the same grid under the project's protocol;
* ``fashion_mnist``: the paper's methods and our controls, 3 seeds, on 2 CPU cores
  (:func:`fashion_mnist_cells`);
* ``sensitivity``: SADT's hyperparameters (:func:`sensitivity_cells`);
* ``sharpness``: Hessian top eigenvalue and worst-case loss increase of the final
  models of ``fashion_mnist`` (:func:`sharpness_cells`);
* ``teacher_every``: SADT-T1 with teachers every k steps, reusing ``fashion_mnist``'s
  base and sadt_t1 runs (:func:`teacher_every_cells`);
* ``fashion_mnist_long``: base, base_2x and sadt_t1 on all 60k training images
  (:func:`fashion_mnist_long_cells`);
* ``fashion_mnist_release``: the paper's methods, base_2x and rdrop under the release
  protocol (:func:`fashion_mnist_release_cells`); ``release_key``: base, base_2x,
  sadt_t1 and rdrop of it with 5 seeds (:func:`release_key_cells`);
* ``ablation``: what makes SADT-T1 work, 11 cells x 10 seeds (:func:`ablation_cells`);
* ``overfit``: a small training set trained until validation loss turns up
  (:func:`overfit_cells`).

Compute estimates (:func:`estimate_seconds`) are *estimates*: steps x a per-example
cost of the base step x the method's step-cost ratio, plus evaluation and
compilation. The constants and where they come from are next to them below.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = [
    "SUITES",
    "Cell",
    "Suite",
    "estimate_seconds",
    "get_suite",
    "gradient_evaluations",
    "suite_cells",
]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def _train_cell(
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
                            _train_cell(
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


# ---- Suite 2: Fashion-MNIST, 9 methods x 3 seeds on 2 CPU cores -------------------------

FM_BATCH = 256
FM_TRAIN_EXAMPLES = 7680  # 30 steps of 256 per epoch
FM_EPOCHS = 5
FM_SEEDS = (0, 1, 2)
FM_METHODS = PAPER_METHODS + CONTROL_METHODS


def _fashion_mnist_method_cell(
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
    return _train_cell(
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
        _fashion_mnist_method_cell(
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
        return _train_cell(
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
            cell = _fashion_mnist_method_cell(
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
        _fashion_mnist_method_cell(
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
}


def ablation_cells(seeds: Sequence[int], smoke: bool = False) -> list[Cell]:
    """What makes SADT-T1 beat base, and why base_2x beats SADT-T1: 11 cells x 10 seeds.

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
      R-Drop-like consistency); ``sadt_t1_nodrop`` and ``base_nodrop`` (dropout off);
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
            cell = _fashion_mnist_method_cell(
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
OVERFIT_TRAIN_EXAMPLES = 1024
OVERFIT_BATCH = 128  # 8 steps per epoch
OVERFIT_EPOCHS = 120  # 960 steps
OVERFIT_EVAL_EVERY = 6  # 20 evaluations; best-validation selection among them


def overfit_cells(seeds: Sequence[int], smoke: bool = False) -> list[Cell]:
    """A regime where a regulariser should show itself: 1,024 images, 120 epochs, 5 seeds.

    Methods: base, base_2x, sam, sadt_t1, sadt_t3, rdrop. The first 1,024 Fashion-MNIST
    training images, batch 128 (8 steps per epoch), 120 epochs (960 steps), no CutMix
    (``data.augment=none``, so the small set can be memorised; dropout 0.3 stays), the
    paper's Adam 1e-4. Validation (the first 3000 test images) and test are evaluated
    every 6 epochs; the reported model is the evaluation with the lowest validation loss,
    so the gap between "test acc @ best val loss" and "final test acc" says how much
    selection mattered. Seeds 0-4; within a seed the same initial weights and batches.

    Compute (an *estimate*): results/benchmark.md measured a Base step at ~1.5 ms per image
    on 2 quiet CPU cores and SAM, SADT-T1/T3 at 1.71-1.76x that, so the 6 methods sum to
    ~9.7 Base-step equivalents; per seed 960 steps x 128 images x 9.7 x 1.5 ms = 30 minutes
    of training, plus 6 x 20 evaluations of 10,000 images (~10 min) and start-up: ~42
    minutes per seed, ~3.5 hours for the 5 seeds; ~5.2 hours with the suites' conservative
    cost model (0.5 s per Base step of 256, :data:`METHOD_COST`), which ``--dry_run`` prints.
    ``jax.vmap`` over seeds would not pay off on 2 cores (the base step already keeps ~1.4
    of them busy; a vmapped step does the same FLOPs), so seeds run one after another.
    """
    cells = []
    for seed in seeds:
        for method in OVERFIT_METHODS:
            overrides = {
                "batch_size": OVERFIT_BATCH,
                "num_epochs": OVERFIT_EPOCHS,
                "data.max_train_examples": OVERFIT_TRAIN_EXAMPLES,
                "data.num_validation": 3000,
                "data.augment": "none",
                "eval_every_epochs": OVERFIT_EVAL_EVERY,
                "ckpt.every_epochs": OVERFIT_EVAL_EVERY,
                "log_every_steps": 40,
            }
            cells.append(
                _train_cell(
                    "overfit",
                    f"{method}_s{seed}",
                    group="overfit",
                    setting=f"fashion_mnist/simple_cnn/b{OVERFIT_BATCH}/{OVERFIT_TRAIN_EXAMPLES}",
                    label=method,
                    method=method,
                    seed=seed,
                    config=f"configs/fashion_mnist.py:{method}",
                    overrides=overrides,
                    dataset="fashion_mnist",
                    model="simple_cnn",
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


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(
            "paper",
            paper_cells,
            default_seeds=(0,),
            hardware="gpu",
            thresholds=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
        ),
        Suite(
            "paper_clean",
            paper_clean_cells,
            default_seeds=(0,),
            hardware="gpu",
            thresholds=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
        ),
        Suite("fashion_mnist", fashion_mnist_cells, FM_SEEDS, references=("base", "base_2x")),
        Suite("sensitivity", sensitivity_cells, (0,)),
        Suite(
            "sharpness",
            sharpness_cells,
            FM_SEEDS,
            kind="sharpness",
            references=("base", "base_2x"),
        ),
        Suite("teacher_every", teacher_every_cells, FM_SEEDS),
        Suite(
            "fashion_mnist_release",
            fashion_mnist_release_cells,
            FM_SEEDS,
            references=("base", "base_2x"),
        ),
        Suite(
            "release_key",
            release_key_cells,
            RELEASE_KEY_SEEDS,
            references=("base", "base_2x"),
        ),
        Suite(
            "fashion_mnist_long",
            fashion_mnist_long_cells,
            FM_SEEDS,
            thresholds=(0.8, 0.85, 0.87, 0.89),
            references=("base", "base_2x"),
        ),
        Suite("ablation", ablation_cells, ABLATION_SEEDS, references=("base", "base_2x")),
        Suite(
            "overfit",
            overfit_cells,
            OVERFIT_SEEDS,
            thresholds=(0.6, 0.7, 0.75, 0.8),
            references=("base", "base_2x"),
        ),
    )
}


def get_suite(name: str) -> Suite:
    """The suite called ``name``; fails listing the valid names."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; valid suites: {', '.join(SUITES)}")
    return SUITES[name]


def suite_cells(
    name: str,
    seeds: Iterable[int] | None = None,
    *,
    smoke: bool = False,
    only: Sequence[str] = (),
) -> list[Cell]:
    """The cells of a suite, seed-major (all cells of the first seed first).

    Args:
      name: the suite.
      seeds: seeds to run (default: the suite's).
      smoke: make every cell tiny (:data:`SMOKE_OVERRIDES`) and put it under
        ``<suite>_smoke`` so it never mixes with real runs.
      only: keep the cells whose name contains any of these substrings.

    Returns:
      The cells. The same workdir may appear in more than one cell (one run shown
      in two tables); runners run it once.
    """
    suite = get_suite(name)
    seeds = tuple(suite.default_seeds if seeds is None else seeds)
    cells = suite.make_cells(seeds, smoke=smoke)
    if only:
        cells = [c for c in cells if any(s in c.name for s in only)]
    return cells


def unique_runs(cells: Sequence[Cell]) -> list[Cell]:
    """The cells with distinct workdirs, first occurrence first."""
    seen, out = set(), []
    for c in cells:
        key = (c.suite, c.name)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


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
    every_epochs = int(dict(cell.overrides).get("eval_every_epochs", 1))
    evaluations = math.ceil(math.ceil(cell.num_epochs) / every_epochs)
    evaluation = evaluations * num_test * per_ex / 3  # forward only
    return train + evaluation + STARTUP_SECONDS.get(hardware, 30.0) * cost


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
