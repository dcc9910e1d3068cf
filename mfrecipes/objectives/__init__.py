"""Objectives: the regression target and the per-sample error (JVP, CFG mixing, class dropout).

Importing this package registers every built-in objective.
"""
from mfrecipes.objectives import alphaflow, flow_matching, meanflow  # noqa: F401  (registration)
from mfrecipes.objectives import discrete_meanflow  # noqa: F401  (registration)
from mfrecipes.objectives.base import ObjectiveOutput

__all__ = ["ObjectiveOutput"]
