"""Rank 0's view of a training run: TensorBoard scalars and images, PNG preview grids, metrics.jsonl.

Its own module because it is about files and dashboards, not optimisation: the trainer hands it
loss means, preview columns and metric results, and it writes them.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import dataset as data
import images
from model import DIRECTIONS, Direction

if TYPE_CHECKING:   # a type only: the monitor writes where the loop's RunFiles says
    from run_folder import RunFiles

# FN's TensorBoard names for its face-distance curves, written too so its dashboards keep working.
# FN (a TF fork) names generators by the domain they produce: G_A is B→A.
FN_TAG_ALIASES = {'G/face_distance_B2A': 'G_A_face_distance', 'G/face_distance_A2B': 'G_B_face_distance'}


def preview_samples(dataset_root: Path, img_size: int, n: int) -> dict[str, torch.Tensor]:
    """The first n train and test images of each domain: the same columns in every preview."""
    samples = {}
    for dom in 'AB':
        parts = []
        for split in (f'train{dom}', f'test{dom}'):
            loader = data.build_test_loader(dataset_root / split, img_size, batch_size=n)
            parts.append(next(iter(loader))[0])
        samples[dom] = torch.cat(parts)
    return samples


class TrainingMonitor:
    """Writes what the trainer reports into the run's files (``run_folder.RunFiles``: the TensorBoard
    folder, the preview folder and metrics.jsonl)."""

    def __init__(self, files: RunFiles, dataset_root: Path, img_size: int, n_preview: int = 5) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.samples = preview_samples(dataset_root, img_size, n_preview)   # read at start-up, not step 1000
        self.writer = SummaryWriter(str(files.logs_dir))
        self.img_dir = files.previews_dir
        self.metrics_file = files.metrics_file

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
            if key in FN_TAG_ALIASES:
                self.writer.add_scalar(FN_TAG_ALIASES[key], value, step)

    def previews(self, step: int, columns: Callable[[torch.Tensor, Direction, bool], list], ema: bool) -> None:
        """PT's A2B/B2A grids (plus _ema ones) as ``img/<name>_<step>.png`` and TensorBoard images;
        ``columns(images, direction, use_ema)`` gives each preview column's tiles."""
        variants = [(False, '')] + ([(True, '_ema')] if ema else [])
        for d in DIRECTIONS:
            for use_ema, suffix in variants:
                image = images.grid(columns(self.samples[d.source], d, use_ema))
                images.save_rgb(self.img_dir / f'{d.name}{suffix}_{step:07d}.png', image)
                self.writer.add_image(f'preview/{d.name}{suffix}', image, step, dataformats='HWC')

    def metrics(self, step: int, results: dict[str, float], record: dict | None = None) -> None:
        for key, value in results.items():
            self.writer.add_scalar(key, value, step)
        with open(self.metrics_file, 'a') as f:
            f.write(json.dumps({'step': step, **results, **(record or {})}) + '\n')
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
