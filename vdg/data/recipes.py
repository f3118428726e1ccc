"""Per-view augmentation recipe: the numbers of one view's pipeline, read from the dataset yaml.

Both backends (CPU torchvision and GPU batched ops) consume this one description, so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from vdg.core.errors import ConfigError


@dataclass(frozen=True)
class ViewRecipe:
    """One view's augmentation, in the order the official code applies them.

    Order: random-resized-crop -> colour jitter (p) -> grayscale (p) -> gaussian blur (p) -> solarize (p)
    -> horizontal flip (p) -> to float -> normalise. Defaults are the official CIFAR-10 values (reference §1.10).
    """

    crop_min_scale: float = 0.2
    crop_max_scale: float = 1.0
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 2.0
    solarize_prob: float = 0.1
    solarize_threshold: float = (
        0.5  # fraction of the full range: 128/255 on uint8 images (PIL's threshold 128)
    )
    flip_prob: float = 0.5

    @classmethod
    def from_config(cls, cfg: Any) -> ViewRecipe:
        """Build from a mapping (dict or OmegaConf node); unknown keys are an error, missing keys take defaults."""
        data = dict(cfg)
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(
                f"unknown augmentation key(s) {unknown} in dataset.augment; allowed keys: {sorted(allowed)}"
            )
        recipe = cls(**{k: float(v) for k, v in data.items()})
        recipe.validate()
        return recipe

    def validate(self) -> None:
        probs = ("color_jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob", "flip_prob")
        for name in probs:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"dataset.augment.{name}={value} must lie in [0, 1]")
        if not 0.0 < self.crop_min_scale <= self.crop_max_scale <= 1.0:
            raise ConfigError(
                f"dataset.augment crop scales ({self.crop_min_scale}, {self.crop_max_scale}) must satisfy "
                "0 < crop_min_scale <= crop_max_scale <= 1"
            )
        if not 0.0 < self.blur_sigma_min <= self.blur_sigma_max:
            raise ConfigError("dataset.augment blur sigmas must satisfy 0 < blur_sigma_min <= blur_sigma_max")
