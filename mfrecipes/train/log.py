"""Run logging: metrics.jsonl (the record), a rich progress bar and console lines, TensorBoard."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

METRICS = "metrics.jsonl"


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep the fact readable
    return v


def truncate_metrics(run_dir: str, images: int) -> None:
    """Drop records past ``images`` (a resumed run rewrites what came after its checkpoint)."""
    path = os.path.join(run_dir, METRICS)
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("images", 0) <= images:
                kept.append(json.dumps(rec))
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(k + "\n" for k in kept))
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file (missing file: none; a line cut by a crash: skipped)."""
    out = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out



class RunLogger:
    """Writes records to metrics.jsonl (and TensorBoard if installed) and shows progress."""

    def __init__(self, run_dir: str, total_images: int, start_images: int, *,
                 enabled: bool = True, progress_bar: bool = True):
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.path = os.path.join(run_dir, METRICS)
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except Exception:  # noqa: BLE001 - TensorBoard is optional
                self._tb = None
        self._progress = None
        if enabled and progress_bar and self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("img"), TimeElapsedColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"), console=self.console, transient=False)
            self._task = self._progress.add_task("train", total=total_images,
                                                 completed=start_images, status="")
            self._progress.start()
        self._t0 = time.time()
        self._total, self._start = total_images, start_images

    def _clock(self, images: int) -> str:
        """``elapsed 0:01:05  eta 0:10:00`` from this process's rate (for non-terminal logs)."""
        elapsed = time.time() - self._t0
        done = images - self._start
        eta = (self._total - images) * elapsed / done if done > 0 else float("nan")
        return f"elapsed={_hms(elapsed)}  eta={_hms(eta)}"

    def log(self, record: dict[str, Any], *, echo: bool = True) -> None:
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        record.setdefault("time", round(time.time(), 3))  # wall clock, seconds since the epoch
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record.get("images", 0))
            for k, v in record.items():
                if k not in ("images", "step", "time") and isinstance(v, (int, float)) \
                        and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        if echo:
            # v_loss and u_err move; the adaptive-weighted loss sits near 1 for a whole run.
            shown = "  ".join(f"{_SHORT.get(k, k)}={_fmt(v)}" for k, v in record.items()
                              if k in _SHOWN or k.startswith("eval/"))
            if self._progress is None and "img_per_s" in record:  # cluster logs: no bar
                shown += "  " + self._clock(int(record.get("images", 0)))
            self.console.print(shown, highlight=False)

    def image(self, tag: str, image, images: int) -> None:
        """An ``[H, W, 3]`` uint8 picture (a labelled sample grid) into TensorBoard."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image, images, dataformats="HWC")

    def advance(self, images: int, status: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=images, status=status)

    def info(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


_SHOWN = ("images", "obj/v_loss", "obj/u_err", "loss", "grad_norm", "img_per_s")
_SHORT = {"obj/v_loss": "v_loss", "obj/u_err": "u_err"}


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
