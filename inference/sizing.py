"""Translating an image at its own size (``--keep_size``) or at the training size.

A light generator pools its features globally before the gamma/beta MLP, so it runs on any H×W
that is a multiple of 4 (two stride-2 stages). Other sides are reflect-padded on the bottom/right
and cropped back, so no border appears. The full model flattens an (img_size/4)² feature map into
its first FC and can only translate img_size×img_size.

Every path that shows or writes a translation (img_dir/test/generate/video phases, demo.py)
prepares images here, so the same file gives the same pixels everywhere.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import errors
import images
from dataset import test_transform
from model import ArchConfig
from networks import GeneratorOutput

MULTIPLE = 4        # two stride-2 stages
MIN_SIDE = 8        # the bottleneck's reflection padding needs feature maps of at least 2×2


class Translates(Protocol):
    """What this module needs of a model.Translator."""

    arch: ArchConfig

    def translate(self, images: torch.Tensor, direction: str) -> GeneratorOutput: ...


def check_keep_size(arch: ArchConfig) -> None:
    """A one-line UserError for models that cannot translate other sizes, saying why."""
    if arch.is_full:
        size = arch.img_size
        raise errors.UserError(
            f'--keep_size needs a light model: this full model flattens its {size // 4}x{size // 4} feature map '
            f'into the gamma/beta MLP, so it only translates {size}x{size} images (drop --keep_size, or train '
            f'with --light True)')


def fit_max_size(image: Image.Image, max_size: int | None) -> Image.Image:
    """Shrink so that the long side is at most ``max_size`` (aspect ratio kept); None/0: unchanged."""
    long_side = max(image.size)
    if not max_size or long_side <= max_size:
        return image
    scale = max_size / long_side
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> 1×3×H×W in [-1, 1] (the test transform's scaling, no resize)."""
    array = torch.from_numpy(np.asarray(image.convert('RGB'), dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float().div(127.5).sub(1).unsqueeze(0)


def translate_any_size(translator: Translates, images: torch.Tensor, direction: str) -> GeneratorOutput:
    """Translate N×3×H×W at its own size: reflect-pad H and W up to multiples of 4, crop back.

    The heatmap is cropped to the padded image's valid quarter-resolution area (ceil(H/4)×ceil(W/4)).
    """
    height, width = images.shape[-2:]
    if min(height, width) < MIN_SIDE:
        raise errors.UserError(f'image of {width}x{height} pixels is too small to translate at its own size '
                              f'(needs at least {MIN_SIDE} per side)')
    pad_h, pad_w = -height % MULTIPLE, -width % MULTIPLE
    padded = F.pad(images, (0, pad_w, 0, pad_h), mode='reflect') if pad_h or pad_w else images
    out = translator.translate(padded, direction)
    crop = lambda t, f: t[..., :-(-height // f), :-(-width // f)] if t is not None else None  # noqa: E731
    return GeneratorOutput(crop(out.image, 1), out.cam_logit, crop(out.heatmap, MULTIPLE),
                           crop(out.attention, 1))


def translate_image(translator: Translates, image: Image.Image, direction: str, keep_size: bool,
                    max_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One RGB image -> (translation, JET heatmap), both H×W×3 uint8.

    keep_size: at the image's own size (at most ``max_size`` on the long side while translating,
    then resized back), so the output has the input's size. Otherwise PT's test transform: a
    bilinear resize to img_size×img_size, and the output has that size.
    """
    if not keep_size:
        size = translator.arch.img_size
        out = translator.translate(test_transform(size)(image.convert('RGB')).unsqueeze(0), direction)
        return images.tensor_to_uint8(out.image[0]), images.heatmap_to_uint8(out.heatmap[0], (size, size))
    check_keep_size(translator.arch)
    work = fit_max_size(image.convert('RGB'), max_size)
    out = translate_any_size(translator, to_tensor(work), direction)
    translation = images.tensor_to_uint8(out.image[0])
    if work.size != image.size:
        translation = np.asarray(Image.fromarray(translation).resize(image.size, Image.Resampling.BICUBIC))
    return translation, images.heatmap_to_uint8(out.heatmap[0], image.size)
