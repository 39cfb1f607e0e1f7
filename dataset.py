"""Data (image files themselves: images.py): transforms, histogram matching, blur images and the training
batch stream (SPEC A8, §1.5, §1.10, §1.11).

Reproducibility: every random choice of the training stream (which images, flips, crops, the
RandomResizedCrop, the histogram-matching coin, the replacement of an unreadable image) comes from a
generator seeded by a hash of (seed, step, rank, sample); nothing reads a global RNG. A run resumed at
step t therefore sees exactly the batches an unbroken run sees at step t, with any number of
DataLoader workers.

Unattended runs: an image that becomes unreadable mid-run is replaced (see _PairDataset) and named in
one warning by the main process; past MAX_UNREADABLE_SHARE of a domain the stream stops with
TooManyUnreadable. Workers ignore SIGINT/SIGTERM (ignore_stop_signals), so a signal to the whole
process group reaches only the main process's clean stop.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from errors import DatasetError, TooManyUnreadable, UnreadableImage
from images import (
    LAYOUT,
    find_images,
    is_readable,
    load_rgb,
    readable_images,
    scan_images,
    warn_skipped,
)
from signals import ignore_stop_signals

SPLITS = ('trainA', 'trainB', 'testA', 'testB')
MATCH_MODES = ('hsv', 'hsl', 'rgb')
GROUP_SAMPLING = ('round_robin', 'balanced')
# More than this share of a training domain unreadable stops the run: a few broken files are replaced
# by others, but a vanished disk or a bad copy is not silently trained around for a week.
MAX_UNREADABLE_SHARE = 0.1


def resolve_dataset_root(dataset: str) -> Path:
    """`dataset/<name>` relative to the working directory, else `dataset` itself if it is a folder."""
    named = Path('dataset') / dataset
    if named.is_dir():
        return named
    if Path(dataset).is_dir():
        return Path(dataset)
    raise DatasetError(f'dataset {dataset!r} not found: looked for {named.resolve()} and '
                       f'{Path(dataset).resolve()}; expected {LAYOUT}')


def domain_images(root: Path, split: str, groups: list[int] | None = None, *, keep_unreadable: bool = False
                  ) -> tuple[list[Path], list[int] | None]:
    """Readable images of `root/split` and, with `groups`, their group labels.

    With groups, only `split/<g>/...` for each selected g is read and labelled g; other
    sub-folders are ignored. A missing or empty selected group raises DatasetError.
    `keep_unreadable`: every image file, unreadable ones too (still warned about), so that indices
    stay the same when a file breaks between a run and its resumption.
    """
    def listed(folder: Path) -> list[Path]:
        return scan_images(folder)[0] if keep_unreadable else readable_images(folder)

    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    folder = Path(root) / split
    if not folder.is_dir():
        raise DatasetError(f'folder {folder} does not exist; expected {LAYOUT}')
    if groups is None:
        return listed(folder), None
    paths: list[Path] = []
    labels: list[int] = []
    for group in groups:
        sub = folder / str(group)
        if not sub.is_dir():
            raise DatasetError(f'group {group} has no folder {sub}; put its images there or leave '
                               f'group {group} out of --group')
        found = listed(sub)
        paths += found
        labels += [group] * len(found)
    return paths, labels


def _stem(path: Path, folder: Path) -> str:
    return path.relative_to(folder).with_suffix('').as_posix()


def pair_by_stem(root: Path, paths_a: Sequence[Path], paths_b: Sequence[Path]) -> list[int]:
    """For --paired: order[i] is the index in `paths_b` of the file with the stem (relative path
    without extension) of `paths_a[i]`. DatasetError unless both hold exactly the same stems."""
    stems_a = [_stem(p, Path(root) / 'trainA') for p in paths_a]
    stems_b = [_stem(p, Path(root) / 'trainB') for p in paths_b]
    index_b = {stem: i for i, stem in enumerate(stems_b)}
    for name, stems in (('trainA', stems_a), ('trainB', stems_b)):
        if len(set(stems)) != len(stems):
            twice = sorted(s for s, n in Counter(stems).items() if n > 1)
            raise DatasetError(f'--paired True: {name} has several files per name ({_listed(twice)}); '
                               'keep one image per name')
    only_a, only_b = sorted(set(stems_a) - set(index_b)), sorted(set(index_b) - set(stems_a))
    if only_a or only_b:
        raise DatasetError(f'--paired True needs the same file names (without extension) in trainA and trainB: '
                           f'only in trainA: {_listed(only_a)}; only in trainB: {_listed(only_b)}')
    return [index_b[stem] for stem in stems_a]


def _listed(names: Sequence[str], limit: int = 5) -> str:
    if not names:
        return 'none'
    more = f' and {len(names) - limit} more' if len(names) > limit else ''
    return ', '.join(names[:limit]) + more


# ---------------------------------------------------------------------------------------------------
# Transforms


def _randint(gen: torch.Generator | None, high: int) -> int:
    return int(torch.randint(high, (1,), generator=gen))


def _coin(gen: torch.Generator | None, prob: float) -> bool:
    return bool(torch.rand(1, generator=gen) < prob)


class TrainTransform:
    """PT's training augmentation, plus EN's RandomResizedCrop, with explicit randomness.

    Order: horizontal flip (p 0.5) -> [RandomResizedCrop(s, scale=(0.748, 1), ratio 1, bicubic)
    with probability aug_prob] -> Resize((s+30, s+30)) bilinear -> random crop s -> tensor in
    [-1, 1]. The RandomResizedCrop sits where EN puts it (right after the flip) and PT's
    resize-and-crop follows, so aug_prob=0 is exactly PT's pipeline.
    """

    def __init__(self, img_size: int, aug_prob: float = 0.0, rrc_scale: tuple[float, float] = (0.748, 1.0)):
        if not 0.0 <= aug_prob <= 1.0:
            raise ValueError(f'aug_prob must be in [0, 1], got {aug_prob}')
        self.img_size, self.aug_prob, self.rrc_scale = img_size, aug_prob, rrc_scale

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment `img`; all randomness comes from `generator` (global RNG when None)."""
        size = self.img_size
        if _coin(generator, 0.5):
            img = TF.hflip(img)
        if self.aug_prob > 0 and _coin(generator, self.aug_prob):
            top, left, side = self._rrc_box(img.width, img.height, generator)
            img = TF.resized_crop(img, top, left, side, side, [size, size], InterpolationMode.BICUBIC)
        img = TF.resize(img, [size + 30, size + 30], InterpolationMode.BILINEAR)
        top, left = _randint(generator, 31), _randint(generator, 31)
        return _to_tensor(TF.crop(img, top, left, size, size))

    def _rrc_box(self, width: int, height: int, gen: torch.Generator | None) -> tuple[int, int, int]:
        """torchvision's RandomResizedCrop.get_params for ratio 1: (top, left, side)."""
        low, high = self.rrc_scale
        for _ in range(10):
            area = width * height * float(torch.empty(1).uniform_(low, high, generator=gen))
            side = int(round(math.sqrt(area)))
            if 0 < side <= min(width, height):
                return _randint(gen, height - side + 1), _randint(gen, width - side + 1), side
        side = min(width, height)  # torchvision's fallback: the central square
        return (height - side) // 2, (width - side) // 2, side


class TFTrainTransform:
    """TF's training pipeline (--augment_flag): Resize((s, s)) bilinear, then, with `augment`, for each
    image with probability 0.5: horizontal flip (p 0.5) -> Resize((s+30, s+30)) (s+15 unless s is
    256) -> random crop s. TF drew the 0.5 coin once per run and domain (SPEC B §4); here it is
    drawn per image, which is what its code meant. Resizing is PIL's bilinear, as in PT's pipeline.
    """

    def __init__(self, img_size: int, augment: bool):
        self.img_size, self.augment = img_size, augment
        self.augment_size = img_size + (30 if img_size == 256 else 15)

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """Transform `img`; all randomness comes from `generator` (global RNG when None)."""
        size, big = self.img_size, self.augment_size
        img = TF.resize(img, [size, size], InterpolationMode.BILINEAR)
        if self.augment and _coin(generator, 0.5):
            if _coin(generator, 0.5):
                img = TF.hflip(img)
            img = TF.resize(img, [big, big], InterpolationMode.BILINEAR)
            top, left = _randint(generator, big - size + 1), _randint(generator, big - size + 1)
            img = TF.crop(img, top, left, size, size)
        return _to_tensor(img)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return TF.normalize(TF.to_tensor(img), [0.5] * 3, [0.5] * 3)


def train_transform(img_size: int, aug_prob: float = 0.0, augment_flag: bool | None = None
                    ) -> TrainTransform | TFTrainTransform:
    """The training transform (PT's, or TF's when `augment_flag` is given); call it as `t(img, generator)`."""
    if augment_flag is not None:
        return TFTrainTransform(img_size, augment_flag)
    return TrainTransform(img_size, aug_prob)


def test_transform(img_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Resize((s, s)) bilinear -> tensor in [-1, 1] (PT's test transform)."""
    return transforms.Compose([transforms.Resize((img_size, img_size), InterpolationMode.BILINEAR),
                               transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])


# ---------------------------------------------------------------------------------------------------
# Histogram matching (EN) and blur images (EN)

_COLOR_SPACES = {'hsv': (cv2.COLOR_RGB2HSV_FULL, cv2.COLOR_HSV2RGB_FULL),
                 'hsl': (cv2.COLOR_RGB2HLS_FULL, cv2.COLOR_HLS2RGB_FULL), 'rgb': None}


def _cdf(channel: np.ndarray) -> np.ndarray:
    hist = np.bincount(channel.ravel(), minlength=256).astype(np.float64)
    return np.cumsum(hist) / hist.sum()


def _match_channel(src: np.ndarray, ref: np.ndarray, ratio: float) -> np.ndarray:
    cdf_src, cdf_ref = _cdf(src), _cdf(ref)
    target = cdf_ref if ratio == 1.0 else (1.0 - ratio) * cdf_src + ratio * cdf_ref
    # LUT[v] = smallest u with target[u] >= cdf_src[v]; clamp guards float round-off at 1.0.
    lut = np.minimum(np.searchsorted(target, cdf_src, side='left'), 255).astype(np.uint8)
    return lut[src]


def match_histograms(src: np.ndarray, ref: np.ndarray, mode: str = 'hsl', ratio: float = 1.0) -> np.ndarray:
    """Match each channel of `src` (uint8 H×W×3 RGB) to `ref`'s histogram in `mode` space (EN).

    ratio mixes the CDFs: target = (1-ratio)·CDF_src + ratio·CDF_ref, so 0 leaves `src` as is.
    Hue (hsv/hsl, 0..255 '_FULL' scale) is matched as a linear channel, as EN does.
    """
    if mode not in _COLOR_SPACES:
        raise ValueError(f'match mode must be one of {MATCH_MODES}, got {mode!r}')
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f'match ratio must be in [0, 1], got {ratio}')
    for name, arr in (('src', src), ('ref', ref)):
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f'{name} must be a uint8 H×W×3 array, got {arr.dtype} {arr.shape}')
    codes = _COLOR_SPACES[mode]
    src_c, ref_c = (np.ascontiguousarray(a) for a in (src, ref))
    if codes:
        src_c, ref_c = cv2.cvtColor(src_c, codes[0]), cv2.cvtColor(ref_c, codes[0])
    out = np.stack([_match_channel(src_c[..., c], ref_c[..., c], ratio) for c in range(3)], axis=-1)
    return cv2.cvtColor(out, codes[1]) if codes else out


def blur_edges(rgb: np.ndarray) -> np.ndarray:
    """EN's blur image: pixels near Canny edges replaced by a 5×5 Gaussian blur (uint8 RGB in/out)."""
    edges = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 100, 200)
    near_edge = cv2.dilate(edges, np.ones((5, 5), np.uint8)) > 0
    blurred = cv2.GaussianBlur(rgb, (5, 5), 0, borderType=cv2.BORDER_REFLECT)  # sigma 0 -> 1.1
    out = rgb.copy()
    out[near_edge] = blurred[near_edge]
    return out


def _save_atomic(img: Image.Image, path: Path) -> None:
    """Write through a '.part' file so an interrupted run never leaves a half image that looks done."""
    buffer = io.BytesIO()
    img.save(buffer, format=Image.registered_extensions()[path.suffix.lower()])
    part = path.with_name(path.name + '.part')
    part.write_bytes(buffer.getvalue())
    os.replace(part, path)


def make_blur_images(src: Path, dst: Path) -> int:
    """Write the blur image of every image under `src` to the same relative path under `dst`.

    Only missing files are written, so a second call returns 0. Returns the number written.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DatasetError(f'folder {src} does not exist; blur images are made from it')
    todo = [p for p in find_images(src) if not (dst / p.relative_to(src)).exists()]
    skipped: list[Path] = []
    for path in todo:
        try:
            rgb = np.asarray(load_rgb(path))
        except UnreadableImage:
            skipped.append(path)
            continue
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic(Image.fromarray(blur_edges(rgb)), out)
    warn_skipped(skipped)
    return len(todo) - len(skipped)


# ---------------------------------------------------------------------------------------------------
# The training stream


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (unlike hash(), the same in every process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') >> 1


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


class SampleSpec(NamedTuple):
    """What one training sample is: image indices (-1 = none) and the seed of its randomness."""

    index_A: int
    index_B: int
    seed: int
    blur_A: int = -1
    blur_B: int = -1


class StepBatchSampler(Sampler[list[SampleSpec]]):
    """Yields, from `start_step` on, the list of SampleSpecs of each step for this rank.

    Sample j of rank r at step t sits at pos = (t·world_size + r)·batch_size + j of the global
    stream. A domain (or a group of it) of n images is read in shuffled epochs: epoch pos // n is
    torch.randperm(n) seeded by (seed, domain, [group,] epoch). 'round_robin' groups: step t draws
    everything from groups[t % G] at the group's own position (its epochs are complete);
    'balanced': each sample's group is drawn from its seed and indexes the group's epochs at pos.
    `paired`: B's images are ordered as A's pairs, and each sample takes B's image of A's index.
    """

    def __init__(self, members: dict[str, dict[int | None, list[int]]], batch_size: int, seed: int,
                 start_step: int = 0, rank: int = 0, world_size: int = 1,
                 groups: list[int] | None = None, group_sampling: str = 'round_robin', paired: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f'rank must be in [0, world_size), got rank {rank}, world_size {world_size}')
        if group_sampling not in GROUP_SAMPLING:
            raise ValueError(f'group_sampling must be one of {GROUP_SAMPLING}, got {group_sampling!r}')
        if batch_size < 1 or start_step < 0:
            raise ValueError(f'need batch_size >= 1 and start_step >= 0, got {batch_size}, {start_step}')
        self.members, self.batch_size, self.seed = members, batch_size, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.groups, self.group_sampling, self.paired = groups, group_sampling, paired
        self._perms: dict[tuple, torch.Tensor] = {}

    def __iter__(self) -> Iterator[list[SampleSpec]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1

    def batch(self, step: int) -> list[SampleSpec]:
        """The SampleSpecs of `step` for this rank (a pure function of the constructor's arguments)."""
        return [self._sample(step, j) for j in range(self.batch_size)]

    def _position(self, step: int, j: int) -> int:
        return (step * self.world_size + self.rank) * self.batch_size + j

    def _sample(self, step: int, j: int) -> SampleSpec:
        pos = self._position(step, j)
        sample_seed = derive_seed(self.seed, 'sample', pos)
        group, group_pos = None, pos
        if self.groups is not None and self.group_sampling == 'round_robin':
            group = round_robin_group(self.groups, step)
            group_pos = self._position(step // len(self.groups), j)
        elif self.groups is not None:
            group = self.groups[_randint(_generator(sample_seed, 'group'), len(self.groups))]
        blur = [self._draw(name, None, pos) if name in self.members else -1 for name in ('blurA', 'blurB')]
        index_a = self._draw('A', group, group_pos)
        index_b = index_a if self.paired else self._draw('B', group, group_pos)
        return SampleSpec(index_a, index_b, sample_seed, *blur)

    def _draw(self, domain: str, group: int | None, pos: int) -> int:
        members = self.members[domain][group]
        epoch, offset = divmod(pos, len(members))
        return members[int(self._permutation(domain, group, epoch, len(members))[offset])]

    def _permutation(self, domain: str, group: int | None, epoch: int, n: int) -> torch.Tensor:
        key = (domain, epoch) if group is None else (domain, group, epoch)
        if key not in self._perms:
            if len(self._perms) >= 32:  # only the current epochs are needed
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = torch.randperm(n, generator=_generator(self.seed, *key))
        return self._perms[key]


class _MatchConfig(NamedTuple):
    mode: str
    prob: float
    ratio: float


_BATCH_KEYS = {'A': 'A', 'B': 'B', 'blurA': 'blur_A', 'blurB': 'blur_B'}


class _Unloadable(Exception):
    """No readable candidate for a sample; the worker reports it in the sample, not as an error."""


def _candidates(index: int, members: list[int], seed: int, names: tuple[str, ...]) -> Iterator[int]:
    """`index`, then the other members of its group in an order seeded by (sample seed, names): the
    k-th replacement is a pure function of (seed, position, k), the same in every worker and run."""
    yield index
    order = torch.randperm(len(members), generator=_generator(seed, 'replace', *names))
    yield from (members[k] for k in order.tolist() if members[k] != index)


class _PairDataset(Dataset):
    """Map-style dataset indexed by SampleSpec; returns one sample's dict of tensors.

    An image that cannot be read (truncated, deleted, overwritten mid-run) is replaced by the next
    of _candidates from its domain and group; paired A and B are replaced together. The sample lists
    the files it skipped under 'skipped', for the main process to warn once per file (workers cannot
    know what the others warned). After more than `max_failures[name]` failures in one sample (its
    domain is then past its share) or with no readable file left in the group, the sample holds
    'failed' (the folder) instead of images.
    """

    def __init__(self, paths: dict[str, list[Path]], labels: dict[str, list[int] | None],
                 members: dict[str, dict[int | None, list[int]]], transform: TrainTransform | TFTrainTransform,
                 match: _MatchConfig | None, paired: bool = False, max_failures: dict[str, int] | None = None):
        self.paths, self.labels, self.members, self.transform, self.match = paths, labels, members, transform, match
        self.paired = paired
        self.max_failures = max_failures or {name: len(found) for name, found in paths.items()}

    def __getitem__(self, spec: SampleSpec) -> dict[str, torch.Tensor | int | list[str] | str]:
        skipped: list[str] = []
        try:
            images, indices = self._load_sample(spec, skipped)
        except _Unloadable as exc:
            return {'skipped': skipped, 'failed': str(exc)}
        item: dict[str, torch.Tensor | int | list[str] | str] = {}
        for name_a, name_b in (('A', 'B'), ('blurA', 'blurB')):
            if name_a not in images:
                continue
            img_a, img_b = self._matched(images[name_a], images[name_b], name_a, spec.seed)
            # Paired A and B share their draws: the same flip and crop.
            seed_b = name_a if self.paired and name_a == 'A' else name_b
            item[_BATCH_KEYS[name_a]] = self.transform(img_a, _generator(spec.seed, name_a))
            item[_BATCH_KEYS[name_b]] = self.transform(img_b, _generator(spec.seed, seed_b))
        for domain in ('A', 'B'):
            if self.labels[domain] is not None:
                item[f'group_{domain}'] = self.labels[domain][indices[domain]]
        item['skipped'] = skipped
        return item

    def _load_sample(self, spec: SampleSpec, skipped: list[str]
                     ) -> tuple[dict[str, Image.Image], dict[str, int]]:
        """The images of the sample by name ('A', 'B', 'blurA', 'blurB') and the indices they came from."""
        sources = [(('A', 'B'), spec.index_A)] if self.paired else [(('A',), spec.index_A), (('B',), spec.index_B)]
        if spec.blur_A >= 0:
            sources += [(('blurA',), spec.blur_A), (('blurB',), spec.blur_B)]
        images, indices = {}, {}
        for names, index in sources:
            index, loaded = self._load_or_replace(names, index, spec.seed, skipped)
            for name, img in zip(names, loaded):
                images[name], indices[name] = img, index
        return images, indices

    def _load_or_replace(self, names: tuple[str, ...], index: int, seed: int, skipped: list[str]
                         ) -> tuple[int, list[Image.Image]]:
        """The images of `index` in each domain of `names`, or of the first candidate that reads."""
        domain = names[0]
        group = self.labels[domain][index] if self.labels.get(domain) is not None else None
        failures: Counter[str] = Counter()
        for candidate in _candidates(index, self.members[domain][group], seed, names):
            loaded = self._try_load(names, candidate, skipped, failures)
            if loaded is not None:
                return candidate, loaded
            if any(failures[name] > self.max_failures[name] for name in names):
                break   # past the domain's share: the main process stops, no need to try them all
        raise _Unloadable(domain if group is None else f'{domain}/{group}')

    def _try_load(self, names: tuple[str, ...], index: int, skipped: list[str], failures: Counter[str]
                  ) -> list[Image.Image] | None:
        loaded = []
        for name in names:
            path = self.paths[name][index]
            try:
                loaded.append(load_rgb(path))   # a deleted file is an OSError, hence UnreadableImage too
            except UnreadableImage:
                skipped.append(str(path))
                failures[name] += 1
                return None
        return loaded

    def _matched(self, img_a: Image.Image, img_b: Image.Image, name_a: str, seed: int
                 ) -> tuple[Image.Image, Image.Image]:
        if self.match is None:
            return img_a, img_b
        arr_a, arr_b = np.asarray(img_a), np.asarray(img_b)
        if _coin(_generator(seed, 'match', name_a), self.match.prob):  # B takes A's colours
            arr_b = match_histograms(arr_b, arr_a, self.match.mode, self.match.ratio)
        else:
            arr_a = match_histograms(arr_a, arr_b, self.match.mode, self.match.ratio)
        return Image.fromarray(arr_a), Image.fromarray(arr_b)


def _collate(samples: list[dict]) -> dict:
    """default_collate of images and labels, plus every file the batch skipped and its first failure."""
    skipped = [path for sample in samples for path in sample.pop('skipped')]
    failed = [sample['failed'] for sample in samples if 'failed' in sample]
    batch = {'failed': failed[0]} if failed else default_collate(samples)
    batch['skipped'] = skipped
    return batch


class UnreadableLedger:
    """The main process's record of unreadable training files: one warning per file however many
    workers met it, and TooManyUnreadable once a domain has more than `max_share` of them."""

    def __init__(self, paths: dict[str, list[Path]], folders: dict[str, Path], max_share: float):
        self.domain_of = {str(path): name for name, found in paths.items() for path in found}
        self.sizes = {name: len(found) for name, found in paths.items()}
        self.folders, self.max_share = folders, max_share
        self.unreadable: dict[str, set[str]] = {name: set() for name in paths}

    def note(self, skipped: Sequence[str | Path], failed: str | None = None) -> None:
        """Record `skipped` files (warning once about new ones); raise past the share or on `failed`."""
        new = [p for p in dict.fromkeys(map(str, skipped)) if p not in self.unreadable[self.domain_of[p]]]
        for path in new:
            self.unreadable[self.domain_of[path]].add(path)
        self._check()
        warn_skipped([Path(p) for p in new])
        if failed is not None:
            name, _, group = failed.partition('/')
            folder = self.folders[name] / group if group else self.folders[name]
            raise TooManyUnreadable(f'no image in {folder} can be read any more: replace the files (or leave '
                                    f'the group out of --group), then resume with --resume True')

    def _check(self) -> None:
        for name, bad in self.unreadable.items():
            if len(bad) > self.max_share * self.sizes[name]:
                folder = self.folders[name]
                names = sorted(Path(p).relative_to(folder).as_posix() for p in bad)
                raise TooManyUnreadable(
                    f'{len(bad)} of {self.sizes[name]} images in {folder} cannot be read (more than '
                    f'{self.max_share:.0%}): {_listed(names)}; replace them, then resume with --resume True')


def round_robin_group(groups: list[int], step: int) -> int:
    """The group every sample of ``step`` comes from under --group_sampling round_robin."""
    return groups[step % len(groups)]


class TrainStream:
    """The infinite training batch stream: the k-th next() is the batch of step start_step + k.

    Batches are dicts: 'A', 'B' (N×3×s×s in [-1, 1]), 'blur_A', 'blur_B' with blur images,
    'group_A', 'group_B' (int64 N) with groups. Files the batch had to skip go to `ledger` (warned
    once each; TooManyUnreadable past the share).
    """

    def __init__(self, loader: DataLoader, ledger: UnreadableLedger):
        self.loader, self.ledger = loader, ledger
        self.files: dict[str, list[str]] = {}   # per domain, relative to train<domain>/: what a resume reuses
        self._iterator: Iterator | None = None

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:  # workers start on first use
            self._iterator = iter(self.loader)
            _report_worker_deaths_in_next(self._iterator)
        batch = next(self._iterator)
        self.ledger.note(batch.pop('skipped'), batch.pop('failed', None))
        return batch

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the workers now. They ignore SIGTERM (``signals.ignore_stop_signals``), so PyTorch's
        shutdown, which terminates a worker that does not exit in time, and multiprocessing's exit
        handler, which then joins it, would wait forever on one stuck behind a dead sibling (a worker
        killed while holding the shared queue's lock): whatever is still alive is killed."""
        iterator, self._iterator = self._iterator, None
        if iterator is None:
            return
        workers = list(getattr(iterator, '_workers', []))
        try:
            iterator._shutdown_workers()   # drains the queues and joins each worker for a few seconds
        except Exception:  # noqa: BLE001 - after a worker died, shutting down may fail too: the kill below is what counts
            pass
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout_s)


def _report_worker_deaths_in_next(iterator: Iterator) -> None:
    """Leave a dead worker to ``next()``. PyTorch's SIGCHLD handler raises its RuntimeError wherever the main
    thread happens to be: inside a training step after an optimizer update, which cannot be undone (the run
    then ends with WorkerDied), or while a checkpoint is written (a crash). Unregistered from that handler,
    the iterator's workers are checked by ``next()`` itself, which looks at them whenever no batch has come
    for 5 s (MP_STATUS_CHECK_INTERVAL): the loop then replaces the loader before the step begins."""
    if getattr(iterator, '_worker_pids_set', False):
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False


def is_worker_death(exc: BaseException) -> bool:
    """Whether ``exc`` is PyTorch's report of a DataLoader worker killed or crashed (by the kernel's OOM
    killer, say): raised by the next batch, or from its SIGCHLD handler anywhere in the main thread."""
    message = str(exc)
    return isinstance(exc, RuntimeError) and 'DataLoader worker' in message and (
        'exited unexpectedly' in message or 'killed by signal' in message)


def _members(labels: list[int] | None, count: int) -> dict[int | None, list[int]]:
    """Indices of each group (key None: all images)."""
    if labels is None:
        return {None: list(range(count))}
    groups: dict[int | None, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    return groups


def build_train_stream(root: Path, img_size: int, batch_size: int, seed: int, *, start_step: int = 0,
                       rank: int = 0, world_size: int = 1, num_workers: int = 0, pin_memory: bool = False,
                       aug_prob: float = 0.0, match_histograms: bool = False, match_mode: str = 'hsl',
                       match_prob: float = 0.5, match_ratio: float = 1.0, blur_root: Path | None = None,
                       groups: list[int] | None = None, group_sampling: str = 'round_robin',
                       augment_flag: bool | None = None, paired: bool = False,
                       prefetch_factor: int = 2, max_unreadable: float = MAX_UNREADABLE_SHARE,
                       worker_init_fn: Callable[[int], None] | None = None,
                       files: Mapping[str, Sequence[str]] | None = None) -> TrainStream:
    """The training stream of `root/trainA` and `root/trainB` (see TrainStream, StepBatchSampler).

    With `blur_root`, blur images come from `blur_root/blurA` and `blur_root/blurB`; a missing
    one is first made from `root/trainA` (`trainB`) by make_blur_images, as EN does. `augment_flag`
    True/False selects TF's pipeline (TFTrainTransform). `paired`: A and B are drawn by the same
    file stem with the same flip and crop (DatasetError when the stems differ).

    Unreadable files stay in the lists (replaced when drawn), so a file that breaks mid-run keeps
    every index, and the draws of a resumed run, as they were; TooManyUnreadable, now or later, when
    more than `max_unreadable` of a domain cannot be read. Workers ignore SIGINT/SIGTERM, then run
    `worker_init_fn`.

    `files` (``TrainStream.files`` of the run being resumed): the file lists the run started with.
    They are kept while files have only disappeared since, so a file deleted mid-run is replaced
    like any unreadable one and the resumed run draws as the unbroken one did; a folder that gained
    files is listed afresh (the draws then differ, as the data does; a note says so).
    """
    root = Path(root)
    paths: dict[str, list[Path]] = {}
    labels: dict[str, list[int] | None] = {}
    folders: dict[str, Path] = {}
    for domain in ('A', 'B'):
        folders[domain] = root / f'train{domain}'
        paths[domain], labels[domain] = domain_images(root, f'train{domain}', groups, keep_unreadable=True)
        if files is not None and domain in files:
            paths[domain], labels[domain] = _started_with(folders[domain], paths[domain], labels[domain],
                                                          files[domain], groups)
    listed = {domain: [p.relative_to(folders[domain]).as_posix() for p in paths[domain]] for domain in 'AB'}
    if paired:
        order = pair_by_stem(root, paths['A'], paths['B'])
        paths['B'] = [paths['B'][i] for i in order]
        labels['B'] = labels['A']   # a stem includes its group folder
    if blur_root is not None:
        for domain in ('A', 'B'):
            folder = Path(blur_root) / f'blur{domain}'
            if not folder.is_dir():
                make_blur_images(root / f'train{domain}', folder)
            paths[f'blur{domain}'], folders[f'blur{domain}'] = scan_images(folder)[0], folder
    ledger = UnreadableLedger(paths, folders, max_unreadable)
    ledger.note([p for found in paths.values() for p in found if not is_readable(p)])   # cached: no decode
    members = {name: _members(labels.get(name), len(found)) for name, found in paths.items()}
    sampler = StepBatchSampler(members, batch_size, seed, start_step, rank, world_size, groups,
                               group_sampling, paired)
    if match_mode not in MATCH_MODES or not 0.0 <= match_prob <= 1.0 or not 0.0 <= match_ratio <= 1.0:
        raise ValueError(f'bad histogram matching settings: mode {match_mode!r}, prob {match_prob}, '
                         f'ratio {match_ratio}')
    match = _MatchConfig(match_mode, match_prob, match_ratio) if match_histograms else None
    max_failures = {name: int(max_unreadable * len(found)) for name, found in paths.items()}
    dataset = _PairDataset(paths, labels, members, train_transform(img_size, aug_prob, augment_flag), match,
                           paired, max_failures)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                        collate_fn=_collate, persistent_workers=num_workers > 0,
                        prefetch_factor=prefetch_factor if num_workers > 0 else None,
                        worker_init_fn=functools.partial(ignore_stop_signals, then=worker_init_fn))
    stream = TrainStream(loader, ledger)
    stream.files = listed
    return stream


def _started_with(folder: Path, found: list[Path], labels: list[int] | None, started: Sequence[str],
                  groups: list[int] | None) -> tuple[list[Path], list[int] | None]:
    """The run's original file list of ``folder`` while files have only disappeared since (see
    build_train_stream); the current listing otherwise."""
    current = {p.relative_to(folder).as_posix() for p in found}
    added = current - set(started)
    if added:
        print(f'note: {len(added)} image(s) added to {folder} since the run started are used from now on; the '
              f'draws differ from an uninterrupted run from here', file=sys.stderr)
        return found, labels
    kept = [folder / rel for rel in started]
    return kept, None if groups is None else [int(rel.split('/', 1)[0]) for rel in started]


# ---------------------------------------------------------------------------------------------------
# Test images


def output_names(paths: Sequence[Path], folder: Path) -> list[str]:
    """A unique name per image: its path relative to ``folder`` without the extension ('sub/img2'), or
    with it ('a.jpg', 'a.png') when several images share that stem, so no output overwrites another."""
    stems = [p.relative_to(folder).with_suffix('').as_posix() for p in paths]
    counts = Counter(stems)
    return [stem if counts[stem] == 1 else p.relative_to(folder).as_posix() for stem, p in zip(stems, paths)]


class _FolderDataset(Dataset):
    """The images of a folder with the test transform, named by relative path without extension."""

    def __init__(self, folder: Path, img_size: int):
        self.folder, self.paths, self.transform = folder, readable_images(folder), test_transform(img_size)
        self.names = output_names(self.paths, folder)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path = self.paths[index]
        return self.transform(load_rgb(path)), self.names[index]


def _collate_named(batch: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    images, names = zip(*batch)
    return torch.stack(images), list(names)


def build_test_loader(folder: Path, img_size: int, batch_size: int = 1, num_workers: int = 0) -> DataLoader:
    """Deterministic loader of (images N×3×s×s in [-1, 1], names: list[str]) over every image under
    `folder`; a name is the relative path without extension ('img1', 'sub/img2')."""
    return DataLoader(_FolderDataset(Path(folder), img_size), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=_collate_named, worker_init_fn=ignore_stop_signals)


@dataclass(frozen=True)
class StreamOptions:
    """What the training stream is made of (the data flags): ``build_train_stream``'s keywords."""

    img_size: int
    batch_size: int
    seed: int
    num_workers: int = 0
    aug_prob: float = 0.0
    match_histograms: bool = False
    match_mode: str = 'hsl'
    match_prob: float = 0.5
    match_ratio: float = 1.0
    groups: list[int] | None = None
    group_sampling: str = 'round_robin'
    augment_flag: bool | None = None
    paired: bool = False
    blur: bool = False   # EN's --has_blur: edge-blurred real images, made once next to the data


def train_stream(root: Path, options: StreamOptions, start: int, dist_ctx, pin_memory: bool = False,
                 files: Mapping[str, Sequence[str]] | None = None) -> TrainStream:
    """The training batches ``options`` describe, from step ``start`` on, this rank's share (EN's
    blur images are made once by rank 0 and cached next to the data); ``files``: see
    build_train_stream."""
    blur_root = None
    if options.blur:
        if dist_ctx.is_main:
            for dom in 'AB':
                written = make_blur_images(root / f'train{dom}', root / f'blur{dom}')
                if written:
                    print(f'wrote {written} blurred images to {root / f"blur{dom}"}', file=sys.stderr)
        dist_ctx.barrier()
        blur_root = root
    kwargs = {key: value for key, value in dataclasses.asdict(options).items() if key != 'blur'}
    return build_train_stream(root, **kwargs, start_step=start, rank=dist_ctx.rank, world_size=dist_ctx.world_size,
                              pin_memory=pin_memory, blur_root=blur_root, files=files)
