"""``mixture``: a class-conditional Gaussian mixture on the digits, with a closed-form velocity.

Class y is a uniform mixture of isotropic Gaussians ``N(m_i, sigma^2 I)`` whose means ``m_i`` are
the scikit-learn digits of class y (upsampled to ``resolution``, in [-1, 1]); labels are uniform
over the 10 classes. Because every component is Gaussian, the velocity that flow matching learns,
``v*(z, t | y) = E[e - x | z_t = z, y]``, has a closed form (mfrecipes/METHOD.md, section 12),
and so has its probability-flow ODE: ``mfrecipes/evaluate/exact.py`` measures a network against
them with no sampling noise.

Samples are drawn fresh (nothing to memorise) in blocks of :data:`BLOCK`: block b of this rank
comes from a generator keyed on ``(seed, draw_salt, rank, b)``, so ``batches(B, start=s)``
continues exactly where a run that consumed s samples stopped, ranks draw independently, and
``draw_salt`` changes the data draws alone (the A/A control of a paired study).
"""
from __future__ import annotations

import functools
import math
from typing import Iterator, Optional

import attrs
import numpy as np
import torch

from mfrecipes.data.base import DataInfo
from mfrecipes.data.plan import seeded_rng
from mfrecipes.errors import DataError
from mfrecipes.registry import DATASETS

__all__ = ["Mixture", "MixtureSpec", "mixture_means", "velocity", "posterior_mean",
           "exact_moments", "BLOCK", "CLASS_COLOURS"]

BLOCK = 1024                 # samples per generator block
NUM_CLASSES = 10
RESOLUTIONS = (8, 16, 32)
CHANNELS = (1, 3)
_DRAWS = 0x4D5801            # domain tag of the training draws
_REFERENCE = 0x4D5802        # domain tag of reference draws (never the training draws)

# channels = 3: class y's colour (r, g, b) in (0, 1]; a channel is -1 + (m + 1) * colour, so the
# background stays -1 (black) and the strokes take the class's colour. Fixed, so the 3 channels
# differ and colour carries class information, as in natural images.
CLASS_COLOURS = (
    (1.00, 0.35, 0.35), (1.00, 0.65, 0.20), (0.95, 0.95, 0.30), (0.45, 1.00, 0.35),
    (0.30, 0.95, 0.85), (0.35, 0.60, 1.00), (0.55, 0.40, 1.00), (0.95, 0.40, 0.95),
    (1.00, 1.00, 1.00), (0.70, 0.70, 0.45),
)


@functools.lru_cache(maxsize=8)
def _means_cached(resolution: int, channels: int, components_per_class: Optional[int]):
    from mfrecipes.data.digits import load_digits_tensors

    x, y = load_digits_tensors(resolution)            # [N, 1, R, R] in [-1, 1], [N]
    x = x.double()
    if components_per_class is not None:
        keep = torch.cat([torch.nonzero(y == c).flatten()[:components_per_class]
                          for c in range(NUM_CLASSES)])
        keep = keep.sort().values
        x, y = x[keep], y[keep]
    if channels == 3:
        colour = torch.tensor(CLASS_COLOURS, dtype=torch.float64)[y]   # [K, 3]
        x = -1 + (x + 1) * colour[:, :, None, None]                    # [K, 3, R, R]
    return x.contiguous(), y.contiguous()


def mixture_means(resolution: int = 16, channels: int = 1,
                  components_per_class: Optional[int] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The component means ``[K, C, R, R]`` float64 in [-1, 1] and their classes ``[K]``."""
    m, y = _means_cached(int(resolution), int(channels), components_per_class)
    return m.clone(), y.clone()


@attrs.frozen
class MixtureSpec:
    """The mixture as numbers: flat means ``[K, D]`` float64, classes ``[K]``, log prior ``[K]``
    (class frequency 1/10 times 1 / components of the class), sigma."""

    means: torch.Tensor
    classes: torch.Tensor
    log_prior: torch.Tensor
    sigma: float
    sample_shape: tuple

    @classmethod
    def build(cls, resolution: int = 16, channels: int = 1, sigma: float = 0.15,
              components_per_class: Optional[int] = None) -> "MixtureSpec":
        m, y = mixture_means(resolution, channels, components_per_class)
        counts = torch.bincount(y, minlength=NUM_CLASSES).double()
        log_prior = -math.log(NUM_CLASSES) - torch.log(counts[y])
        return cls(m.flatten(1), y, log_prior, float(sigma), tuple(m.shape[1:]))

    @property
    def dim(self) -> int:
        return self.means.shape[1]


def _as_time(t, n: int) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float64)
    return t.expand(n).clone() if t.dim() == 0 else t.reshape(n)


def posterior_mean(spec: MixtureSpec, z: torch.Tensor, t, y: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(E[m | z_t = z, y] [N, D], a = 1 - t [N], s_t^2 [N])`` for flat ``z [N, D]`` float64.

    Posterior weights ``w_i ∝ pi_i exp(-||z - a m_i||^2 / (2 s_t^2))`` (a log-sum-exp softmax);
    ``y`` restricts the components to that class (None: all classes, prior = class
    frequencies); ``y`` equal to the number of classes (the null label) is unconditional too.
    """
    z = z.to(torch.float64)
    n = z.shape[0]
    t = _as_time(t, n)
    a = 1.0 - t
    s2 = a * a * spec.sigma ** 2 + t * t                                # [N]
    if y is None:
        return _posterior_mean(spec.means, spec.log_prior, z, a, s2), a, s2
    y = y.to(spec.classes.device).long().reshape(n)
    out = torch.empty_like(z)
    for c in torch.unique(y).tolist():
        rows = torch.nonzero(y == c).flatten()
        if c >= NUM_CLASSES:      # the null label: all classes
            means, log_prior = spec.means, spec.log_prior
        else:
            keep = spec.classes == c
            means, log_prior = spec.means[keep], spec.log_prior[keep]
        out[rows] = _posterior_mean(means, log_prior, z[rows], a[rows], s2[rows])
    return out, a, s2


def _posterior_mean(m, log_prior, z, a, s2) -> torch.Tensor:
    # ||z - a m||^2 = ||z||^2 - 2 a z.m + a^2 ||m||^2; ||z||^2 is common to all i.
    logits = (a[:, None] * (z @ m.T) - 0.5 * (a * a)[:, None] * (m * m).sum(1)[None, :]) \
        / s2[:, None] + log_prior[None, :]                              # [N, K]
    return torch.softmax(logits, dim=1) @ m


def velocity(spec: MixtureSpec, z: torch.Tensor, t, y: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
    """The exact flow-matching velocity ``v*(z, t | y) = E[e - x | z_t = z, y]``, float64,
    ``z [N, *shape]`` (or flat ``[N, D]``) -> same shape (mfrecipes/METHOD.md, section 12)."""
    shape = z.shape
    zf = z.reshape(shape[0], -1).to(torch.float64)
    mbar, a, s2 = posterior_mean(spec, zf, t, y)
    t = 1.0 - a
    c = (t - a * spec.sigma ** 2) / s2                                  # [N]
    # sum_i w_i [c (z - a m_i) - m_i] = c z - (c a + 1) mbar
    v = c[:, None] * zf - (c * a + 1.0)[:, None] * mbar
    return v.reshape(shape)


def exact_moments(spec: MixtureSpec) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` of the mixture (all classes), float64:
    ``mu = sum pi_i m_i``, ``Sigma = sigma^2 I + sum pi_i (m_i - mu)(m_i - mu)^T``."""
    pi = torch.exp(spec.log_prior)
    mu = pi @ spec.means
    dm = spec.means - mu
    cov = (dm * pi[:, None]).T @ dm + spec.sigma ** 2 * torch.eye(spec.dim, dtype=torch.float64)
    return mu.numpy(), cov.numpy()


def _check_int(name: str, value, allowed=None, minimum=None):
    if not isinstance(value, int) or isinstance(value, bool) or \
            (allowed is not None and value not in allowed) or \
            (minimum is not None and value < minimum):
        valid = (", ".join(map(str, allowed)) if allowed is not None
                 else f"an integer >= {minimum}")
        raise DataError(f"mixture {name} {value!r} is not valid; valid: {valid}",
                        path=f"data.params.{name}")


def _validate(resolution, channels, sigma, components_per_class, draw_salt, conditional):
    _check_int("resolution", resolution, RESOLUTIONS)
    _check_int("channels", channels, CHANNELS)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or \
            not (math.isfinite(sigma) and 0 < sigma <= 10):
        raise DataError(f"mixture sigma {sigma!r} is not valid; valid: a number in (0, 10]",
                        path="data.params.sigma")
    if components_per_class is not None:
        _check_int("components_per_class", components_per_class, minimum=1)
    _check_int("draw_salt", draw_salt, minimum=0)
    if not isinstance(conditional, bool):
        raise DataError(f"mixture conditional {conditional!r} is not valid; valid: true or false",
                        path="data.params.conditional")


@DATASETS.register("mixture")
@attrs.frozen(eq=False)
class Mixture:
    """Gaussian mixture around the digits (see the module docstring); no download, no cache."""

    resolution: int = 16
    channels: int = 1
    sigma: float = 0.15
    components_per_class: Optional[int] = None
    draw_salt: int = 0
    conditional: bool = True
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    cache_dir: Optional[str] = None

    _spec: MixtureSpec = attrs.field(init=False, repr=False)
    _info: DataInfo = attrs.field(init=False, repr=False)

    @classmethod
    def static_info(cls, resolution: int = 16, channels: int = 1, sigma: float = 0.15,
                    components_per_class: Optional[int] = None, draw_salt: int = 0,
                    conditional: bool = True, **_) -> DataInfo:
        """What the data will be, without building it (used by ``mfr check``)."""
        _validate(resolution, channels, sigma, components_per_class, draw_salt, conditional)
        return DataInfo(name="mixture", modality="image",
                        sample_shape=(channels, resolution, resolution),
                        num_classes=NUM_CLASSES if conditional else None)

    def __attrs_post_init__(self):
        _validate(self.resolution, self.channels, self.sigma, self.components_per_class,
                  self.draw_salt, self.conditional)
        if not 0 <= self.rank < self.world_size:
            raise DataError(f"rank {self.rank} is outside [0, world_size={self.world_size})",
                            path="data")
        object.__setattr__(self, "_spec", MixtureSpec.build(
            self.resolution, self.channels, float(self.sigma), self.components_per_class))
        object.__setattr__(self, "_info", self.static_info(
            self.resolution, self.channels, self.sigma, self.components_per_class,
            self.draw_salt, self.conditional))

    @property
    def info(self) -> DataInfo:
        return self._info

    @property
    def spec(self) -> MixtureSpec:
        return self._spec

    def params(self) -> dict:
        """The parameters that define the distribution (not the draws)."""
        return {"resolution": self.resolution, "channels": self.channels,
                "sigma": float(self.sigma), "components_per_class": self.components_per_class}

    def _draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` samples: labels uniform over classes, a uniform component of the class, then
        ``m_i + sigma * noise``."""
        spec = self._spec
        classes = spec.classes.numpy()
        y = rng.integers(0, NUM_CLASSES, size=n)
        u = rng.random(n)
        comp = np.empty(n, dtype=np.int64)
        for c in range(NUM_CLASSES):
            idx = np.flatnonzero(classes == c)
            sel = y == c
            comp[sel] = idx[np.minimum((u[sel] * len(idx)).astype(np.int64), len(idx) - 1)]
        noise = rng.standard_normal((n, spec.dim), dtype=np.float64)
        x = spec.means.numpy()[comp] + spec.sigma * noise
        return x.astype(np.float32).reshape(n, *spec.sample_shape), y

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        return self._draw(seeded_rng(self.seed, _DRAWS, self.draw_salt, self.rank, b), BLOCK)

    def batches(self, batch_size: int, *, start: int = 0
                ) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Yield ``(x [B, C, R, R] float32, y [B] int64 or None)`` forever; sample s of this
        rank is row ``s % BLOCK`` of block ``s // BLOCK``."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(start, int) or start < 0:
            raise DataError(f"start must be an integer >= 0, got {start!r}")
        b, off = divmod(start, BLOCK)
        xs, ys = self._block(b)
        while True:
            parts_x, parts_y, need = [], [], batch_size
            while need:
                if off == BLOCK:
                    b, off = b + 1, 0
                    xs, ys = self._block(b)
                k = min(need, BLOCK - off)
                parts_x.append(xs[off:off + k])
                parts_y.append(ys[off:off + k])
                off += k
                need -= k
            x = torch.from_numpy(np.concatenate(parts_x))
            y = torch.from_numpy(np.concatenate(parts_y)).long()
            yield x, (y if self.conditional else None)

    def counters(self) -> dict:
        return {}

    def reference(self, n: int, seed: int) -> torch.Tensor:
        """``n`` fresh exact draws ``[n, C, R, R]`` (never the training draws)."""
        x, _ = self._draw(seeded_rng(seed, _REFERENCE, self.draw_salt), int(n))
        return torch.from_numpy(x)
