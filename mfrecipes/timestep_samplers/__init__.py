"""Timestep samplers: ``sample(batch_size, *, progress, generator, device) -> (t, r)``.

Importing the package registers every built-in sampler.
"""
from mfrecipes.timestep_samplers import monte_carlo  # noqa: F401
from mfrecipes.timestep_samplers.base import PairSampler
from mfrecipes.timestep_samplers.dtd import DTD
from mfrecipes.timestep_samplers.logit_normal import LogitNormal
from mfrecipes.timestep_samplers.uniform import Uniform

__all__ = ["PairSampler", "LogitNormal", "Uniform", "DTD"]
