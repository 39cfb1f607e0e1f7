"""--keep_size: light models translate at the image's own size (reflect-padded to multiples of 4 and
cropped back, optionally capped by --max_size); full models refuse with a one-line reason."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import errors
import images as image_arrays
from inference import sizing
from model import ArchConfig, Translator
from networks import ResnetGenerator


def translator(light: bool | int = True, img_size: int = 32) -> Translator:
    torch.manual_seed(0)
    nets = {d: ResnetGenerator(3, 3, ngf=4, n_blocks=1, img_size=img_size, light=light).eval() for d in ('A2B', 'B2A')}
    return Translator(nets, ArchConfig(light=light, ch=4, n_res=1, img_size=img_size), 'cpu')


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_light_model_translates_300x200_to_300x200():
    translation, heatmap = sizing.translate_image(translator(), photo(300, 200), 'A2B', keep_size=True)
    assert translation.shape == heatmap.shape == (200, 300, 3) and translation.dtype == np.uint8


def test_sides_that_are_multiples_of_4_are_translated_as_they_are():
    model = translator()
    x = sizing.to_tensor(photo(40, 28))
    direct = model.translate(x, 'A2B')
    out = sizing.translate_any_size(model, x, 'A2B')
    assert torch.equal(out.image, direct.image) and torch.equal(out.heatmap, direct.heatmap)


def test_other_sides_are_reflect_padded_bottom_right_and_cropped_back():
    model = translator()
    x = sizing.to_tensor(photo(38, 25))
    out = sizing.translate_any_size(model, x, 'B2A')
    padded = model.translate(F.pad(x, (0, 2, 0, 3), mode='reflect'), 'B2A')
    assert out.image.shape[-2:] == (25, 38) and torch.equal(out.image, padded.image[..., :25, :38])
    assert out.heatmap.shape[-2:] == (7, 10)   # ceil(25/4) x ceil(38/4) cells of the padded map


def test_max_size_translates_smaller_and_returns_the_input_size():
    model = translator()
    seen = []
    original = model.translate
    model.translate = lambda images, direction: seen.append(tuple(images.shape[-2:])) or original(images, direction)
    translation, _ = sizing.translate_image(model, photo(300, 200), 'A2B', keep_size=True, max_size=100)
    assert seen == [(68, 100)]                    # 100 x 67 (aspect kept), padded to 100 x 68
    assert translation.shape == (200, 300, 3)


def test_en_pooled_light_model_keeps_size_too():
    translation, _ = sizing.translate_image(translator(light=2), photo(44, 36), 'A2B', keep_size=True)
    assert translation.shape == (36, 44, 3)


@pytest.mark.parametrize('light', [False, -1])
def test_full_model_refuses_keep_size_in_one_line(light):
    with pytest.raises(errors.UserError) as err:
        sizing.translate_image(translator(light=light), photo(40, 40), 'A2B', keep_size=True)
    message = str(err.value)
    assert 'full model' in message and '32x32' in message and '\n' not in message


def test_without_keep_size_the_test_transform_is_used():
    from dataset import test_transform
    model = translator()
    image = photo(50, 30)
    translation, heatmap = sizing.translate_image(model, image, 'A2B', keep_size=False)
    expected = model.translate(test_transform(32)(image).unsqueeze(0), 'A2B').image[0]
    assert translation.shape == heatmap.shape == (32, 32, 3)
    assert np.array_equal(translation, image_arrays.tensor_to_uint8(expected))


def test_too_small_images_are_a_user_error():
    with pytest.raises(errors.UserError, match='too small'):
        sizing.translate_image(translator(), photo(6, 30), 'A2B', keep_size=True)
