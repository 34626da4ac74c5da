"""Reading our tags back from TensorBoard event files (TensorBoard's own reader) and ``alerts.jsonl``.

Nothing here imports the user's code: a run is only its directory of event files.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning_watch.alerts.alert import JSONL_NAME
from lightning_watch.snapshot import parse_tag
from lightning_watch.views.history import History

EVENT_MARKER = "events.out.tfevents"
ALERTS_NAME = JSONL_NAME  # written by lightning_watch/alerts/sinks.py

Progress = Callable[[str], None]


class NoRunsError(ValueError):
    """The directory holds no TensorBoard event file."""


@dataclass
class RunData:
    """The scalars of one run directory, its alerts, and the files that could not be read.

    Attributes:
        path: the run directory.
        scalars: ``tag -> [(step, value), ...]`` sorted by step (our ``watch/...`` tags and any other).
        alerts: records of ``alerts.jsonl`` (dicts; unknown fields kept).
        skipped: ``(file, reason)`` for every event file or alert line skipped.
    """

    path: str
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def watch_tags(self) -> list[str]:
        """Our scalar tags (either layout), in the order first written."""
        return [tag for tag in self.scalars if parse_tag(tag) is not None]

    def history(self, maxlen: int = 256) -> History:
        """Feed our per-module tags into a :class:`History`, step by step, modules in written order."""
        hist = History(maxlen=maxlen)
        per_metric: dict[str, list[tuple[str, list[tuple[int, float]]]]] = {}
        for tag, points in self.scalars.items():  # tags in the order first written: registration order
            parsed = parse_tag(tag)
            if parsed is not None and parsed[1] is not None:
                per_metric.setdefault(parsed[0], []).append((parsed[1], points))
            elif parsed is not None and points:  # whole-model values count as a logged step too
                hist.last_step = max(hist.last_step, max(int(step) for step, _ in points))
        for metric in hist.metrics:
            hist.merge_order(module for module, _ in per_metric.get(metric, []))
        for metric, series in per_metric.items():
            for module, points in series:
                for step, value in points:
                    hist.add(metric, module, step, value)
        return hist


def find_runs(logdir: str) -> list[str]:
    """Directories under ``logdir`` (itself included) that hold an event file, sorted.

    Raises:
        NoRunsError: if ``logdir`` is not a directory or holds no event file.
    """
    if not os.path.isdir(logdir):
        raise NoRunsError(f"`logdir` must be a directory of TensorBoard runs, got {logdir!r} (not a directory).")
    runs = sorted(root for root, _dirs, files in os.walk(logdir) if any(EVENT_MARKER in name for name in files))
    if not runs:
        raise NoRunsError(
            f"`logdir` must hold at least one TensorBoard run (a directory with an {EVENT_MARKER}.* file), "
            f"got {logdir!r}: none found."
        )
    return runs


def check_event_file(path: str) -> str | None:
    """Why ``path`` is corrupt (a bad record length or checksum), or ``None`` if every record is sound.

    A record cut short at the end is not corruption: a running job may be writing it.
    """
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    try:
        with open(path, "rb") as f:
            offset = 0
            while True:
                header = f.read(12)
                if len(header) < 12:
                    return None
                (length,) = struct.unpack("<Q", header[:8])
                (length_crc,) = struct.unpack("<I", header[8:])
                if masked_crc32c(header[:8]) != length_crc:
                    return f"bad record header checksum at byte {offset}"
                data = f.read(length)
                footer = f.read(4)
                if len(data) < length or len(footer) < 4:
                    return None
                if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                    return f"bad record checksum at byte {offset}"
                offset += 12 + length + 4
    except OSError as err:
        return f"cannot read: {err}"


def read_run(run_dir: str, progress: Progress | None = None) -> RunData:
    """Read every event file of ``run_dir`` (not its subdirectories) and its ``alerts.jsonl``.

    A corrupt event file is reported through ``progress`` and in ``RunData.skipped``, then skipped.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    say = progress or (lambda _msg: None)
    run = RunData(path=run_dir)
    files = sorted(n for n in os.listdir(run_dir) if EVENT_MARKER in n)
    merged: dict[str, dict[int, float]] = {}
    for i, name in enumerate(files, 1):
        path = os.path.join(run_dir, name)
        say(f"reading {i}/{len(files)}: {path}")
        reason = check_event_file(path)
        if reason is not None:
            run.skipped.append((path, reason))
            say(f"skipping corrupt event file {path}: {reason}")
            continue
        try:
            acc = EventAccumulator(path, size_guidance={"scalars": 0, "images": 1, "histograms": 1, "tensors": 1})
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                points = merged.setdefault(tag, {})
                for event in acc.Scalars(tag):
                    points[int(event.step)] = float(event.value)  # a resumed run rewrites a step: keep the last
        except Exception as err:  # the reader's own failure on one file must not stop the others
            run.skipped.append((path, f"{type(err).__name__}: {err}"))
            say(f"skipping unreadable event file {path}: {type(err).__name__}: {err}")
    run.scalars = {tag: sorted(points.items()) for tag, points in merged.items()}
    run.alerts = read_alerts(os.path.join(run_dir, ALERTS_NAME), run.skipped)
    return run


def read_alerts(path: str, skipped: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """Records of an ``alerts.jsonl`` (missing file: none; a bad line is skipped and noted)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                if skipped is not None:
                    skipped.append((f"{path}:{lineno}", f"not JSON: {err.msg}"))
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
