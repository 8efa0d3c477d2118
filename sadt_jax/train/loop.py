"""``train_and_evaluate(config, workdir)``: the training loop.

One code path for one CPU, one GPU, many devices and many hosts: the state is
replicated and the batch sharded on the ``data`` axis of a mesh over all
devices, the step is ``jax.jit``-ed once with the state donated, and each host
feeds only its own slice of every global batch
(``jax.make_array_from_process_local_data``).

The data stay on the devices: the in-memory training set is uploaded once per run
(replicated), each epoch's index plan once per epoch (each host its own slice of every
batch, sharded like a batch), and the jitted step gathers and augments its batch there
(:func:`sadt_jax.train.steps.make_gather_train_step`). Every dataset here fits in device
memory many times over (Fashion-MNIST 47 MB, CIFAR 150 MB as uint8); a dataset that does
not would need host-fed batches, which the loop does not offer. Evaluation batches are
still cut on the host (once per epoch, a small share of a run).

How a run is put together (each piece a small function):

* :func:`sadt_jax.train.validation.validate_config` and ``validate_against_model``
  check the config before anything is read or compiled;
* :class:`sadt_jax.train.workdir.WorkdirLock` locks the workdir for this run;
* :func:`sadt_jax.train.builders.build_run` builds the :class:`~builders.Run`
  (dataset, duration, mesh, model, optimizer, method, initial state);
* :func:`_restore` resumes from the newest checkpoint into a :class:`Progress`;
* per epoch: :func:`on_epoch_start` (the release protocol's optimizer reset),
  :func:`_train_epoch`, :func:`evaluate` (a dict of validation and test metrics),
  :class:`~sadt_jax.train.selection.Selection` (the selection rule and the kept
  ``best/`` weights), :func:`_record_epoch` (logs and files) and
  :func:`_checkpoint_due` (the checkpoint policy).

What lands in ``workdir``:

* ``config.json`` — the run's config; ``metrics.jsonl`` — one line per epoch
  (train averages, validation and test loss/accuracy; deterministic values only,
  so a resumed run writes the same file); ``timing.jsonl`` — wall-clock per epoch;
* ``summary.json`` — final and best-validation results, thresholds, versions;
* ``checkpoints/`` — orbax checkpoints (resumed automatically);
* ``best/`` — the selected weights (:mod:`sadt_jax.train.selection`), tested at the end;
* TensorBoard event files (:mod:`sadt_jax.train.writers`; no TensorFlow needed).

Reliability: a run killed at any point and rerun with the same command ends
with the same parameters and ``metrics.jsonl``, bit for bit, as one that was
never interrupted (same config and device count). What makes that hold:

* checkpoints at every ``ckpt.every_epochs`` epoch end and at the end of
  training, and on SIGTERM / SIGINT at the current step, mid-epoch included (the
  running metric sums are part of the state); rows of ``metrics.jsonl`` of epochs
  the restored checkpoint has not completed are dropped on resume;
* the position in the data is the checkpoint's step: epoch ``step // steps_per_epoch``,
  batch ``step % steps_per_epoch``, so a run extended with a larger
  ``num_steps``/``num_epochs`` continues exactly where a longer run would be,
  from any stopping point (a run is never shortened: that is refused);
* data order from ``(seed, epoch)``, augmentation and noise keys from
  ``fold_in(key, step)``: a resumed run draws the same batches and noise;
* the loss and the whole state are checked for NaN/Inf at every log interval,
  and :class:`Checkpointer` refuses to write a non-finite state, so every
  checkpoint on disk is finite;
* an unreadable newest checkpoint is skipped with a warning (see
  :mod:`sadt_jax.train.checkpointing`);
* the workdir is locked (``flock``) while the run uses it.

SIGTERM / SIGINT with one process: a Python handler sets a flag that the loop
polls before every step (a second SIGINT interrupts at once). With several
processes, JAX's preemption service (started by ``jax.distributed.initialize``)
receives SIGTERM on any host and all hosts agree on the step at which to save
(``reached_preemption_sync_point``); SIGINT then stops without saving.

Exit codes of the CLI (see ``sadt_jax.main``): 0 done, 2 bad config/data/workdir,
3 non-finite loss, 130 / 143 interrupted by SIGINT / SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

import sadt_jax
from sadt_jax import io
from sadt_jax.data import pipeline
from sadt_jax.train import builders, protocol, steps, validation, writers
from sadt_jax.train.checkpointing import (
    Checkpointer,
    NonFiniteStateError,
    abstract_like,
    all_finite,
)
from sadt_jax.train.selection import Selection
from sadt_jax.train.workdir import WorkdirError, WorkdirLock

__all__ = [
    "NonFiniteLossError",
    "Preempted",
    "Progress",
    "evaluate",
    "on_epoch_start",
    "select_best",
    "train_and_evaluate",
]

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or state; no checkpoint of that state was written."""


class Preempted(RuntimeError):
    """SIGTERM or SIGINT received; a checkpoint was saved (if enabled) and the run can resume.

    Attributes:
      signum: the signal (``signal.SIGTERM`` or ``signal.SIGINT``).
    """

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = signum


class _Preemption:
    """SIGTERM and SIGINT as a flag the loop polls between steps.

    One process: a Python handler (main thread only) sets the flag; a second
    SIGINT raises ``KeyboardInterrupt`` at once. Several processes: JAX's
    preemption sync service catches SIGTERM (a Python handler would hide it) and
    :meth:`stop_at` turns true on every host at the same step; SIGINT is left
    to Python (``KeyboardInterrupt``, no checkpoint).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if not self._multi:
            try:
                for s in self.SIGNALS:
                    self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no preemption handling
                self._previous = {}
        return self

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name

    def requested(self) -> bool:
        """A signal seen by this process (one-process runs; ``False`` with several)."""
        return self.signum is not None

    def stop_at(self, step: int) -> bool:
        """Whether to save and stop before running ``step``; call it at every step."""
        if self._multi:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = signal.SIGTERM
                return True
            return False
        return self.signum is not None

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)


@dataclasses.dataclass
class Progress:
    """Where a run stands; what a checkpoint and the records restore.

    Attributes:
      state: the :class:`~sadt_jax.TrainState`.
      sums: running sums of the current epoch's train metrics.
      step: batches trained (``state.step``).
      train_time_s: training wall-clock so far, over all sessions.
      history: ``metrics.jsonl`` rows of the epochs done.
      timing: ``timing.jsonl`` rows of the epochs done.
      checked_step: the last step after which the loss and state were seen finite.
    """

    state: Any
    sums: Any
    step: int
    train_time_s: float = 0.0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    timing: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    checked_step: int = 0


@dataclasses.dataclass
class _Context:
    """What the epoch functions share for one session of a run."""

    run: builders.Run
    workdir: str
    ckpt: Checkpointer | None
    preemption: _Preemption
    train_step: Any
    base_step: Any
    eval_fn: Any
    writer: Any
    report: Any
    is_main: bool
    reset_optimizer: Any  # state -> state, or None (optim.reset_every_epoch)
    selection: Selection
    train_data: Any  # the training set on the devices (Run.place_train_data)


def _versions() -> dict[str, str]:
    import flax
    import optax
    import orbax.checkpoint as ocp

    return {
        "sadt_jax": sadt_jax.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax_checkpoint": getattr(ocp, "__version__", "?"),
        "python": platform.python_version(),
    }


def _devices() -> dict[str, Any]:
    d = jax.devices()[0]
    return {
        "platform": d.platform,
        "device_kind": d.device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
    }


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _print(ctx: _Context, message: str) -> None:
    if ctx.is_main:
        print(message, flush=True)


# ---- Entry point ---------------------------------------------------------------------


def train_and_evaluate(config: Any, workdir: str, *, allow_config_change: bool = False) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint).

    Args:
      config: an ml_collections config from ``configs/``.
      workdir: output folder (created if needed; locked while the run uses it).
      allow_config_change: resume a workdir whose stored config differs.

    Returns:
      The summary written to ``workdir/summary.json``.

    Raises:
      validation.ConfigError: invalid config (before any compute), a workdir holding
        another run's checkpoints, or a run already past this config's end.
      WorkdirError: the workdir is not a writable folder or another run holds it.
      sadt_jax.data.DatasetError: data missing or unreadable.
      sadt_jax.io.CorruptFileError: ``metrics.jsonl`` or ``timing.jsonl`` is damaged.
      NonFiniteLossError: the loss or the state became NaN/Inf.
      Preempted: SIGTERM or SIGINT received (a checkpoint was saved first).
      checkpointing.CheckpointError: checkpoints exist in ``workdir`` but none is
        readable, or one cannot be written.
    """
    t_start = time.time()
    if not workdir:
        raise WorkdirError("--workdir is empty; name the run's output folder")
    workdir = os.path.abspath(workdir)
    validation.validate_config(config)
    validation.validate_against_model(config, builders.resolve_sadt_config(config))
    with _Preemption() as preemption, WorkdirLock(workdir):
        validation.guard_workdir(config, workdir, allow_change=allow_config_change)
        run = builders.build_run(config)
        validation.validate_against_data(config, run.dataset.num_train)
        ckpt = _open_checkpointer(config, workdir)
        try:
            return _train(run, workdir, ckpt, preemption, t_start)
        finally:
            if ckpt is not None:
                ckpt.close()


def _open_checkpointer(config: Any, workdir: str) -> Checkpointer | None:
    if not config.ckpt.enabled:
        return None
    return Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=config.ckpt.max_to_keep,
        async_save=config.ckpt.async_save,
    )


def _train(run, workdir, ckpt, preemption, t_start) -> dict:
    """Restores, trains the remaining epochs and writes the summary."""
    is_main = jax.process_index() == 0
    ds = run.dataset
    progress = _restore(run, ckpt, workdir, is_main)
    if is_main:
        _write_records(workdir, progress)
        io.write_json(os.path.join(workdir, "config.json"), run.config.to_dict())
    ctx = _make_context(run, workdir, ckpt, preemption, is_main)
    ctx.selection.start(progress.state, run.init_state, progress.history)
    try:
        _print(ctx, _banner(run))
        if preemption.requested():
            raise Preempted(
                f"{preemption.name} before training started, nothing new to save; "
                "rerun the same command to resume",
                preemption.signum,
            )
        for epoch in range(progress.step // run.steps_per_epoch, run.num_epochs):
            on_epoch_start(ctx, progress, epoch)
            _train_epoch(ctx, progress, epoch)
            _end_epoch(ctx, progress, epoch)
        selected = ctx.selection.test(
            lambda st: _evaluate_split(run, ctx.eval_fn, st, ds.test_images, ds.test_labels),
            progress.state,
        )
    finally:
        ctx.selection.close()
        ctx.writer.close()
    summary = _summary(run, progress, t_start)
    summary["selected"] = selected
    if is_main:
        io.write_json(os.path.join(workdir, "summary.json"), summary)
        _print_summary(summary, workdir)
    return summary


def _banner(run: builders.Run) -> str:
    c, ds = run.config, run.dataset
    return (
        f"Training {c.method} on {c.data.name} ({ds.num_train} train / "
        f"{ds.num_val} val / {ds.num_test} test), model {c.model.name}, "
        f"{run.num_epochs} epochs x {run.steps_per_epoch} steps, global batch {c.batch_size}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es)"
    )


# ---- Resume ----------------------------------------------------------------------------


def _restore(run: builders.Run, ckpt, workdir: str, is_main: bool) -> Progress:
    """The run's :class:`Progress`: fresh, or from the newest readable checkpoint and records.

    Raises:
      validation.ConfigError: the checkpoint is past this config's last step.
    """
    state, sums = run.init_state(), run.init_metric_sums()
    meta: dict[str, Any] = {"train_time_s": 0.0}
    if ckpt is not None:
        restored = ckpt.restore(abstract_like({"state": state, "metrics": sums}))
        if restored is not None:
            tree, meta, ckpt_step = restored
            state, sums = tree["state"], tree["metrics"]
            epoch, in_epoch = divmod(ckpt_step, run.steps_per_epoch)
            if is_main:
                print(
                    f"Resuming from the checkpoint at step {ckpt_step} (epoch "
                    f"{epoch + 1}, after {in_epoch} of its steps)",
                    flush=True,
                )
    step = int(jax.device_get(state.step))
    if step > run.total_steps:
        raise validation.ConfigError(
            f"{workdir} holds a run already trained to step {step}, past this config's "
            f"last step {run.total_steps} (num_epochs={run.config.num_epochs}, "
            f"num_steps={run.config.get('num_steps')}); a run cannot be shortened: use "
            "another --workdir, or a duration at least as long to extend or re-summarise it"
        )
    done = step // run.steps_per_epoch  # epochs completed; a partial one is redone
    history, timing = (
        [r for r in _read_records(workdir, name) if r["epoch"] <= done]
        for name in ("metrics.jsonl", "timing.jsonl")
    )
    return Progress(
        state=state,
        sums=sums,
        step=step,
        train_time_s=float(meta["train_time_s"]),
        history=history,
        timing=timing,
        checked_step=step,
    )


def _read_records(workdir: str, name: str) -> list[dict[str, Any]]:
    try:
        rows = io.read_jsonl(os.path.join(workdir, name))
    except io.CorruptFileError as e:
        raise io.CorruptFileError(
            f"{e}; the run's records are damaged: restore the file, or move {workdir} "
            "away and start afresh"
        ) from None
    if not all(isinstance(r, dict) and isinstance(r.get("epoch"), int) for r in rows):
        raise io.CorruptFileError(
            f"{os.path.join(workdir, name)} has rows without an epoch; restore the file, or "
            f"move {workdir} away and start afresh"
        )
    return rows


def _write_records(workdir: str, progress: Progress) -> None:
    io.write_jsonl(os.path.join(workdir, "metrics.jsonl"), progress.history)
    io.write_jsonl(os.path.join(workdir, "timing.jsonl"), progress.timing)


def _make_context(run, workdir, ckpt, preemption, is_main) -> _Context:
    """The jitted steps, the metric writer and the progress reporter of a session."""
    ds = run.dataset
    mean, std = protocol.normalization(run.config, ds)
    preprocess_kwargs = dict(
        augment_name=run.config.data.augment,
        mean=mean,
        std=std,
        num_classes=ds.num_classes,
        cutmix_alpha=run.config.data.cutmix_alpha,
        cutmix_box=run.config.data.get("cutmix_box", "reference"),
    )
    shardings = dict(state_sharding=run.replicated, batch_sharding=run.data_sharding)
    train_step = steps.make_gather_train_step(
        run.sadt_config, aug_key=run.aug_key, **shardings, **preprocess_kwargs
    )
    base_step = None
    if run.config.teacher_every > 1:  # cheap steps between teacher steps
        base_step = steps.make_gather_train_step(
            builders.method_config("base"), aug_key=run.aug_key, **shardings, **preprocess_kwargs
        )
    eval_fn = jax.jit(lambda s, b: steps.eval_sums(s, b, mean=mean, std=std))
    writer = writers.create_writer(workdir, is_main=is_main)  # TensorBoard without TensorFlow
    return _Context(
        run,
        workdir,
        ckpt,
        preemption,
        train_step,
        base_step,
        eval_fn,
        writer,
        writers.ProgressReporter(writer),
        is_main,
        reset_optimizer=protocol.make_optimizer_reset(run.config, run.replicated),
        selection=Selection(run.config, workdir, has_validation=ds.num_val > 0),
        train_data=run.place_train_data(),
    )


# ---- One epoch -------------------------------------------------------------------------


def on_epoch_start(ctx: _Context, progress: Progress, epoch: int) -> None:
    """Called before every epoch (resumed ones included).

    With ``optim.reset_every_epoch`` (the release protocol) the optimizer state is
    recreated before the epoch's first step: Adam's moments, its bias-correction count and
    the schedule's count restart. Not when resuming mid-epoch: the checkpoint then holds
    the epoch's own optimizer state.

    Args:
      ctx: the session's context.
      progress: the run's progress; ``progress.state`` may be replaced.
      epoch: the epoch about to run, from 0.
    """
    if ctx.reset_optimizer is not None and progress.step == epoch * ctx.run.steps_per_epoch:
        progress.state = ctx.reset_optimizer(progress.state)


def _train_epoch(ctx: _Context, progress: Progress, epoch: int) -> None:
    """Trains epoch ``epoch`` from ``progress.step`` to its last step (or the run's end).

    The epoch's index plan is uploaded once (:func:`_place_epoch_plan`); every step then
    gathers its batch on the devices (:func:`sadt_jax.train.steps.make_gather_train_step`),
    so the loop does no per-step host work but choosing the step function and polling for a
    preemption. ``data_time_s`` in ``timing.jsonl`` is the time spent planning and uploading.
    """
    run = ctx.run
    spe = run.steps_per_epoch
    start = progress.step - epoch * spe
    stop = min(spe, run.total_steps - epoch * spe)
    t_epoch = time.time()
    if int(jax.device_get(progress.state.step)) != progress.step:  # the plan's row is state.step
        raise RuntimeError(f"state.step is not the loop's step {progress.step}")
    plans = _place_epoch_plan(run, epoch)
    data_time = time.time() - t_epoch
    for s in range(start, stop):
        if ctx.preemption.stop_at(progress.step):
            progress.train_time_s += time.time() - t_epoch
            _stop_preempted(ctx, progress, epoch, s, stop)
        fn = ctx.train_step
        if ctx.base_step is not None and progress.step % run.config.teacher_every:
            fn = ctx.base_step
        progress.state, progress.sums = fn(progress.state, progress.sums, ctx.train_data, plans[s])
        progress.step += 1
        ctx.report(progress.step, time.time())
        if progress.step % run.config.log_every_steps == 0 or s == stop - 1:
            _log_step(ctx, progress, epoch, s, start, stop, t_epoch)
    jax.block_until_ready(progress.state)
    progress.train_time_s += time.time() - t_epoch
    progress.timing.append(
        {"epoch": epoch + 1, "epoch_time_s": time.time() - t_epoch, "data_time_s": data_time}
    )


def _place_epoch_plan(run: builders.Run, epoch: int) -> dict[int, dict[str, jax.Array]]:
    """The epoch's plan on the devices: step within the epoch -> the block of the plan holding it.

    The plan (this process's indices, and CutMix partners under ``data.cutmix_partner="stream"``)
    is :func:`sadt_jax.train.protocol.epoch_plan`'s; a kept partial last batch is a block
    of its own (another shape). The whole epoch is uploaded, also when resuming within it.
    """
    plan = protocol.epoch_plan(run.config, run.dataset.num_train, epoch)
    out = {}
    for first, block in pipeline.plan_blocks(plan):
        placed = run.place_plan(epoch * run.steps_per_epoch + first, block)
        out.update(dict.fromkeys(range(first, first + block["index"].shape[0]), placed))
    return out


def _log_step(ctx, progress, epoch, s, start, stop, t_epoch) -> None:
    """Checks the loss and state for NaN/Inf and prints the running averages."""
    host = jax.device_get(progress.sums)
    n = max(float(host["count"]), 1.0)
    if not (np.isfinite(host["loss"]) and all_finite(progress.state)):
        raise _diverged(ctx, progress, progress.step)
    progress.checked_step = progress.step
    if not ctx.is_main:
        return
    elapsed = progress.train_time_s + time.time() - t_epoch
    rate = (s + 1 - start) / max(time.time() - t_epoch + 1e-9, 1e-9)
    eta = (ctx.run.total_steps - progress.step) / max(rate, 1e-9)
    print(
        f"epoch {epoch + 1}/{ctx.run.num_epochs} step {s + 1}/{stop} "
        f"loss {host['loss'] / n:.4f} acc {host['accuracy'] / n:.4f} "
        f"| {rate:.2f} steps/s, elapsed {_fmt_time(elapsed)}, ETA {_fmt_time(eta)}",
        flush=True,
    )


def _diverged(ctx: _Context, progress: Progress, last_step: int) -> NonFiniteLossError:
    good = ctx.ckpt.latest_step() if ctx.ckpt is not None else None
    where = f"step {good} in {ctx.ckpt.directory}" if good is not None else "none"
    return NonFiniteLossError(
        f"training diverged: non-finite loss or parameters at step {last_step} "
        f"(finite up to step {progress.checked_step}); no checkpoint of it was written; "
        f"last good checkpoint: {where}; lower optim.learning_rate or sadt.rho"
    )


def _stop_preempted(ctx: _Context, progress: Progress, epoch: int, s: int, stop: int) -> None:
    """Saves the current step and raises :class:`Preempted`."""
    name, signum = ctx.preemption.name, ctx.preemption.signum
    if not _save(ctx, progress):
        raise Preempted(
            f"{name} at step {progress.step}; nothing saved (ckpt.enabled is False)", signum
        )
    ctx.ckpt.wait()
    raise Preempted(
        f"{name}: checkpoint saved at step {progress.step} (epoch {epoch + 1}, "
        f"{s}/{stop} steps done) in {ctx.ckpt.directory}; rerun the same command to resume",
        signum,
    )


# ---- End of an epoch: evaluation, selection, records, checkpoint ------------------------


def evaluate(run: builders.Run, eval_fn: Any, state: Any) -> dict[str, float]:
    """Validation (if the run has a split) and test loss and accuracy of ``state``.

    Returns:
      ``{"val_loss", "val_accuracy", "test_loss", "test_accuracy"}`` (no ``val_*``
      keys when ``data.num_validation`` is 0), and ``val_selection_loss`` (the CE of
      the last validation batch alone) under ``selection.loss="last_batch"``.
    """
    ds, out = run.dataset, {}
    if ds.num_val:
        val = protocol.evaluate(
            eval_fn,
            state,
            ds.val_images,
            ds.val_labels,
            protocol.validation_batch_size(run.config),
            run.data_sharding,
        )
        out.update({"val_loss": val["loss"], "val_accuracy": val["accuracy"]})
        if run.config.get("selection", {}).get("loss", "full") == "last_batch":
            out["val_selection_loss"] = val["last_batch_loss"]
    test = _evaluate_split(run, eval_fn, state, ds.test_images, ds.test_labels)
    out.update({f"test_{k}": v for k, v in test.items()})
    return out


def _evaluate_split(run, eval_fn, state, images, labels) -> dict[str, float]:
    """Loss and accuracy over ``images`` in batches of ``eval_batch_size``."""
    result = protocol.evaluate(
        eval_fn, state, images, labels, run.config.eval_batch_size, run.data_sharding
    )
    return {k: result[k] for k in ("loss", "accuracy")} if result else {}


def select_best(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The selection rule: the epoch with the lowest validation loss (the first on a tie).

    Returns:
      ``{"epoch", "val_loss", "val_accuracy", "test_loss", "test_accuracy"}``, or
      ``None`` when the run has no validation split (nothing to select on; the test
      set is never used for selection).
    """
    rows = [r for r in history if "val_loss" in r]
    if not rows:
        return None
    best = min(rows, key=lambda r: r["val_loss"])  # min keeps the first of equal values
    keys = ("epoch", "val_loss", "val_accuracy", "test_loss", "test_accuracy")
    return {k: best[k] for k in keys}


def _end_epoch(ctx: _Context, progress: Progress, epoch: int) -> None:
    """Evaluates, records and (per the policy) checkpoints the epoch just trained."""
    run = ctx.run
    host = jax.device_get(progress.sums)
    n = max(float(host["count"]), 1.0)
    row: dict[str, Any] = {"epoch": epoch + 1, "step": progress.step}
    row.update({f"train_{k}": float(v) / n for k, v in host.items() if k != "count"})
    t_eval = time.time()
    row.update(evaluate(run, ctx.eval_fn, progress.state))
    eval_time = time.time() - t_eval
    progress.history.append(row)
    ctx.selection.update(epoch + 1, row, progress.state)  # before the checkpoint
    progress.timing[-1] = {
        **progress.timing[-1],
        "train_time_s": progress.train_time_s,
        "eval_time_s": eval_time,
    }
    _record_epoch(ctx, progress, row, eval_time)
    full = progress.step == (epoch + 1) * run.steps_per_epoch
    if full:  # a partial last epoch keeps its sums, so an extended run can continue it
        progress.sums = run.init_metric_sums()
    if _checkpoint_due(run, epoch):
        _save(ctx, progress)


def _record_epoch(ctx: _Context, progress: Progress, row: dict[str, Any], eval_time) -> None:
    """Writes the epoch's row to TensorBoard, ``metrics.jsonl`` / ``timing.jsonl`` and stdout."""
    ctx.writer.write_scalars(
        row["step"], {k: v for k, v in row.items() if k not in ("epoch", "step")}
    )
    ctx.writer.flush()
    if not ctx.is_main:
        return
    _write_records(ctx.workdir, progress)
    msg = (
        f"epoch {row['epoch']}/{ctx.run.num_epochs} done: train loss {row['train_loss']:.4f} "
        f"acc {row['train_accuracy']:.4f}"
    )
    if "val_accuracy" in row:
        msg += f" | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}"
    msg += (
        f" | test acc {row['test_accuracy']:.4f} | "
        f"{progress.timing[-1]['epoch_time_s']:.1f} s train, {eval_time:.1f} s eval"
    )
    print(msg, flush=True)


def _checkpoint_due(run: builders.Run, epoch: int) -> bool:
    """The checkpoint policy: every ``ckpt.every_epochs`` epochs and at the end of training."""
    c = run.config.ckpt
    return c.enabled and ((epoch + 1) % c.every_epochs == 0 or epoch + 1 == run.num_epochs)


def _save(ctx: _Context, progress: Progress) -> bool:
    """Checkpoints the current position; ``False`` when checkpoints are off."""
    if ctx.ckpt is None:
        return False
    step = progress.step
    if ctx.ckpt.latest_step() == step:  # already on disk (e.g. SIGTERM after an epoch end)
        return True
    epoch, in_epoch = divmod(step, ctx.run.steps_per_epoch)
    meta = {
        "epoch": epoch,
        "step_in_epoch": in_epoch,
        "train_time_s": progress.train_time_s,
        "best": select_best(progress.history),
        "global_step": step,
    }
    try:
        ctx.ckpt.save(step, {"state": progress.state, "metrics": progress.sums}, meta)
    except NonFiniteStateError:
        raise _diverged(ctx, progress, step) from None
    _print(ctx, f"checkpoint saved at step {step}")
    return True


# ---- Summary ----------------------------------------------------------------------------


def _thresholds(config, history, timing) -> tuple[str, dict[str, Any]]:
    """First epoch reaching each accuracy threshold (on validation, else test accuracy)."""
    times = {r["epoch"]: r.get("train_time_s") for r in timing}
    acc_key = "val_accuracy" if history and "val_accuracy" in history[0] else "test_accuracy"
    out = {}
    for thr in config.accuracy_thresholds:
        hit = next((r for r in history if r[acc_key] >= thr), None)
        out[f"{thr:g}"] = (
            None
            if hit is None
            else {"epoch": hit["epoch"], "train_time_s": times.get(hit["epoch"])}
        )
    return acc_key, out


def _summary(run: builders.Run, progress: Progress, t_start: float) -> dict[str, Any]:
    config, history, timing = run.config, progress.history, progress.timing
    acc_key, thresholds = _thresholds(config, history, timing)
    last = history[-1] if history else {}
    epoch_times = [r["epoch_time_s"] for r in timing]
    data_times = [r["data_time_s"] for r in timing]
    return {
        "method": config.method,
        "dataset": config.data.name,
        "model": config.model.name,
        "seed": config.seed,
        "epochs": len(history),
        "steps": progress.step,
        "steps_per_epoch": run.steps_per_epoch,
        "final": {
            k: last.get(k) for k in ("val_loss", "val_accuracy", "test_loss", "test_accuracy")
        },
        "best_val": select_best(history),
        "selection": "lowest val_loss" if run.dataset.num_val else "none (data.num_validation=0)",
        "thresholds_on": acc_key,
        "thresholds": thresholds,
        "train_time_s": progress.train_time_s,
        "median_epoch_time_s": float(np.median(epoch_times)) if epoch_times else None,
        "data_time_fraction": (sum(data_times) / max(sum(epoch_times), 1e-9))
        if epoch_times
        else None,
        "wall_clock_this_process_s": time.time() - t_start,
        "sadt_config": builders.sadt_config_dict(run.sadt_config),
        "config": config.to_dict(),
        "versions": _versions(),
        "devices": _devices(),
        "command": " ".join(sys.argv),
    }


def _selected_line(sel: dict | None) -> str:
    if not sel or sel.get("test_accuracy") is None:
        return "  selected weights: none tested"
    loss = sel.get("selection_loss")
    return (
        f"  selected (epoch {sel['epoch']}{' = initial' if sel['epoch'] == 0 else ''}, rule from "
        f"epoch {sel['first_epoch']}): test accuracy {100 * sel['test_accuracy']:5.2f} % "
        f"(selection loss {float('nan') if loss is None else loss:.4f})"
    )


def _print_summary(summary: dict, workdir: str) -> None:
    f, b = summary["final"], summary["best_val"]

    def pct(x):
        return "  n/a" if x is None else f"{100 * x:5.2f}"

    if b is None:
        best = "  best-val epoch: none (no validation split, nothing to select on)"
    else:
        best = (
            f"  best-val epoch {b['epoch']}: test accuracy {pct(b['test_accuracy'])} % "
            f"(val loss {b['val_loss']:.4f})"
        )
    lines = [
        "",
        f"== Summary: {summary['method']} on {summary['dataset']} ({summary['model']}), "
        f"{summary['epochs']} epochs, seed {summary['seed']} ==",
        f"  final test accuracy          {pct(f['test_accuracy'])} %",
        best,
        _selected_line(summary.get("selected")),
        f"  training time                {summary['train_time_s']:.1f} s "
        f"(median epoch {summary['median_epoch_time_s'] or 0:.1f} s, "
        f"data {100 * (summary['data_time_fraction'] or 0):.1f} % of it)",
        "  epochs to reach "
        + summary["thresholds_on"]
        + ": "
        + ", ".join(f"{k}: {v['epoch'] if v else '-'}" for k, v in summary["thresholds"].items()),
        f"  outputs: {workdir}/summary.json, metrics.jsonl, TensorBoard events",
    ]
    print("\n".join(lines), flush=True)
