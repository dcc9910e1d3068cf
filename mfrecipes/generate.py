"""Sampling: k-NFE with the average velocity, and Euler on the instantaneous velocity.

Both samplers integrate from noise at t = 1 to data at t = 0 (mfrecipes/METHOD.md, section 8), run
under ``torch.no_grad`` with the network in eval mode (each module's mode is restored afterwards),
and process the batch in chunks of ``batch_size`` so that large ``n`` fits in memory.
"""
from __future__ import annotations

import contextlib
import os
import sys
import types
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from mfrecipes.data.base import DataInfo
from mfrecipes.errors import RecipeError

__all__ = ["sample_meanflow", "sample_instantaneous", "generate", "generate_from", "even_times"]

DEFAULT_BATCH_SIZE = 256


def even_times(nfe: int) -> list[float]:
    """``1 = t_0 > t_1 > ... > t_nfe = 0``, evenly spaced."""
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise RecipeError(f"the number of function evaluations must be an integer >= 1, got {nfe!r}")
    return [1.0 - i / nfe for i in range(nfe + 1)]


def _check_times(times: Sequence[float]) -> list[float]:
    ts = [float(t) for t in times]
    ok = len(ts) >= 2 and all(0.0 <= t <= 1.0 for t in ts) and all(a > b for a, b in zip(ts, ts[1:]))
    if not ok:
        raise RecipeError(
            f"sampling times must be strictly decreasing values in [0, 1] with at least two entries "
            f"(e.g. [1.0, 0.5, 0.0]), got {list(times)!r}")
    return ts


@contextlib.contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    # Remember every module's own flag: a sub-module frozen in eval mode stays in eval mode.
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _integrate(net: nn.Module, noise: torch.Tensor, y: Optional[torch.Tensor], times: list[float],
               *, instantaneous: bool, batch_size: Optional[int]) -> torch.Tensor:
    """Steps ``z <- z - (t_i - t_{i+1}) * u(z, t_i, h_i, y)`` with ``h_i = t_i - t_{i+1}`` or 0."""
    n = noise.shape[0]
    if y is not None:
        if y.shape != (n,):
            raise RecipeError(f"labels must have shape [{n}] to match the noise, got {tuple(y.shape)}")
        y = y.to(device=noise.device, dtype=torch.long)
    chunk = n if not batch_size else int(batch_size)
    if chunk < 1:
        raise RecipeError(f"sampling batch_size must be >= 1, got {batch_size!r}")
    out = []
    with torch.no_grad(), _eval_mode(net):
        for lo in range(0, n, chunk):
            z = noise[lo:lo + chunk]                                    # [b, *shape]
            yb = None if y is None else y[lo:lo + chunk]                # [b]
            for t_cur, t_next in zip(times, times[1:]):
                dt = t_cur - t_next
                t = torch.full((z.shape[0],), t_cur, device=z.device, dtype=z.dtype)    # [b]
                h = torch.full_like(t, 0.0 if instantaneous else dt)                    # [b]
                u = net(z, t, h, yb)
                z = z - dt * u
            out.append(z)
    return torch.cat(out, 0) if out else noise.clone()


def sample_meanflow(net: nn.Module, noise: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                    nfe: int = 1, times: Optional[Sequence[float]] = None,
                    batch_size: Optional[int] = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """k-NFE sampling with the average velocity (mfrecipes/METHOD.md, section 8).

    ``noise`` is ``z_1 [N, *shape]``; ``y`` is ``[N]`` long or None. With the default evenly spaced
    times, 1-NFE is ``x = z_1 - u(z_1, t = 1, h = 1, y)``. ``times`` (``1 = t_0 > ... > t_k = 0``)
    replaces the even spacing and then sets the number of steps (``nfe`` is ignored).
    Returns ``x [N, *shape]`` on the device of ``noise``.
    """
    ts = _check_times(times) if times is not None else even_times(nfe)
    return _integrate(net, noise, y, ts, instantaneous=False, batch_size=batch_size)


def sample_instantaneous(net: nn.Module, noise: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                         steps: int, batch_size: Optional[int] = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """Euler ODE sampling on the instantaneous velocity ``u(z, t, h = 0)`` with ``steps`` even steps
    from t = 1 to t = 0 (the multi-step sampler of Kim et al., Table 5)."""
    return _integrate(net, noise, y, even_times(steps), instantaneous=True, batch_size=batch_size)


def _labels(info: DataInfo, n: int, labels, generator: torch.Generator) -> Optional[torch.Tensor]:
    k = info.num_classes
    if k is None:
        if isinstance(labels, torch.Tensor):
            raise RecipeError(f"dataset {info.name!r} is unconditional (num_classes is None); "
                              f"labels cannot be given")
        return None
    if labels is None or (isinstance(labels, str) and labels == "uniform"):
        return torch.randint(0, k, (n,), generator=generator)
    if isinstance(labels, str):
        if labels == "balanced":
            return torch.arange(n) % k
        raise RecipeError(f"unknown label mode {labels!r}; valid: None, 'uniform', 'balanced' "
                          f"or a tensor [n] of class indices")
    y = torch.as_tensor(labels)
    if y.shape != (n,) or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise RecipeError(f"labels must be an integer tensor of shape [{n}], got "
                          f"{y.dtype} {tuple(y.shape)}")
    if n and (int(y.min()) < 0 or int(y.max()) > k):
        raise RecipeError(f"labels must lie in 0..{k} for dataset {info.name!r} "
                          f"({k} = the null class, i.e. unconditional), got "
                          f"{int(y.min())}..{int(y.max())}")
    return y.long()


def generate(net: nn.Module, info: DataInfo, n: int, *, nfe: int = 1, seed: int = 0,
             device: Union[str, torch.device, None] = None,
             labels: Union[None, str, torch.Tensor] = None,
             times: Optional[Sequence[float]] = None, instantaneous: bool = False,
             batch_size: Optional[int] = DEFAULT_BATCH_SIZE
             ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Draw ``n`` samples: ``(x [n, *info.sample_shape], y [n] long or None)``.

    Noise ``z_1 ~ N(0, I)`` and then uniform labels come from one CPU generator seeded with
    ``seed``, so results do not depend on the device. ``labels`` (conditional datasets only):
    None or ``"uniform"`` (random classes, the evaluation protocol), ``"balanced"`` (cycle
    0..num_classes-1), or a tensor ``[n]`` (``num_classes`` = the null label). ``instantaneous``
    switches to Euler on ``u(z, t, h = 0)`` with ``nfe`` steps.
    """
    if device is None:
        p = next(iter(net.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((int(n), *info.sample_shape), generator=g)     # [n, *shape]
    y = _labels(info, int(n), labels, g)
    noise = noise.to(device)
    y = None if y is None else y.to(device)
    if instantaneous:
        if times is not None:
            raise RecipeError("custom times are only supported by the average-velocity sampler")
        x = sample_instantaneous(net, noise, y, steps=nfe, batch_size=batch_size)
    else:
        x = sample_meanflow(net, noise, y, nfe=nfe, times=times, batch_size=batch_size)
    return x, y


def generate_from(model, n: int, *, nfe: int = 1, seed: int = 0,
                  labels: Union[None, str, Sequence[int], torch.Tensor] = None,
                  device: Union[str, torch.device, None] = None, instantaneous: bool = False,
                  times: Optional[Sequence[float]] = None,
                  batch_size: Optional[int] = DEFAULT_BATCH_SIZE, decode: bool = False
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``mfrecipes.generate``: ``n`` samples ``(x, y)`` from ``model``.

    ``model`` is what :func:`mfrecipes.load_pretrained` returns, or a path it accepts (an
    exported folder or a run directory). ``labels``: None / ``"uniform"``, ``"balanced"``, or
    class indices (a list or tensor of length ``n``; ``num_classes`` is the null class).
    ``decode=True`` turns latents into images ``[n, 3, H, W]`` in [-1, 1] through the data's VAE
    (loaded with diffusers). The other arguments are those of :func:`generate`.
    """
    from mfrecipes.export import Pretrained, load_pretrained

    if isinstance(model, (str, os.PathLike)):
        model = load_pretrained(model, device=device or "cpu")
    if not isinstance(model, Pretrained):
        raise TypeError(f"mfrecipes.generate expects what mfrecipes.load_pretrained returns (or "
                        f"a path to load), got {type(model).__name__}; for a bare network use "
                        f"mfrecipes.generate.generate(net, info, n)")
    if isinstance(labels, (list, tuple)):
        labels = torch.tensor(labels, dtype=torch.long)
    x, y = generate(model.net, model.info, n, nfe=nfe, seed=seed, device=device, labels=labels,
                    times=times, instantaneous=instantaneous, batch_size=batch_size)
    if decode and model.info.modality == "latent":
        from mfrecipes.data.vae import decode_latents

        x = decode_latents(x, model.info)
    return x, y


class _CallableModule(types.ModuleType):
    """``mfrecipes.generate(model, n)`` is the public call, while ``mfrecipes.generate`` is also
    this module (``from mfrecipes import generate; generate.sample_meanflow(...)``): once a
    submodule is imported, Python binds its name on the package, so the function and the module
    must be one object."""

    def __call__(self, model, n: int, **kwargs):
        return generate_from(model, n, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
