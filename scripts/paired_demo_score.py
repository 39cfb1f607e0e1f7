"""Score a demo model against ground truth: the EMA generators against the raw ones.

The demo's two domains draw the same kind of scene in two styles, and a scene is a pure function of
its random seed, so the same seed drawn in style A and in style B is a ground-truth translation
pair. This script draws ``--n`` such pairs (seeds the training data never used), translates each
side with the checkpoint's EMA and raw generators, and prints per direction the score
1 − mean |translation − ground truth| (pixels in [0, 1]; 1 is perfect):

    python scripts/paired_demo_score.py --checkpoint results/demo/model/demo_params_0001000.pt
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoints import load_translator  # noqa: E402
from scripts.make_demo_dataset import make_scene  # noqa: E402


def paired_scenes(n: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    """n scenes drawn in both styles from the same seeds, as N×3×H×W tensors in [-1, 1]."""
    out = {}
    for domain in 'AB':
        images = [np.asarray(make_scene(domain, size, random.Random(f'paired-{seed}-{i}')).convert('RGB'))
                  for i in range(n)]
        out[domain] = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return out


def score(translated: torch.Tensor, truth: torch.Tensor) -> float:
    """1 − mean absolute error in [0, 1] pixel units, after the 8-bit rounding a saved image has."""
    quantised = ((translated.clamp(-1, 1) + 1) * 127.5).round() / 255
    return 1.0 - float((quantised - (truth + 1) / 2).abs().mean())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', required=True, help='a demo training checkpoint (with EMA weights)')
    parser.add_argument('--n', type=int, default=64, help='number of scene pairs')
    parser.add_argument('--seed', type=int, default=0, help='seed of the scene pairs')
    args = parser.parse_args(argv)
    results = {}
    for use_ema, label in ((True, 'ema'), (False, 'raw')):
        translator, _ = load_translator(args.checkpoint, use_ema=use_ema)
        scenes = paired_scenes(args.n, translator.img_size, args.seed)
        for direction, (src, tgt) in (('A2B', ('A', 'B')), ('B2A', ('B', 'A'))):
            results[f'{direction}_{label}'] = score(translator.translate(scenes[src], direction).image, scenes[tgt])
    print(' '.join(f'{key}={value:.4f}' for key, value in results.items()))
    return results


if __name__ == '__main__':
    main()
