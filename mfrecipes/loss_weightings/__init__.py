"""Loss weightings: ``weights(err, t, r) -> [B]`` (no gradient).

Importing the package registers every built-in weighting.
"""
from mfrecipes.loss_weightings.adaptive import AdaptiveWeighting, adaptive_weights
from mfrecipes.loss_weightings.constant import ConstantWeighting
from mfrecipes.loss_weightings.min_snr import MinSNRWeighting, min_snr_alpha

__all__ = ["AdaptiveWeighting", "ConstantWeighting", "MinSNRWeighting", "adaptive_weights",
           "min_snr_alpha"]
