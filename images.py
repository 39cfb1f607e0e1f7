"""Image files: finding them, decoding any mode to upright 8-bit RGB, and skipping unreadable ones once.

Its own module because training data, the inference phases, the metrics and the demo all read
users' image files the same way, and none of them should need the training pipeline for it.
"""
from __future__ import annotations

import os
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from tqdm import tqdm

from errors import DatasetError, UnreadableImage

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
LAYOUT = 'dataset/<name>/{trainA,trainB,testA,testB}/ holding image files'
# Pillow's ways of failing on a corrupt or foreign file.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
# EXIF orientations that turn the stored pixels by 90 degrees (width and height swap).
_SIDEWAYS = (5, 6, 7, 8)


# ---------------------------------------------------------------------------------------------------
# Finding and reading images


def find_images(folder: Path) -> list[Path]:
    """All image files under `folder` (recursive, case-insensitive extensions), sorted."""
    files = (p for p in Path(folder).rglob('*') if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
    return sorted(files, key=lambda p: p.as_posix())


def load_rgb(path: str | Path) -> Image.Image:
    """Decode any image file to an 8-bit RGB PIL image, upright.

    The one reader of image files: training, inference, metrics, the demo and the scripts all call
    it, so a photo looks the same everywhere. Its EXIF orientation is applied (phones store pixels
    sideways and say so in the tag). Transparent images (RGBA, LA, PA, P with transparency) are
    composited on white, since what lies under fully transparent pixels is arbitrary. 16-bit and
    32-bit images are scaled, not clipped, to 8 bits. Raises UnreadableImage for corrupt or
    non-image files.
    """
    try:
        with Image.open(path) as img:
            ImageOps.exif_transpose(img, in_place=True)   # loads the pixels; in place: no extra copy
            return _to_rgb(img)
    except _DECODE_ERRORS as exc:
        raise UnreadableImage(f'cannot read image {path} ({exc}); delete or replace the file') from exc


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image :func:`load_rgb` gives (EXIF orientation included), from the
    header; only a PNG without its eXIf chunk up front is decoded to look for it. Raises UnreadableImage."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            sideways = img.getexif().get(ExifTags.Base.Orientation) in _SIDEWAYS
    except _DECODE_ERRORS as exc:
        raise UnreadableImage(f'cannot read image {path} ({exc}); delete or replace the file') from exc
    return (height, width) if sideways else (width, height)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith('I') or img.mode == 'F':
        return Image.fromarray(_scale_to_uint8(np.asarray(img), img.mode)).convert('RGB')
    if img.mode == 'PA' or (img.mode == 'P' and 'transparency' in img.info):
        img = img.convert('RGBA')
    if img.mode in ('RGBA', 'RGBa', 'LA', 'La'):
        rgba = img.convert('RGBA')
        white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert('RGB')
    return img.convert('RGB')  # also copies RGB, so the result outlives the opened file


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map high-bit-depth pixel values to 0..255 (Pillow's own convert() would clip at 255)."""
    values = np.nan_to_num(arr.astype(np.float64))
    top = float(values.max()) if values.size else 0.0
    if mode == 'F' and values.min() >= 0.0 and top <= 1.0:
        scale = 255.0  # float image in [0, 1]
    elif mode.startswith('I;16') or 255.0 < top <= 65535.0:
        scale = 255.0 / 65535.0  # 16-bit: 65535 -> 255 and 257*v -> v exactly
    elif top > 65535.0:
        scale = 255.0 / top
    else:
        scale = 1.0  # already 8-bit values stored in a wide type
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


_READABLE: dict[tuple[str, int, int], bool] = {}


def is_readable(path: Path) -> bool:
    """Decode the file once (JPEGs at 1/8 scale, which is cheap); cached per (path, mtime, size)."""
    try:
        stat = path.stat()
    except OSError:   # deleted since it was listed
        return False
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _READABLE:
        try:
            with Image.open(path) as img:
                img.draft('RGB', (32, 32))
                img.load()
            _READABLE[key] = True
        except _DECODE_ERRORS:
            _READABLE[key] = False
    return _READABLE[key]


_WARNED: set[str] = set()


def warn_skipped(skipped: Sequence[Path]) -> None:
    """One line per unreadable file, once per process (validation and training both list folders)."""
    for path in skipped:
        if str(path) not in _WARNED:
            _WARNED.add(str(path))
            # tqdm.write: a line of its own even while a training progress bar is drawn
            tqdm.write(f'warning: skipping unreadable image {path}', file=sys.stderr)


def scan_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """(every image file under `folder`, the unreadable ones among them); warns once naming each
    unreadable one; DatasetError if the folder is missing or holds no readable image."""
    if not folder.is_dir():
        raise DatasetError(f'folder {folder} does not exist; expected {LAYOUT}')
    found = find_images(folder)
    unreadable = [p for p in found if not is_readable(p)]
    warn_skipped(unreadable)
    if len(unreadable) == len(found):
        detail = f'{len(found)} unreadable file(s)' if found else 'no file with extension ' + ' '.join(
            IMG_EXTENSIONS)
        raise DatasetError(f'no readable image in {folder} ({detail}); put images there')
    return found, unreadable


def readable_images(folder: Path) -> list[Path]:
    """Readable images under `folder`; warns once naming the unreadable ones; DatasetError if none."""
    found, unreadable = scan_images(folder)
    bad = set(unreadable)
    return [p for p in found if p not in bad]


# ----------------------------------------------------------------------------------------------
# Image arrays: tensors to uint8 RGB, heatmaps, preview grids


def tensor_to_uint8(image: torch.Tensor) -> np.ndarray:
    """C×H×W tensor in [-1, 1] → H×W×3 RGB uint8."""
    array = (image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
    return array.round().byte().permute(1, 2, 0).numpy()


def heatmap_to_uint8(heatmap: torch.Tensor, size: int | tuple[int, int]) -> np.ndarray:
    """CAM heatmap (1×h×w) → JET-coloured RGB uint8 of size×size (or (width, height)), normalised by its range.

    PT divides by the maximum only, which yields NaN for an all-zero map.
    """
    h = heatmap.detach().float().cpu()[0]
    h = h - h.min()
    peak = h.max()
    h = h / peak if peak > 0 else h
    gray = (h.numpy() * 255).astype(np.uint8)
    gray = cv2.resize(gray, (size, size) if isinstance(size, int) else tuple(size))
    return cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def grid(columns: list[list[np.ndarray]]) -> np.ndarray:
    """Stack each column's tiles vertically, then the columns side by side (PT's preview layout)."""
    return np.concatenate([np.concatenate(col, axis=0) for col in columns], axis=1)


def save_rgb(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an H×W×3 RGB uint8 array as an image file (PNG/JPEG by extension), creating folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f'could not write {path}')
