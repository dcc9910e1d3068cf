"""Gap schedules: ``weights(t, r, progress) -> [B]`` (1 on r = t samples).

Importing the package registers every built-in schedule.
"""
from mfrecipes.gap_schedules.constant import ConstantGapWeighting
from mfrecipes.gap_schedules.progressive import ProgressiveGapWeighting

__all__ = ["ConstantGapWeighting", "ProgressiveGapWeighting"]
