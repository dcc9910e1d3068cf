"""scikit-learn's handwritten digits (1,797 images, 8x8, 10 classes), shipped with the install."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def load_digits_tensors(resolution: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as ``x [N, 1, R, R]`` float32 in [-1, 1] and ``y [N]`` int64 (0..9).

    The originals are 8x8 with values 0..16; ``resolution`` > 8 upsamples bilinearly.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div(16.0).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1), torch.from_numpy(d.target).long()
