"""PNG figures: sample grids, 2-D scatter plots, convergence curves.

Every file is written atomically (a temporary file in the same folder, then ``os.replace``), so a
run killed mid-write never leaves a truncated PNG. matplotlib is used through its Agg canvas
directly (no pyplot, no display, no global state).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["images_to_uint8", "save_image_grid", "labelled_grid", "save_scatter", "save_samples",
           "save_curves", "save_sweep"]

PathLike = Union[str, os.PathLike]


def _atomic_target(path: PathLike) -> tuple[Path, Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _commit(tmp: Path, path: Path) -> Path:
    os.replace(tmp, path)
    return path


def images_to_uint8(x: torch.Tensor) -> np.ndarray:
    """``x [N, C, H, W]`` in [-1, 1] -> ``[N, H, W, C]`` uint8 via ``clip(127.5 x + 128)``
    (mfrecipes/METHOD.md, section 10)."""
    x = x.detach().to("cpu", torch.float32)
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_image_grid(x: torch.Tensor, path: PathLike, nrow: Optional[int] = None,
                    upscale: Optional[int] = None, *, min_cell: int = 32, pad: int = 2,
                    pad_value: int = 128) -> Path:
    """Write ``x [N, C, H, W]`` in [-1, 1] (C = 1 grey or 3 RGB) as one PNG grid.

    ``nrow`` images per row (default ceil(sqrt(N))). Cells are enlarged by nearest-neighbour
    ``upscale`` (default: the smallest integer factor that makes a cell at least ``min_cell``
    pixels, so 8x8 digits become 32x32), separated by ``pad`` pixels of grey ``pad_value``.
    """
    from PIL import Image

    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"save_image_grid expects a non-empty [N, C, H, W] batch with C = 1 or 3 "
                         f"(decode latents first), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if upscale is None:
        upscale = max(1, math.ceil(min_cell / min(h, w)))
    img = images_to_uint8(x)                                            # [N, H, W, C]
    img = img.repeat(upscale, axis=1).repeat(upscale, axis=2)           # nearest-neighbour
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_rows = math.ceil(n / nrow)
    ch, cw = h * upscale, w * upscale
    grid = np.full((pad + ncol_rows * (ch + pad), pad + nrow * (cw + pad), c), pad_value, np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = pad + r * (ch + pad), pad + k * (cw + pad)
        grid[top:top + ch, left:left + cw] = img[i]
    pil = Image.fromarray(grid[..., 0] if c == 1 else grid)            # mode L (grey) or RGB
    path, tmp = _atomic_target(path)
    pil.save(tmp, format="PNG")
    return _commit(tmp, path)


def labelled_grid(x: torch.Tensor, *, title: str, labels: Optional[Sequence[int]] = None,
                  class_names: Optional[Sequence[str]] = None, ncol: Optional[int] = None,
                  min_cell: int = 32) -> np.ndarray:
    """A grid ``[H, W, 3]`` uint8 of ``x [N, C, H, W]`` in [-1, 1] (``torchvision.utils.
    make_grid``) under a title line, with each column headed by its class when ``labels`` (one
    per image) repeat with period ``ncol`` (as ``labels="balanced"`` draws them)."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"labelled_grid expects a non-empty [N, C, H, W] batch with C = 1 or 3, "
                         f"got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    up = max(1, math.ceil(min_cell / min(h, w)))
    img = torch.from_numpy(images_to_uint8(x)).permute(0, 3, 1, 2)          # [N, C, H, W] uint8
    img = img.repeat_interleave(up, 2).repeat_interleave(up, 3)             # nearest-neighbour
    if c == 1:
        img = img.expand(-1, 3, -1, -1)
    ncol = ncol or math.ceil(math.sqrt(n))
    pad = 2
    grid = make_grid(img, nrow=ncol, padding=pad, pad_value=128).permute(1, 2, 0).numpy()
    font = ImageFont.load_default()
    line = 14
    head = line + 6 + (line if labels is not None else 0)
    width = max(grid.shape[1], 8 * len(title) + 8)
    canvas = Image.new("RGB", (width, grid.shape[0] + head), "white")
    canvas.paste(Image.fromarray(np.ascontiguousarray(grid)), (0, head))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), title, fill="black", font=font)
    if labels is not None:
        cell = w * up + pad
        for k in range(min(ncol, n)):
            cls = int(labels[k])
            text = class_names[cls] if class_names and cls < len(class_names) else str(cls)
            draw.text((pad + k * cell + cell // 2 - 3 * len(text), line + 4), text, fill="black",
                      font=font)
    return np.asarray(canvas)


def save_labelled_grid(x: torch.Tensor, path: PathLike, **kwargs) -> Path:
    """:func:`labelled_grid` written as a PNG (atomically)."""
    return save_png(labelled_grid(x, **kwargs), path)


def save_png(arr: np.ndarray, path: PathLike) -> Path:
    """An ``[H, W, 3]`` uint8 array as a PNG, atomically."""
    from PIL import Image

    path, tmp = _atomic_target(path)
    Image.fromarray(np.asarray(arr)).save(tmp, format="PNG")
    return _commit(tmp, path)


def _new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, path: PathLike) -> Path:
    path, tmp = _atomic_target(path)
    fig.savefig(tmp, format="png", bbox_inches="tight")
    return _commit(tmp, path)


def save_scatter(points: torch.Tensor, path: PathLike, reference: Optional[torch.Tensor] = None,
                 title: Optional[str] = None, *,
                 limits: Optional[tuple[float, float]] = None,
                 labels: Optional[Sequence[int]] = None,
                 class_names: Optional[Sequence[str]] = None) -> Path:
    """Scatter ``points [N, 2]`` (and ``reference [M, 2]`` underneath, in grey) to a PNG.

    Both axes share ``limits`` (default: a square covering both sets with a 5 % margin), so the
    two sets and successive figures of one run are drawn on the same scale. ``labels`` (one
    class per point, a conditional model's): each class in its own colour, named in the legend
    (``class_names``, else the class number).
    """
    p = np.asarray(torch.as_tensor(points).detach().cpu().float().numpy()).reshape(-1, 2)
    ref = None if reference is None else (
        np.asarray(torch.as_tensor(reference).detach().cpu().float().numpy()).reshape(-1, 2))
    if limits is None:
        both = p if ref is None else np.concatenate([p, ref], 0)
        both = both[np.isfinite(both).all(1)]
        lo, hi = (float(both.min()), float(both.max())) if len(both) else (-1.0, 1.0)
        margin = 0.05 * max(hi - lo, 1e-6)
        limits = (lo - margin, hi + margin)
    fig = _new_figure((5, 5))
    ax = fig.add_subplot(1, 1, 1)
    if ref is not None:
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.7", alpha=0.5, linewidths=0, label="reference")
    if labels is None:
        ax.scatter(p[:, 0], p[:, 1], s=2, c="tab:blue", alpha=0.6, linewidths=0,
                   label="samples")
    else:
        from matplotlib import colormaps

        lab = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1).astype(np.int64)
        if len(lab) != len(p):
            raise ValueError(f"save_scatter: {len(lab)} labels for {len(p)} points")
        classes = sorted(set(lab.tolist()))
        # Qualitative colours with black for their grey (the reference is grey).
        colours = ([colormaps["tab10"](i) if i != 7 else "black" for i in range(10)]
                   if len(classes) <= 10 else
                   [colormaps["tab20"](i) for i in range(20) if i not in (14, 15)] + ["black"])
        for i, cls in enumerate(classes):
            name = class_names[cls] if class_names and 0 <= cls < len(class_names) else str(cls)
            sel = lab == cls
            ax.scatter(p[sel, 0], p[sel, 1], s=2, color=colours[i % len(colours)], alpha=0.7,
                       linewidths=0, label=f"class {name}")
    ax.set_xlim(*limits)
    ax.set_ylim(*limits)
    ax.set_aspect("equal")
    if ref is not None or labels is not None:
        ax.legend(loc="upper right", markerscale=4, fontsize="x-small" if labels is not None
                  else "small")
    if title:
        ax.set_title(title)
    return _save_figure(fig, path)


def save_samples(x: torch.Tensor, path: PathLike, *, modality: str, title: str,
                 labels: Optional[torch.Tensor] = None, reference: Optional[torch.Tensor] = None,
                 class_columns: Optional[int] = None,
                 decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                 ) -> Optional[np.ndarray]:
    """One picture of samples ``x`` by the data's modality, written to ``path`` (PNG); the
    training loop's evaluation and ``mfr sample`` both draw through it.

    - ``points``: a scatter over ``reference``, coloured by ``labels`` when given;
    - ``image``: a titled grid; with ``class_columns`` = the number of classes (samples drawn
      balanced: labels 0, 1, ..., k-1, 0, ...) one column per class, headed by its label;
    - ``latent``: decoded by ``decode(x) -> [N, C, H, W]`` in [-1, 1], then as ``image``.

    Returns the grid ``[H, W, 3]`` uint8 (for the metric loggers), None for points."""
    if modality == "points":
        save_scatter(x, path, reference=reference, labels=labels, title=title)
        return None
    if modality == "latent":
        if decode is None:
            raise ValueError("latent samples need a decode function (the run's VAE) for a "
                             "picture")
        x = decode(x)
    elif modality != "image":
        raise ValueError(f"no picture for samples of modality {modality!r}; valid: points, "
                         f"image, latent")
    k = class_columns
    grid = labelled_grid(x, ncol=k or None, labels=None if not k else list(range(k)),
                         title=title)
    save_png(grid, path)
    return grid


def save_curves(curves: Sequence[tuple[str, Sequence[float], Sequence[float]]], path: PathLike, *,
                xlabel: str = "images seen", ylabel: str = "metric", title: Optional[str] = None,
                logy: bool = False,
                spreads: Optional[Sequence[Optional[Sequence[float]]]] = None) -> Path:
    """Plot ``curves`` = ``[(label, xs, ys), ...]`` (e.g. FID against images seen, one curve per
    recipe) on one set of axes and write a PNG. ``spreads[i]`` (one value per point, e.g. the
    standard deviation over seeds; None for a single run) is drawn as a band around curve i."""
    fig = _new_figure((6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, xs, ys) in enumerate(curves):
        line, = ax.plot(list(xs), list(ys), marker="o", markersize=3, label=label)
        sd = spreads[i] if spreads is not None and i < len(spreads) else None
        if sd is not None and len(sd) == len(ys):
            lo = [y - d for y, d in zip(ys, sd)]
            if logy:  # a band below zero cannot be drawn on a log axis
                lo = [max(a, y * 0.05) for a, y in zip(lo, ys)]
            ax.fill_between(list(xs), lo, [y + d for y, d in zip(ys, sd)],
                            color=line.get_color(), alpha=0.18, linewidth=0)
    return _finish_axes(fig, ax, path, xlabel=xlabel, ylabel=ylabel, title=title, logy=logy,
                        entries=len(curves))


def _minor_label(v: float, _pos=None) -> str:
    """Minor log ticks: only 2 and 5 times a power of ten are labelled (no crowding near 1)."""
    import math

    if v <= 0:
        return ""
    lead = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6)
    return plain_number(v) if lead in (2.0, 5.0) else ""


def plain_number(v: float, _pos=None) -> str:
    """A tick label without scientific notation: 40k, 1.2M, 0.25, 3."""
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:g}M"
    if a >= 1e4:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def _finish_axes(fig, ax, path: PathLike, *, xlabel: str, ylabel: str, title: Optional[str],
                 logy: bool, entries: int) -> Path:
    """Labels, scale, title, legend and grid of a line plot, then write the PNG. The legend sits
    inside the axes for a few entries, beside them (outside) for many, where an inside legend
    would cover the data."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_formatter(FuncFormatter(plain_number))  # 40k, not 4e4 with an offset
    if logy:
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
        # plain labels; on a short log range the minor ticks carry them (0.2, 0.3, ...)
        ax.yaxis.set_major_formatter(FuncFormatter(plain_number))
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label) if lo > 0 and hi / lo < 30
                                     else NullFormatter())
    else:
        ax.yaxis.set_major_formatter(FuncFormatter(plain_number))
    if title:
        ax.set_title(title)
    if entries > 8:
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  ncol=1 + entries // 24)
    elif entries:
        ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return _save_figure(fig, path)


def save_sweep(series: Sequence[tuple[str, Sequence[float], Sequence[float], Sequence[float]]],
               path: PathLike, *, xlabel: str, ylabel: str = "metric",
               title: Optional[str] = None, logy: bool = False) -> Path:
    """Plot a final figure against a swept parameter: ``series`` = ``[(label, xs, means, stds),
    ...]`` (one line per setting, e.g. per data set), the spread as error bars."""
    fig = _new_figure((6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for label, xs, means, stds in series:
        ax.errorbar(list(xs), list(means), yerr=list(stds), marker="o", markersize=4,
                    capsize=3, label=label)
    return _finish_axes(fig, ax, path, xlabel=xlabel, ylabel=ylabel, title=title, logy=logy,
                        entries=len(series))
