"""Sample quality: one entry point, :func:`quality`, dispatching on the dataset.

Metrics per dataset:

- 2-D points: sliced Wasserstein-1 to fresh reference samples (``swd``);
- scikit-learn digits: Frechet distance in the features of a small cached classifier (``fd_digits``);
- the ``mixture`` test bed: Frechet distance to the mixture's exact mean and covariance
  (``fd_exact``); its noise-free metrics against the exact flow (``map1``, ``map2``, ``v_err``,
  ``u_err/g..``) live in ``exact.py`` and are logged as ``eval/exact/<name>``;
- other image or latent sets: none here; FID against reference statistics (clean-fid) is
  computed by ``mfr eval`` (``fid.py``, ``commands.py``).

Also in this package: ``load.py`` (a checkpoint's network from a run directory), ``commands.py``
(``mfr sample`` / ``mfr eval``), ``task_affinity.py`` (gradient cosine of the v- and u-losses per
gap range) and ``compare.py`` (tables and curves across runs).

scipy, scikit-learn and safetensors are imported only when a metric needs them.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Union

import torch

__all__ = ["quality", "register_quality", "QUALITY_BY_NAME", "QUALITY_BY_MODALITY",
           "DEFAULT_POINTS"]

# Sample count of the 2-D benchmarks (mfrecipes/METHOD.md, section 7).
DEFAULT_POINTS = 4096

# fn(dataset, samples, *, cache_dir, seed) -> {metric name: value}
QualityFn = Callable[..., dict]
QUALITY_BY_NAME: dict[str, QualityFn] = {}       # checked first: info.name
QUALITY_BY_MODALITY: dict[str, QualityFn] = {}   # fallback: info.modality


def register_quality(*, name: Optional[str] = None, modality: Optional[str] = None):
    """Decorator: use ``fn`` for datasets called ``name`` or, failing a name match, of ``modality``."""
    if (name is None) == (modality is None):
        raise ValueError("register_quality takes exactly one of name= or modality=")

    def deco(fn: QualityFn) -> QualityFn:
        (QUALITY_BY_NAME if name is not None else QUALITY_BY_MODALITY)[name or modality] = fn
        return fn
    return deco


@register_quality(modality="points")
def _points_quality(dataset, samples: torch.Tensor, *, cache_dir, seed: int) -> dict:
    from mfrecipes.evaluate.swd import sliced_wasserstein

    n = len(samples) or DEFAULT_POINTS
    ref = dataset.reference(n, seed)
    return {"swd": sliced_wasserstein(samples, ref, seed=seed)}


@register_quality(name="digits")
def _digits_quality(dataset, samples: torch.Tensor, *, cache_dir, seed: int) -> dict:
    from mfrecipes.evaluate.digits_classifier import digits_fd

    return {"fd_digits": digits_fd(samples, cache_dir)}


@register_quality(name="mixture")
def _mixture_quality(dataset, samples: torch.Tensor, *, cache_dir, seed: int) -> dict:
    from mfrecipes.evaluate.exact import fd_exact

    return {"fd_exact": fd_exact(dataset, samples)}


def quality(dataset, samples: torch.Tensor, *, cache_dir: Union[str, os.PathLike, None] = None,
            seed: int = 0) -> dict[str, float]:
    """Quality metrics of ``samples [N, *sample_shape]`` for ``dataset`` (lower is better for
    every metric returned); ``{}`` when no metric is registered for it."""
    info = dataset.info
    fn = QUALITY_BY_NAME.get(info.name) or QUALITY_BY_MODALITY.get(info.modality)
    if fn is None:
        return {}
    return {k: float(v) for k, v in fn(dataset, samples, cache_dir=cache_dir, seed=seed).items()}
