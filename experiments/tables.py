"""Tables of a suite (Markdown for reading, CSV for numbers) and their provenance lines.

Every table is a :class:`Table`: display strings for Markdown, full-precision numbers
for CSV, notes, and the provenance lines (:func:`provenance`) written on top.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Sequence

from experiments import suites
from experiments.stats import (
    PairedDifference,
    fmt_ci,
    fmt_ms,
    fmt_num,
    fmt_p,
    mean_std,
    paired_difference,
    reach,
)
from experiments.workdirs import Run, run_metric, sharpness_value

__all__ = [
    "ACC_METRICS",
    "INIT_NOTE",
    "REFERENCE_METRICS",
    "STATS_NOTE",
    "Table",
    "accuracy_table",
    "convergence_table",
    "paired_differences",
    "pivot_table",
    "provenance",
    "reference_table",
    "runs_table",
    "seed_pairs",
    "sharpness_reference_table",
    "sharpness_table",
]

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
            m, s, _ = mean_std([run_metric(r, key) for r in done])
            md.append(fmt_ms(m, s, scale=scale, digits=digits))
            row += [fmt_num(m), fmt_num(s)]
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
            m, s, n = mean_std([run_metric(r, metric) for r in runs])
            md.append("–" if m is None else f"{fmt_ms(m, s, scale=100.0)} (n={n})")
            row += [fmt_num(m), fmt_num(s), str(n)]
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
        md_header += [
            f"{100 * t:g}%: epochs (k/n)",
            f"{100 * t:g}%: passes",
            f"{100 * t:g}%: time (s)",
        ]
        csv_header += [
            f"reach_{t:g}_k",
            f"reach_{t:g}_epochs_mean",
            f"reach_{t:g}_epochs_std",
            f"reach_{t:g}_passes_mean",
            f"reach_{t:g}_passes_std",
            f"reach_{t:g}_time_mean",
            f"reach_{t:g}_time_std",
        ]
    md_rows, csv_rows = [], []
    for (group, setting, label), runs in groups.items():
        done = [r for r in runs if r.finished]
        md = [group, setting, label, str(len(done))]
        row = [group, setting, label, str(len(done))]
        for t in thresholds:
            hits = [(r, reach(r.history, r.timing, t, acc_key)) for r in done]
            hits = [(r, h) for r, h in hits if h is not None]
            em, es, k = mean_std([h[0] for _, h in hits])
            pm, ps, _ = mean_std([_passes(r, h[2]) for r, h in hits])
            tm, ts, _ = mean_std([h[1] for _, h in hits])
            md += [
                f"{fmt_ms(em, es, digits=1)} ({k}/{len(done)})",
                fmt_ms(pm, ps, digits=0),
                fmt_ms(tm, ts, digits=1),
            ]
            row += [str(k), fmt_num(em), fmt_num(es), fmt_num(pm), fmt_num(ps)]
            row += [fmt_num(tm), fmt_num(ts)]
        md_rows.append(md)
        csv_rows.append(row)
    return Table(
        "convergence",
        f"Convergence: epochs, gradient evaluations and training time to reach "
        f"{acc_key.replace('_', ' ')}",
        md_header,
        md_rows,
        csv_header,
        csv_rows,
        notes=[
            "Epochs, passes and time are means over the k of n seeds that reached the "
            "threshold; passes = forward+backward passes of a batch spent by the end of that "
            "epoch (steps x the method's passes per step: base 1, base_2x/SAM/T1/T3 2, T2 3); "
            "time is cumulative training wall-clock at the end of that epoch."
        ],
    )


def _passes(run: Run, step: int | None) -> float | None:
    """Gradient evaluations a run spent by ``step`` (None if unknown)."""
    if step is None:
        return None
    try:
        return suites.gradient_evaluations_at(run.cell, step)
    except ValueError:  # a method this checkout does not define
        return None


def seed_pairs(groups: dict[tuple[str, str, str], list[Run]], reference: str):
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


REFERENCE_METRICS = (
    ("best_val_test", "Δ test acc @ best val (pp)"),
    ("final_test", "Δ final test acc (pp)"),
)


def paired_differences(
    groups: dict[tuple[str, str, str], list[Run]], reference: str
) -> list[tuple[tuple[str, str, str], int, dict[str, PairedDifference], PairedDifference]]:
    """For every row with a ``reference`` row in its setting: ``(key, pairs, {metric:
    difference}, time ratio)``; differences of accuracies in fractions (x 100 for pp)."""
    out = []
    for key, pairs in seed_pairs(groups, reference):
        diffs = {}
        for metric, _ in REFERENCE_METRICS:
            diffs[metric] = paired_difference(
                [
                    run_metric(a, metric) - run_metric(b, metric)
                    for a, b in pairs
                    if run_metric(a, metric) is not None and run_metric(b, metric) is not None
                ]
            )
        ratio = paired_difference(
            [
                run_metric(a, "train_time") / run_metric(b, "train_time")
                for a, b in pairs
                if run_metric(a, "train_time") and run_metric(b, "train_time")
            ]
        )
        out.append((key, len(pairs), diffs, ratio))
    return out


def reference_table(groups: dict[tuple[str, str, str], list[Run]], reference: str) -> Table | None:
    """Seed-paired differences of every row to ``reference`` (same setting), with 95 % CIs."""
    md_rows, csv_rows = [], []
    for (group, setting, label), n, diffs, ratio in paired_differences(groups, reference):
        md, row = [group, setting, label, str(n)], [group, setting, label, str(n)]
        for metric, _ in REFERENCE_METRICS:
            d = diffs[metric]
            md += [
                fmt_ms(d.mean, d.std, scale=100.0, signed=True),
                fmt_ci(d, scale=100.0),
                fmt_p(d.p_value),
                f"{d.wins}/{d.n}",
            ]
            row += [fmt_num(d.mean), fmt_num(d.std), fmt_num(d.ci_low), fmt_num(d.ci_high)]
            row += [fmt_num(d.p_value), str(d.wins)]
        md.append(fmt_ms(ratio.mean, ratio.std))
        row += [fmt_num(ratio.mean), fmt_num(ratio.std)]
        md_rows.append(md)
        csv_rows.append(row)
    if not md_rows:
        return None
    md_header = ["group", "setting", "method", "pairs"]
    csv_header = ["group", "setting", "label", "pairs"]
    for metric, title in REFERENCE_METRICS:
        md_header += [f"{title} vs {reference}", "95 % CI", "p", "wins"]
        csv_header += [f"d_{metric}_{k}" for k in ("mean", "std", "ci_low", "ci_high", "p")]
        csv_header.append(f"d_{metric}_wins")
    md_header.append(f"train time / {reference}")
    csv_header += ["time_ratio_mean", "time_ratio_std"]
    return Table(
        f"vs_{reference}",
        f"Seed-paired comparison with {reference}",
        md_header,
        md_rows,
        csv_header,
        csv_rows,
        notes=[
            f"Each run is compared with the {reference} run of the same seed (same initial "
            "weights and data order); Δ in percentage points, mean ± std over seeds; 95 % CI: "
            "t interval of the mean paired difference (t with pairs − 1 degrees of freedom); "
            "p: two-sided paired t-test; wins = seeds where the method is higher."
        ],
    )


def runs_table(runs: Sequence[Run], rhos: Sequence[str] = ()) -> Table:
    """One row per planned run: its state, its numbers and the code it ran.

    With ``rhos`` (the sharpness suite) each row also has the run's sharpness
    measurements: top Hessian eigenvalue, whether the power iteration converged and in
    how many Hessian-vector products, the worst-case loss increase per radius and the
    loss on the batch.
    """
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
    ]
    if rhos:
        header += ["top Hessian eigenvalue", "converged", "HVPs"]
        header += [f"worst-case loss increase, rho={r}" for r in rhos] + ["loss on the batch"]
    header += ["git commit", "last attempt"]
    md_rows, csv_rows = [], []
    for r in runs:
        c = r.cell
        vals = [run_metric(r, k) if r.summary else None for k in ("best_epoch", "best_val_test")]
        vals += [run_metric(r, k) if r.summary else None for k in ("final_test", "final_val")]
        tt = run_metric(r, "train_time") if r.summary else None
        epochs = (r.summary or {}).get("epochs", len(r.history))
        base = [c.name, c.group, c.setting, c.label, c.method, str(c.seed), r.state, str(epochs)]
        md = base + ["–" if vals[0] is None else str(vals[0])]
        md += [fmt_ms(v, None, scale=100.0) for v in vals[1:]] + [fmt_ms(tt, None, digits=1)]
        row = base + ["" if vals[0] is None else str(vals[0])]
        row += [fmt_num(v) for v in vals[1:]] + [fmt_num(tt, 3)]
        if rhos:
            h = (r.sharpness or {}).get("hessian") or {}
            conv = h.get("converged")
            iters = h.get("num_iters")
            worst = [sharpness_value(r, f"worst_case_{rho}") for rho in rhos]
            loss = (r.sharpness or {}).get("loss")
            lam = sharpness_value(r, "lambda_max")
            md += [fmt_ms(lam, None, digits=2), "–" if conv is None else ("yes" if conv else "no")]
            md += ["–" if iters is None else str(iters)]
            md += [fmt_ms(w, None, digits=4) for w in worst] + [fmt_ms(loss, None, digits=4)]
            row += [fmt_num(lam), "" if conv is None else str(bool(conv))]
            row += ["" if iters is None else str(iters)]
            row += [fmt_num(w) for w in worst] + [fmt_num(loss)]
        md += [r.commit or "–", r.outcome or "–"]
        row += [r.commit, r.outcome]
        md_rows.append(md)
        csv_rows.append(row)
    csv_header = [h.replace(" ", "_") for h in header]
    if rhos:
        i = csv_header.index("top_Hessian_eigenvalue")
        keys = ["lambda_max", "converged", "hvps", *(f"worst_case_{r}" for r in rhos), "loss"]
        csv_header[i : i + len(keys)] = keys
    return Table(
        "runs",
        "Runs (every planned cell; only state 'done' enters the statistics)",
        header,
        md_rows,
        csv_header,
        csv_rows,
        notes=[
            "git commit: the code the run's last attempt ran, as recorded by "
            "experiments.run_suite ('+dirty': uncommitted changes; '–': not recorded)."
        ],
    )


def sharpness_table(groups: dict[tuple[str, str, str], list[Run]], rhos: Sequence[str]) -> Table:
    md_header = ["group", "setting", "method", "n", "top Hessian eigenvalue", "converged"]
    md_header += [f"worst-case loss increase, rho={r}" for r in rhos]
    md_header += ["loss on the batch", "test acc @ best val", "final test acc"]
    csv_header = ["group", "setting", "label", "n", "lambda_max_mean", "lambda_max_std"]
    csv_header.append("converged")
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
            row.extend([fmt_num(m), fmt_num(s)])

        add([r.sharpness["hessian"]["top_eigenvalue"] for r in done], digits=2)
        flags = [r.sharpness["hessian"].get("converged") for r in done]
        known = [f for f in flags if f is not None]
        md.append(f"{sum(map(bool, known))}/{len(known)}" if known else "–")
        row.append(str(sum(map(bool, known))) if known else "")
        for rho in rhos:
            add([r.sharpness["worst_case_loss_increase"].get(rho) for r in done], digits=4)
        add([r.sharpness["loss"] for r in done], digits=4)
        for key in ("best_val_test", "final_test"):
            src = [Run(cell=r.cell, state="done", summary=r.source_summary) for r in done]
            add([run_metric(s, key) if s.summary else None for s in src], scale=100.0, digits=2)
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
    for (group, setting, label), pairs in seed_pairs(groups, reference):
        md, row = [group, setting, label, str(len(pairs))], [group, setting, label, str(len(pairs))]
        for metric, _, digits in metrics:
            diffs = [
                sharpness_value(a, metric) - sharpness_value(b, metric)
                for a, b in pairs
                if sharpness_value(a, metric) is not None and sharpness_value(b, metric) is not None
            ]
            m, s, _ = mean_std(diffs)
            lower = sum(d < 0 for d in diffs)
            md += [fmt_ms(m, s, digits=digits), f"{lower}/{len(diffs)}"]
            row += [fmt_num(m), fmt_num(s), str(lower)]
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
    commits = [r.commit for r in done if r.commit]
    seeds = sorted({r.cell.seed for r in runs})
    lines = [
        f"Generated by: `{command}` (from the workdirs; rerun it to regenerate this file)",
        f"Suite: {suite.name}; {len(done)} of {len(runs)} runs finished; seeds "
        + ", ".join(str(s) for s in seeds),
        "Devices (summary.json): " + (_count(devices) if devices else "unknown"),
        "Host CPU (experiments.run_suite): " + (_count(hosts) if hosts else "unknown"),
        "Versions: " + (_count(versions) if versions else "unknown"),
        "Code (git commit, experiments.run_suite): "
        + (_count(commits) if commits else "not recorded")
        + (
            f" ({len(done) - len(commits)} runs not recorded)"
            if 0 < len(commits) < len(done)
            else ""
        ),
        INIT_NOTE,
    ]
    if suite.kind == "train":
        lines.append(STATS_NOTE)
    return lines
