"""Metric writers that need no TensorFlow: TensorBoard event files and a progress rate.

TensorBoard reads *event files*: ``Event`` protocol buffers in TFRecord framing. The
``tensorboard`` package ships both the protos and the record writer, so the event files are
written here with it alone, never importing TensorFlow (which takes seconds, prints its
oneDNN banner, and is absent from many accelerator images). Without the ``tensorboard``
package the event files are skipped with one line on stdout; the run's metrics are in
``metrics.jsonl`` either way.

The writers follow clu's ``MetricWriter`` interface (``write_scalars``, ``flush``,
``close``), so code written for clu's writers works with them.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["ProgressReporter", "ScalarWriter", "create_writer"]

log = logging.getLogger(__name__)

#: Printed once when the ``tensorboard`` package cannot be imported.
SKIPPED_LINE = (
    "TensorBoard event files skipped: the tensorboard package is not installed "
    "(`pip install tensorboard` to get them); metrics.jsonl holds every metric"
)


def _event_file_writer(logdir: str):
    """``(record_writer, file, event_pb2, summary_pb2)``, or ``None`` without tensorboard."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:
        return None
    os.makedirs(logdir, exist_ok=True)
    # TensorFlow's naming: events.out.tfevents.<time>.<host>.<pid>.<uid>.v2
    name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0.v2"
    f = open(os.path.join(logdir, name), "wb")  # noqa: SIM115 - closed by ScalarWriter.close
    writer = RecordWriter(f)
    first = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
    writer.write(first.SerializeToString())
    return writer, f, event_pb2, summary_pb2


class ScalarWriter:
    """Scalars to TensorBoard event files in ``logdir`` (if given) and to the log.

    Args:
      logdir: folder of the event file; ``None`` writes to the log only (e.g. on the
        processes other than process 0).
    """

    def __init__(self, logdir: str | None):
        self._tb = None if logdir is None else _event_file_writer(logdir)
        self.skipped = logdir is not None and self._tb is None

    @property
    def writes_events(self) -> bool:
        """Whether scalars go to a TensorBoard event file."""
        return self._tb is not None

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Writes ``{tag: value}`` at ``step`` (values convertible to ``float``)."""
        values = {k: float(v) for k, v in scalars.items() if v is not None}
        log.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in values.items()))
        if self._tb is None:
            return
        writer, _, event_pb2, summary_pb2 = self._tb
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
        )
        event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
        writer.write(event.SerializeToString())

    def flush(self) -> None:
        """Flushes the event file to disk."""
        if self._tb is not None:
            self._tb[0].flush()

    def close(self) -> None:
        """Flushes and closes the event file; later writes go to the log only."""
        if self._tb is not None:
            self._tb[0].close()
            self._tb = None


def create_writer(workdir: str, *, is_main: bool = True) -> ScalarWriter:
    """The training loop's writer: event files in ``workdir`` on the main process.

    Prints one line when the ``tensorboard`` package is missing (main process only).

    Args:
      workdir: the run's output folder.
      is_main: whether this is process 0 (only it writes files).

    Returns:
      A :class:`ScalarWriter`.
    """
    writer = ScalarWriter(workdir if is_main else None)
    if writer.skipped:
        print(SKIPPED_LINE, flush=True)
    return writer


class ProgressReporter:
    """Writes ``steps_per_sec`` every ``every_secs`` seconds (what clu's ReportProgress did).

    Call it after every step: ``report(step, time.time())``.

    Args:
      writer: a :class:`ScalarWriter`.
      every_secs: minimum wall time between two reports.
    """

    def __init__(self, writer: ScalarWriter, every_secs: float = 60.0):
        self._writer = writer
        self._every = every_secs
        self._last: tuple[int, float] | None = None

    def __call__(self, step: int, now: float) -> None:
        if self._last is None:
            self._last = (step, now)
            return
        step0, t0 = self._last
        if now - t0 >= self._every and step > step0:
            self._writer.write_scalars(step, {"steps_per_sec": (step - step0) / (now - t0)})
            self._last = (step, now)
