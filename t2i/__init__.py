"""The text-to-image world: SD3 / SDXL through diffusers + peft, reward models, tiny offline builders.

Importing this package is cheap (presets only); diffusers / transformers load with T2IWorld and the reward factories.
"""

from .presets import FAMILIES, PRESETS, Preset, get_preset

__all__ = ["FAMILIES", "PRESETS", "Preset", "ROLES", "T2IWorld", "get_preset", "read_prompts"]


def __getattr__(name):  # lazy: `import t2i` must not import diffusers (the toy path stays fast)
    if name in ("T2IWorld", "ROLES", "read_prompts", "load_pipeline"):
        from . import world

        return getattr(world, name)
    raise AttributeError(f"module 't2i' has no attribute {name!r}")
