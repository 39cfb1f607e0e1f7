"""EXIF orientation: every path that reads a photo sees it upright (images.load_rgb, the training
stream, test/img_dir translation, the metrics' size grouping, scripts/prepare_faces.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import trained_checkpoint
from PIL import ExifTags, Image

import dataset as data
import images
import main
from metrics.evaluator import folder_features
from scripts import prepare_faces

TAGS = range(1, 9)
SIDEWAYS = (5, 6, 7, 8)


def upright_image(height: int = 24, width: int = 40) -> np.ndarray:
    """Noise with a red top-left block: any flip or turn changes it."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 200, (height, width, 3), dtype=np.uint8)
    pixels[:6, :10] = (255, 0, 0)
    return pixels


def stored_pixels(upright: np.ndarray, tag: int) -> np.ndarray:
    """What a camera stores for an upright picture, per the EXIF 2.3 meaning of Orientation
    (where stored row 0 / column 0 are shown): showing it as the tag says gives `upright` back."""
    return {
        1: upright,
        2: upright[:, ::-1],                    # row 0 top, column 0 right
        3: upright[::-1, ::-1],                 # row 0 bottom, column 0 right
        4: upright[::-1],                       # row 0 bottom, column 0 left
        5: upright.transpose(1, 0, 2),          # row 0 left, column 0 top
        6: np.rot90(upright, 1),                # row 0 right, column 0 top
        7: np.rot90(upright, 2).transpose(1, 0, 2),   # row 0 right, column 0 bottom
        8: np.rot90(upright, -1),               # row 0 left, column 0 bottom
    }[tag]


def save_tagged(path: Path, upright: np.ndarray, tag: int) -> Path:
    """The stored pixels of `upright` with the Orientation tag, as PNG (lossless) or JPEG."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = tag
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(stored_pixels(upright, tag))).save(path, exif=exif, quality=95)
    return path


@pytest.mark.parametrize('tag', TAGS)
def test_load_rgb_turns_every_orientation_upright(tmp_path, tag):
    upright = upright_image()
    path = save_tagged(tmp_path / f'tag{tag}.png', upright, tag)
    np.testing.assert_array_equal(np.asarray(images.load_rgb(path)), upright)
    assert images.image_size(path) == (40, 24)   # (width, height) as loaded, from the header


def test_jpeg_tagged_6_loads_portrait(tmp_path):
    """A phone photo: 40x20 stored pixels, Orientation 6, is a 20x40 (W x H) picture."""
    rows, cols = np.mgrid[0:40, 0:20]   # smooth gradients: JPEG keeps them within a few levels
    upright = np.stack([rows * 6, cols * 12, np.full_like(rows, 90)], axis=-1).astype(np.uint8)
    path = save_tagged(tmp_path / 'phone.jpg', upright, 6)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    loaded = np.asarray(images.load_rgb(path))
    assert loaded.shape == (40, 20, 3)
    assert np.abs(loaded.astype(int) - upright).max() <= 10   # JPEG noise; turned the wrong way: > 100
    assert images.image_size(path) == (20, 40)


def test_training_stream_reads_photos_upright(tmp_path):
    """Tagged files give the training batches their upright twins give (same seed, same draws)."""
    upright_a, upright_b = upright_image(), upright_image()[::-1].copy()
    batches = []
    for name, tags in (('upright', (1, 1)), ('tagged', (6, 3))):
        root = tmp_path / name
        save_tagged(root / 'trainA' / 'a.png', upright_a, tags[0])
        save_tagged(root / 'trainB' / 'b.png', upright_b, tags[1])
        batches.append(next(iter(data.build_train_stream(root, 32, 1, seed=3))))
    for key in ('A', 'B'):
        torch.testing.assert_close(batches[1][key], batches[0][key], rtol=0, atol=0)


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> Path:
    return trained_checkpoint(tmp_path_factory, 'orientation')


@pytest.mark.parametrize('extra', [(), ('--keep_size', 'True'), ('--crop', 'center')],
                         ids=['img_size', 'keep_size', 'crop_center'])
def test_img_dir_translates_photos_upright(checkpoint, tmp_path, extra):
    """Eight files of one upright picture, one per tag, translate to eight equal images; at the
    photo's own size the output of tags 5-8 is as wide as the stored pixels are high."""
    upright = upright_image()
    photos = tmp_path / 'photos'
    for tag in TAGS:
        save_tagged(photos / f'tag{tag}.png', upright, tag)
    out = tmp_path / 'out'
    assert main.main(['--phase', 'img_dir', '--checkpoint', str(checkpoint), '--img_dir', str(photos),
                      '--out_dir', str(out), '--device', 'cpu', *extra]) == 0
    results = [np.asarray(Image.open(out / f'tag{tag}.png')) for tag in TAGS]
    expected_shape = (32, 32, 3) if not extra else upright.shape
    for tag, result in zip(TAGS, results):
        assert result.shape == expected_shape, tag
        np.testing.assert_allclose(result, results[0], atol=1, err_msg=f'tag {tag}')


def test_metrics_group_photos_by_their_upright_size(tmp_path):
    """Sizes come from the header with the tag applied, so a tagged photo is batched with photos of
    its upright size (a stored-size grouping would stack 24x40 with 40x24 images and fail)."""
    class TopLeftPixel(torch.nn.Module):
        """A stand-in for Inception: the top-left pixel, repeated to 2048 features."""

        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [x[:, :, :1, :1].repeat(1, 683, 1, 1)[:, :2048]]

    upright = upright_image()
    save_tagged(tmp_path / 'a_upright.png', upright, 1)
    save_tagged(tmp_path / 'b_tagged.png', upright, 6)                   # stored 24 wide, 40 high
    save_tagged(tmp_path / 'c_portrait.png', upright.transpose(1, 0, 2), 1)   # 24 wide, 40 high
    feats = folder_features(tmp_path, TopLeftPixel(), batch_size=4)
    assert feats.shape == (3, 2048)
    np.testing.assert_array_equal(feats[1], feats[0])   # red, like the upright picture's corner
    np.testing.assert_allclose(feats[0, :3], [1.0, 0.0, 0.0])


def test_prepare_faces_reads_with_the_shared_reader(tmp_path):
    upright = upright_image()
    path = save_tagged(tmp_path / 'tag8.png', upright, 8)
    np.testing.assert_array_equal(prepare_faces.read_rgb(path), upright)
    (tmp_path / 'broken.jpg').write_bytes(b'not a jpeg')
    assert prepare_faces.read_rgb(tmp_path / 'broken.jpg') is None
