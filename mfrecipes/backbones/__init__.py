"""Backbones: u(z, t, h, y) networks. Importing this package registers ``mlp``, ``dit`` and the
DiT sizes ``dit_{s,b,m,l,xl}_{2,4,8}``, ``dit_tiny_{2,4}``, and the DDPM++ U-Net ``unet``,
``unet_cifar10``, ``unet_tiny``."""
from mfrecipes.backbones import dit, mlp, unet  # noqa: F401  (registration on import)
from mfrecipes.backbones.dit import DiT
from mfrecipes.backbones.mlp import MLP
from mfrecipes.backbones.unet import SongUNet

__all__ = ["DiT", "MLP", "SongUNet", "parameter_count", "format_count", "KNOWN_COUNTS"]

# The input each built-in backbone is counted on (``mfr list``): CIFAR-10 images for the U-Nets,
# ImageNet-256 SD-VAE latents with 1,000 classes for the DiTs, 2-D points for the MLP.
_COUNTED_ON = {"unet": ((3, 32, 32), None), "dit": ((4, 32, 32), 1000), "mlp": ((2,), None)}

# Parameter counts of the built-ins with their defaults on the input above, for ``mfr list``
# without importing timm or building anything (a test rebuilds each on the meta device and
# compares, so an architecture change that forgets this table fails there).
KNOWN_COUNTS = {
    "dit": 131_091_472, "dit_b_2": 131_091_472, "dit_b_4": 131_165_248, "dit_b_8": 131_460_352,
    "dit_l_2": 459_137_040, "dit_l_4": 459_235_392, "dit_l_8": 459_628_800,
    "dit_m_2": 308_019_216, "dit_m_4": 308_117_568, "dit_m_8": 308_510_976,
    "dit_s_2": 33_105_424, "dit_s_4": 33_142_336, "dit_s_8": 33_289_984,
    "dit_tiny_2": 1_451_536, "dit_tiny_4": 1_463_872,
    "dit_xl_2": 676_440_592, "dit_xl_4": 676_551_232, "dit_xl_8": 676_993_792,
    "mlp": 132_482, "unet": 55_929_347, "unet_cifar10": 55_932_419, "unet_tiny": 178_019,
}


def counted_on(name: str):
    """``(input_shape, num_classes)`` a backbone's parameter count refers to, or None."""
    return _COUNTED_ON.get(name.split("_")[0])


def parameter_count(factory, input_shape, num_classes=None) -> int:
    """Parameters of ``factory(input_shape=..., num_classes=...)`` with its defaults, built on
    the meta device (no memory, no initialisation work: a 675M DiT-XL counts in milliseconds)."""
    import torch

    with torch.device("meta"):
        net = factory(input_shape=tuple(input_shape), num_classes=num_classes)
    return sum(p.numel() for p in net.parameters())


def format_count(n: int) -> str:
    """55,932,419 -> '55.9M'; 675,000,000 -> '675M'; 12,345 -> '12.3k'."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            v = n / div
            return f"{v:.3g}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return str(n)
