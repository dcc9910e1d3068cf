"""Objective ``ds_nan_rank1``: MeanFlow whose error is NaN on rank 1 only, in the third step
(calls 4 and 5 with 2 accumulation steps). Loaded through a recipe's ``imports:`` in the
DeepSpeed test runs."""
from __future__ import annotations

import os

import attrs

from mfrecipes.objectives.meanflow import MeanFlow
from mfrecipes.registry import OBJECTIVES

_calls = {"n": 0}


@OBJECTIVES.register("ds_nan_rank1")
@attrs.frozen
class NanOnRank1(MeanFlow):
    def __call__(self, *args, **kwargs):
        out = super().__call__(*args, **kwargs)
        if os.environ.get("RANK") == "1" and _calls["n"] in (4, 5):
            out.err = out.err * float("nan")
        _calls["n"] += 1
        return out
