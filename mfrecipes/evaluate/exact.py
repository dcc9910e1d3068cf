"""Exact metrics on the ``mixture`` data set: a network against the closed-form guided flow.

The data's velocity ``v*`` is known in closed form (``mfrecipes/data/mixture.py``,
mfrecipes/METHOD.md, section 12), so the field a recipe trains towards is known too: with
training-time guidance the network's fixed point is ``v_w = w v*(z, t | y) + (1 - w) v*(z, t)``
inside ``[t_start, t_end]`` (``w = 1`` outside), ``w = omega / (1 - kappa)`` (``omega`` when
``kappa = 0``). The reference is the probability-flow ODE of ``v_w``, solved in float64 with
RK4 once for a fixed probe set and cached.

Probe set (:class:`ProbeSet`): ``probes`` noises ``z_1 ~ N(0, I)`` (seed :data:`PROBE_SEED`)
with balanced labels ``j % 10``, their flow map ``Phi(z_1) = z_0`` and, for the first
``traj_probes``, the trajectory at ``t = k / 8`` and ``v_w`` there.

Metrics (lower is better; mean squared errors per element, ``D`` = elements per sample):

- ``map1``: ``||z_1 - u(z_1, 1, 1) - Phi(z_1)||^2 / D`` over all probes;
- ``map2``: the same for the 2-step map (t: 1 -> 0.5 -> 0);
- ``v_err``: ``||u(z_t, t, 0) - v_w(z_t, t)||^2 / D``, probe j at ``t = (j % 8 + 1) / 8``;
- ``u_err/g<lo>-<hi>``: ``||u(z_t, t, t - r) - (z_t - z_r) / (t - r)||^2 / D`` for the 36
  pairs ``r < t`` of the 9 stored times ``{0, 1/8, ..., 1}``, probe j on pair ``j % 36``,
  averaged within the gap bins [0, 0.25), [0.25, 0.5), [0.5, 0.75), [0.75, 1].

``fd_exact`` (registered as the ``mixture`` data set's quality metric) is the Frechet distance
between generated samples' mean and covariance and the mixture's exact ones.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Union

import attrs
import numpy as np
import torch

from mfrecipes.data.mixture import NUM_CLASSES, MixtureSpec, exact_moments, velocity
from mfrecipes.errors import DataError

__all__ = ["GuidanceTarget", "guidance_of", "guided_velocity", "solve_flow", "ProbeSet",
           "probe_set", "exact_metrics", "fd_exact", "applies", "GAP_BINS", "PROBE_SEED",
           "SOLVER_STEPS", "TRAJ_TIMES"]

PROBE_SEED = 20250806
SOLVER_STEPS = 32                                   # RK4 steps on [0, 1] (a multiple of 8)
TRAJ_TIMES = tuple(k / 8 for k in range(9))         # 0, 1/8, ..., 1 (0 = Phi, 1 = z_1)
GAP_BINS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))
CACHE_VERSION = 1
# What the loop and ``mfr eval`` use: 2,048 probes (map1, map2), 1,024 with trajectories
# (v_err, u_err), 32 RK4 steps (datasets/mixture.md: solver error and evaluation cost).
DEFAULTS = {"probes": 2048, "traj_probes": 1024, "steps": SOLVER_STEPS}
_LOADED: dict[str, "ProbeSet"] = {}                 # one load per process and cache key


def applies(dataset) -> bool:
    """Whether the exact metrics exist for ``dataset`` (the ``mixture`` set)."""
    return getattr(getattr(dataset, "info", None), "name", None) == "mixture" \
        and isinstance(getattr(dataset, "spec", None), MixtureSpec)


@attrs.frozen
class GuidanceTarget:
    """The guided field the objective's fixed point is: ``w`` inside ``[t_start, t_end]``."""

    w: float = 1.0
    t_start: float = 0.0
    t_end: float = 1.0

    def weight(self, t: float) -> float:
        return self.w if self.t_start <= t <= self.t_end else 1.0


def guidance_of(objective, conditional: bool = True) -> GuidanceTarget:
    """The target of an objective's training-time guidance (mfrecipes/METHOD.md, section 12).

    ``kappa > 0``: ``u = omega v + kappa u + (1 - omega - kappa) v_uncond`` at the fixed point,
    so ``u = w v + (1 - w) v_uncond`` with ``w = omega / (1 - kappa)``; ``kappa = 0``:
    ``w = omega``. Objectives without these settings, and unconditional data, give ``w = 1``.
    """
    omega = float(getattr(objective, "omega", 1.0))
    kappa = float(getattr(objective, "kappa", 0.0))
    if not conditional or (omega == 1.0 and kappa == 0.0):
        return GuidanceTarget()
    w = omega / (1.0 - kappa) if kappa > 0 else omega
    return GuidanceTarget(w, float(getattr(objective, "t_start", 0.0)),
                          float(getattr(objective, "t_end", 1.0)))


def guided_velocity(spec: MixtureSpec, z: torch.Tensor, t: float, y: Optional[torch.Tensor],
                    w: float) -> torch.Tensor:
    """``w v*(z, t | y) + (1 - w) v*(z, t)`` in float64 (``y = None``: ``v*(z, t)``)."""
    if y is None:
        return velocity(spec, z, t, None)
    vc = velocity(spec, z, t, y)
    if w == 1.0:
        return vc
    return w * vc + (1.0 - w) * velocity(spec, z, t, None)


def _grid(steps: int, target: GuidanceTarget) -> list[float]:
    """Decreasing times 1 -> 0: ``steps`` even steps, plus the guidance window's ends."""
    ts = {1.0 - k / steps for k in range(steps + 1)} | {target.t_start, target.t_end}
    return sorted((min(max(t, 0.0), 1.0) for t in ts), reverse=True)


def solve_flow(spec: MixtureSpec, z1: torch.Tensor, y: Optional[torch.Tensor],
               target: GuidanceTarget, *, steps: int = SOLVER_STEPS,
               save: tuple = ()) -> tuple[torch.Tensor, dict[float, torch.Tensor]]:
    """RK4 on ``dz/dt = v_w(z, t)`` from ``t = 1`` to 0 in float64; returns ``(z_0, {t: z_t})``
    for the grid times in ``save`` (each step uses the guidance weight of its midpoint, and the
    window's ends are grid points, so no step straddles a jump of ``w``)."""
    z = z1.reshape(z1.shape[0], -1).to(torch.float64)
    grid = _grid(steps, target)
    want = {float(t) for t in save}
    missing = [t for t in want if not any(abs(t - g) < 1e-12 for g in grid)]
    if missing:
        raise ValueError(f"save times {missing} are not on the solver grid of {steps} steps")
    saved = {t: z.clone() for t in want if abs(t - 1.0) < 1e-12}
    for a, b in zip(grid, grid[1:]):
        dt = b - a
        w = target.weight(0.5 * (a + b))

        def f(zz, tt):
            return guided_velocity(spec, zz, tt, y, w)
        k1 = f(z, a)
        k2 = f(z + 0.5 * dt * k1, a + 0.5 * dt)
        k3 = f(z + 0.5 * dt * k2, a + 0.5 * dt)
        k4 = f(z + dt * k3, b)
        z = z + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        for t in want:
            if abs(t - b) < 1e-12:
                saved[t] = z.clone()
    shape = z1.shape
    return z.reshape(shape), {t: v.reshape(shape) for t, v in saved.items()}


@attrs.frozen(eq=False)
class ProbeSet:
    """The fixed probes and their exact flow (arrays float32 on the CPU)."""

    z1: torch.Tensor                # [P, *shape]
    y: Optional[torch.Tensor]       # [P] or None (unconditional)
    phi: torch.Tensor               # [P, *shape]: Phi(z_1) = z_0
    traj: torch.Tensor              # [9, Q, *shape]: z_t at TRAJ_TIMES for the first Q probes
    v_traj: torch.Tensor            # [9, Q, *shape]: v_w(z_t, t) there
    meta: dict

    @property
    def dim(self) -> int:
        return int(np.prod(self.z1.shape[1:]))


def _cache_key(dataset, target: GuidanceTarget, probes: int, traj_probes: int, steps: int,
               seed: int) -> dict:
    return {"version": CACHE_VERSION, "data": dataset.params(),
            "conditional": dataset.info.num_classes is not None,
            "w": target.w, "t_start": target.t_start, "t_end": target.t_end,
            "probes": probes, "traj_probes": traj_probes, "steps": steps, "seed": seed}


def cache_folder(cache_dir, key: dict) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else None
    if root is None:
        from mfrecipes.data.cache import default_cache_dir
        root = default_cache_dir()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return root / "mixture-exact" / digest


def _build(dataset, target: GuidanceTarget, key: dict) -> dict[str, np.ndarray]:
    spec: MixtureSpec = dataset.spec
    probes, q, steps = key["probes"], key["traj_probes"], key["steps"]
    g = torch.Generator().manual_seed(int(key["seed"]))
    z1 = torch.randn((probes, *spec.sample_shape), generator=g)         # float32, what nets see
    y = torch.arange(probes) % NUM_CLASSES if key["conditional"] else None
    phi, saved = solve_flow(spec, z1, y, target, steps=steps, save=TRAJ_TIMES[1:-1])
    saved[1.0] = z1.double()
    saved[0.0] = phi
    traj = torch.stack([saved[t][:q] for t in TRAJ_TIMES])              # [9, Q, *shape]
    yq = None if y is None else y[:q]
    v = torch.stack([guided_velocity(spec, traj[i], t, yq, target.weight(t))
                     for i, t in enumerate(TRAJ_TIMES)])
    out = {"z1": z1.numpy(), "phi": phi.float().numpy(), "traj": traj.float().numpy(),
           "v_traj": v.float().numpy()}
    if y is not None:
        out["y"] = y.numpy()
    return out


def probe_set(dataset, target: GuidanceTarget = GuidanceTarget(), *, cache_dir=None,
              probes: int = 2048, traj_probes: int = 1024, steps: int = SOLVER_STEPS,
              seed: int = PROBE_SEED) -> ProbeSet:
    """The cached probe set for ``dataset`` and ``target`` (built on first use, atomically:
    into a temporary folder renamed into place; ``.npy`` files and a ``meta.json``)."""
    if not applies(dataset):
        raise DataError(f"exact metrics need the mixture data set, not "
                        f"{getattr(dataset.info, 'name', dataset)!r}", path="data.name")
    if not (isinstance(probes, int) and probes >= 1 and isinstance(traj_probes, int)
            and 1 <= traj_probes <= probes):
        raise ValueError(f"need probes >= traj_probes >= 1, got {probes}, {traj_probes}")
    if not (isinstance(steps, int) and steps >= 8 and steps % 8 == 0):
        raise ValueError(f"solver steps must be a positive multiple of 8, got {steps!r}")
    key = _cache_key(dataset, target, probes, traj_probes, steps, seed)
    folder = cache_folder(cache_dir, key)
    if str(folder) in _LOADED:
        return _LOADED[str(folder)]
    names = ["z1", "phi", "traj", "v_traj"] + (["y"] if key["conditional"] else [])
    if not _valid(folder, key, names):
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            t0 = time.time()
            arrays = _build(dataset, target, key)
            for k, v in arrays.items():
                np.save(tmp / f"{k}.npy", v, allow_pickle=False)
            (tmp / "meta.json").write_text(json.dumps(
                {"key": key, "build_seconds": round(time.time() - t0, 2)}, indent=1))
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)   # invalid: rebuilt
            try:
                os.rename(tmp, folder)
            except OSError:
                if not _valid(folder, key, names):          # lost a race to a bad folder
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    arr = {k: torch.from_numpy(np.load(folder / f"{k}.npy", allow_pickle=False)) for k in names}
    meta = json.loads((folder / "meta.json").read_text())
    ps = ProbeSet(arr["z1"], arr.get("y"), arr["phi"], arr["traj"], arr["v_traj"], meta)
    _LOADED[str(folder)] = ps
    return ps


def _valid(folder: Path, key: dict, names: list[str]) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("key") == key and all((folder / f"{n}.npy").is_file() for n in names)


def _net_u(net, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor, y: Optional[torch.Tensor],
           device, batch_size: int) -> torch.Tensor:
    out = []
    for lo in range(0, z.shape[0], batch_size):
        sl = slice(lo, lo + batch_size)
        u = net(z[sl].to(device), t[sl].to(device), h[sl].to(device),
                None if y is None else y[sl].to(device))
        out.append(u.float().cpu())
    return torch.cat(out)


def _msq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared difference ``[N]`` in float64."""
    return (a.double() - b.double()).flatten(1).pow(2).mean(1)


def bin_name(lo: float, hi: float) -> str:
    return f"u_err/g{lo:.2f}-{hi:.2f}"


def _pairs() -> list[tuple[int, int]]:
    """Index pairs ``(i, j)`` into TRAJ_TIMES with ``t_i > t_j`` (t = i/8 > r = j/8)."""
    return [(i, j) for i in range(1, len(TRAJ_TIMES)) for j in range(i)]


def exact_metrics(net, dataset, *, target: GuidanceTarget = GuidanceTarget(), cache_dir=None,
                  device=None, probes: int = 2048, traj_probes: int = 1024,
                  steps: int = SOLVER_STEPS, seed: int = PROBE_SEED,
                  batch_size: int = 512) -> dict[str, float]:
    """``map1``, ``map2``, ``v_err`` and ``u_err/g..`` of ``net(z, t, h, y)`` (module
    docstring), in eval mode without gradients. Draws no random numbers."""
    from mfrecipes.generate import _eval_mode

    ps = probe_set(dataset, target, cache_dir=cache_dir, probes=probes,
                   traj_probes=traj_probes, steps=steps, seed=seed)
    if device is None:
        p = next(iter(net.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    P, Q = ps.z1.shape[0], ps.traj.shape[1]
    one = torch.ones(P)

    def u(z, t, h, y):
        return _net_u(net, z, t, h, y, device, batch_size)

    out: dict[str, float] = {}
    with torch.no_grad(), _eval_mode(net):
        x1 = ps.z1 - u(ps.z1, one, one, ps.y)
        out["map1"] = float(_msq(x1, ps.phi).mean())
        half = 0.5 * one
        zh = ps.z1 - 0.5 * u(ps.z1, one, half, ps.y)
        x2 = zh - 0.5 * u(zh, half, half, ps.y)
        out["map2"] = float(_msq(x2, ps.phi).mean())
        j = torch.arange(Q)
        yq = None if ps.y is None else ps.y[:Q]
        ti = j % 8 + 1                                        # index of t = 1/8 .. 1
        t = torch.tensor(TRAJ_TIMES, dtype=torch.float32)[ti]
        zt = ps.traj[ti, j]
        v = u(zt, t, torch.zeros(Q), yq)
        out["v_err"] = float(_msq(v, ps.v_traj[ti, j]).mean())
        pairs = torch.tensor(_pairs())                        # [36, 2]
        pi, pj = pairs[j % len(pairs), 0], pairs[j % len(pairs), 1]
        times = torch.tensor(TRAJ_TIMES, dtype=torch.float64)
        tt, rr = times[pi], times[pj]
        zt, zr = ps.traj[pi, j].double(), ps.traj[pj, j].double()
        gap = tt - rr
        u_star = (zt - zr) / gap.reshape(-1, *([1] * (zt.dim() - 1)))
        uu = u(zt.float(), tt.float(), gap.float(), yq)
        err = _msq(uu, u_star)
        for lo, hi in GAP_BINS:
            sel = (gap >= lo - 1e-9) & ((gap < hi - 1e-9) if hi < 1.0 else (gap <= hi + 1e-9))
            out[bin_name(lo, hi)] = float(err[sel].mean()) if bool(sel.any()) else math.nan
    return out


_SQRT_COV: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def fd_exact(dataset, samples: torch.Tensor) -> float:
    """Frechet distance between the samples' mean / covariance and the mixture's exact ones:
    ``||mu_s - mu||^2 + tr(S + C - 2 (C^1/2 S C^1/2)^1/2)`` in float64 (eigen route)."""
    spec: MixtureSpec = dataset.spec
    key = (tuple(dataset.params().items()),)
    if key not in _SQRT_COV:
        mu, cov = exact_moments(spec)
        evals, evecs = np.linalg.eigh(cov)
        root = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T
        _SQRT_COV[key] = (mu, cov, root)
    mu, cov, root = _SQRT_COV[key]
    x = samples.detach().double().cpu().reshape(samples.shape[0], -1).numpy()
    if x.shape[0] < 2 or x.shape[1] != mu.shape[0]:
        raise DataError(f"fd_exact needs at least 2 samples of {mu.shape[0]} elements, got "
                        f"{tuple(samples.shape)}")
    mu_s = x.mean(0)
    s = np.cov(x, rowvar=False)
    mid = root @ s @ root
    ev = np.linalg.eigvalsh(0.5 * (mid + mid.T))
    tr_sqrt = float(np.sqrt(np.clip(ev, 0, None)).sum())
    return float(((mu_s - mu) ** 2).sum() + np.trace(s) + np.trace(cov) - 2 * tr_sqrt)


def run_exact(net, dataset, objective, *, cache_dir: Union[str, os.PathLike, None], device,
              **kw) -> dict[str, float]:
    """The loop's and ``mfr eval``'s call: the metrics under the objective's guidance target."""
    target = guidance_of(objective, conditional=dataset.info.num_classes is not None)
    return exact_metrics(net, dataset, target=target, cache_dir=cache_dir, device=device,
                         **{**DEFAULTS, **kw})
