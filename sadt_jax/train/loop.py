"""``train_and_evaluate(config, workdir)``: the training loop.

One code path for one CPU, one GPU, many devices and many hosts: the state is
replicated and the batch sharded on the ``data`` axis of a mesh over all
devices, the step is ``jax.jit``-ed once with the state donated, and each host
feeds only its own slice of every global batch
(``jax.make_array_from_process_local_data``).

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

* checkpoints at every ``ckpt.every_epochs`` epoch end, and on SIGTERM at the
  current step, mid-epoch included (the running metric sums are part of the
  state); rows of ``metrics.jsonl`` newer than the restored checkpoint are
  dropped on resume;
* data order from ``(seed, epoch)``, augmentation and noise keys from
  ``fold_in(key, step)``: a resumed run draws the same batches and noise;
* the loss and the whole state are checked for NaN/Inf at every log interval,
  and :class:`Checkpointer` refuses to write a non-finite state, so every
  checkpoint on disk is finite;
* an unreadable newest checkpoint is skipped with a warning (see
  :mod:`sadt_jax.train.checkpointing`).

SIGTERM with one process: a Python handler sets a flag that the loop polls
before every step. With several processes, JAX's preemption service (started
by ``jax.distributed.initialize``) receives SIGTERM on any host and all hosts
agree on the step at which to save (``reached_preemption_sync_point``).

Exit codes of the CLI (see ``sadt_jax.main``): 0 done, 2 bad config/data,
3 non-finite loss, 143 preempted by SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sadt_jax
from sadt_jax.data import pipeline
from sadt_jax.train import builders, protocol, steps, validation, writers
from sadt_jax.train.checkpointing import (
    Checkpointer,
    NonFiniteStateError,
    abstract_like,
    all_finite,
)
from sadt_jax.train.selection import Selection

__all__ = ["NonFiniteLossError", "Preempted", "train_and_evaluate"]

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or state; no checkpoint of that state was written."""


class Preempted(RuntimeError):
    """SIGTERM received; a checkpoint was saved and the run can be resumed."""


class _Preemption:
    """SIGTERM as a flag the loop polls between steps.

    One process: a Python handler (main thread only) sets the flag. Several
    processes: JAX's preemption sync service catches SIGTERM (a Python handler
    would hide it) and :meth:`stop_at` turns true on every host at the same step.
    """

    def __init__(self):
        self._flag = False
        self._previous = None
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if not self._multi:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: no preemption handling
                self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self._flag = True

    def requested(self) -> bool:
        """SIGTERM seen by this process (one-process runs; ``False`` with several)."""
        return self._flag

    def stop_at(self, step: int) -> bool:
        """Whether to save and stop before running ``step``; call it at every step."""
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


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


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def _rewrite_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _evaluate(eval_fn, state, images, labels, batch_size, sharding) -> dict[str, float]:
    totals = None
    for batch in pipeline.eval_batches(
        images,
        labels,
        batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
        sums = eval_fn(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        return {}
    totals = jax.device_get(totals)
    n = max(float(totals["count"]), 1.0)
    return {"loss": float(totals["loss"]) / n, "accuracy": float(totals["correct"]) / n}


def train_and_evaluate(config: Any, workdir: str, *, allow_config_change: bool = False) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint).

    Args:
      config: an ml_collections config from ``configs/``.
      workdir: output folder (created if needed).
      allow_config_change: resume a workdir whose stored config differs.

    Returns:
      The summary written to ``workdir/summary.json``.

    Raises:
      validation.ConfigError: invalid config (before any compute).
      sadt_jax.data.DatasetError: data missing or unreadable.
      NonFiniteLossError: the loss or the state became NaN/Inf.
      Preempted: SIGTERM received (a checkpoint was saved first).
      checkpointing.CheckpointError: checkpoints exist in ``workdir`` but none is readable.
    """
    with _Preemption() as preemption:
        return _train_and_evaluate(config, workdir, allow_config_change, preemption)


def _train_and_evaluate(config, workdir, allow_config_change, preemption) -> dict:
    t_start = time.time()
    workdir = os.path.abspath(workdir)
    validation.validate_config(config)
    protocol.validate_config(config)  # [protocol hook]
    sadt_config = builders.resolve_sadt_config(config)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    validation.guard_workdir(config, workdir, allow_change=allow_config_change)
    validation.validate_against_model(config, sadt_config)

    # ---- Data ------------------------------------------------------------------
    ds = protocol.load_data(config)  # [protocol hook] release_split
    validation.validate_against_data(config, ds.num_train, sadt_config)
    protocol.validate_against_data(config, ds.num_train)  # [protocol hook]
    steps_per_epoch = protocol.steps_per_epoch(config, ds.num_train)  # [protocol hook]
    mean, std = protocol.normalization(config, ds)  # [protocol hook]
    total_steps = builders.num_train_steps(config, steps_per_epoch)
    num_epochs = builders.steps_to_epochs(total_steps, steps_per_epoch)

    # ---- Model, optimizer, state ------------------------------------------------
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))
    model = builders.build_model(config, ds.num_classes)
    tx = builders.build_optimizer(config, steps_per_epoch)
    _, _, aug_key = builders.run_keys(config)
    init_fn = functools.partial(builders.init_state, config, model, ds.image_shape, tx, sadt_config)
    state = jax.jit(init_fn, out_shardings=replicated)()
    # jit, not device_put: a device_put of local arrays to a multi-process sharding
    # makes arrays that orbax cannot save.
    zero_sums = jax.jit(steps.init_metric_sums, out_shardings=replicated)
    reset_optimizer = protocol.make_optimizer_reset(config, replicated)  # [protocol hook]
    sums = zero_sums()

    # ---- Resume ------------------------------------------------------------------
    ckpt = None
    meta: dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "train_time_s": 0.0}
    if config.ckpt.enabled:
        ckpt = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            max_to_keep=config.ckpt.max_to_keep,
            async_save=config.ckpt.async_save,
        )
        restored = ckpt.restore(abstract_like({"state": state, "metrics": sums}))
        if restored is not None:
            tree, meta, ckpt_step = restored
            state, sums = tree["state"], tree["metrics"]
            if is_main:
                print(
                    f"Resuming from the checkpoint at step {ckpt_step} (epoch "
                    f"{meta['epoch'] + 1}, after {meta['step_in_epoch']} of its steps)",
                    flush=True,
                )

    metrics_path = os.path.join(workdir, "metrics.jsonl")
    timing_path = os.path.join(workdir, "timing.jsonl")
    history = [r for r in _read_jsonl(metrics_path) if r["epoch"] <= meta["epoch"]]
    timing = [r for r in _read_jsonl(timing_path) if r["epoch"] <= meta["epoch"]]
    selection = Selection(config, workdir)  # [protocol hook] selection slot + workdir/best
    selection.start(state, jax.jit(init_fn, out_shardings=replicated), history)
    if is_main:  # drop lines written after the checkpoint we resumed from
        _rewrite_jsonl(metrics_path, history)
        _rewrite_jsonl(timing_path, timing)
        _write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())

    preprocess_kwargs = dict(
        augment_name=config.data.augment,
        mean=mean,
        std=std,
        num_classes=ds.num_classes,
        cutmix_alpha=config.data.cutmix_alpha,
        cutmix_box=config.data.get("cutmix_box", "reference"),
    )
    train_step = steps.make_train_step(
        sadt_config, aug_key=aug_key, state_sharding=replicated, **preprocess_kwargs
    )
    base_step = None
    if config.teacher_every > 1:  # cheap steps between teacher steps
        base_cfg = builders.method_config("base")
        base_step = steps.make_train_step(
            base_cfg, aug_key=aug_key, state_sharding=replicated, **preprocess_kwargs
        )
    eval_fn = jax.jit(lambda s, b: steps.eval_sums(s, b, mean=mean, std=std))

    writer = writers.create_writer(workdir, is_main=is_main)  # TensorBoard without TensorFlow
    report = writers.ProgressReporter(writer)

    step = int(jax.device_get(state.step))
    train_time = float(meta["train_time_s"])
    data_time = 0.0
    best = meta.get("best") or {"val_loss": float("inf")}
    if is_main:
        print(
            f"Training {config.method} on {config.data.name} ({ds.num_train} train / "
            f"{ds.num_val} val / {ds.num_test} test), model {config.model.name}, "
            f"{num_epochs} epochs x {steps_per_epoch} steps, global batch {config.batch_size}, "
            f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
            f"{jax.process_count()} process(es)",
            flush=True,
        )

    checked_step = step  # the loss and the state were finite after this step

    def diverged(last_step: int) -> NonFiniteLossError:
        good = ckpt.latest_step() if ckpt is not None else None
        where = f"step {good} in {ckpt.directory}" if good is not None else "none"
        return NonFiniteLossError(
            f"training diverged: non-finite loss or parameters at step {last_step} "
            f"(finite up to step {checked_step}); no checkpoint of it was written; "
            f"last good checkpoint: {where}; lower optim.learning_rate or sadt.rho"
        )

    def save(epoch: int, step_in_epoch: int) -> bool:
        """Checkpoints the current position; ``False`` when checkpoints are off."""
        if ckpt is None:
            return False
        if ckpt.latest_step() == step:  # already on disk (e.g. SIGTERM after an epoch end)
            return True
        meta_out = {
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "train_time_s": train_time,
            "best": best,
            "global_step": step,
        }
        try:
            ckpt.save(step, {"state": state, "metrics": sums}, meta_out)
        except NonFiniteStateError:
            raise diverged(step) from None
        if is_main:
            print(f"checkpoint saved at step {step}", flush=True)
        return True

    try:
        if preemption.requested():
            raise Preempted(
                "SIGTERM before training started, nothing new to save; "
                "rerun the same command to resume"
            )
        for epoch in range(int(meta["epoch"]), num_epochs):
            plan = protocol.epoch_plan(config, ds.num_train, epoch)  # [protocol hook]
            start_in_epoch = int(meta["step_in_epoch"]) if epoch == meta["epoch"] else 0
            if reset_optimizer is not None and start_in_epoch == 0:  # [protocol hook]
                state = reset_optimizer(state)
            epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
            t_epoch = time.time()
            for s in range(start_in_epoch, epoch_steps):
                if preemption.stop_at(step):
                    train_time += time.time() - t_epoch
                    if not save(epoch, s):
                        raise Preempted(
                            f"SIGTERM at step {step}; nothing saved (ckpt.enabled is False)"
                        )
                    ckpt.wait()
                    raise Preempted(
                        f"SIGTERM: checkpoint saved at step {step} (epoch {epoch + 1}, "
                        f"{s}/{epoch_steps} steps done) in {ckpt.directory}; "
                        "rerun the same command to resume"
                    )
                t0 = time.time()
                local = protocol.local_batch(ds, plan[s])  # [protocol hook]
                batch = {
                    k: jax.make_array_from_process_local_data(data_sharding, v)
                    for k, v in local.items()
                }
                data_time += time.time() - t0
                fn = train_step
                if base_step is not None and step % config.teacher_every:
                    fn = base_step
                state, sums = fn(state, sums, batch)
                step += 1
                report(step, time.time())
                if step % config.log_every_steps == 0 or s == epoch_steps - 1:
                    host = jax.device_get(sums)
                    n = max(float(host["count"]), 1.0)
                    if not (np.isfinite(host["loss"]) and all_finite(state)):
                        raise diverged(step)
                    checked_step = step
                    if is_main:
                        elapsed = train_time + time.time() - t_epoch
                        done = step - (meta.get("global_step") or 0)
                        rate = done / max(time.time() - t_epoch + 1e-9, 1e-9) if s >= 0 else 0
                        eta = (total_steps - step) / max(rate, 1e-9)
                        print(
                            f"epoch {epoch + 1}/{num_epochs} step {s + 1}/{epoch_steps} "
                            f"loss {host['loss'] / n:.4f} acc {host['accuracy'] / n:.4f} "
                            f"| {rate:.2f} steps/s, elapsed {_fmt_time(elapsed)}, "
                            f"ETA {_fmt_time(eta)}",
                            flush=True,
                        )
            jax.block_until_ready(state)
            train_time += time.time() - t_epoch
            meta["global_step"] = step

            # ---- End of epoch: train averages, evaluation, logs, checkpoint --------
            host = jax.device_get(sums)
            n = max(float(host["count"]), 1.0)
            train_avg = {f"train_{k}": float(v) / n for k, v in host.items() if k != "count"}
            t_eval = time.time()
            row: dict[str, Any] = {"epoch": epoch + 1, "step": step, **train_avg}
            if ds.num_val:  # [protocol hook] batches of batch_size for selection.loss=last_batch
                val = protocol.evaluate(
                    eval_fn,
                    state,
                    ds.val_images,
                    ds.val_labels,
                    protocol.validation_batch_size(config),
                    data_sharding,
                )
                row.update({"val_loss": val["loss"], "val_accuracy": val["accuracy"]})
                if config.get("selection", {}).get("loss", "full") == "last_batch":
                    row["val_selection_loss"] = val["last_batch_loss"]
            test = _evaluate(
                eval_fn,
                state,
                ds.test_images,
                ds.test_labels,
                config.eval_batch_size,
                data_sharding,
            )
            row.update({"test_loss": test["loss"], "test_accuracy": test["accuracy"]})
            eval_time = time.time() - t_eval
            key = row.get("val_loss", row["test_loss"])
            if key < best["val_loss"]:
                best = {
                    "epoch": epoch + 1,
                    "val_loss": key,
                    "val_accuracy": row.get("val_accuracy"),
                    "test_loss": row["test_loss"],
                    "test_accuracy": row["test_accuracy"],
                }
            history.append(row)
            selection.update(epoch + 1, row, state)  # [protocol hook] before the checkpoint
            timing.append(
                {
                    "epoch": epoch + 1,
                    "train_time_s": train_time,
                    "epoch_time_s": time.time() - t_epoch - eval_time,
                    "eval_time_s": eval_time,
                    "data_time_s": data_time,
                }
            )
            data_time = 0.0
            writer.write_scalars(step, {k: v for k, v in row.items() if k not in ("epoch", "step")})
            writer.flush()
            if is_main:
                _rewrite_jsonl(metrics_path, history)
                _rewrite_jsonl(timing_path, timing)
                msg = (
                    f"epoch {epoch + 1}/{num_epochs} done: train loss {row['train_loss']:.4f} "
                    f"acc {row['train_accuracy']:.4f}"
                )
                if "val_accuracy" in row:
                    msg += f" | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}"
                msg += (
                    f" | test acc {row['test_accuracy']:.4f} | "
                    f"{timing[-1]['epoch_time_s']:.1f} s train, {eval_time:.1f} s eval"
                )
                print(msg, flush=True)
            sums = zero_sums()
            if config.ckpt.enabled and (
                (epoch + 1) % config.ckpt.every_epochs == 0 or epoch + 1 == num_epochs
            ):
                save(epoch + 1, 0)
            meta["epoch"], meta["step_in_epoch"] = epoch + 1, 0

        # [protocol hook] test the selected weights
        selected = selection.test(
            lambda st: _evaluate(
                eval_fn, st, ds.test_images, ds.test_labels, config.eval_batch_size, data_sharding
            ),
            state,
        )
    finally:
        if ckpt is not None:
            ckpt.close()
        selection.close()
        writer.close()
    summary = _summary(
        config, sadt_config, history, timing, best, steps_per_epoch, total_steps, t_start
    )
    summary["selected"] = selected  # [protocol hook]
    if is_main:
        _write_json_atomic(os.path.join(workdir, "summary.json"), summary)
        _print_summary(summary, workdir)
    return summary


def _summary(config, sadt_config, history, timing, best, steps_per_epoch, total_steps, t_start):
    thresholds = {}
    times = {r["epoch"]: r["train_time_s"] for r in timing}
    acc_key = "val_accuracy" if history and "val_accuracy" in history[0] else "test_accuracy"
    for thr in config.accuracy_thresholds:
        hit = next((r for r in history if r[acc_key] >= thr), None)
        thresholds[f"{thr:g}"] = (
            None
            if hit is None
            else {"epoch": hit["epoch"], "train_time_s": times.get(hit["epoch"])}
        )
    last = history[-1] if history else {}
    epoch_times = [r["epoch_time_s"] for r in timing]
    data_times = [r["data_time_s"] for r in timing]
    return {
        "method": config.method,
        "dataset": config.data.name,
        "model": config.model.name,
        "seed": config.seed,
        "epochs": len(history),
        "steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "final": {
            k: last.get(k) for k in ("val_loss", "val_accuracy", "test_loss", "test_accuracy")
        },
        "best_val": best,
        "thresholds_on": acc_key,
        "thresholds": thresholds,
        "train_time_s": timing[-1]["train_time_s"] if timing else 0.0,
        "median_epoch_time_s": float(np.median(epoch_times)) if epoch_times else None,
        "data_time_fraction": (sum(data_times) / max(sum(epoch_times), 1e-9))
        if epoch_times
        else None,
        "wall_clock_this_process_s": time.time() - t_start,
        "sadt_config": builders.sadt_config_dict(sadt_config),
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

    lines = [
        "",
        f"== Summary: {summary['method']} on {summary['dataset']} ({summary['model']}), "
        f"{summary['epochs']} epochs, seed {summary['seed']} ==",
        f"  final test accuracy          {pct(f['test_accuracy'])} %",
        f"  best-val epoch {b.get('epoch')}: test accuracy {pct(b.get('test_accuracy'))} % "
        f"(val loss {b.get('val_loss', float('nan')):.4f})",
        _selected_line(summary.get("selected")),  # [protocol hook]
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
