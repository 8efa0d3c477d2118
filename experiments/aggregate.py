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
  weights and data order): mean ± std of the difference, and wins;
* ``runs``: one row per planned run, finished or not;
* plots per group: ``curves_val_<group>.png``, ``curves_test_<group>.png`` (accuracy
  vs epoch, mean ± std band), ``acc_vs_time_<group>.png``, ``final_<group>.png``
  (error bars), ``bars_<group>.png`` (the paper's bar chart).

The ``sharpness`` suite gets ``sharpness`` (top Hessian eigenvalue, worst-case loss
increase per radius, with the test accuracies of the measured runs), ``runs``,
``sharpness_<group>.png`` and ``sharpness_vs_accuracy.png``.

Run::

  python -m experiments.aggregate --suite=fashion_mnist --root=runs
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from experiments import suites
from experiments.suites import Cell

__all__ = ["aggregate_suite", "canonical_command", "collect_runs", "main", "mean_std"]

INIT_NOTE = (
    "Initial weights: within a seed, every method starts from the same initial weights "
    "(init key = config.init_seed, or config.seed when unset, independent of the method); "
    "seeds differ in initial weights, data order, CutMix and perturbation noise."
)
STATS_NOTE = (
    "Statistics: mean ± sample std (ddof=1) over seeds; n = finished runs (no ± when n = 1). "
    "Accuracies in %. Times are training wall-clock without evaluation, on the machine(s) "
    "below; the first epoch includes compilation, so the median epoch time is the steadier "
    "number. Times from a shared machine are noisy: compare them within one suite run."
)


# ---- Reading the workdirs ----------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What one cell's workdir holds."""

    cell: Cell
    state: str
    summary: dict[str, Any] | None = None
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    timing: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    sharpness: dict[str, Any] | None = None
    source_summary: dict[str, Any] | None = None
    hosts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    outcome: str = ""

    @property
    def finished(self) -> bool:
        return self.state == "done"


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _cell_from_json(d: dict[str, Any]) -> Cell:
    fields = {f.name for f in dataclasses.fields(Cell)}
    d = {k: v for k, v in d.items() if k in fields}
    d["overrides"] = tuple(tuple(kv) for kv in d.get("overrides", ()))
    return Cell(**d)


def _discover_extra(
    cells: Sequence[Cell], root: str, folders: Sequence[str] | None = None
) -> list[Cell]:
    """Cells run earlier (e.g. with more seeds) that are not in ``cells``.

    Only ``folders`` are searched (default: every folder of ``cells``); a suite that
    reuses another suite's runs searches its own folder only.
    """
    known = {(c.suite, c.name) for c in cells}
    folders = sorted({c.suite for c in cells} if folders is None else set(folders))
    extra = []
    for folder in folders:
        base = os.path.join(root, folder)
        if not os.path.isdir(base):
            continue
        for name in sorted(os.listdir(base)):
            if (folder, name) in known:
                continue
            status = _read_json(os.path.join(base, name, "suite_run.json"))
            if status and isinstance(status.get("cell"), dict):
                try:
                    cell = _cell_from_json(status["cell"])
                except TypeError:
                    continue
                if (cell.suite, cell.name) == (folder, name):
                    extra.append(cell)
    return sorted(extra, key=lambda c: (c.seed, c.name))


def collect_runs(
    cells: Sequence[Cell],
    root: str,
    *,
    discover: bool = True,
    folders: Sequence[str] | None = None,
) -> list[Run]:
    """Reads the workdirs of ``cells`` (and, with ``discover``, other cells found in
    ``folders``, by default the folders of ``cells``)."""
    from experiments.run_suite import cell_state

    cells = list(cells) + (_discover_extra(cells, root, folders) if discover else [])
    runs = []
    for cell in cells:
        workdir = cell.workdir(root)
        run = Run(cell=cell, state=cell_state(cell, root))
        status = _read_json(os.path.join(workdir, "suite_run.json")) or {}
        attempts = status.get("attempts") or []
        run.hosts = [a["host"] for a in attempts if a.get("host")]
        run.outcome = attempts[-1].get("outcome", "") if attempts else ""
        if cell.kind == "train":
            run.history = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            run.timing = _read_jsonl(os.path.join(workdir, "timing.jsonl"))
            if run.finished:
                run.summary = _read_json(os.path.join(workdir, "summary.json"))
                run.state = "done" if run.summary else "unreadable"
        else:
            if run.finished:
                run.sharpness = _read_json(os.path.join(workdir, cell.done_file))
                run.state = "done" if run.sharpness else "unreadable"
            run.source_summary = _read_json(os.path.join(cell.source_workdir(root), "summary.json"))
        runs.append(run)
    return runs


# ---- Statistics ---------------------------------------------------------------------------


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """``(mean, sample std or None when n < 2, n)`` of the non-None values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return None, None, 0
    m = sum(xs) / n
    if n < 2:
        return m, None, n
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var), n


def fmt_ms(m: float | None, s: float | None, *, scale: float = 1.0, digits: int = 2) -> str:
    """``"12.34 ± 0.56"`` (no ± without a std; ``"–"`` without a mean)."""
    if m is None:
        return "–"
    out = f"{m * scale:.{digits}f}"
    if s is not None:
        out += f" ± {s * scale:.{digits}f}"
    return out


def _num(x: float | None, digits: int = 6) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def reach(history: Sequence[dict], timing: Sequence[dict], threshold: float, key: str):
    """``(epoch, train_time_s)`` of the first epoch with ``key >= threshold``, or None."""
    times = {r["epoch"]: r.get("train_time_s") for r in timing}
    for row in history:
        v = row.get(key)
        if v is not None and v >= threshold:
            return row["epoch"], times.get(row["epoch"])
    return None


def _acc_key(runs: Sequence[Run]) -> str:
    for r in runs:
        if r.history:
            return "val_accuracy" if "val_accuracy" in r.history[0] else "test_accuracy"
    return "val_accuracy"


# ---- Tables --------------------------------------------------------------------------------


@dataclasses.dataclass
class Table:
    """A table as Markdown (display strings) and CSV (numbers)."""

    name: str
    title: str
    md_header: list[str]
    md_rows: list[list[str]]
    csv_header: list[str]
    csv_rows: list[list[str]]
    notes: list[str] = dataclasses.field(default_factory=list)

    def markdown(self, provenance: list[str] | None = None) -> str:
        lines = [f"## {self.title}", ""]
        for note in self.notes:
            lines += [note, ""]
        if provenance:
            lines += [f"- {p}" for p in provenance] + [""]
        esc = lambda s: str(s).replace("|", "\\|")
        lines.append("| " + " | ".join(esc(h) for h in self.md_header) + " |")
        lines.append("|" + "|".join("---" for _ in self.md_header) + "|")
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in self.md_rows]
        return "\n".join(lines) + "\n"

    def csv(self, provenance: list[str]) -> str:
        buf = io.StringIO()
        for p in [self.title, *self.notes, *provenance]:
            buf.write(f"# {p}\n")
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.csv_header)
        w.writerows(self.csv_rows)
        return buf.getvalue()


def _keys(runs: Sequence[Run]) -> list[tuple[str, str, str]]:
    """(group, setting, label) in order of first appearance."""
    seen: dict[tuple[str, str, str], None] = {}
    for r in runs:
        seen.setdefault((r.cell.group, r.cell.setting, r.cell.label), None)
    return list(seen)


def _by_key(runs: Sequence[Run]) -> dict[tuple[str, str, str], list[Run]]:
    out: dict[tuple[str, str, str], list[Run]] = {k: [] for k in _keys(runs)}
    for r in runs:
        out[(r.cell.group, r.cell.setting, r.cell.label)].append(r)
    for k in out:
        out[k].sort(key=lambda r: (r.cell.seed, r.cell.name))
    return out


def _metric(run: Run, name: str) -> float | None:
    s = run.summary or {}
    if name == "best_val_test":
        return (s.get("best_val") or {}).get("test_accuracy")
    if name == "best_val_val":
        return (s.get("best_val") or {}).get("val_accuracy")
    if name == "best_epoch":
        return (s.get("best_val") or {}).get("epoch")
    if name == "final_test":
        return (s.get("final") or {}).get("test_accuracy")
    if name == "final_val":
        return (s.get("final") or {}).get("val_accuracy")
    if name == "train_time":
        return s.get("train_time_s")
    if name == "epoch_time":
        return s.get("median_epoch_time_s")
    raise KeyError(name)


ACC_METRICS = [
    ("best_val_test", "test acc @ best val loss", 100.0, 2),
    ("final_test", "final test acc", 100.0, 2),
    ("final_val", "final val acc", 100.0, 2),
    ("best_val_val", "val acc @ best val loss", 100.0, 2),
    ("best_epoch", "best epoch", 1.0, 1),
    ("train_time", "train time (s)", 1.0, 1),
    ("epoch_time", "median epoch time (s)", 1.0, 2),
]


def accuracy_table(groups: dict[tuple[str, str, str], list[Run]]) -> Table:
    md_header = ["group", "setting", "method", "n"] + [m[1] for m in ACC_METRICS]
    csv_header = ["group", "setting", "label", "n"]
    for key, *_ in ACC_METRICS:
        csv_header += [f"{key}_mean", f"{key}_std"]
    md_rows, csv_rows = [], []
    for (group, setting, label), runs in groups.items():
        done = [r for r in runs if r.finished]
        md = [group, setting, label, str(len(done))]
        row = [group, setting, label, str(len(done))]
        for key, _, scale, digits in ACC_METRICS:
            m, s, _ = mean_std([_metric(r, key) for r in done])
            md.append(fmt_ms(m, s, scale=scale, digits=digits))
            row += [_num(m), _num(s)]
        md_rows.append(md)
        csv_rows.append(row)
    return Table(
        "accuracy",
        "Accuracy and time",
        md_header,
        md_rows,
        csv_header,
        csv_rows,
        notes=[
            "'test acc @ best val loss' is the test accuracy of the epoch with the lowest "
            "validation loss (the paper's reported model); 'final' is the last epoch."
        ],
    )


def pivot_table(
    groups: dict[tuple[str, str, str], list[Run]], group: str, metric: str, title: str
) -> Table:
    keys = [k for k in groups if k[0] == group]
    settings = list(dict.fromkeys(k[1] for k in keys))
    labels = list(dict.fromkeys(k[2] for k in keys))
    md_rows, csv_rows = [], []
    for label in labels:
        md, row = [label], [label]
        for setting in settings:
            runs = [r for r in groups.get((group, setting, label), []) if r.finished]
            m, s, n = mean_std([_metric(r, metric) for r in runs])
            md.append("–" if m is None else f"{fmt_ms(m, s, scale=100.0)} (n={n})")
            row += [_num(m), _num(s), str(n)]
        md_rows.append(md)
        csv_rows.append(row)
    csv_header = ["label"]
    for s in settings:
        csv_header += [f"{s} mean", f"{s} std", f"{s} n"]
    return Table(
        f"pivot_{group}_{metric}",
        f"{title} — {group} (rows: methods; columns: settings)",
        ["method", *settings],
        md_rows,
        csv_header,
        csv_rows,
    )


def convergence_table(
    groups: dict[tuple[str, str, str], list[Run]], thresholds: Sequence[float], acc_key: str
) -> Table:
    md_header = ["group", "setting", "method", "n"]
    csv_header = ["group", "setting", "label", "n"]
    for t in thresholds:
        md_header += [f"{100 * t:g}%: epochs (k/n)", f"{100 * t:g}%: time (s)"]
        csv_header += [
            f"reach_{t:g}_k",
            f"reach_{t:g}_epochs_mean",
            f"reach_{t:g}_epochs_std",
            f"reach_{t:g}_time_mean",
            f"reach_{t:g}_time_std",
        ]
    md_rows, csv_rows = [], []
    for (group, setting, label), runs in groups.items():
        done = [r for r in runs if r.finished]
        md = [group, setting, label, str(len(done))]
        row = [group, setting, label, str(len(done))]
        for t in thresholds:
            hits = [reach(r.history, r.timing, t, acc_key) for r in done]
            hits = [h for h in hits if h is not None]
            em, es, k = mean_std([h[0] for h in hits])
            tm, ts, _ = mean_std([h[1] for h in hits])
            md += [
                f"{fmt_ms(em, es, digits=1)} ({k}/{len(done)})",
                fmt_ms(tm, ts, digits=1),
            ]
            row += [str(k), _num(em), _num(es), _num(tm), _num(ts)]
        md_rows.append(md)
        csv_rows.append(row)
    return Table(
        "convergence",
        f"Convergence: epochs and training time to reach {acc_key.replace('_', ' ')}",
        md_header,
        md_rows,
        csv_header,
        csv_rows,
        notes=[
            "Epochs and time are means over the k of n seeds that reached the threshold; "
            "time is cumulative training wall-clock at the end of that epoch."
        ],
    )


def _seed_pairs(groups: dict[tuple[str, str, str], list[Run]], reference: str):
    """``(key, [(run, reference run of the same seed), ...])`` for every other row whose
    setting has a ``reference`` row (finished runs only)."""
    for (group, setting, label), runs in groups.items():
        if label == reference or (group, setting, reference) not in groups:
            continue
        ref = {r.cell.seed: r for r in groups[(group, setting, reference)] if r.finished}
        yield (
            (group, setting, label),
            [(r, ref[r.cell.seed]) for r in runs if r.finished and r.cell.seed in ref],
        )


def reference_table(groups: dict[tuple[str, str, str], list[Run]], reference: str) -> Table | None:
    """Seed-paired differences of every row to ``reference`` (same setting)."""
    md_rows, csv_rows = [], []
    for (group, setting, label), pairs in _seed_pairs(groups, reference):
        md, row = [group, setting, label, str(len(pairs))], [group, setting, label, str(len(pairs))]
        for metric in ("best_val_test", "final_test"):
            diffs = [
                _metric(a, metric) - _metric(b, metric)
                for a, b in pairs
                if _metric(a, metric) is not None and _metric(b, metric) is not None
            ]
            m, s, _ = mean_std(diffs)
            wins = sum(d > 0 for d in diffs)
            md += [fmt_ms(m, s, scale=100.0), f"{wins}/{len(diffs)}"]
            row += [_num(m), _num(s), str(wins)]
        ratios = [
            _metric(a, "train_time") / _metric(b, "train_time")
            for a, b in pairs
            if _metric(a, "train_time") and _metric(b, "train_time")
        ]
        m, s, _ = mean_std(ratios)
        md.append(fmt_ms(m, s))
        row += [_num(m), _num(s)]
        md_rows.append(md)
        csv_rows.append(row)
    if not md_rows:
        return None
    return Table(
        f"vs_{reference}",
        f"Seed-paired comparison with {reference}",
        [
            "group",
            "setting",
            "method",
            "pairs",
            f"Δ test acc @ best val (pp) vs {reference}",
            "wins",
            f"Δ final test acc (pp) vs {reference}",
            "wins",
            f"train time / {reference}",
        ],
        md_rows,
        [
            "group",
            "setting",
            "label",
            "pairs",
            "d_best_val_test_mean",
            "d_best_val_test_std",
            "d_best_val_test_wins",
            "d_final_test_mean",
            "d_final_test_std",
            "d_final_test_wins",
            "time_ratio_mean",
            "time_ratio_std",
        ],
        csv_rows,
        notes=[
            f"Each run is compared with the {reference} run of the same seed (same initial "
            "weights and data order); Δ in percentage points, mean ± std over seeds; wins = "
            "seeds where the method is higher."
        ],
    )


def runs_table(runs: Sequence[Run]) -> Table:
    header = [
        "cell",
        "group",
        "setting",
        "label",
        "method",
        "seed",
        "state",
        "epochs",
        "best epoch",
        "test acc @ best val",
        "final test acc",
        "final val acc",
        "train time (s)",
        "last attempt",
    ]
    md_rows, csv_rows = [], []
    for r in runs:
        c = r.cell
        vals = [_metric(r, k) if r.summary else None for k in ("best_epoch", "best_val_test")]
        vals += [_metric(r, k) if r.summary else None for k in ("final_test", "final_val")]
        tt = _metric(r, "train_time") if r.summary else None
        epochs = (r.summary or {}).get("epochs", len(r.history))
        base = [c.name, c.group, c.setting, c.label, c.method, str(c.seed), r.state, str(epochs)]
        md_rows.append(
            base
            + ["–" if vals[0] is None else str(vals[0])]
            + [fmt_ms(v, None, scale=100.0) for v in vals[1:]]
            + [fmt_ms(tt, None, digits=1), r.outcome or "–"]
        )
        csv_rows.append(
            base
            + ["" if vals[0] is None else str(vals[0])]
            + [_num(v) for v in vals[1:]]
            + [_num(tt, 3), r.outcome]
        )
    return Table(
        "runs",
        "Runs (every planned cell; only state 'done' enters the statistics)",
        header,
        md_rows,
        [h.replace(" ", "_") for h in header],
        csv_rows,
    )


def sharpness_table(groups: dict[tuple[str, str, str], list[Run]], rhos: Sequence[str]) -> Table:
    md_header = ["group", "setting", "method", "n", "top Hessian eigenvalue"]
    md_header += [f"worst-case loss increase, rho={r}" for r in rhos]
    md_header += ["loss on the batch", "test acc @ best val", "final test acc"]
    csv_header = ["group", "setting", "label", "n", "lambda_max_mean", "lambda_max_std"]
    for r in rhos:
        csv_header += [f"worst_case_{r}_mean", f"worst_case_{r}_std"]
    csv_header += ["loss_mean", "loss_std", "best_val_test_mean", "best_val_test_std"]
    csv_header += ["final_test_mean", "final_test_std"]
    md_rows, csv_rows = [], []
    for (group, setting, label), runs in groups.items():
        done = [r for r in runs if r.finished]
        md = [group, setting, label, str(len(done))]
        row = [group, setting, label, str(len(done))]

        def add(values, scale=1.0, digits=3, md=md, row=row):
            m, s, _ = mean_std(values)
            md.append(fmt_ms(m, s, scale=scale, digits=digits))
            row.extend([_num(m), _num(s)])

        add([r.sharpness["hessian"]["top_eigenvalue"] for r in done], digits=2)
        for rho in rhos:
            add([r.sharpness["worst_case_loss_increase"].get(rho) for r in done], digits=4)
        add([r.sharpness["loss"] for r in done], digits=4)
        for key in ("best_val_test", "final_test"):
            src = [Run(cell=r.cell, state="done", summary=r.source_summary) for r in done]
            add([_metric(s, key) if s.summary else None for s in src], scale=100.0, digits=2)
        md_rows.append(md)
        csv_rows.append(row)
    return Table(
        "sharpness",
        "Sharpness of the final models",
        md_header,
        md_rows,
        csv_header,
        csv_rows,
        notes=[
            "Measured at the last checkpoint of each run on a fixed batch (the same for every "
            "method and seed; see the 'batch' of sharpness.json), BatchNorm in inference mode. "
            "Top eigenvalue: power iteration on Hessian-vector products. Worst-case increase: "
            "projected normalized gradient ascent within the L2 ball (a lower bound)."
        ],
    )


def sharpness_reference_table(
    groups: dict[tuple[str, str, str], list[Run]], reference: str, rhos: Sequence[str]
) -> Table | None:
    """Seed-paired differences in sharpness to ``reference`` (same seed = same init/data)."""
    metrics = [("lambda_max", "top Hessian eigenvalue", 2)]
    metrics += [(f"worst_case_{r}", f"worst-case increase, rho={r}", 4) for r in rhos]
    md_rows, csv_rows = [], []
    for (group, setting, label), pairs in _seed_pairs(groups, reference):
        md, row = [group, setting, label, str(len(pairs))], [group, setting, label, str(len(pairs))]
        for metric, _, digits in metrics:
            diffs = [
                _sharp(a, metric) - _sharp(b, metric)
                for a, b in pairs
                if _sharp(a, metric) is not None and _sharp(b, metric) is not None
            ]
            m, s, _ = mean_std(diffs)
            lower = sum(d < 0 for d in diffs)
            md += [fmt_ms(m, s, digits=digits), f"{lower}/{len(diffs)}"]
            row += [_num(m), _num(s), str(lower)]
        md_rows.append(md)
        csv_rows.append(row)
    if not md_rows:
        return None
    md_header = ["group", "setting", "method", "pairs"]
    csv_header = ["group", "setting", "label", "pairs"]
    for metric, title, _ in metrics:
        md_header += [f"Δ {title} vs {reference}", "lower"]
        csv_header += [f"d_{metric}_mean", f"d_{metric}_std", f"d_{metric}_lower"]
    return Table(
        f"sharpness_vs_{reference}",
        f"Sharpness: seed-paired comparison with {reference}",
        md_header,
        md_rows,
        csv_header,
        csv_rows,
        notes=[
            f"Each run's sharpness minus that of the {reference} run of the same seed (same "
            "initial weights and data order), mean ± std over seeds; lower = seeds where the "
            "method's model is flatter (smaller value)."
        ],
    )


# ---- Provenance ----------------------------------------------------------------------------


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


def _count(items: list[str]) -> str:
    uniq = list(dict.fromkeys(items))
    if len(uniq) == 1:
        return uniq[0]
    return "; ".join(f"{u} ({items.count(u)} runs)" for u in sorted(uniq))


def provenance(runs: Sequence[Run], command: str, suite: suites.Suite) -> list[str]:
    done = [r for r in runs if r.finished]
    summaries = [r.summary or r.source_summary for r in done]
    summaries = [s for s in summaries if s]
    devices, versions, hosts = [], [], []
    for s in summaries:
        d = s.get("devices") or {}
        devices.append(
            f"{d.get('device_count', '?')} x {d.get('device_kind', '?')} "
            f"({d.get('platform', '?')}), {d.get('process_count', '?')} process(es)"
        )
        v = s.get("versions") or {}
        versions.append(", ".join(f"{k} {v[k]}" for k in sorted(v)))
    for r in done:
        for h in r.hosts[-1:]:
            hosts.append(
                f"{h.get('cpu', '?')}, {h.get('cpu_count', '?')} logical CPUs "
                f"({h.get('affinity_cpu_count', '?')} usable), {h.get('platform', '?')}"
            )
    seeds = sorted({r.cell.seed for r in runs})
    lines = [
        f"Generated by: `{command}` (from the workdirs; rerun it to regenerate this file)",
        f"Suite: {suite.name}; {len(done)} of {len(runs)} runs finished; seeds "
        + ", ".join(str(s) for s in seeds),
        "Devices (summary.json): " + (_count(devices) if devices else "unknown"),
        "Host CPU (experiments.run_suite): " + (_count(hosts) if hosts else "unknown"),
        "Versions: " + (_count(versions) if versions else "unknown"),
        INIT_NOTE,
    ]
    if suite.kind == "train":
        lines.append(STATS_NOTE)
    return lines


# ---- Plots -----------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _grid(n: int, width: float = 4.2, height: float = 3.2):
    plt = _plt()
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows + 0.6), squeeze=False
    )
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _curve(runs: Sequence[Run], key: str, x: str = "epoch"):
    """Per epoch: (x mean, y mean, y std) over the runs that have that epoch."""
    by_epoch: dict[int, list[tuple[float, float]]] = {}
    for r in runs:
        times = {t["epoch"]: t.get("train_time_s") for t in r.timing}
        for row in r.history:
            if row.get(key) is None:
                continue
            xv = row["epoch"] if x == "epoch" else times.get(row["epoch"])
            if xv is None:
                continue
            by_epoch.setdefault(row["epoch"], []).append((float(xv), float(row[key])))
    xs, ys, ss = [], [], []
    for e in sorted(by_epoch):
        pts = by_epoch[e]
        xs.append(sum(p[0] for p in pts) / len(pts))
        m, s, _ = mean_std([p[1] for p in pts])
        ys.append(m)
        ss.append(s or 0.0)
    return xs, ys, ss


def _legend(fig, axes, labels):
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            names,
            loc="lower center",
            ncol=min(len(names), 5),
            fontsize=8,
            frameon=False,
        )
        fig.tight_layout(rect=(0, 0.06 + 0.05 * (len(names) > 5), 1, 0.95))
    else:
        fig.tight_layout(rect=(0, 0, 1, 0.95))


def plot_curves(groups, group, key, x, ylabel, path, title) -> str:
    plt = _plt()
    keys = [k for k in groups if k[0] == group]
    settings = list(dict.fromkeys(k[1] for k in keys))
    labels = list(dict.fromkeys(k[2] for k in keys))
    colors = _colors(labels)
    fig, axes = _grid(len(settings))
    for ax, setting in zip(axes, settings, strict=True):
        for label in labels:
            runs = [r for r in groups.get((group, setting, label), []) if r.finished]
            if not runs:
                continue
            xs, ys, ss = _curve(runs, key, x)
            lo = [100 * (m - s) for m, s in zip(ys, ss, strict=True)]
            hi = [100 * (m + s) for m, s in zip(ys, ss, strict=True)]
            ax.plot(xs, [100 * y for y in ys], marker="o", ms=3, color=colors[label], label=label)
            ax.fill_between(xs, lo, hi, color=colors[label], alpha=0.15, lw=0)
        ax.set_title(setting, fontsize=9)
        ax.set_xlabel("epoch" if x == "epoch" else "training wall-clock (s)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    _legend(fig, axes, labels)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_final(groups, group, path, title) -> str:
    plt = _plt()
    keys = [k for k in groups if k[0] == group]
    settings = list(dict.fromkeys(k[1] for k in keys))
    labels = list(dict.fromkeys(k[2] for k in keys))
    fig, axes = _grid(len(settings), width=max(4.2, 0.55 * len(labels) + 1.5))
    for ax, setting in zip(axes, settings, strict=True):
        for j, (metric, name, marker) in enumerate(
            (("best_val_test", "test acc @ best val loss", "o"), ("final_test", "final", "s"))
        ):
            xs, ms, ss = [], [], []
            for i, label in enumerate(labels):
                runs = [r for r in groups.get((group, setting, label), []) if r.finished]
                m, s, _ = mean_std([_metric(r, metric) for r in runs])
                if m is not None:
                    xs.append(i + (j - 0.5) * 0.2)
                    ms.append(100 * m)
                    ss.append(100 * (s or 0.0))
            ax.errorbar(xs, ms, yerr=ss, fmt=marker, capsize=3, ms=4, label=name)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(setting, fontsize=9)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    _legend(fig, axes, ["a", "b"])
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_bars(groups, group, path, title, metric="best_val_test", ylabel=None) -> str:
    """The paper's bar chart: settings along x, methods side by side, std error bars.

    More than 4 settings wrap onto several rows (4 settings each).
    """
    plt = _plt()
    keys = [k for k in groups if k[0] == group]
    settings = list(dict.fromkeys(k[1] for k in keys))
    labels = list(dict.fromkeys(k[2] for k in keys))
    colors = _colors(labels)
    width = 0.8 / max(len(labels), 1)
    per_row = 4 if len(settings) > 4 else max(len(settings), 1)
    chunks = [settings[i : i + per_row] for i in range(0, len(settings), per_row)] or [[]]
    scale = 100.0 if metric in ("best_val_test", "final_test") else 1.0
    fig, axes = plt.subplots(
        len(chunks),
        1,
        figsize=(max(6.0, 0.3 * len(labels) * per_row + 2), 3.4 * len(chunks) + 1.0),
        squeeze=False,
    )
    handles: dict[str, Any] = {}
    lows, highs = [], []
    for ax, chunk in zip(axes[:, 0], chunks, strict=True):
        for i, label in enumerate(labels):
            xs, ms, ss = [], [], []
            for j, setting in enumerate(chunk):
                runs = [r for r in groups.get((group, setting, label), []) if r.finished]
                values = [_metric(r, metric) if r.summary else _sharp(r, metric) for r in runs]
                m, s, _ = mean_std(values)
                if m is not None:
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ms.append(scale * m)
                    ss.append(scale * (s or 0.0))
                    lows.append(scale * m - scale * (s or 0.0))
                    highs.append(scale * m + scale * (s or 0.0))
            if xs:
                handles[label] = ax.bar(
                    xs, ms, width, yerr=ss, capsize=2, color=colors[label], label=label
                )
        ax.set_xticks(range(len(chunk)))
        ax.set_xticklabels(chunk, fontsize=8)
        ax.set_xlim(-0.5, per_row - 0.5)
        ax.set_ylabel(ylabel or "test acc @ best val loss (%)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    if lows:  # one scale for every row; accuracies zoomed to the data
        bottom = max(0.0, math.floor(min(lows) / 5) * 5 - 5) if scale == 100.0 else min(0, *lows)
        top = max(highs) + 0.05 * (max(highs) - bottom) + 1e-9
        for ax in axes[:, 0]:
            ax.set_ylim(bottom, top)
    fig.suptitle(title, fontsize=10)
    names = [label for label in labels if label in handles]
    if names:
        fig.legend(
            [handles[n] for n in names],
            names,
            loc="lower center",
            ncol=min(len(names), 5),
            fontsize=8,
            frameon=False,
        )
    fig.tight_layout(
        rect=(0, (0.07 if len(chunks) == 1 else 0.04) + 0.05 * (len(names) > 5), 1, 0.96)
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _sharp(run: Run, metric: str) -> float | None:
    if run.sharpness is None:
        return None
    if metric == "lambda_max":
        return run.sharpness["hessian"]["top_eigenvalue"]
    if metric.startswith("worst_case_"):
        return run.sharpness["worst_case_loss_increase"].get(metric.removeprefix("worst_case_"))
    return None


def plot_sharpness_vs_accuracy(runs: Sequence[Run], path: str, title: str) -> str:
    plt = _plt()
    done = [r for r in runs if r.finished and r.source_summary]
    labels = list(dict.fromkeys(r.cell.label for r in done))
    colors = _colors(labels)
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for label in labels:
        pts = [
            (_sharp(r, "lambda_max"), _metric(Run(r.cell, "done", r.source_summary), "final_test"))
            for r in done
            if r.cell.label == label
        ]
        pts = [(a, b) for a, b in pts if a is not None and b is not None]
        if pts:
            ax.scatter(
                [p[0] for p in pts], [100 * p[1] for p in pts], color=colors[label], label=label
            )
    ax.set_xscale("symlog")
    ax.set_xlabel("top Hessian eigenvalue (final model)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ---- The suite ---------------------------------------------------------------------------------


def _write(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return path


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
    groups = _by_key(runs)
    os.makedirs(results_dir, exist_ok=True)
    tables: list[Table] = []
    figures: list[tuple[str, str]] = []
    group_names = list(dict.fromkeys(k[0] for k in groups))
    if suite.kind == "train":
        acc_key = _acc_key(runs)
        tables.append(accuracy_table(groups))
        for g in group_names:
            tables.append(pivot_table(groups, g, "best_val_test", "Test accuracy @ best val loss"))
            tables.append(pivot_table(groups, g, "final_test", "Final test accuracy"))
        tables.append(convergence_table(groups, suite.thresholds, acc_key))
        for ref in suite.references:
            t = reference_table(groups, ref)
            if t is not None:
                tables.append(t)
        if plots:
            for g in group_names:
                p = lambda name, g=g: os.path.join(results_dir, f"{name}_{g}.png")
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
                            f"{suite.name}: {acc_key.replace('_', ' ')} (mean ± std over seeds)",
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
                            f"{suite.name}: test accuracy (mean ± std over seeds)",
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
                            f"{suite.name}: accuracy vs training time (mean over seeds)",
                        ),
                    ),
                    (
                        "Final and best-validation test accuracy",
                        plot_final(
                            groups, g, p("final"), f"{suite.name}: test accuracy (mean ± std)"
                        ),
                    ),
                    (
                        "Bar chart (the paper's style)",
                        plot_bars(
                            groups,
                            g,
                            p("bars"),
                            f"{suite.name}: test accuracy @ best validation loss (mean ± std)",
                        ),
                    ),
                ]
    else:
        rhos = sorted(
            {k for r in runs if r.sharpness for k in r.sharpness["worst_case_loss_increase"]},
            key=float,
        )
        tables.append(sharpness_table(groups, rhos))
        for ref in suite.references:
            t = sharpness_reference_table(groups, ref, rhos)
            if t is not None:
                tables.append(t)
        if plots:
            for g in group_names:
                figures.append(
                    (
                        "Top Hessian eigenvalue",
                        plot_bars(
                            groups,
                            g,
                            os.path.join(results_dir, f"sharpness_{g}.png"),
                            f"{suite.name}: top Hessian eigenvalue of the final models",
                            metric="lambda_max",
                            ylabel="top Hessian eigenvalue",
                        ),
                    )
                )
                for rho in rhos:
                    figures.append(
                        (
                            f"Worst-case loss increase, rho={rho}",
                            plot_bars(
                                groups,
                                g,
                                os.path.join(results_dir, f"worst_case_{rho}_{g}.png"),
                                f"{suite.name}: worst-case loss increase, rho={rho}",
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
    tables.append(runs_table(runs))

    written = []
    report = [f"# Results: suite `{suite.name}`{' (smoke)' if smoke else ''}", ""]
    report += [f"- {p}" for p in prov] + ["", suite.doc, ""]
    for t in tables:
        written.append(
            _write(
                os.path.join(results_dir, f"{t.name}.md"),
                f"# {suite.name}: {t.title}\n\n" + t.markdown(prov),
            )
        )
        written.append(_write(os.path.join(results_dir, f"{t.name}.csv"), t.csv(prov)))
        report.append(t.markdown())
    for title, path in figures:
        report += [f"## {title}", "", f"![{title}]({os.path.basename(path)})", ""]
        written.append(path)
    written.insert(0, _write(os.path.join(results_dir, "REPORT.md"), "\n".join(report)))
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
