"""Write the tiny synthetic `dataset/demo` used by the quick-start and the smoke tests.

Both domains show the same kind of scene: one to three round cartoon "faces" (an ellipse with two
eyes and a mouth) and a few small background shapes, drawn at random. They differ in style only,
which a small U-GAT-IT (`--light True --ch 16 --img_size 64`) learns in a few thousand CPU steps:

* trainA / testA: warm flat colours (orange, red, yellow, pink) on a cream background, no outlines;
* trainB / testB: cool flat colours (blue, teal, violet, green) on a pale blue background, with
  bold dark navy outlines.

The scenes of A and B are drawn independently (the data is unpaired). Images are 64×64 palette PNGs
of a few flat colours, so the default 200 + 200 training and 8 + 8 test images take about 0.2 MB.
Backgrounds are shaded in bands rather than flat, so that no training crop is a constant image (see
_gradient_background). The output is a pure function of --seed.

    python scripts/make_demo_dataset.py [--out dataset/demo] [--n_train 200] [--n_test 8]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

STYLES = {
    'A': {'background': (250, 238, 220), 'ink': (110, 60, 30), 'outline': 0,
          'colours': [(240, 150, 60), (225, 80, 70), (245, 200, 80), (240, 140, 150)]},
    'B': {'background': (222, 234, 250), 'ink': (25, 30, 70), 'outline': 3,
          'colours': [(60, 120, 220), (50, 170, 170), (130, 90, 200), (70, 170, 110)]},
}


def _jitter(colour: tuple[int, int, int], rng: random.Random, amount: int = 12) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in colour)


def _draw_face(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], fill: tuple[int, int, int],
               style: dict, rng: random.Random) -> None:
    """An ellipse with two eyes and a smiling or flat mouth."""
    left, top, right, bottom = box
    draw.ellipse(box, fill=fill, outline=style['ink'] if style['outline'] else None, width=style['outline'])
    width, height = right - left, bottom - top
    eye = max(1, width // 10)
    for frac in (0.33, 0.67):
        cx, cy = left + frac * width, top + 0.4 * height
        draw.ellipse((cx - eye, cy - eye, cx + eye, cy + eye), fill=style['ink'])
    mouth = (left + 0.3 * width, top + 0.5 * height, right - 0.3 * width, top + 0.78 * height)
    draw.arc(mouth, 20 if rng.random() < 0.7 else 0, 160 if rng.random() < 0.7 else 180,
             fill=style['ink'], width=max(1, width // 14))


def _draw_shape(draw: ImageDraw.ImageDraw, size: int, fill: tuple[int, int, int], style: dict,
                rng: random.Random) -> None:
    """A small square or triangle in the background."""
    side = rng.randint(size // 10, size // 5)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    outline = style['ink'] if style['outline'] else None
    if rng.random() < 0.5:
        draw.rectangle((x, y, x + side, y + side), fill=fill, outline=outline, width=style['outline'] - 1)
    else:
        draw.polygon([(x, y + side), (x + side, y + side), (x + side // 2, y)], fill=fill, outline=outline,
                     width=max(style['outline'] - 1, 1))


def _gradient_background(colour: tuple[int, int, int], size: int, depth: int = 24, band: int = 4) -> Image.Image:
    """A background darkening from top to bottom in bands of `band` rows.

    Never perfectly flat: a training crop of a flat background is a constant image, for which the
    instance norms of the generator's encoder multiply the gradient by 1/sqrt(eps) ≈ 316 per layer
    and training diverges within a few steps (the official code does the same).
    """
    rows = np.arange(size) // band * band / max(size - 1, 1)  # 0 … 1, in steps
    shade = np.rint((0.5 - rows) * depth).astype(int)
    column = np.clip(np.array(colour)[None, :] + shade[:, None], 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(column[:, None, :], size, axis=1), 'RGB')


def make_scene(domain: str, size: int, rng: random.Random) -> Image.Image:
    """One random scene in the style of `domain` ('A' or 'B'), as a palette image."""
    style = STYLES[domain]
    img = _gradient_background(_jitter(style['background'], rng, 6), size)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, 3)):
        _draw_shape(draw, size, _jitter(rng.choice(style['colours']), rng), style, rng)
    for _ in range(rng.randint(1, 3)):
        width = rng.randint(size // 4, size // 2)
        height = int(width * rng.uniform(1.0, 1.3))
        left = rng.randint(-width // 4, size - 3 * width // 4)
        top = rng.randint(-height // 4, size - height // 2)
        _draw_face(draw, (left, top, left + width, top + height), _jitter(rng.choice(style['colours']), rng),
                   style, rng)
    return _to_palette(img)


def _to_palette(img: Image.Image) -> Image.Image:
    """Lossless conversion of a few-colour RGB image to a palette image (much smaller PNGs)."""
    pixels = np.asarray(img).reshape(-1, 3)
    colours, index = np.unique(pixels, axis=0, return_inverse=True)
    palette_img = Image.frombytes('P', img.size, index.astype(np.uint8).tobytes())
    palette_img.putpalette(colours.astype(np.uint8).ravel().tolist())
    return palette_img


def write_split(out: Path, split: str, count: int, size: int, seed: int) -> None:
    """Write `count` scenes of the split's domain as `<split>/<split>_0000.png`, ..."""
    rng = random.Random(f'{seed}-{split}')
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        make_scene(split[-1], size, rng).save(folder / f'{split}_{index:04d}.png', optimize=True)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and write the dataset."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=Path('dataset/demo'), help='output folder')
    parser.add_argument('--n_train', type=int, default=200, help='training images per domain')
    parser.add_argument('--n_test', type=int, default=8, help='test images per domain')
    parser.add_argument('--size', type=int, default=64, help='image side in pixels')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    args = parser.parse_args(argv)
    for split in ('trainA', 'trainB', 'testA', 'testB'):
        write_split(args.out, split, args.n_train if split.startswith('train') else args.n_test,
                    args.size, args.seed)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
