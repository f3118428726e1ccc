"""Tests of vdg.data.gpu_augment: batched ops against torchvision, the samplers, the view modules."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode, v2

from vdg.data import gpu_augment as ga
from vdg.data.recipes import ViewRecipe

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
# Identity pipeline (whole-image crop, every probability 0): tests switch single ops on with `replace`.
ALL_OFF = ViewRecipe(
    crop_min_scale=1.0,
    color_jitter_prob=0.0,
    grayscale_prob=0.0,
    blur_prob=0.0,
    solarize_prob=0.0,
    flip_prob=0.0,
)


def _images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _smooth_images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Natural-image-like content: random 8x8 images up-sampled bilinearly."""
    coarse = _images(n, 8, seed)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------ ops vs torchvision, per image
@pytest.mark.parametrize(
    ("op", "reference", "factors"),
    [
        (ga.adjust_brightness, TF.adjust_brightness, (0.6, 1.4)),
        (ga.adjust_contrast, TF.adjust_contrast, (0.6, 1.4)),
        (ga.adjust_saturation, TF.adjust_saturation, (0.0, 1.2)),
        (ga.adjust_hue, TF.adjust_hue, (-0.1, 0.37)),
    ],
)
def test_colour_op_matches_torchvision_per_image(op, reference, factors) -> None:
    images = _images()
    out = op(images, torch.tensor(factors))
    for i, factor in enumerate(factors):
        torch.testing.assert_close(out[i], reference(images[i], factor), atol=1e-5, rtol=0)


def test_grayscale_solarize_hflip_match_torchvision() -> None:
    images = _images()
    torch.testing.assert_close(ga.rgb_to_grayscale(images), TF.rgb_to_grayscale(images, 3), atol=1e-6, rtol=0)
    out = ga.solarize(images, torch.tensor([0.5, 0.8]))
    torch.testing.assert_close(out[0], TF.solarize(images[0], 0.5))
    torch.testing.assert_close(out[1], TF.solarize(images[1], 0.8))
    out = ga.hflip(images, torch.tensor([True, False]))
    torch.testing.assert_close(out[0], TF.horizontal_flip(images[0]))
    torch.testing.assert_close(out[1], images[1])


def test_color_jitter_runs_each_images_own_order() -> None:
    images = _images(n=6)
    factors = torch.tensor([[0.7, 1.3, 0.4, 0.08]] * 3 + [[1.35, 0.65, 1.2, -0.1]] * 3)
    order = torch.tensor([[3, 0, 1, 2], [0, 3, 2, 1], [2, 1, 3, 0], [1, 2, 0, 3], [0, 1, 2, 3], [3, 2, 1, 0]])
    reference_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    out = ga.color_jitter(images, factors, order)
    for i in range(len(images)):
        expected = images[i]
        for op_id in order[i].tolist():
            expected = reference_ops[op_id](expected, factors[i, op_id].item())
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


def test_gaussian_blur_matches_torchvision_per_image() -> None:
    images = _images()
    sigmas = (0.7, 1.6)
    kernel_size = ga.blur_kernel_size(max(sigmas))
    assert kernel_size == 11
    out = ga.gaussian_blur(images, torch.tensor(sigmas), kernel_size)
    for i, sigma in enumerate(sigmas):
        expected = TF.gaussian_blur(images[i], [kernel_size, kernel_size], [sigma, sigma])
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    # The default size comes from the largest sigma.
    torch.testing.assert_close(ga.gaussian_blur(images, torch.tensor(sigmas)), out)


def test_resized_crop_identity_box_is_exact() -> None:
    images = _images()
    out = ga.resized_crop(images, torch.tensor([[0, 0, 32, 32]] * 2), 32)
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


def test_resized_crop_upsampling_matches_torchvision_per_image() -> None:
    images = _smooth_images()
    boxes = torch.tensor([[4, 6, 16, 20], [10, 0, 22, 13]])
    out = ga.resized_crop(images, boxes, 32)
    for i, (top, left, height, width) in enumerate(boxes.tolist()):
        expected = TF.resized_crop(
            images[i], top, left, height, width, [32, 32], InterpolationMode.BICUBIC, antialias=True
        ).clamp(0, 1)
        # Not tighter: grid_sample's cubic is a=-0.75 vs PIL's a=-0.5, and edge taps read real neighbours.
        # A half-pixel mapping error (align_corners=True) gives a mean 1-2e-2 and an interior max 5-7e-2.
        assert (out[i] - expected).abs().mean() < 1e-2
        assert (out[i] - expected)[:, 2:-2, 2:-2].abs().max() < 3e-2


# -------------------------------------------------------------------------------------------- samplers
def test_crop_boxes_respect_scale_ratio_and_image() -> None:
    gen = torch.Generator().manual_seed(0)
    boxes = ga.sample_crop_boxes(20_000, 512, 512, (0.2, 1.0), generator=gen)
    top, left, height, width = boxes.T.double()
    fits = (width <= 512) & (height <= 512)
    assert fits.all() and (height > 0).all() and (width > 0).all()
    assert (
        (top >= 0).all() and (left >= 0).all() and (top + height <= 512).all() and (left + width <= 512).all()
    )
    full = (height == 512) & (width == 512)  # the fallback on a square image is the whole image
    area, ratio = (height * width / 512**2)[~full], (width / height)[~full]
    assert area.min() > 0.2 * 0.99 and area.max() <= 1.0
    assert ratio.min() > 0.75 * 0.99 and ratio.max() < 4 / 3 * 1.01
    assert full.float().mean() < 0.02
    # Corners are uniform over the free space: their mean relative offset is 1/2.
    assert abs((top / (512 - height).clamp(min=1))[~full].mean() - 0.5) < 0.02


def test_crop_boxes_match_torchvision_distribution_on_cifar() -> None:
    gen = torch.Generator().manual_seed(1)
    ours = ga.sample_crop_boxes(20_000, 32, 32, (0.2, 1.0), generator=gen).double()
    torch.manual_seed(1)
    image = torch.zeros(3, 32, 32)
    theirs = torch.tensor(
        [v2.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)]
    ).double()
    for column in range(4):  # top, left, height, width
        assert abs(ours[:, column].mean() - theirs[:, column].mean()) < 0.4  # pixels; std ~6, s.e. ~0.1
    area = lambda b: (b[:, 2] * b[:, 3]).mean() / 32**2
    assert abs(area(ours) - area(theirs)) < 0.02


def test_crop_boxes_fallback_is_torchvision_centre_crop() -> None:
    # A 10x1000 image cannot hold a box of >= 90% area with a ratio in [3/4, 4/3]: always the fallback.
    boxes = ga.sample_crop_boxes(100, 10, 1000, (0.9, 1.0), generator=torch.Generator().manual_seed(0))
    expected = torch.tensor(
        v2.RandomResizedCrop.get_params(torch.zeros(3, 10, 1000), [0.9, 1.0], [3 / 4, 4 / 3])
    )
    assert (boxes == expected).all()


def test_view_params_probabilities_and_ranges() -> None:
    recipe = ViewRecipe(
        color_jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.3, solarize_prob=0.1, flip_prob=0.5
    )
    n = 20_000
    params = ga.sample_view_params(recipe, n, 32, 32, generator=torch.Generator().manual_seed(0))
    for name, prob in [("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.3), ("solarize", 0.1), ("flip", 0.5)]:
        mask = getattr(params, name)
        assert mask.shape == (n,) and mask.dtype == torch.bool
        assert abs(mask.float().mean().item() - prob) < 0.02, name
    lows, highs = torch.tensor([0.6, 0.6, 0.8, -0.1]), torch.tensor([1.4, 1.4, 1.2, 0.1])
    factors = params.jitter_factors
    assert (factors >= lows).all() and (factors <= highs).all()
    torch.testing.assert_close(factors.mean(0), (lows + highs) / 2, atol=0.01, rtol=0)
    order = params.jitter_order
    assert (order.sort(dim=1).values == torch.arange(4)).all()
    slot_freq = torch.nn.functional.one_hot(order, 4).float().mean(0)  # [slot, op]
    torch.testing.assert_close(slot_freq, torch.full((4, 4), 0.25), atol=0.02, rtol=0)
    sigma = params.blur_sigma
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean().item() - 1.05) < 0.02


# ---------------------------------------------------------------------------------------------- modules
def test_view_output_shape_dtype_and_determinism() -> None:
    augment = ga.GPUViewAugment(ViewRecipe(blur_prob=0.5), 24, CIFAR_MEAN, CIFAR_STD)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 24, 24) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(augment(images, torch.Generator().manual_seed(0)), out, atol=0, rtol=0)
    assert not torch.equal(augment(images, torch.Generator().manual_seed(1)), out)
    with pytest.raises(TypeError):
        augment(images.float())


def test_view_normalises_constant_image() -> None:
    augment = ga.GPUViewAugment(ALL_OFF, 32, CIFAR_MEAN, CIFAR_STD)
    out = augment(torch.full((4, 3, 32, 32), 153, dtype=torch.uint8))
    expected = (153 / 255 - torch.tensor(CIFAR_MEAN)) / torch.tensor(CIFAR_STD)
    torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand_as(out), atol=1e-5, rtol=0)


def test_view_applies_certain_ops() -> None:
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    floats = images.float() / 255
    view = lambda recipe: ga.GPUViewAugment(recipe, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(images)
    out = view(replace(ALL_OFF, solarize_prob=1.0, flip_prob=1.0))
    torch.testing.assert_close(out, TF.horizontal_flip(TF.solarize(floats, 0.5)), atol=1e-5, rtol=0)
    out = view(replace(ALL_OFF, grayscale_prob=1.0))
    torch.testing.assert_close(out, TF.rgb_to_grayscale(floats, 3), atol=1e-5, rtol=0)
    # Jitter with brightness only: each image is scaled by its own factor in [0.6, 1.4].
    out = view(replace(ALL_OFF, color_jitter_prob=1.0, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0))
    unclipped = (floats > 0.1) & (floats < 0.7)
    ratios = [(out[i] / floats[i])[unclipped[i]] for i in range(len(images))]
    assert all(r.max() - r.min() < 1e-3 and 0.6 - 1e-4 < r.mean() < 1.4 + 1e-4 for r in ratios)
    assert len({round(r.mean().item(), 4) for r in ratios}) == len(images)


def test_forward_never_syncs_with_host() -> None:
    # On the meta device tensors have no data: .item(), .cpu(), .tolist(), nonzero and boolean indexing raise.
    recipe = ViewRecipe(blur_prob=1.0, solarize_prob=1.0)
    augment = ga.GPUMultiViewAugment([recipe, ViewRecipe()], 32, CIFAR_MEAN, CIFAR_STD).to("meta")
    views = augment(torch.empty(8, 3, 32, 32, dtype=torch.uint8, device="meta"))
    assert [v.shape for v in views] == [(8, 3, 32, 32)] * 2 and views[0].device.type == "meta"


def test_multi_view_uses_one_recipe_per_view() -> None:
    blurred = replace(ALL_OFF, blur_prob=1.0, blur_sigma_min=2.0, blur_sigma_max=2.0)
    augment = ga.GPUMultiViewAugment([ALL_OFF, blurred], 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    first, second = augment(images)
    torch.testing.assert_close(first, images.float() / 255, atol=1e-5, rtol=0)
    assert augment.views[1].blur_kernel_size == 13
    expected = TF.gaussian_blur(images.float() / 255, [13, 13], [2.0, 2.0])
    torch.testing.assert_close(second, expected, atol=1e-5, rtol=0)
