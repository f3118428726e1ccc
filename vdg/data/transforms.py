"""CPU (torchvision transforms v2) pipelines: one per pretraining view, and the evaluation transform.

Built from `ViewRecipe`s; the GPU backend builds its batched equivalent from the same recipes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from vdg.data.recipes import ViewRecipe


def blur_kernel_size(sigma_max: float) -> int:
    """Odd kernel covering +-3 sigma: PIL's radius blur (official code) has no kernel size, this is its support."""
    return 2 * math.ceil(3 * sigma_max) + 1


def view_transform(recipe: ViewRecipe, size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """crop -> jitter -> grayscale -> blur -> solarize -> flip -> float -> normalise (reference §1.10 order)."""
    steps: list = [
        T.ToImage(),
        T.RandomResizedCrop(
            size,
            scale=(recipe.crop_min_scale, recipe.crop_max_scale),
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        ),
    ]
    if recipe.color_jitter_prob > 0:
        jitter = T.ColorJitter(recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)
        steps.append(T.RandomApply([jitter], p=recipe.color_jitter_prob))
    if recipe.grayscale_prob > 0:
        steps.append(T.RandomGrayscale(p=recipe.grayscale_prob))
    if recipe.blur_prob > 0:
        blur = T.GaussianBlur(
            blur_kernel_size(recipe.blur_sigma_max), sigma=(recipe.blur_sigma_min, recipe.blur_sigma_max)
        )
        steps.append(T.RandomApply([blur], p=recipe.blur_prob))
    if recipe.solarize_prob > 0:
        # On uint8 images the fraction 0.5 means 127.5: pixels >= 128 invert, exactly PIL's threshold 128.
        steps.append(T.RandomSolarize(threshold=recipe.solarize_threshold * 255, p=recipe.solarize_prob))
    if recipe.flip_prob > 0:
        steps.append(T.RandomHorizontalFlip(p=recipe.flip_prob))
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    return T.Compose(steps)


def eval_transform(
    size: int, mean: Sequence[float], std: Sequence[float], resize: int | None = None
) -> T.Compose:
    """Deterministic evaluation transform: optional Resize(resize) + CenterCrop(size), then normalise.

    resize=None keeps images at their native size (CIFAR: ToTensor + Normalize, as the official code).
    """
    steps: list = [T.ToImage()]
    if resize is not None:
        steps += [T.Resize(resize, antialias=True), T.CenterCrop(size)]
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    return T.Compose(steps)


def decode_transform(size: int) -> T.Compose:
    """PIL image -> uint8 [3, size, size]: shorter side resized to size, centre crop (the GPU backend's decode).

    A no-op on images already size x size (CIFAR); larger images lose the borders of their longer side.
    """
    return T.Compose([T.ToImage(), T.Resize(size, antialias=True), T.CenterCrop(size)])


def linear_train_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Linear-evaluation train transform: RandomResizedCrop(scale 0.08-1, bilinear) + flip (reference §1.13)."""
    return T.Compose(
        [
            T.ToImage(),
            T.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(mean), list(std)),
        ]
    )


class MultiView:
    """Apply one pipeline per view to the same image: view 0 feeds the gated branch, view 1 the dense one."""

    def __init__(self, transforms: Sequence[T.Compose]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image):  # noqa: ANN001, ANN204 - PIL image or uint8 tensor in, list of tensors out
        return [t(image) for t in self.transforms]
