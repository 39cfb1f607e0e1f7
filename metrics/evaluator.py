"""Image folders -> Inception features, a disk cache for real-image features, and FID/KID scoring."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import to_tensor

import images
from signals import ignore_stop_signals

from .inception import FEATURE_DIM, build_inception, inception_features, unit_range_features
from .scores import MetricsError, feature_statistics, frechet_distance, kernel_inception_distance

CACHE_VERSION = 1


def image_files(folder: str | os.PathLike) -> list[Path]:
    """All image files under ``folder`` (recursive, sorted, extensions case-insensitive)."""
    root = Path(folder)
    if not root.is_dir():
        raise MetricsError(f'image folder not found: {root}; pass an existing directory')
    return images.find_images(root)


def require_images(folder: str | os.PathLike) -> list[Path]:
    """Like :func:`image_files`, but an empty folder is a MetricsError."""
    files = image_files(folder)
    if not files:
        raise MetricsError(f'no images found in {folder}; expected files with extensions '
                           f'{" ".join(images.IMG_EXTENSIONS)}')
    return files


def _load_rgb(path: Path, img_size: int | None) -> Image.Image:
    """The file as training and inference read it (images.load_rgb), resized to ``img_size``."""
    img = images.load_rgb(path)
    if img_size is not None:
        img = img.resize((img_size, img_size), Image.Resampling.BILINEAR)
    return img


def _image_size(path: Path, img_size: int | None) -> tuple[int, int] | None:
    """(width, height) the image will have once loaded (upright), from its header; None if unreadable."""
    try:
        size = images.image_size(path)
    except images.UnreadableImage as err:
        warnings.warn(f'skipping unreadable image {path}: {err}', stacklevel=3)
        return None
    return (img_size, img_size) if img_size is not None else size


_Item = tuple[int, torch.Tensor | None]


class _ImageDataset(Dataset):
    """(index, [0,1] tensor or None) per file; None marks an image that failed to decode."""

    def __init__(self, files: list[Path], indices: list[int], img_size: int | None) -> None:
        self.files, self.indices, self.img_size = files, indices, img_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> _Item:
        index = self.indices[i]
        try:
            return index, to_tensor(_load_rgb(self.files[index], self.img_size))
        except (OSError, ValueError, images.UnreadableImage):
            return index, None


def _collate(items: list[_Item]) -> tuple[list[int], torch.Tensor | None, list[int]]:
    """Stack the decodable images; report the indices of the others."""
    good = [(i, t) for i, t in items if t is not None]
    failed = [i for i, t in items if t is None]
    batch = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], batch, failed


def _group_by_size(files: list[Path], img_size: int | None) -> dict[tuple[int, int], list[int]]:
    """File indices grouped by loaded image size, so every batch has a single shape."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, path in enumerate(files):
        size = _image_size(path, img_size)
        if size is not None:
            groups.setdefault(size, []).append(index)
    return groups


def folder_features(folder: str | os.PathLike, model: torch.nn.Module, batch_size: int = 50,
                    device: str | torch.device = 'cpu', img_size: int | None = None,
                    num_workers: int = 0) -> np.ndarray:
    """Inception pool3 features (float64, one row per readable image, in sorted file order).

    Images are read as RGB with PIL and fed in [0, 1] like pytorch-fid; with ``img_size`` they are
    first resized bilinearly to ``img_size`` x ``img_size`` (so real images match the fakes' size).
    Mixed-size folders work because equal-size images are batched together. Batches go to the
    model's device; ``device`` is kept for signature compatibility with pytorch-fid.
    """
    files = require_images(folder)
    feats = np.full((len(files), FEATURE_DIM), np.nan)
    done = np.zeros(len(files), dtype=bool)
    for indices in _group_by_size(files, img_size).values():
        loader = DataLoader(_ImageDataset(files, indices, img_size), batch_size=max(1, batch_size),
                            shuffle=False, num_workers=num_workers, collate_fn=_collate,
                            worker_init_fn=ignore_stop_signals if num_workers else None)
        for good, batch, failed in loader:
            for index in failed:
                warnings.warn(f'skipping unreadable image {files[index]}', stacklevel=2)
            if batch is not None:
                feats[good] = unit_range_features(model, batch).numpy()
                done[good] = True
    if not done.any():
        raise MetricsError(f'no readable images in {folder}; check the image files')
    return feats[done]


def _file_fingerprint(files: list[Path], root: Path) -> list[list]:
    """(relative path, size, mtime_ns) per file: changes whenever the folder's content changes."""
    entries = []
    for path in files:
        stat = path.stat()
        entries.append([path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns])
    return entries


def weights_identity(weights: str | None) -> str | list:
    """What identifies the network's weights in a cache key: the file's path, size and mtime."""
    if weights is None:
        return 'download'
    path = Path(weights).resolve()
    if not path.is_file():
        raise MetricsError(f'Inception weights not found: {path}')
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


class FeatureCache:
    """Feature arrays cached on disk as ``<hash>.npz``, keyed by a JSON-able dict."""

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir)

    def path_for(self, key_parts: dict) -> Path:
        """The cache file for a key (SHA-1 of its canonical JSON)."""
        blob = json.dumps({'version': CACHE_VERSION, **key_parts}, sort_keys=True, default=str)
        return self.cache_dir / f'{hashlib.sha1(blob.encode()).hexdigest()}.npz'

    def get_or_compute(self, key_parts: dict, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached array for ``key_parts``, or ``compute()`` stored atomically and returned."""
        path = self.path_for(key_parts)
        cached = self._read(path)
        if cached is not None:
            return cached
        feats = np.asarray(compute())
        self._write(path, feats)
        return feats

    @staticmethod
    def _read(path: Path) -> np.ndarray | None:
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                return data['features']
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None  # a damaged cache entry is recomputed and overwritten

    def _write(self, path: Path, feats: np.ndarray) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix='.tmp-', suffix='.npz')
        try:
            with os.fdopen(fd, 'wb') as f:
                np.savez(f, features=feats)
            os.replace(tmp, path)  # readers never see a half-written file
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


class Evaluator:
    """FID/KID between real image folders and generated images, sharing one Inception network."""

    def __init__(self, weights: str | None, device: str | torch.device = 'cpu', batch_size: int = 50,
                 cache_dir: str | os.PathLike | None = None, num_workers: int = 0) -> None:
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache = FeatureCache(cache_dir) if cache_dir is not None else None
        self._model: torch.nn.Module | None = None

    @property
    def model(self) -> torch.nn.Module:
        """The Inception network, built on first use."""
        if self._model is None:
            self._model = build_inception(self.weights, self.device)
        return self._model

    def real_features(self, folder: str | os.PathLike, img_size: int | None = None) -> np.ndarray:
        """Features of every image in ``folder`` (cached on disk when a cache_dir is set)."""
        files = require_images(folder)  # fail on a bad folder before building the network

        def compute() -> np.ndarray:
            return folder_features(folder, self.model, self.batch_size, self.device, img_size,
                                   self.num_workers)

        if self.cache is None:
            return compute()
        root = Path(folder).resolve()
        key = {'folder': str(root), 'files': _file_fingerprint(files, Path(folder)),
               'img_size': img_size, 'weights': weights_identity(self.weights)}
        return self.cache.get_or_compute(key, compute)

    def fake_features(self, images: Iterable[torch.Tensor]) -> np.ndarray:
        """Features (float64) of generated image batches in [-1, 1] (N x 3 x H x W or 3 x H x W)."""
        chunks = []
        for batch in images:
            batch = batch.unsqueeze(0) if batch.dim() == 3 else batch
            for part in batch.split(max(1, self.batch_size)):
                chunks.append(inception_features(self.model, part).double().numpy())
        if not chunks:
            raise MetricsError('no generated images to score; check the test image folder')
        return np.concatenate(chunks)

    @staticmethod
    def score(real_feats: np.ndarray, fake_feats: np.ndarray, kid_subsets: int = 100,
              kid_subset_size: int = 1000) -> dict[str, float]:
        """{'FID', 'KID', 'KID_std'} between two feature sets (real first, as pytorch-fid orders)."""
        mu1, sigma1 = feature_statistics(real_feats)
        mu2, sigma2 = feature_statistics(fake_feats)
        kid, kid_std = kernel_inception_distance(real_feats, fake_feats, kid_subsets, kid_subset_size)
        return {'FID': frechet_distance(mu1, sigma1, mu2, sigma2), 'KID': kid, 'KID_std': kid_std}
