r"""From a suite's workdirs to tables (Markdown + CSV) and plots (PNG) in ``results/<suite>/``.

Reads only what the runs wrote (``summary.json``, ``metrics.jsonl``,
``timing.jsonl``, ``suite_run.json``; ``sharpness.json`` for the sharpness suite),
so rerunning it regenerates identical tables: rows in the suite's order, seeds
sorted, fixed number formats, no timestamps. Every table file starts with its
provenance: the command that regenerates it, the machine(s) and versions the runs
report, and the initial-weights protocol.

Statistics over seeds: mean ± sample standard deviation (``ddof=1``; no ± when
n = 1) and n, the number of finished runs in the cell. Unfinished or failed runs
never enter the statistics; they are listed in ``runs.md``.

Files (training suites), per table ``<name>.md`` and ``<name>.csv`` (the CSV's
provenance is in ``#`` lines: ``pandas.read_csv(path, comment="#")``):

* ``REPORT.md``: everything below in one page, with the plots;
* ``accuracy``: best-validation-loss epoch's test accuracy (the paper's number),
  final test and validation accuracy, training time and median epoch time;
* ``pivot_<group>_best_val_test``, ``pivot_<group>_final_test``: rows = methods,
  columns = settings (for ``paper``: dataset / model / batch);
* ``convergence``: epochs and training wall-clock to reach each validation-accuracy
  threshold (mean over the seeds that reached it; k/n reached);
* ``vs_<reference>``: seed-paired differences to a reference method (same initial
  weights and data order): mean ± std of the difference, its 95 % t interval, the paired
  t-test p, and wins;
* ``runs``: one row per planned run, finished or not, with the git commit it ran;
* plots per group: ``curves_val_<group>.png``, ``curves_test_<group>.png`` (accuracy
  vs epoch, mean ± std band), ``loss_val_<group>.png`` (validation loss vs epoch),
  ``acc_vs_grads_<group>.png`` (vs forward+backward passes), ``acc_vs_time_<group>.png``
  (vs training wall-clock), ``final_<group>.png`` (error bars), ``bars_<group>.png`` (the
  paper's bar chart, from 0) and ``vs_<reference>_<group>.png`` (paired differences with
  their intervals).

The ``sharpness`` suite gets ``sharpness`` (top Hessian eigenvalue and how many power
iterations converged, worst-case loss increase per radius, with the test accuracies of
the measured runs), ``sharpness_vs_<reference>``, ``runs`` (every run's measurements),
``sharpness_<group>.png`` and ``sharpness_vs_accuracy.png``.

This module orchestrates: reading the workdirs is :mod:`experiments.workdirs`, the
statistics :mod:`experiments.stats`, the tables :mod:`experiments.tables`, the plots
:mod:`experiments.plots`.

Run::

  python -m experiments.aggregate --suite=fashion_mnist --root=runs
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

from experiments import suites
from experiments.plots import (
    plot_bars,
    plot_curves,
    plot_differences,
    plot_final,
    plot_sharpness_vs_accuracy,
)
from experiments.stats import PairedDifference
from experiments.tables import (
    REFERENCE_METRICS,
    Table,
    accuracy_table,
    convergence_table,
    paired_differences,
    pivot_table,
    provenance,
    reference_table,
    runs_table,
    sharpness_reference_table,
    sharpness_table,
)
from experiments.workdirs import accuracy_key, collect_runs, group_runs
from sadt_jax.io import write_text

__all__ = ["aggregate_suite", "canonical_command", "main"]


def canonical_command(
    suite: str,
    root: str,
    seeds: Sequence[int] | None = None,
    smoke: bool = False,
    results_dir: str | None = None,
) -> str:
    """The aggregation command that regenerates the tables (written into them)."""
    parts = ["python -m experiments.aggregate", f"--suite={suite}", f"--root={root}"]
    if seeds is not None:
        parts.append("--seeds=" + ",".join(str(s) for s in seeds))
    if smoke:
        parts.append("--smoke")
    default_dir = os.path.join("results", suite + ("_smoke" if smoke else ""))
    if results_dir is not None and os.path.normpath(results_dir) != default_dir:
        parts.append(f"--results_dir={results_dir}")
    return " ".join(parts)


def _spread(groups, group: str) -> str:
    """ "mean ± std over seeds" when some row of ``group`` has more than one finished run."""
    n = max(
        (sum(r.finished for r in runs) for (g, _, _), runs in groups.items() if g == group),
        default=0,
    )
    return "mean ± std over seeds" if n > 1 else "one seed: no spread shown"


def _training_tables(suite, runs, groups) -> list[Table]:
    group_names = list(dict.fromkeys(k[0] for k in groups))
    tables = [accuracy_table(groups)]
    for g in group_names:
        tables.append(pivot_table(groups, g, "best_val_test", "Test accuracy @ best val loss"))
        tables.append(pivot_table(groups, g, "final_test", "Final test accuracy"))
    tables.append(convergence_table(groups, suite.thresholds, accuracy_key(runs)))
    tables += [t for ref in suite.references if (t := reference_table(groups, ref)) is not None]
    return tables + [runs_table(runs)]


def _training_figures(suite, runs, groups, results_dir) -> list[tuple[str, str]]:
    acc_key = accuracy_key(runs)
    acc_name = acc_key.replace("_", " ")
    figures = []
    for g in dict.fromkeys(k[0] for k in groups):
        p = lambda name, g=g: os.path.join(results_dir, f"{name}_{g}.png")
        spread = _spread(groups, g)
        figures += [
            (
                "Validation accuracy vs epoch",
                plot_curves(
                    groups,
                    g,
                    acc_key,
                    "epoch",
                    "validation accuracy (%)",
                    p("curves_val"),
                    f"{suite.name}: {acc_name} ({spread})",
                ),
            ),
            (
                "Test accuracy vs epoch",
                plot_curves(
                    groups,
                    g,
                    "test_accuracy",
                    "epoch",
                    "test accuracy (%)",
                    p("curves_test"),
                    f"{suite.name}: test accuracy ({spread})",
                ),
            ),
            (
                "Validation loss vs epoch",
                plot_curves(
                    groups,
                    g,
                    acc_key.replace("accuracy", "loss"),
                    "epoch",
                    "validation loss",
                    p("loss_val"),
                    f"{suite.name}: {acc_name.replace('accuracy', 'loss')} ({spread})",
                    scale=1.0,
                ),
            ),
            (
                "Validation accuracy vs gradient evaluations (compute per step)",
                plot_curves(
                    groups,
                    g,
                    acc_key,
                    "grads",
                    "validation accuracy (%)",
                    p("acc_vs_grads"),
                    f"{suite.name}: {acc_name} vs forward+backward passes ({spread})",
                ),
            ),
            (
                "Validation accuracy vs training wall-clock",
                plot_curves(
                    groups,
                    g,
                    acc_key,
                    "time",
                    "validation accuracy (%)",
                    p("acc_vs_time"),
                    f"{suite.name}: {acc_name} vs training time ({spread})",
                ),
            ),
            (
                "Final and best-validation test accuracy",
                plot_final(groups, g, p("final"), f"{suite.name}: test accuracy ({spread})"),
            ),
            (
                "Bar chart (the paper's style)",
                plot_bars(
                    groups,
                    g,
                    p("bars"),
                    f"{suite.name}: test accuracy @ best validation loss ({spread})",
                ),
            ),
        ]
        for ref in suite.references:
            rows = []
            for (group, setting, label), _, diffs, _ in paired_differences(groups, ref):
                if group != g:
                    continue
                settings = {k[1] for k in groups if k[0] == g}
                name = label if len(settings) == 1 else f"{label} ({setting})"
                for metric, title in REFERENCE_METRICS:
                    d = diffs[metric]
                    rows.append((name, title.removeprefix("Δ ").removesuffix(" (pp)"), _pp(d)))
            if any(d.ci_low is not None for _, _, d in rows):
                figures.append(
                    (
                        f"Seed-paired differences to {ref} (95 % CI)",
                        plot_differences(
                            rows,
                            ref,
                            p(f"vs_{ref}"),
                            f"{suite.name}: seed-paired differences to {ref}",
                        ),
                    )
                )
    return figures


def _pp(d: PairedDifference) -> PairedDifference:
    """A paired difference of accuracies in percentage points."""
    scale = lambda x: None if x is None else 100.0 * x
    return dataclasses.replace(
        d, mean=scale(d.mean), std=scale(d.std), ci_low=scale(d.ci_low), ci_high=scale(d.ci_high)
    )


def _sharpness_rhos(runs) -> list[str]:
    return sorted(
        {k for r in runs if r.sharpness for k in r.sharpness["worst_case_loss_increase"]},
        key=float,
    )


def _sharpness_tables(suite, runs, groups) -> list[Table]:
    rhos = _sharpness_rhos(runs)
    tables = [sharpness_table(groups, rhos)]
    for ref in suite.references:
        t = sharpness_reference_table(groups, ref, rhos)
        if t is not None:
            tables.append(t)
    return tables + [runs_table(runs, rhos)]


def _sharpness_figures(suite, runs, groups, results_dir) -> list[tuple[str, str]]:
    figures = []
    for g in dict.fromkeys(k[0] for k in groups):
        spread = _spread(groups, g)
        figures.append(
            (
                "Top Hessian eigenvalue",
                plot_bars(
                    groups,
                    g,
                    os.path.join(results_dir, f"sharpness_{g}.png"),
                    f"{suite.name}: top Hessian eigenvalue of the final models ({spread})",
                    metric="lambda_max",
                    ylabel="top Hessian eigenvalue",
                ),
            )
        )
        for rho in _sharpness_rhos(runs):
            figures.append(
                (
                    f"Worst-case loss increase, rho={rho}",
                    plot_bars(
                        groups,
                        g,
                        os.path.join(results_dir, f"worst_case_{rho}_{g}.png"),
                        f"{suite.name}: worst-case loss increase, rho={rho} ({spread})",
                        metric=f"worst_case_{rho}",
                        ylabel="loss increase",
                    ),
                )
            )
    figures.append(
        (
            "Sharpness vs accuracy",
            plot_sharpness_vs_accuracy(
                runs,
                os.path.join(results_dir, "sharpness_vs_accuracy.png"),
                f"{suite.name}: one point per run",
            ),
        )
    )
    return figures


def aggregate_suite(
    suite_name: str,
    root: str,
    results_dir: str,
    *,
    seeds: Sequence[int] | None = None,
    smoke: bool = False,
    command: str | None = None,
    plots: bool = True,
) -> list[str]:
    """Writes the tables and plots of a suite; returns the paths (``REPORT.md`` first).

    Args:
      suite_name: a suite of :mod:`experiments.suites`.
      root: the runs' root folder.
      results_dir: where to write.
      seeds: the planned seeds (default: the suite's); runs found with other seeds are
        included too.
      smoke: aggregate the ``--smoke`` runs.
      command: the command written into the tables (default: :func:`canonical_command`).
      plots: also draw the PNGs.
    """
    suite = suites.get_suite(suite_name)
    cells = suites.suite_cells(suite_name, seeds, smoke=smoke)
    runs = collect_runs(cells, root, folders=[suite.name + ("_smoke" if smoke else "")])
    command = command or canonical_command(suite_name, root, seeds, smoke, results_dir)
    prov = provenance(runs, command, suite)
    groups = group_runs(runs)
    os.makedirs(results_dir, exist_ok=True)
    if suite.kind == "train":
        tables = _training_tables(suite, runs, groups)
        figures = _training_figures(suite, runs, groups, results_dir) if plots else []
    else:
        tables = _sharpness_tables(suite, runs, groups)
        figures = _sharpness_figures(suite, runs, groups, results_dir) if plots else []

    written = []
    report = [f"# Results: suite `{suite.name}`{' (smoke)' if smoke else ''}", ""]
    report += [f"- {p}" for p in prov] + ["", suite.doc, ""]
    for t in tables:
        written.append(
            write_text(
                os.path.join(results_dir, f"{t.name}.md"),
                f"# {suite.name}: {t.title}\n\n" + t.markdown(prov),
            )
        )
        written.append(write_text(os.path.join(results_dir, f"{t.name}.csv"), t.csv(prov)))
        report.append(t.markdown())
    for title, path in figures:
        report += [f"## {title}", "", f"![{title}]({os.path.basename(path)})", ""]
        written.append(path)
    written.insert(0, write_text(os.path.join(results_dir, "REPORT.md"), "\n".join(report)))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.aggregate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--suite", required=True, help=f"One of: {', '.join(suites.SUITES)}.")
    p.add_argument("--root", default="runs")
    p.add_argument("--seeds", default=None, help="Planned seeds (default: the suite's).")
    p.add_argument("--smoke", action="store_true", help="Aggregate the --smoke runs.")
    p.add_argument("--results_dir", default=None, help="Default: results/<suite>[_smoke].")
    p.add_argument("--no_plots", action="store_true")
    args = p.parse_args(argv)
    seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",") if s]
    try:
        suites.get_suite(args.suite)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    folder = args.suite + ("_smoke" if args.smoke else "")
    results_dir = args.results_dir or os.path.join("results", folder)
    command = canonical_command(args.suite, args.root, seeds, args.smoke, args.results_dir)
    written = aggregate_suite(
        args.suite,
        args.root,
        results_dir,
        seeds=seeds,
        smoke=args.smoke,
        command=command,
        plots=not args.no_plots,
    )
    print(f"Wrote {len(written)} files to {results_dir}: {written[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
