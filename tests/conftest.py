"""Shared fixtures: a tiny two-domain dataset and the flags of a tiny model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def make_domain(folder: Path, n: int, size: int, colour: tuple[int, int, int], seed: int) -> None:
    """n noisy images around one colour, so the domains differ."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        noise = rng.integers(-40, 40, size=(size, size, 3))
        array = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f'img{i}.png')


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    root = tmp_path / 'tiny'
    make_domain(root / 'trainA', 6, 40, (200, 80, 60), 0)
    make_domain(root / 'trainB', 5, 40, (60, 90, 200), 1)
    make_domain(root / 'testA', 3, 40, (200, 80, 60), 2)
    make_domain(root / 'testB', 2, 40, (60, 90, 200), 3)
    return root


def tiny_flags(dataset: Path, result_dir: Path, *extra: str) -> list[str]:
    """A 32-px light model with 4/3-layer discriminators: a step takes a few tens of ms on a CPU."""
    return ['--dataset', str(dataset), '--result_dir', str(result_dir), '--device', 'cpu',
            '--light', 'True', '--ch', '4', '--n_res', '1', '--img_size', '32',
            '--n_global_dis', '4', '--n_local_dis', '3', '--num_workers', '0',
            '--print_freq', '1000', '--log_freq', '1', '--latest_freq', '0', *extra]
