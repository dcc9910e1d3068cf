"""FID with clean-fid's image pipeline, against reference statistics ``(mu, sigma)``.

Images are uint8 ``[N, H, W, C]`` (grey images are repeated to RGB). Each is resized the way
clean-fid does for the chosen ``mode`` (``cleanfid.resize.build_resizer``) and fed as float values
in [0, 255], NCHW, to an Inception network:

- ``legacy_tensorflow`` (the paper protocol, mfrecipes/METHOD.md, section 10, and how ADM's
  reference statistics were made): no resize outside the network; clean-fid's TorchScript Inception
  ``inception-2015-12-05.pt`` resizes inside (``forward(x, return_features=True)``).
- ``clean``: PIL bicubic resize to 299 x 299, then ``layers((x - 128) / 128)`` of the same file.
- ``legacy_pytorch``: bilinear resize to 299, pytorch-fid's Inception weights
  (``pt_inception-2015-12-05-6726825d.pth``) on ``x / 255``.

Weights are never fetched silently when a local file is known: ``--inception PATH`` or
``$MFR_INCEPTION``, then ``<cache dir>/<file>``, then clean-fid's own download location (the
system temp folder). Only if none exists is the file downloaded (into the cache dir); offline,
that fails with a message naming the URL and where to put the file.

A TorchScript file without a ``layers`` attribute is taken as a custom extractor: ``forward``
gets the resized float batch in [0, 255] and returns ``[N, D]`` (any trailing dims flattened).
The distance itself is clean-fid's ``frechet_distance``. clean-fid is imported only here.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch

from mfrecipes.errors import DataError

__all__ = ["MODES", "INCEPTION_URL", "INCEPTION_FILE", "PT_INCEPTION_URL", "PT_INCEPTION_FILE",
           "find_inception", "load_extractor", "image_features", "load_ref_stats",
           "save_ref_stats", "fid_from_features", "FeatureStats", "fid_key"]

MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 "inception-2015-12-05.pt")
INCEPTION_FILE = "inception-2015-12-05.pt"
PT_INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                    "pt_inception-2015-12-05-6726825d.pth")
PT_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
ENV = "MFR_INCEPTION"

Extractor = Callable[[torch.Tensor], torch.Tensor]


def fid_key(mode: str) -> str:
    """Metric name: ``fid`` for the paper protocol (legacy_tensorflow), ``fid_<mode>`` else."""
    return "fid" if mode == "legacy_tensorflow" else f"fid_{mode}"


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise DataError(f"unknown FID mode {mode!r}; valid: {', '.join(MODES)}", path="--mode")


def _missing(mode: str, tried: list[str], cache_dir: Path, why: str) -> DataError:
    url, name = (PT_INCEPTION_URL, PT_INCEPTION_FILE) if mode == "legacy_pytorch" else \
        (INCEPTION_URL, INCEPTION_FILE)
    return DataError(
        f"the Inception weights for FID (mode {mode!r}) are not available ({why}). Download\n"
        f"  {url}\n"
        f"on a machine with network access and either pass it with --inception PATH, set "
        f"{ENV}=PATH, or put it at {cache_dir / name}.\n"
        f"Looked in: {', '.join(tried) or 'nowhere'}")


def _download(url: str, dest: Path) -> None:
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)
    os.replace(tmp, dest)


def find_inception(path: Optional[str] = None, *, mode: str = "legacy_tensorflow",
                   cache_dir: Union[str, os.PathLike, None] = None,
                   download: bool = True) -> str:
    """The local weights file for ``mode`` (see the module docstring for the search order)."""
    _check_mode(mode)
    from mfrecipes.data.cache import default_cache_dir

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name, url = (PT_INCEPTION_FILE, PT_INCEPTION_URL) if mode == "legacy_pytorch" else \
        (INCEPTION_FILE, INCEPTION_URL)
    given = path or os.environ.get(ENV)
    if given:
        p = Path(given).expanduser()
        if p.is_dir():
            p = p / name
        if not p.is_file():
            where = "--inception" if path else ENV
            raise _missing(mode, [str(p)], cache, f"{where} points at {str(p)!r}, which is not "
                                                  f"a file")
        return str(p)
    candidates = [cache / name, Path(tempfile.gettempdir()) / name]
    if mode == "legacy_pytorch":
        candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / name)
    for c in candidates:
        if c.is_file():
            return str(c)
    if not download:
        raise _missing(mode, [str(c) for c in candidates], cache, "no local file")
    try:
        _download(url, cache / name)
    except Exception as err:  # noqa: BLE001 - offline, proxy, HTTP errors: all one message
        raise _missing(mode, [str(c) for c in candidates], cache,
                       f"download failed: {type(err).__name__}: {err}") from err
    return str(cache / name)


class _TorchScriptExtractor:
    """clean-fid's TorchScript Inception (or a custom TorchScript extractor) for one mode."""

    def __init__(self, module, mode: str):
        self.module, self.mode = module, mode
        self.inception_like = hasattr(module, "layers")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:        # x [N, 3, H, W] in [0, 255]
        n = x.shape[0]
        if not self.inception_like:
            return self.module(x).reshape(n, -1)
        if self.mode == "legacy_tensorflow":
            return self.module(x, return_features=True).reshape(n, -1)
        return self.module.layers((x - 128) / 128).reshape(n, -1)


def _pytorch_inception(path: str, device: torch.device) -> Extractor:
    from cleanfid.inception_pytorch import InceptionV3

    # pytorch-fid's InceptionV3 fetches its weights through the torch hub cache: point the hub at
    # a folder that holds (a link to) the local file, so nothing is downloaded.
    hub = Path(tempfile.mkdtemp(prefix="mfr-hub-"))
    (hub / "checkpoints").mkdir()
    os.symlink(os.path.abspath(path), hub / "checkpoints" / PT_INCEPTION_FILE)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        model = InceptionV3(output_blocks=[3], resize_input=False).to(device).eval()
    finally:
        torch.hub.set_dir(old)
    return lambda x: model(x / 255)[0].reshape(x.shape[0], -1)


def load_extractor(mode: str = "legacy_tensorflow", path: Optional[str] = None, *,
                   device: Union[str, torch.device] = "cpu",
                   cache_dir: Union[str, os.PathLike, None] = None,
                   download: bool = True) -> Extractor:
    """``fn(x [N, 3, H, W] float in [0, 255]) -> [N, D]`` for ``mode`` (weights: find_inception)."""
    file = find_inception(path, mode=mode, cache_dir=cache_dir, download=download)
    device = torch.device(device)
    if mode == "legacy_pytorch" and not file.endswith((".pt", ".jit", ".torchscript")):
        return _pytorch_inception(file, device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
            module = torch.jit.load(file, map_location=device).eval()
    except (RuntimeError, ValueError, OSError) as err:
        raise DataError(f"cannot load {file} as a TorchScript feature extractor ({err}); valid: "
                        f"clean-fid's {INCEPTION_FILE} from {INCEPTION_URL}",
                        path="--inception") from err
    return _TorchScriptExtractor(module, mode)


def _to_rgb(images: np.ndarray) -> np.ndarray:
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"FID needs uint8 images [N, H, W, 1 or 3], got {images.dtype} "
                         f"{images.shape}")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def image_features(images: np.ndarray, extractor: Extractor, *, mode: str,
                   batch_size: int = 64, device: Union[str, torch.device] = "cpu") -> np.ndarray:
    """Features ``[N, D]`` float64 of uint8 images ``[N, H, W, C]`` through clean-fid's resize for
    ``mode`` and ``extractor``."""
    _check_mode(mode)
    from cleanfid.resize import build_resizer

    resize = build_resizer(mode)
    images = _to_rgb(np.asarray(images))
    out = []
    with torch.no_grad():
        for lo in range(0, images.shape[0], batch_size):
            chunk = images[lo:lo + batch_size]
            # clean-fid: resize each HWC image, float values in [0, 255], then NCHW
            batch = np.stack([np.asarray(resize(img), dtype=np.float32) for img in chunk])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(device)
            out.append(extractor(x).detach().double().cpu().numpy())
    if not out:
        raise ValueError("image_features got no images")
    return np.concatenate(out, 0)


class FeatureStats:
    """Running mean and covariance of feature batches (float64), so that 50k x 2048 features
    need not be held at once; ``sigma`` is the unbiased covariance (as ``np.cov``)."""

    def __init__(self):
        self.n, self.total, self.outer = 0, None, None

    def add(self, feats: np.ndarray) -> None:
        f = np.asarray(feats, np.float64)
        if self.total is None:
            self.total, self.outer = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        self.n += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 samples, got {self.n}")
        mu = self.total / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, sigma


def _mode_from_name(path: str) -> Optional[str]:
    """The mode in a clean-fid statistics file name, ``<name>_<mode>_<split>_<res>.npz`` (e.g.
    ``cifar10_clean_train_32.npz``), or None."""
    import re

    m = re.fullmatch(r".+?_(clean|legacy_tensorflow|legacy_pytorch)_[a-z]+_[0-9a-z]+\.npz",
                     os.path.basename(path).lower())
    return m.group(1) if m else None


def load_ref_stats(path: Union[str, os.PathLike], *, mode: Optional[str] = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], sigma [D, D])`` from an ``.npz`` with ``mu``/``sigma`` (ADM's
    ``VIRTUAL_imagenet256_labeled.npz``, clean-fid's stats) or ``ref_mu``/``ref_sigma``.

    Files written by :func:`save_ref_stats` record their mode, and clean-fid's precomputed files
    name it (``cifar10_clean_train_32.npz``: clean mode, the training set at 32 x 32); another
    ``mode`` is an error.
    """
    path = os.fspath(path)
    try:
        data = np.load(path)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read reference statistics {path}: {err}", path="--ref") from err
    with data:
        for m, s in (("mu", "sigma"), ("ref_mu", "ref_sigma")):
            if m in data.files and s in data.files:
                mu, sigma = np.asarray(data[m], np.float64), np.asarray(data[s], np.float64)
                break
        else:
            raise DataError(f"{path} holds {sorted(data.files)}; valid reference statistics have "
                            f"keys mu and sigma (or ref_mu and ref_sigma)", path="--ref")
        made = str(data["mode"]) if "mode" in data.files else _mode_from_name(path)
    if mode is not None and made is not None and made != mode:
        raise DataError(f"{path} was computed in mode {made!r}, not {mode!r}: FID needs both "
                        f"sides from the same pipeline; pass --mode {made} or recompute it",
                        path="--ref")
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise DataError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit ([D] and "
                        f"[D, D])", path="--ref")
    return mu, sigma


def save_ref_stats(path: Union[str, os.PathLike], mu: np.ndarray, sigma: np.ndarray,
                   **extra) -> str:
    """Write ``mu``/``sigma`` (plus scalar ``extra`` facts) as an ``.npz``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in extra.items()})
    os.replace(tmp, path)
    return str(path)


def fid_from_features(feature_batches: Iterable[np.ndarray], mu_ref: np.ndarray,
                      sigma_ref: np.ndarray) -> float:
    """FID between the Gaussian of the features and the reference ``(mu, sigma)``."""
    from cleanfid.fid import frechet_distance

    acc = FeatureStats()
    for f in feature_batches:
        acc.add(f)
    mu, sigma = acc.stats()
    if mu.shape != mu_ref.shape:
        raise DataError(f"the features have {mu.size} dimensions but the reference statistics "
                        f"have {mu_ref.size}: they come from another network; use matching "
                        f"--inception weights and --ref statistics")
    return float(frechet_distance(mu, sigma, mu_ref, sigma_ref))
