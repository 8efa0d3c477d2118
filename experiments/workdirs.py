r"""Reading a suite's run workdirs: which cells are finished, and what they wrote.

A cell's workdir (``<root>/<suite>/<cell>``) holds what the run wrote
(``summary.json``, ``metrics.jsonl``, ``timing.jsonl``; ``sharpness.json`` for a
measurement cell) and what :mod:`experiments.run_suite` recorded about its attempts
(``suite_run.json``). :func:`cell_state` says where a cell stands;
:func:`collect_runs` reads the workdirs into :class:`Run` records, which the tables
(:mod:`experiments.tables`) and plots (:mod:`experiments.plots`) use.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from experiments.suites import Cell
from sadt_jax.io import read_json_lenient as read_json
from sadt_jax.io import read_jsonl

__all__ = [
    "STATUS_FILE",
    "Run",
    "accuracy_key",
    "cell_state",
    "collect_runs",
    "group_keys",
    "group_runs",
    "run_metric",
    "sharpness_value",
]

#: The file :mod:`experiments.run_suite` writes into each workdir (the cell, its attempts).
STATUS_FILE = "suite_run.json"


def cell_state(cell: Cell, root: str) -> str:
    """``done``, ``waiting`` (its source run is unfinished), ``partial``, ``failed`` or ``new``."""
    workdir = cell.workdir(root)
    if os.path.exists(os.path.join(workdir, cell.done_file)):
        return "done"
    if cell.source is not None and not os.path.exists(
        os.path.join(cell.source_workdir(root), "summary.json")
    ):
        return "waiting"
    status = read_json(os.path.join(workdir, STATUS_FILE)) or {}
    attempts = status.get("attempts") or []
    if attempts and attempts[-1].get("returncode") not in (0, None, 143):
        return "failed"
    if os.path.isdir(os.path.join(workdir, "checkpoints")) or os.path.exists(
        os.path.join(workdir, "metrics.jsonl")
    ):
        return "partial"
    return "new"


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
    commit: str = ""

    @property
    def finished(self) -> bool:
        return self.state == "done"


def cell_from_json(d: dict[str, Any]) -> Cell:
    fields = {f.name for f in dataclasses.fields(Cell)}
    d = {k: v for k, v in d.items() if k in fields}
    d["overrides"] = tuple(tuple(kv) for kv in d.get("overrides", ()))
    return Cell(**d)


def discover_extra(
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
            status = read_json(os.path.join(base, name, STATUS_FILE))
            if status and isinstance(status.get("cell"), dict):
                try:
                    cell = cell_from_json(status["cell"])
                except TypeError:
                    continue
                if (cell.suite, cell.name) == (folder, name):
                    extra.append(cell)
    return sorted(extra, key=lambda c: (c.seed, c.name))


def _commit(attempt: dict[str, Any]) -> str:
    """``"<sha>"`` or ``"<sha>+dirty"`` from an attempt's ``git`` record, or ``""``."""
    git = attempt.get("git") or {}
    if not git.get("commit"):
        return ""
    return git["commit"] + ("+dirty" if git.get("dirty") else "")


def collect_runs(
    cells: Sequence[Cell],
    root: str,
    *,
    discover: bool = True,
    folders: Sequence[str] | None = None,
) -> list[Run]:
    """Reads the workdirs of ``cells`` (and, with ``discover``, other cells found in
    ``folders``, by default the folders of ``cells``)."""
    cells = list(cells) + (discover_extra(cells, root, folders) if discover else [])
    runs = []
    for cell in cells:
        workdir = cell.workdir(root)
        run = Run(cell=cell, state=cell_state(cell, root))
        status = read_json(os.path.join(workdir, STATUS_FILE)) or {}
        attempts = status.get("attempts") or []
        run.hosts = [a["host"] for a in attempts if a.get("host")]
        run.outcome = attempts[-1].get("outcome", "") if attempts else ""
        run.commit = _commit(attempts[-1]) if attempts else ""
        if cell.kind == "train":
            run.history = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            run.timing = read_jsonl(os.path.join(workdir, "timing.jsonl"))
            if run.finished:
                run.summary = read_json(os.path.join(workdir, "summary.json"))
                run.state = "done" if run.summary else "unreadable"
        else:
            if run.finished:
                run.sharpness = read_json(os.path.join(workdir, cell.done_file))
                run.state = "done" if run.sharpness else "unreadable"
            run.source_summary = read_json(os.path.join(cell.source_workdir(root), "summary.json"))
        runs.append(run)
    return runs


def group_keys(runs: Sequence[Run]) -> list[tuple[str, str, str]]:
    """(group, setting, label) in order of first appearance."""
    seen: dict[tuple[str, str, str], None] = {}
    for r in runs:
        seen.setdefault((r.cell.group, r.cell.setting, r.cell.label), None)
    return list(seen)


def group_runs(runs: Sequence[Run]) -> dict[tuple[str, str, str], list[Run]]:
    out: dict[tuple[str, str, str], list[Run]] = {k: [] for k in group_keys(runs)}
    for r in runs:
        out[(r.cell.group, r.cell.setting, r.cell.label)].append(r)
    for k in out:
        out[k].sort(key=lambda r: (r.cell.seed, r.cell.name))
    return out


def _selected(summary: dict) -> dict:
    """The run's selected model: the kept ``best/`` weights where the run tested them
    (``summary["selected"]``, the release's and the project's selection rules alike),
    else the per-epoch record of the lowest validation loss (runs from before ``best/``)."""
    selected = summary.get("selected") or {}
    if selected.get("test_accuracy") is not None:
        return selected
    return summary.get("best_val") or {}


def run_metric(run: Run, name: str) -> float | None:
    s = run.summary or {}
    if name == "best_val_test":
        return _selected(s).get("test_accuracy")
    if name == "best_val_val":
        return _selected(s).get("val_accuracy")
    if name == "best_epoch":
        return _selected(s).get("epoch")
    if name == "final_test":
        return (s.get("final") or {}).get("test_accuracy")
    if name == "final_val":
        return (s.get("final") or {}).get("val_accuracy")
    if name == "train_time":
        return s.get("train_time_s")
    if name == "epoch_time":
        return s.get("median_epoch_time_s")
    raise KeyError(name)


def sharpness_value(run: Run, metric: str) -> float | None:
    if run.sharpness is None:
        return None
    if metric == "lambda_max":
        return run.sharpness["hessian"]["top_eigenvalue"]
    if metric.startswith("worst_case_"):
        return run.sharpness["worst_case_loss_increase"].get(metric.removeprefix("worst_case_"))
    return None


def accuracy_key(runs: Sequence[Run]) -> str:
    for r in runs:
        if r.history:
            return "val_accuracy" if "val_accuracy" in r.history[0] else "test_accuracy"
    return "val_accuracy"
