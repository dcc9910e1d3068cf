"""A small CNN trained on scikit-learn's digits, used as the feature extractor of a Frechet distance
for digit samples (the embedded-dataset analogue of FID).

The classifier trains in seconds on a CPU from a fixed seed (80 / 20 split, held-out accuracy
reported), and is cached as ``<cache_dir>/digits_cnn_v{VERSION}_s{seed}_e{epochs}.safetensors``
(weights and the reference feature statistics of all 1,797 digits) beside a ``.json`` with the
accuracy. A cache that does not load or does not match is retrained and rewritten.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional, Union

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mfrecipes.data.cache import default_cache_dir

__all__ = ["DigitsCNN", "DigitsClassifier", "load_digits_classifier", "digits_features",
           "digits_fd", "default_cache_dir"]

VERSION = 1
FEATURE_DIM = 64
DEFAULT_EPOCHS = 40
HOLDOUT_FRACTION = 0.2


class DigitsCNN(nn.Module):
    """8x8 grey digits -> 10 logits; ``features`` is the 64-d penultimate layer (pre-activation,
    so its covariance is well conditioned)."""

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                             # 8x8 -> 4x4
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        self.fc = nn.Linear(64 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, 1, 8, 8]`` in [-1, 1] -> ``[N, feature_dim]``."""
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))


@attrs.frozen
class DigitsClassifier:
    """A trained :class:`DigitsCNN` with its held-out accuracy and the feature statistics
    ``(ref_mu [D], ref_sigma [D, D])`` of all real digits."""

    net: DigitsCNN = attrs.field(repr=False)
    accuracy: float
    ref_mu: np.ndarray = attrs.field(repr=False)
    ref_sigma: np.ndarray = attrs.field(repr=False)
    path: str

    def features(self, x: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
        """``x [N, 1, R, R]`` in [-1, 1] -> ``[N, D]`` float32 on the CPU.

        Inputs are clipped to [-1, 1] (as the uint8 conversion of images does) and, when R != 8,
        area-downsampled to 8x8 first.
        """
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"digit features expect [N, 1, R, R] grey images, got {tuple(x.shape)}")
        out = []
        self.net.eval()
        with torch.no_grad(), _one_thread():
            for lo in range(0, x.shape[0], batch_size):
                xb = x[lo:lo + batch_size].detach().to("cpu", torch.float32).clamp(-1, 1)
                if xb.shape[-2:] != (8, 8):
                    xb = F.interpolate(xb, size=(8, 8), mode="area")
                out.append(self.net.features(xb))
        return torch.cat(out, 0) if out else torch.zeros(0, self.ref_mu.shape[0])


@contextlib.contextmanager
def _one_thread():
    # The net is tiny: intra-op threading only adds overhead, and on a busy machine spinning
    # worker threads made training 20x slower. One thread is also more reproducible.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * HOLDOUT_FRACTION))
    return perm[n_test:], perm[:n_test]


def _train(seed: int, epochs: int) -> tuple[DigitsCNN, float]:
    with _one_thread():
        return _train_impl(seed, epochs)


def _train_impl(seed: int, epochs: int) -> tuple[DigitsCNN, float]:
    from mfrecipes.data.digits import load_digits_tensors

    x, y = load_digits_tensors(8)
    train_idx, test_idx = _split(x.shape[0], seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsCNN()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    xtr, ytr = x[train_idx], y[train_idx]
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(xtr.shape[0], generator=g)
        for lo in range(0, len(perm), 64):
            idx = perm[lo:lo + 64]
            xb = xtr[idx]
            # One-pixel random shifts (pad with background -1): cheap augmentation.
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(F.pad(xb, (1, 1, 1, 1), value=-1.0), shifts=shift, dims=(2, 3))[..., 1:-1, 1:-1]
            loss = F.cross_entropy(net(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x[test_idx]).argmax(1) == y[test_idx]).float().mean().item()
    return net, acc


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _reference_stats(clf_net: DigitsCNN) -> tuple[np.ndarray, np.ndarray]:
    from mfrecipes.data.digits import load_digits_tensors
    from mfrecipes.evaluate.fd import feature_stats

    x, _ = load_digits_tensors(8)
    with torch.no_grad(), _one_thread():
        clf_net.eval()
        return feature_stats(clf_net.features(x))


def _load(weights: Path, meta: Path, seed: int, epochs: int) -> Optional[DigitsClassifier]:
    """The cached classifier, or None when it is missing, unreadable or does not match."""
    from safetensors.torch import load_file

    try:
        info = json.loads(meta.read_text())
        if (info.get("version"), info.get("seed"), info.get("epochs")) != (VERSION, seed, epochs):
            return None
        tensors = load_file(str(weights))
        ref_mu = tensors.pop("ref.mu").double().numpy()
        ref_sigma = tensors.pop("ref.sigma").double().numpy()
        net = DigitsCNN()
        net.load_state_dict(tensors, strict=True)
        net.eval()
        if ref_mu.shape != (FEATURE_DIM,) or ref_sigma.shape != (FEATURE_DIM, FEATURE_DIM) \
                or not (np.isfinite(ref_mu).all() and np.isfinite(ref_sigma).all()):
            return None
        return DigitsClassifier(net, float(info["accuracy"]), ref_mu, ref_sigma, str(weights))
    except Exception:  # any corruption -> retrain (the cache is only an optimisation)
        return None


_MEMO: dict[tuple[str, int, int], DigitsClassifier] = {}


def load_digits_classifier(cache_dir: Union[str, os.PathLike, None] = None, *, seed: int = 0,
                           epochs: int = DEFAULT_EPOCHS) -> DigitsClassifier:
    """The digits classifier from ``cache_dir`` (default :func:`default_cache_dir`), trained and
    cached first when absent or corrupt. Kept in memory for the rest of the process."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = (str(cache.resolve()), seed, epochs)
    if key in _MEMO and Path(_MEMO[key].path).exists():
        return _MEMO[key]
    stem = f"digits_cnn_v{VERSION}_s{seed}_e{epochs}"
    weights, meta = cache / f"{stem}.safetensors", cache / f"{stem}.json"
    clf = _load(weights, meta, seed, epochs)
    if clf is None:
        from safetensors.torch import save

        net, acc = _train(seed, epochs)
        ref_mu, ref_sigma = _reference_stats(net)
        tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
        tensors["ref.mu"] = torch.from_numpy(ref_mu)
        tensors["ref.sigma"] = torch.from_numpy(ref_sigma)
        cache.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(weights, save(tensors))
        # The json goes last: a present json vouches for a complete weights file.
        _atomic_write_bytes(meta, json.dumps({
            "version": VERSION, "seed": seed, "epochs": epochs, "accuracy": acc,
            "feature_dim": FEATURE_DIM, "holdout_fraction": HOLDOUT_FRACTION}, indent=1).encode())
        clf = DigitsClassifier(net, acc, ref_mu, ref_sigma, str(weights))
    _MEMO[key] = clf
    return clf


def digits_features(x: torch.Tensor, *, cache_dir: Union[str, os.PathLike, None] = None,
                    classifier: Optional[DigitsClassifier] = None) -> torch.Tensor:
    """``x [N, 1, R, R]`` in [-1, 1] -> penultimate-layer features ``[N, 64]``."""
    clf = classifier or load_digits_classifier(cache_dir)
    return clf.features(x)


def digits_fd(samples: torch.Tensor, cache_dir: Union[str, os.PathLike, None] = None, *,
              classifier: Optional[DigitsClassifier] = None) -> float:
    """Frechet distance between the classifier features of ``samples [N, 1, R, R]`` (N >= 2) and
    those of all 1,797 real digits."""
    from mfrecipes.evaluate.fd import feature_stats, frechet_distance

    clf = classifier or load_digits_classifier(cache_dir)
    mu, sigma = feature_stats(clf.features(samples))
    return frechet_distance(mu, sigma, clf.ref_mu, clf.ref_sigma)
