"""Model presets of the text-to-image world: which repository, which family (flow SD3 / VP SDXL), which resolution.

Pure data, no diffusers import: the method files read preset names while validating their options.
"""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Preset:
    name: str
    repo: str
    """Hugging Face repository of the diffusers-format weights (from_pretrained), unless --model-path is given"""
    family: str
    """sd3 (rectified flow, MMDiT transformer, velocity) or sdxl (VP, UNet, eps-prediction)"""
    resolution: int
    """training / sampling resolution in pixels (square)"""
    shift: Optional[float] = None
    """SD3 timestep shift; None: the scheduler config's (SD3 / SD3.5: 3.0)"""
    gated: bool = False
    """the repository asks its users to accept a licence on the hub before downloading"""


PRESETS = {
    # DMDR trains SD3-Medium at 512 px (notes/reference-implementations.md); SD3.5 the same here.
    "sd3-medium": Preset("sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers", "sd3", 512, gated=True),
    "sd3.5-medium": Preset("sd3.5-medium", "stabilityai/stable-diffusion-3.5-medium", "sd3", 512, gated=True),
    "sd3.5-large": Preset("sd3.5-large", "stabilityai/stable-diffusion-3.5-large", "sd3", 512, gated=True),
    # DMD2 distils SDXL at its native 1024 px (SDXL degrades visibly at 512).
    "sdxl": Preset("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 1024),
}
FAMILIES = ("sd3", "sdxl")


def get_preset(name):
    if name not in PRESETS:
        raise ValueError(f"unknown text-to-image model {name!r}; valid models: {', '.join(PRESETS)}")
    return PRESETS[name]
