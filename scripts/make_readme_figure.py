"""Compose the README's demo picture from a test-phase output folder.

    python scripts/make_readme_figure.py --dataset dataset/demo --test_dir results/demo/test \
        --out assets/demo_results.png [--n 8] [--scale 2]

Rows: testA images, their A→B translations, testB images, their B→A translations (nearest-neighbour
upscaled by --scale so small demo images stay crisp).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import images  # noqa: E402

GAP = 4


def _pairs(sources: Path, translations: Path, n: int) -> list[tuple[Image.Image, Image.Image]]:
    pairs = []
    for source in sorted(sources.glob('*.png'))[:n]:
        translated = translations / source.name
        if not translated.is_file():
            raise SystemExit(f'error: {translated} missing; run --phase test first')
        pairs.append((images.load_rgb(source), images.load_rgb(translated)))
    if not pairs:
        raise SystemExit(f'error: no PNG images in {sources}')
    return pairs


def compose(rows: list[list[Image.Image]], size: int) -> Image.Image:
    """A white-spaced grid of size×size tiles."""
    width = max(len(row) for row in rows) * (size + GAP) - GAP
    canvas = Image.new('RGB', (width, len(rows) * (size + GAP) - GAP), 'white')
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            canvas.paste(tile.resize((size, size), Image.NEAREST), (c * (size + GAP), r * (size + GAP)))
    return canvas


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dataset', type=Path, default=Path('dataset/demo'))
    parser.add_argument('--test_dir', type=Path, default=Path('results/demo/test'))
    parser.add_argument('--out', type=Path, default=Path('assets/demo_results.png'))
    parser.add_argument('--n', type=int, default=8, help='images per row')
    parser.add_argument('--scale', type=int, default=2, help='upscaling factor of each tile')
    args = parser.parse_args(argv)
    rows = []
    for src, direction in (('testA', 'A2B'), ('testB', 'B2A')):
        pairs = _pairs(args.dataset / src, args.test_dir / direction, args.n)
        rows += [[real for real, _ in pairs], [fake for _, fake in pairs]]
    size = rows[1][0].width * args.scale
    args.out.parent.mkdir(parents=True, exist_ok=True)
    compose(rows, size).save(args.out, optimize=True)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
