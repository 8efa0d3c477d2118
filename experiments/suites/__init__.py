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

The code is split by role: :mod:`~experiments.suites.cells` (a cell and a suite),
:mod:`~experiments.suites.cost` (compute estimates, gradient evaluations per step),
:mod:`~experiments.suites.paper`, :mod:`~experiments.suites.fashion_mnist` and
:mod:`~experiments.suites.science` (the grids); this module is the registry.

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
* ``ablation``: what makes SADT-T1 work, 12 cells x 10 seeds (:func:`ablation_cells`);
* ``overfit``: a small training set trained until validation loss turns up
  (:func:`overfit_cells`).

Compute estimates (:func:`estimate_seconds`) are *estimates*: steps x a per-example
cost of the base step x the method's step-cost ratio, plus evaluation and
compilation. The constants and where they come from are next to them below.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from experiments.suites.cells import (
    CONTROL_METHODS,
    PAPER_DATASETS,
    PAPER_METHODS,
    PAPER_MODELS,
    PAPER_VARIANTS,
    REPO_ROOT,
    SMOKE_OVERRIDES,
    Cell,
    Suite,
    fmt_number,
)
from experiments.suites.cost import (
    METHOD_COST,
    estimate_seconds,
    gradient_evaluations,
    gradient_evaluations_at,
    num_steps,
)
from experiments.suites.fashion_mnist import (
    FM_SEEDS,
    RELEASE_KEY_SEEDS,
    fashion_mnist_cells,
    fashion_mnist_long_cells,
    fashion_mnist_release_cells,
    release_key_cells,
    sensitivity_cells,
    teacher_every_cells,
)
from experiments.suites.paper import paper_cells, paper_clean_cells
from experiments.suites.science import (
    ABLATION_CELLS,
    ABLATION_SEEDS,
    OVERFIT_SEEDS,
    ablation_cells,
    overfit_cells,
    sharpness_cells,
)

__all__ = [
    "ABLATION_CELLS",
    "CONTROL_METHODS",
    "METHOD_COST",
    "PAPER_DATASETS",
    "PAPER_METHODS",
    "PAPER_MODELS",
    "PAPER_VARIANTS",
    "REPO_ROOT",
    "SMOKE_OVERRIDES",
    "SUITES",
    "Cell",
    "Suite",
    "estimate_seconds",
    "fmt_number",
    "get_suite",
    "gradient_evaluations",
    "gradient_evaluations_at",
    "num_steps",
    "suite_cells",
    "unique_runs",
]


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
