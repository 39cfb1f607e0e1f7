"""FID/KID of a model's test-set translations during training and in ``--phase val`` (SPEC A6).

The translations are quantised to uint8 exactly as the saved PNGs are, so a logged score is
reproduced by ``python -m metrics`` on the test images the same generator wrote (real images
resized to ``img_size`` with ``--img_size``).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

import utils
from model import DIRECTIONS

from .evaluator import Evaluator, weights_identity
from .inception import unit_range_features
from .scores import kernel_inception_distance

RESIZE_MODE = 'real: PIL bilinear to img_size; fake: generator output at img_size, uint8-quantised'


def quantise(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images → the [0, 1] values their 8-bit PNGs decode to (images.tensor_to_uint8's rounding)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round() / 255.0


def module_sha256(module: torch.nn.Module) -> str:
    """A hash of a network's weights (what was evaluated), independent of device."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class TranslationMetrics:
    """Scores translations of ``test<source>`` against ``train<target>`` for each direction.

    The Inception network is built at construction, so a run that will need it fails at start-up
    (missing weights, offline) rather than at its first evaluation hours in.
    """

    def __init__(self, dataset_root: Path, img_size: int, weights: str | None, device: torch.device | str,
                 batch_size: int = 50, cache_dir: str | Path | None = None, groups: list[int] | None = None,
                 num_workers: int = 0) -> None:
        self.root = Path(dataset_root)
        self.img_size = img_size
        self.groups = groups or []
        self.num_workers = num_workers
        self.evaluator = Evaluator(weights, device, batch_size=batch_size, cache_dir=cache_dir)
        self.evaluator.model   # noqa: B018 - build (and so check) the network now
        self.inception = utils.file_sha256(weights) if weights else str(weights_identity(None))

    def evaluate(self, translators: Mapping[str, object]) -> tuple[dict[str, float], dict]:
        """Scores keyed 'FID/A2B<suffix>', 'KID/...', 'KID_std/...' for each (suffix → translator),
        plus a record of what was measured (hashes, image counts, resize mode)."""
        results: dict[str, float] = {}
        record: dict = {'inception_weights': self.inception, 'resize': RESIZE_MODE, 'images': {},
                        'generators': {}}
        for suffix, translator in translators.items():
            for direction, src, tgt in ((d.name, d.source, d.target) for d in DIRECTIONS):
                real, fake = self.features(translator, direction, src, tgt, '')
                scores = self.evaluator.score(real, fake)
                results.update({f'{name}/{direction}{suffix}': v for name, v in scores.items()})
                record['images'][f'{direction}{suffix}'] = {'real': len(real), 'fake': len(fake)}
                record['generators'][f'{direction}{suffix}'] = module_sha256(translator.generators[direction])
                for g in self.groups:   # few-shot runs: KID per group present on both sides
                    if all((self.root / s / str(g)).is_dir() for s in (f'test{src}', f'train{tgt}')):
                        kid, _ = kernel_inception_distance(*self.features(translator, direction, src, tgt, str(g)))
                        results[f'KID/{direction}_group{g}{suffix}'] = kid
        return results, record

    def features(self, translator, direction: str, src: str, tgt: str, sub: str) -> tuple[np.ndarray, np.ndarray]:
        """Inception features of train<tgt>/<sub> (cached on disk) and of translated test<src>/<sub>."""
        real = self.evaluator.real_features(self.root / f'train{tgt}' / sub, img_size=self.img_size)
        fake = np.concatenate(list(self._fake_batches(translator, direction, self.root / f'test{src}' / sub)))
        return real, fake

    def _fake_batches(self, translator, direction: str, folder: Path) -> Iterator[np.ndarray]:
        import dataset as data
        loader = data.build_test_loader(folder, self.img_size, batch_size=self.evaluator.batch_size,
                                        num_workers=self.num_workers)
        for images, _ in loader:
            fakes = quantise(translator.translate(images, direction).image)
            yield unit_range_features(self.evaluator.model, fakes).double().numpy()
