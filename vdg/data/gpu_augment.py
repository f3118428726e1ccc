"""GPU-resident batched SSL augmentation: one `ViewRecipe` applied to a whole uint8 batch on its device.

Every image gets its own random parameters, drawn as in the CPU torchvision pipeline. A forward must not loop
over images in Python nor synchronise with the host (.item(), .cpu(), .tolist(), nonzero, boolean indexing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vdg.data.recipes import ViewRecipe

# We write our own ops rather than use kornia: kornia is not a dependency of this project, and these ops are
# fully batched with per-image parameters held in tensors, so a forward never waits on the host.

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # the ids used in jitter orders and factors
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop default aspect-ratio range
CROP_CANDIDATES = 10  # torchvision's RandomResizedCrop tries 10 boxes before its centre-crop fallback


def _per_image(values: Tensor) -> Tensor:
    """[N] -> [N, 1, 1, 1], to broadcast a per-image parameter over an [N, C, H, W] batch."""
    return values.reshape(-1, 1, 1, 1)


def _luma(images: Tensor) -> Tensor:
    """ITU-R 601-2 luma, [N, 3, H, W] -> [N, 1, H, W] (the weights of torchvision and PIL)."""
    r, g, b = images.unbind(1)
    return (r * 0.2989 + g * 0.587 + b * 0.114).unsqueeze(1)


def _blend(images: Tensor, target: Tensor, factor: Tensor) -> Tensor:
    """factor * images + (1 - factor) * target, clamped to [0, 1]; factor is per image, [N].

    torch.lerp is one fused pass and returns `images` exactly where factor is 1.
    """
    return torch.lerp(target, images, _per_image(factor)).clamp_(0, 1)


# ---------------------------------------------------------------------------------------------- batched ops
def rgb_to_grayscale(images: Tensor) -> Tensor:
    """Luma replicated over 3 channels: [N, 3, H, W] -> [N, 3, H, W]."""
    return _luma(images).expand_as(images)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """Scale each image by its factor [N], clamped to [0, 1]."""
    return (images * _per_image(factor)).clamp(0, 1)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Blend towards the mean of each image's grayscale, as torchvision does."""
    return _blend(images, _luma(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """Blend towards each pixel's grayscale: 0 gives grey, 1 the image, > 1 more saturated."""
    return _blend(images, _luma(images), factor)


def adjust_hue(images: Tensor, factor: Tensor) -> Tensor:
    """Rotate the hue by factor (in turns, [-0.5, 0.5]) per image, through HSV like torchvision.

    HSV -> RGB is the closed form of the 6-sector table: channel = v - chroma * clamp(min(k, 4 - k), 0, 1)
    with k = (n + hue in sextants) mod 6 and n = 5, 3, 1 for R, G, B; saturation never needs forming.
    """
    r, g, b = images.unbind(1)
    value = images.amax(1)
    chroma = value - images.amin(1)
    # Hue in sextants; grey pixels (chroma 0) get hue 0 as their numerators are 0 too.
    sextant = torch.where(value == r, g - b, torch.where(value == g, b - r + 2 * chroma, r - g + 4 * chroma))
    sextant = sextant / torch.where(chroma > 0, chroma, 1.0) + 6 * factor.view(-1, 1, 1)
    n = torch.arange(5.0, 0.0, -2.0, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    k = (n + sextant.unsqueeze(1)) % 6
    return value.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def _linear_jitter(images: Tensor, factors: Tensor, op: Tensor, active: Tensor) -> Tensor:
    """One jitter slot: image i runs blend op[i] (0 brightness, 1 contrast, 2 saturation) if active[i]."""
    gray = _luma(images)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    target = torch.where(_per_image(op == 0), 0.0, torch.where(_per_image(op == 1), mean, gray))
    factor = torch.where(active, factors.gather(1, op[:, None]).squeeze(1), 1.0)  # factor 1: exact identity
    return _blend(images, target, factor)


def color_jitter(images: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """ColorJitter with per-image factors [N, 4] and op order [N, 4] (a permutation of JITTER_OPS ids).

    Brightness, contrast and saturation are all blends towards a target (black, the grey mean, the grey
    image), so one blend serves a slot whatever op each image has there. Only hue is costly, so instead of
    evaluating it in all 4 slots we run each image's blend ops that precede hue, hue once, then the rest.
    """
    is_hue = (order == 3).int()
    hue_slot = is_hue.argmax(1)  # number of blend ops before hue
    blend_ops = order.gather(1, torch.argsort(is_hue, dim=1, stable=True)[:, :3])  # the order without hue
    for j in range(3):
        images = _linear_jitter(images, factors, blend_ops[:, j], active=j < hue_slot)
    images = adjust_hue(images, factors[:, 3])
    for j in range(3):
        images = _linear_jitter(images, factors, blend_ops[:, j], active=j >= hue_slot)
    return images


def blur_kernel_size(sigma_max: float) -> int:
    """2*ceil(3*sigma_max)+1: a +-3 sigma support, which holds 99.7% of the Gaussian mass.

    The official code blurs with PIL's GaussianBlur(radius=sigma): radius is the standard deviation and there
    is no kernel size to copy (PIL approximates the Gaussian by box blurs), so we truncate at 3 sigma. One
    size serves the whole batch (one convolution); it comes from the recipe's largest sigma so that it is
    known without reading the sampled sigmas back from the device.
    """
    return 2 * math.ceil(3 * sigma_max) + 1


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int | None = None) -> Tensor:
    """Separable Gaussian blur with per-image sigma [N] and reflect padding (torchvision's `gaussian_blur`).

    kernel_size defaults to blur_kernel_size(sigma.max()), which reads sigma on the host: pass it in hot code.
    The radius is capped at the image size minus 1, the most reflect padding allows.
    """
    if kernel_size is None:
        kernel_size = blur_kernel_size(float(sigma.max()))
    n, channels, height, width = images.shape
    radius = min(kernel_size // 2, height - 1, width - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma.to(images.dtype)[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, dim=0)  # [N*C, K]
    # Every (image, channel) plane is one group of a single depthwise convolution.
    planes = F.pad(images.reshape(1, n * channels, height, width), (radius,) * 4, mode="reflect")
    planes = F.conv2d(planes, kernel[:, None, None, :], groups=n * channels)
    planes = F.conv2d(planes, kernel[:, None, :, None], groups=n * channels)
    return planes.reshape(n, channels, height, width)


def solarize(images: Tensor, threshold: Tensor) -> Tensor:
    """Invert the pixels >= threshold (per image, [N], as a fraction of the full range)."""
    return torch.where(images >= _per_image(threshold), 1 - images, images)


def hflip(images: Tensor, mask: Tensor) -> Tensor:
    """Mirror left-right the images where mask [N] (bool) is True."""
    return torch.where(_per_image(mask), images.flip(-1), images)


def resized_crop(images: Tensor, boxes: Tensor, size: int, mode: str = "bicubic") -> Tensor:
    """Crop boxes [N, 4] = (top, left, height, width) in pixels and resize each to size x size, bicubic.

    mode="bilinear" resizes bilinearly instead (the linear-evaluation crop of the official code).

    Output pixel centres map onto the box as in torchvision's crop-then-resize (align_corners=False), so an
    up-sampling crop matches it except that (a) grid_sample's cubic uses a=-0.75 where PIL and torchvision's
    antialiased resize use a=-0.5, and (b) taps beyond the box read the real neighbouring pixels instead of
    the replicated box edge. Down-sampling is not antialiased. Output is clamped to [0, 1], like PIL's uint8.
    """
    n, channels, height, width = images.shape
    top, left, box_h, box_w = boxes.to(images.dtype).unbind(1)
    zero = torch.zeros_like(top)
    theta = torch.stack(
        [
            torch.stack([box_w / width, zero, (2 * left + box_w) / width - 1], dim=1),
            torch.stack([zero, box_h / height, (2 * top + box_h) / height - 1], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, [n, channels, size, size], align_corners=False)
    out = F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.clamp(0, 1)


# ---------------------------------------------------------------------------------------- parameter sampling
def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = CROP_RATIO,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """RandomResizedCrop boxes [n, 4] int64 (top, left, height, width), torchvision's distribution.

    Area fraction ~ U(scale) and log aspect ratio ~ U(log ratio); torchvision retries up to 10 times until
    the box fits, so we draw 10 candidates at once and keep the first that fits, else its centre crop.
    """
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=device)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * rand(n, CROP_CANDIDATES))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * rand(n, CROP_CANDIDATES))
    box_w = torch.sqrt(area * aspect).round().long()  # round half to even, like Python's round
    box_h = torch.sqrt(area / aspect).round().long()
    fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first candidate that fits (0 if none does)
    any_fits = fits.any(1)

    in_ratio = width / height  # torchvision's fallback: the largest centred box with a ratio in range
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    box_w = torch.where(any_fits, box_w.gather(1, first).squeeze(1), fallback_w)
    box_h = torch.where(any_fits, box_h.gather(1, first).squeeze(1), fallback_h)
    # Uniform integer corner in [0, size - box]; the clamp guards rand() * (k + 1) rounding up to k + 1.
    top = torch.minimum((rand(n) * (height - box_h + 1)).long(), height - box_h)
    left = torch.minimum((rand(n) * (width - box_w + 1)).long(), width - box_w)
    top = torch.where(any_fits, top, (height - fallback_h) // 2)
    left = torch.where(any_fits, left, (width - fallback_w) // 2)
    return torch.stack([top, left, box_h, box_w], dim=1)


def sample_jitter_factors(
    n: int,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """[n, 4] factors in JITTER_OPS order: U(max(0, 1-x), 1+x) for the first three, U(-hue, hue) for hue."""
    bounds = [(max(0.0, 1 - x), 1 + x) for x in (brightness, contrast, saturation)] + [(-hue, hue)]
    u = torch.rand(n, 4, generator=generator, device=device)
    return torch.stack([lo + (hi - lo) * u[:, i] for i, (lo, hi) in enumerate(bounds)], dim=1)


def sample_jitter_order(
    n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """[n, 4] int64: per image a uniform random permutation of the JITTER_OPS ids, like torch.randperm(4)."""
    return torch.rand(n, 4, generator=generator, device=device).argsort(dim=1)


def sample_mask(
    n: int, prob: float, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """[n] bool, True with probability prob."""
    return torch.rand(n, generator=generator, device=device) < prob


class ViewParams(NamedTuple):
    """The random draws of one view for a batch of N images."""

    boxes: Tensor  # [N, 4] int64: top, left, height, width
    jitter: Tensor  # [N] bool
    jitter_factors: Tensor  # [N, 4]: brightness, contrast, saturation, hue
    jitter_order: Tensor  # [N, 4]: permutation of JITTER_OPS ids
    grayscale: Tensor  # [N] bool
    blur: Tensor  # [N] bool
    blur_sigma: Tensor  # [N]
    solarize: Tensor  # [N] bool
    flip: Tensor  # [N] bool


def sample_view_params(
    recipe: ViewRecipe,
    n: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> ViewParams:
    """Every draw is made whatever the probabilities, so the random stream does not depend on the recipe."""
    kw = {"generator": generator, "device": device}
    r = recipe
    sigma_u = torch.rand(n, **kw)
    return ViewParams(
        boxes=sample_crop_boxes(n, height, width, (r.crop_min_scale, r.crop_max_scale), CROP_RATIO, **kw),
        jitter=sample_mask(n, r.color_jitter_prob, **kw),
        jitter_factors=sample_jitter_factors(n, r.brightness, r.contrast, r.saturation, r.hue, **kw),
        jitter_order=sample_jitter_order(n, **kw),
        grayscale=sample_mask(n, r.grayscale_prob, **kw),
        blur=sample_mask(n, r.blur_prob, **kw),
        blur_sigma=r.blur_sigma_min + (r.blur_sigma_max - r.blur_sigma_min) * sigma_u,
        solarize=sample_mask(n, r.solarize_prob, **kw),
        flip=sample_mask(n, r.flip_prob, **kw),
    )


# ------------------------------------------------------------------------------------------------- modules
class GPUViewAugment(nn.Module):
    """One view's pipeline on a batch: crop -> jitter (p) -> gray (p) -> blur (p) -> solarize (p) -> flip (p)
    -> normalise. uint8 [N, 3, H, W] in, float32 [N, 3, size, size] out, on the input's device.

    A batch shares one H x W (CIFAR, STL, or images resized at decode); crops that shrink are not antialiased.

    Example: ``GPUViewAugment(ViewRecipe(), 32, CIFAR10_MEAN, CIFAR10_STD)(images_uint8_on_gpu)``.
    """

    def __init__(self, recipe: ViewRecipe, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        recipe.validate()
        self.recipe = recipe
        self.size = size
        self.blur_kernel_size = blur_kernel_size(recipe.blur_sigma_max)
        as_channels = lambda values: torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", as_channels(mean), persistent=False)
        self.register_buffer("std", as_channels(std), persistent=False)

    def apply_params(self, images: Tensor, params: ViewParams) -> Tensor:
        """Apply drawn parameters to float images in [0, 1]; an op with probability 0 is skipped outright."""
        r = self.recipe
        x = resized_crop(images, params.boxes, self.size)
        if r.color_jitter_prob > 0:
            jittered = color_jitter(x, params.jitter_factors, params.jitter_order)
            x = torch.where(_per_image(params.jitter), jittered, x)
        if r.grayscale_prob > 0:
            x = torch.where(_per_image(params.grayscale), rgb_to_grayscale(x), x)
        if r.blur_prob > 0:
            blurred = gaussian_blur(x, params.blur_sigma, self.blur_kernel_size)
            x = torch.where(_per_image(params.blur), blurred, x)
        if r.solarize_prob > 0:
            threshold = torch.full_like(params.blur_sigma, r.solarize_threshold)
            x = torch.where(_per_image(params.solarize), solarize(x, threshold), x)
        if r.flip_prob > 0:
            x = hflip(x, params.flip)
        return (x - self.mean) / self.std

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            # not user input: the data module's own tensors
            raise TypeError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        n, _, height, width = images.shape
        params = sample_view_params(self.recipe, n, height, width, generator, images.device)
        return self.apply_params(images.float() / 255, params)


class GPUMultiViewAugment(nn.Module):
    """One GPUViewAugment per recipe; returns the list of views, view i from recipes[i]."""

    def __init__(
        self, recipes: Sequence[ViewRecipe], size: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        self.views = nn.ModuleList(GPUViewAugment(recipe, size, mean, std) for recipe in recipes)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        return [view(images, generator) for view in self.views]
