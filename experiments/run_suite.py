r"""Runs a suite of experiments cell by cell, then aggregates it into tables and plots.

Every cell is run as its own process, exactly the command a user would type
(``python -m sadt_jax.main --config=... --workdir=<root>/<suite>/<cell> ...``; see
:mod:`experiments.suites`), with its output appended to ``<workdir>/log.txt``:

* a cell whose ``summary.json`` (``sharpness.json`` for measurement cells) exists
  is skipped;
* any other cell is (re)run with the same command, which resumes from its last
  checkpoint;
* every attempt records the git commit of the code it runs (and whether tracked files
  had uncommitted changes) in ``suite_run.json``; the tables show it;
* a failed cell is recorded (``<workdir>/suite_run.json``, the suite's
  ``_runs.jsonl``, and the status table of the results) and the suite goes on;
* order is seed-major (every cell of seed 0, then seed 1, ...) so a partial suite
  is balanced across methods;
* Ctrl-C sends SIGTERM to the running cell (it saves a checkpoint and exits 143),
  then stops; rerun the same command to continue.

Run::

  python -m experiments.run_suite --suite=fashion_mnist --root=runs
  python -m experiments.run_suite --suite=fashion_mnist --root=runs --dry_run
  python -m experiments.run_suite --suite=sharpness --root=runs   # after fashion_mnist
  python -m experiments.run_suite --suite=fashion_mnist --root=runs --aggregate_only
  # A tiny end-to-end check (into <root>/fashion_mnist_smoke and --results_dir):
  python -m experiments.run_suite --suite=fashion_mnist --root=/tmp/runs --smoke \
      --seeds=0 --only=base_s,sadt_t1_s --results_dir=/tmp/results

Exit status: 0 when every selected cell is finished, 1 when some failed or are
still unfinished, 2 for bad arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from experiments import aggregate, suites
from experiments.suites import Cell
from experiments.workdirs import STATUS_FILE, cell_state
from sadt_jax.io import read_json_lenient as read_json
from sadt_jax.io import write_json

__all__ = ["cell_state", "git_info", "host_info", "main", "run_cells"]

#: ``launcher(argv, log_path, cwd) -> returncode``; replaced in tests.
Launcher = Callable[[Sequence[str], str, str], int]


def host_info() -> dict[str, Any]:
    """The machine a cell runs on (the CPU model and core count, for the tables)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu or platform.machine(),
        "cpu_count": os.cpu_count(),
        "affinity_cpu_count": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "platform": platform.system() + " " + platform.machine(),
    }


def git_info(repo: str) -> dict[str, Any]:
    """The code a cell runs: ``{"commit": <sha>, "dirty": <uncommitted changes to tracked
    files>}``, or ``{}`` when ``repo`` is not a git checkout (or git is missing)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", repo, *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": dirty}


def subprocess_launcher(argv: Sequence[str], log_path: str, cwd: str) -> int:
    """Runs ``argv`` in ``cwd`` with stdout and stderr appended to ``log_path``."""
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            list(argv), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)  # the loop saves a checkpoint and exits
            try:
                proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise


def _fmt_s(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _describe_rc(rc: int) -> str:
    return {
        0: "done",
        2: "failed: bad config or missing data (exit 2)",
        3: "failed: non-finite loss (exit 3)",
        143: "preempted (exit 143; rerun to resume)",
    }.get(rc, f"failed (exit {rc})")


def run_cells(
    cells: Sequence[Cell],
    root: str,
    *,
    hardware: str = "cpu2",
    launcher: Launcher = subprocess_launcher,
    python: str = sys.executable,
    dry_run: bool = False,
    out=None,
) -> dict[str, list[str]]:
    """Runs the unfinished cells in order; returns cell names by outcome.

    Args:
      cells: the cells (duplicates of one workdir are run once).
      root: the root folder (cells go to ``<root>/<suite>/<cell>``).
      hardware: key of the cost model for the progress estimate.
      launcher: runs one command (:func:`subprocess_launcher`).
      python: the interpreter for the cells.
      dry_run: print the plan and the commands; run nothing.
      out: where progress goes.

    Returns:
      ``{"done": [...], "skipped": [...], "failed": [...], "waiting": [...]}``
      (``skipped``: finished before this call; ``done``: finished by it).
    """
    runs = suites.unique_runs(cells)
    result: dict[str, list[str]] = {"done": [], "skipped": [], "failed": [], "waiting": []}
    states = {c.name: cell_state(c, root) for c in runs}
    todo = [c for c in runs if states[c.name] not in ("done",)]
    est = {c.name: suites.estimate_seconds(c, hardware) for c in runs}
    remaining = sum(est[c.name] for c in todo if states[c.name] != "waiting")
    n = len(runs)

    def say(msg: str) -> None:
        print(msg, file=out or sys.stdout, flush=True)

    say(
        f"{n} runs: {sum(s == 'done' for s in states.values())} finished, "
        f"{sum(s == 'partial' for s in states.values())} partial (resume), "
        f"{sum(s == 'failed' for s in states.values())} failed before (retry), "
        f"{sum(s == 'new' for s in states.values())} new, "
        f"{sum(s == 'waiting' for s in states.values())} waiting for their source run; "
        f"estimated {_fmt_s(remaining)} to go (a rough estimate, '{hardware}' cost model)"
    )
    repo = suites.REPO_ROOT
    for i, cell in enumerate(runs, 1):
        state = states[cell.name]
        workdir = cell.workdir(root)
        argv = cell.command(root, python=python)
        prefix = f"[{i}/{n}] {cell.suite}/{cell.name}"
        if state == "done":
            result["skipped"].append(cell.name)
            say(f"{prefix}: finished, skipped")
            continue
        if state == "waiting":
            result["waiting"].append(cell.name)
            say(f"{prefix}: waiting for {cell.source} to finish, skipped")
            continue
        if dry_run:
            say(f"{prefix}: {state}, ~{_fmt_s(est[cell.name])}\n    {' '.join(argv)}")
            continue
        os.makedirs(workdir, exist_ok=True)
        status_path = os.path.join(workdir, STATUS_FILE)
        status = read_json(status_path) or {}
        attempts = list(status.get("attempts") or [])
        started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        attempt = {"started": started, "host": host_info(), "command": argv, "resumed": state}
        attempt["git"] = git_info(repo)
        attempts.append(attempt)
        write_json(status_path, {"cell": cell.to_json(), "attempts": attempts})
        log_path = os.path.join(workdir, "log.txt")
        with open(log_path, "a") as log:
            log.write(f"\n=== experiments.run_suite {started}: {' '.join(argv)}\n")
        say(f"{prefix}: {'resuming' if state == 'partial' else 'running'} (log: {log_path})")
        t0 = time.time()
        try:
            rc = launcher(argv, log_path, repo)
        except KeyboardInterrupt:
            attempt.update(returncode=None, elapsed_s=time.time() - t0, outcome="interrupted")
            write_json(status_path, {"cell": cell.to_json(), "attempts": attempts})
            say(f"{prefix}: interrupted (checkpoint saved if it got that far); rerun to resume")
            raise
        elapsed = time.time() - t0
        finished = os.path.exists(os.path.join(workdir, cell.done_file))
        outcome = _describe_rc(rc) if not (rc == 0 and not finished) else "failed: no output"
        attempt.update(returncode=rc if finished or rc else -1, elapsed_s=elapsed, outcome=outcome)
        write_json(status_path, {"cell": cell.to_json(), "attempts": attempts})
        with open(os.path.join(root, cell.suite, "_runs.jsonl"), "a") as f:
            f.write(json.dumps({"cell": cell.name, **attempt}, sort_keys=True) + "\n")
        remaining -= est[cell.name]
        if rc == 0 and finished:
            result["done"].append(cell.name)
            say(f"{prefix}: done in {_fmt_s(elapsed)}; ~{_fmt_s(remaining)} to go (estimate)")
        else:
            result["failed"].append(cell.name)
            say(f"{prefix}: {outcome} after {_fmt_s(elapsed)}; see {log_path}")
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.run_suite", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--suite", required=True, help=f"One of: {', '.join(suites.SUITES)}.")
    p.add_argument("--root", default="runs", help="Runs go to <root>/<suite>/<cell>.")
    p.add_argument("--seeds", default=None, help="Comma-separated seeds (default: the suite's).")
    p.add_argument(
        "--only", default="", help="Comma-separated substrings; keep cells whose name has one."
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="Extra --config.FIELD=VALUE for every training cell (e.g. data.data_dir=/data).",
    )
    p.add_argument("--smoke", action="store_true", help="Tiny cells under <root>/<suite>_smoke.")
    p.add_argument("--dry_run", action="store_true", help="Print the plan; run nothing.")
    p.add_argument("--aggregate_only", action="store_true", help="Only regenerate the results.")
    p.add_argument("--no_aggregate", action="store_true", help="Skip the aggregation.")
    p.add_argument(
        "--results_dir", default=None, help="Default: results/<suite> (results/<suite>_smoke)."
    )
    return p.parse_args(argv)


def _with_overrides(cells: list[Cell], overrides: Sequence[str]) -> list[Cell]:
    import dataclasses

    extra = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--override expects FIELD=VALUE, got {item!r}")
        extra.append((key.removeprefix("config."), value))
    if not extra:
        return cells
    return [
        dataclasses.replace(c, overrides=c.overrides + tuple(extra)) if c.kind == "train" else c
        for c in cells
    ]


def config_problems(cells: Sequence[Cell]) -> list[str]:
    """What ``sadt_jax.main`` would refuse in these cells, one line per distinct problem.

    Checked for every run before any runs (:meth:`Cell.config_problems`), so an override
    the config does not accept stops the suite at once rather than failing each cell.
    """
    where: dict[str, list[str]] = {}
    for cell in suites.unique_runs(cells):
        for problem in cell.config_problems():
            where.setdefault(problem, []).append(f"{cell.suite}/{cell.name}")
    return [
        f"{problem} ({names[0]}" + (f" and {len(names) - 1} more cells)" if len(names) > 1 else ")")
        for problem, names in where.items()
    ]


def main(argv: Sequence[str] | None = None, *, launcher: Launcher = subprocess_launcher) -> int:
    args = parse_args(argv)
    try:
        suite = suites.get_suite(args.suite)
        seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",") if s]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    only = [s for s in args.only.split(",") if s]
    cells = suites.suite_cells(args.suite, seeds, smoke=args.smoke, only=only)
    cells = _with_overrides(cells, args.override)
    if not cells:
        print(f"error: no cell of suite {args.suite!r} matches --only={args.only}", file=sys.stderr)
        return 2
    problems = config_problems(cells)
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    # The suite's own folder (a suite may also reuse runs kept in another suite's folder).
    folder = args.suite + ("_smoke" if args.smoke else "")
    results_dir = args.results_dir or os.path.join("results", folder)
    print(
        f"Suite {args.suite}{' (smoke)' if args.smoke else ''}: "
        f"{len(suites.unique_runs(cells))} runs under {os.path.join(args.root, folder)}, "
        f"results in {results_dir}",
        flush=True,
    )
    outcome = {"failed": [], "waiting": []}
    if not args.aggregate_only:
        if not args.dry_run:
            os.makedirs(os.path.join(args.root, folder), exist_ok=True)
        try:
            outcome = run_cells(
                cells, args.root, hardware=suite.hardware, launcher=launcher, dry_run=args.dry_run
            )
        except KeyboardInterrupt:
            return 130
        if outcome["failed"]:
            print(f"Failed cells: {', '.join(outcome['failed'])}", flush=True)
    if args.dry_run or args.no_aggregate:
        return 0
    cmd = aggregate.canonical_command(args.suite, args.root, seeds, args.smoke, results_dir)
    written = aggregate.aggregate_suite(
        args.suite, args.root, results_dir, seeds=seeds, smoke=args.smoke, command=cmd
    )
    print(f"Results: {len(written)} files in {results_dir} (see {written[0]})", flush=True)
    unfinished = [c for c in suites.unique_runs(cells) if cell_state(c, args.root) != "done"]
    return 1 if outcome["failed"] or unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
