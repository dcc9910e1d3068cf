"""One random stream per purpose, seeded from the run seed and checkpointed.

Each kind of draw in a training step has its own CPU ``torch.Generator``:

- ``timesteps``: the sampler's (t, r) pairs and its r = t mask (the same on every rank: drawn
  for the global batch, each rank takes its rows);
- ``noise``: the Gaussian noise e of ``z_t = (1 - t) x + t e`` (also the same on every rank);
- ``objective``: every draw inside the objective: class dropout, v-target noise, the anchor's
  delta (one stream per rank: ranks hold different rows);
- ``augment``: the training-time data transform's draws (``train.augment``; per rank too).

Nothing else draws from them: evaluation, sample grids and metric models use their own seeded
generators and run inside ``torch.random.fork_rng``, so how often a run evaluates cannot change
its trajectory. Separate streams also mean that two recipes that differ in one component (a
weighting, a gap schedule) see the same noise and the same (t, r) for the same seed.
"""
from __future__ import annotations

import torch

from mfrecipes.data.plan import seeded_rng
from mfrecipes.errors import CheckpointError

__all__ = ["RandomStreams", "STREAMS"]

# Domain tags: different purposes get independent generators for the same run seed.
STREAMS = {"timesteps": 0x4D4601, "noise": 0x4D4602, "objective": 0x4D4603,
           "augment": 0x4D4604}
SHARED = ("timesteps", "noise")   # identical on every rank
PER_RANK = ("objective", "augment")


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seeded_rng(*keys).integers(2**63 - 1)))


class RandomStreams:
    """``streams.timesteps``, ``streams.noise``, ``streams.objective``, ``streams.augment``:
    CPU generators."""

    def __init__(self, seed: int, rank: int = 0):
        self.seed, self.rank = int(seed), int(rank)
        self.timesteps = _generator(self.seed, STREAMS["timesteps"])
        self.noise = _generator(self.seed, STREAMS["noise"])
        self.objective = _generator(self.seed, STREAMS["objective"], self.rank)
        self.augment = _generator(self.seed, STREAMS["augment"], self.rank)

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The rank-independent streams (saved once per checkpoint)."""
        return {k: getattr(self, k).get_state() for k in SHARED}

    def rank_state(self) -> dict[str, torch.Tensor]:
        """This rank's own streams (saved per rank)."""
        return {k: getattr(self, k).get_state() for k in PER_RANK}

    def load_shared_state(self, state) -> None:
        self._load(state, SHARED)

    def load_rank_state(self, state) -> None:
        if isinstance(state, dict) and set(state) == {"objective"}:
            # written before the augment stream existed (no run could augment then): it
            # stays freshly seeded
            self._load(state, ("objective",))
            return
        self._load(state, PER_RANK)

    def reseed_rank(self, salt: int) -> None:
        """Fresh per-rank streams (a resume onto another world size)."""
        self.objective = _generator(self.seed, STREAMS["objective"], self.rank, salt)
        self.augment = _generator(self.seed, STREAMS["augment"], self.rank, salt)

    def _load(self, state, names) -> None:
        if not isinstance(state, dict) or set(state) != set(names):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"random stream state must have keys {sorted(names)}, got {got}")
        for k in names:
            value = state[k]
            if not (torch.is_tensor(value) and value.dtype == torch.uint8):
                raise CheckpointError(f"random stream {k!r} state must be a uint8 tensor, got "
                                      f"{type(value).__name__}")
            getattr(self, k).set_state(value)
