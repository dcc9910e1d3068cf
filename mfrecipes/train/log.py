"""Run logging: the console and progress bar, and the metric backends a recipe names in
``train.loggers`` (registered in ``LOGGERS``): ``jsonl`` (metrics.jsonl, the run's record),
``tensorboard``, ``wandb`` (optional extra) or a plugin's own."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time
import uuid
from typing import Any, Sequence

from mfrecipes.errors import RecipeError
from mfrecipes.registry import LOGGERS, logger_blocks
from mfrecipes.run.layout import METRICS

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)



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


class MetricLogger:
    """A metric backend: receives every record of the run, the sample grids, then ``close()``.

    A record is a flat JSON-ready mapping with ``images`` (the x axis), ``step`` and ``time``
    (wall clock, seconds since the epoch); non-finite numbers arrive as the strings "nan"/"inf".
    A backend is built with only the runtime arguments it names (``run_dir``).
    """

    def log(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def log_image(self, tag: str, image, step: int) -> None:
        """An ``[H, W, 3]`` uint8 array (a labelled sample grid) at ``step`` images."""

    def close(self) -> None:
        pass

    # (module, extra): the package the backend imports and the mfrecipes extra that installs it
    requires: tuple[str, str] | None = None

    @classmethod
    def missing(cls) -> str | None:
        """Why this backend cannot run here (a missing package), or None; ``mfr check`` asks."""
        if cls.requires is None or importlib.util.find_spec(cls.requires[0]) is not None:
            return None
        module, extra = cls.requires
        name = next((n for n in LOGGERS.names() if LOGGERS.get(n) is cls), cls.__name__)
        return (f"logger {name!r} needs the {module} package, an optional "
                f"extra: pip install 'mfrecipes[{extra}]' (or drop it from train.loggers)")

    @classmethod
    def require(cls) -> None:
        """Raise the ``missing`` reason as a recipe error (a backend's constructor calls it)."""
        why = cls.missing()
        if why:
            raise RecipeError(why, path="train.loggers")


def _warning(record: dict[str, Any]) -> str | None:
    """The text of a warning record (``RunLogger.warning``), else None."""
    text = record.get("warning")
    return text if isinstance(text, str) else None


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The plottable figures of a record (the axes and strings such as a stage name left out)."""
    return {k: v for k, v in record.items() if k not in ("images", "step", "time")
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


@LOGGERS.register("jsonl")
class JsonlLogger(MetricLogger):
    """metrics.jsonl in the run directory: one JSON line per record (resume and tools read it)."""

    def __init__(self, *, run_dir: str):
        self.path = os.path.join(run_dir, METRICS)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a crash keeps every record written so far

    def close(self) -> None:
        self._file.close()


@LOGGERS.register("tensorboard")
class TensorBoardLogger(MetricLogger):
    """TensorBoard event files in RUN_DIR/tensorboard: scalars against images seen, grids, and
    the run's warnings as text (tag ``warnings``)."""

    requires = ("tensorboard", "tensorboard")

    def __init__(self, *, run_dir: str):
        self.require()
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("images", 0))
        for k, v in _scalars(record).items():
            self._tb.add_scalar(k, v, step)
        text = _warning(record)
        if text is not None:
            self._tb.add_text("warnings", text, step)

    def log_image(self, tag: str, image, step: int) -> None:
        self._tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        self._tb.close()


@LOGGERS.register("wandb")
class WandbLogger(MetricLogger):
    """Weights & Biases, the optional ``wandb`` extra; WANDB_MODE=offline needs no network.

    Install it with ``pip install 'mfrecipes[wandb]'``. Files go to RUN_DIR/wandb unless WANDB_DIR says otherwise. The wandb run id is kept in
    RUN_DIR/wandb_run_id, so a resumed run continues the same wandb run. Charts use ``images``
    as their x axis (wandb's own step only counts calls).
    """

    def __init__(self, project: str | None = None, entity: str | None = None,
                 name: str | None = None, tags: Sequence[str] = (), *, run_dir: str):
        self.require()
        import wandb

        self._wandb = wandb
        id_path = os.path.join(run_dir, "wandb_run_id")
        if os.path.isfile(id_path):
            with open(id_path, encoding="utf-8") as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # wandb ids: lower-case letters and digits
            with open(id_path, "w", encoding="utf-8") as f:
                f.write(run_id + "\n")
        wandb_dir = os.environ.get("WANDB_DIR") or os.path.join(run_dir, "wandb")
        os.makedirs(wandb_dir, exist_ok=True)
        self._run = wandb.init(project=project, entity=entity,
                               name=name or os.path.basename(os.path.abspath(run_dir)),
                               tags=list(tags) or None, dir=wandb_dir, id=run_id,
                               resume="allow")
        self._run.define_metric("images")
        self._run.define_metric("*", step_metric="images")

    requires = ("wandb", "wandb")

    def log(self, record: dict[str, Any]) -> None:
        figures = _scalars(record)
        text = _warning(record)
        if text is not None:     # a text column in the run's history, beside the figures
            figures["warning"] = text
        if figures:
            self._run.log({"images": int(record.get("images", 0)), **figures})

    def log_image(self, tag: str, image, step: int) -> None:
        self._run.log({"images": int(step), tag: self._wandb.Image(image)})

    def close(self) -> None:
        self._run.finish()


class RunLogger:
    """Sends records to the run's metric backends (``train.loggers``) and shows progress."""

    def __init__(self, run_dir: str, total_images: int, start_images: int, *,
                 enabled: bool = True, progress_bar: bool = True,
                 loggers: Sequence[Any] | None = None):
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.path = os.path.join(run_dir, METRICS)
        self.backends: list[MetricLogger] = []
        if enabled:
            try:
                for path, block in logger_blocks(loggers):
                    self.backends.append(LOGGERS.build(block, where=path, run_dir=run_dir))
            except BaseException:
                self.close()  # the backends already opened keep what they wrote
                raise
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
        for backend in self.backends:
            backend.log(record)
        if echo:
            # v_loss and u_err move; the adaptive-weighted loss sits near 1 for a whole run.
            shown = "  ".join(f"{_SHORT.get(k, k)}={_fmt(v)}" for k, v in record.items()
                              if k in _SHOWN or k.startswith("eval/"))
            if self._progress is None and "img_per_s" in record:  # cluster logs: no bar
                shown += "  " + self._clock(int(record.get("images", 0)))
            self.console.print(shown, highlight=False)

    def image(self, tag: str, image, images: int) -> None:
        """An ``[H, W, 3]`` uint8 picture (a labelled sample grid) to every backend."""
        if self.enabled:
            for backend in self.backends:
                backend.log_image(tag, image, images)

    def advance(self, images: int, status: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=images, status=status)

    def info(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def warning(self, text: str, *, images: int | None = None, step: int | None = None) -> None:
        """``warning: text`` on the console and, when ``images`` is given, one record
        ``{images, step, warning}`` to every backend (metrics.jsonl keeps it, TensorBoard shows
        it as text under ``warnings``, wandb as a ``warning`` column of the run's history)."""
        if not self.enabled:
            return
        self.console.print(f"warning: {text}", highlight=False)
        if images is not None:
            record = {"images": int(images), "warning": text}
            if step is not None:
                record["step"] = int(step)
            self.log(record, echo=False)

    def close(self) -> None:
        if getattr(self, "_progress", None) is not None:
            self._progress.stop()
        backends, self.backends = self.backends, []
        failure = None
        for backend in backends:  # one failing backend does not keep the others open
            try:
                backend.close()
            except Exception as err:  # noqa: BLE001 - re-raised below
                failure = failure or err
        if failure is not None:
            raise failure


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
