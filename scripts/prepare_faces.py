"""Detect, align and crop faces from a folder of photos into a trainA-style folder.

    python scripts/prepare_faces.py --input photos/ --output dataset/selfie/trainA \
        [--size 256] [--margin 0.4] [--min_face_size 40] [--all_faces] [--device cpu]

Images are found recursively (case-insensitive extensions, EXIF orientation applied). Each image
gives `<name>.png` for its largest face, or `<name>_<k>.png` for every face (k = 0 is the largest)
with --all_faces. <name> is the path relative to --input without its extension, with folder
separators replaced by '_' (so equal stems in different folders do not collide). Images without
a face are listed in `<output>/no_face.txt`; unreadable files are reported on stderr and skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

if __package__ in (None, ''):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import images  # noqa: E402
from faceseg.align import FaceAligner  # noqa: E402

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
NO_FACE_REPORT = 'no_face.txt'


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--input', required=True, type=Path, help='folder of photos (searched recursively)')
    parser.add_argument('--output', required=True, type=Path, help='folder for the aligned crops (created)')
    parser.add_argument('--size', type=int, default=256, help='side of the square output crops')
    parser.add_argument('--margin', type=float, default=0.4,
                        help='border around the face, a fraction of the face square (faceseg/align.py)')
    parser.add_argument('--min_face_size', type=int, default=40, help='smallest face MTCNN looks for, pixels')
    parser.add_argument('--all_faces', action='store_true', help='write every face, not only the largest')
    parser.add_argument('--device', default='cpu', help='torch device for MTCNN')
    return parser


def find_images(folder: Path, exclude: Path | None = None) -> list[Path]:
    """Image files under folder, sorted, skipping anything inside exclude (the output folder)."""
    exclude = exclude.resolve() if exclude is not None else None
    found = []
    for path in sorted(folder.rglob('*')):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if exclude is not None and exclude in path.resolve().parents:
            continue
        found.append(path)
    return found


def read_rgb(path: Path) -> np.ndarray | None:
    """RGB uint8 array as training reads it (images.load_rgb: EXIF orientation applied), or None if
    the file cannot be decoded."""
    try:
        return np.asarray(images.load_rgb(path))
    except images.UnreadableImage:
        return None


def output_name(path: Path, root: Path) -> str:
    """Relative path without extension, folders joined by '_'."""
    return '_'.join(path.relative_to(root).with_suffix('').parts)


def process(args: argparse.Namespace, aligner: FaceAligner) -> tuple[int, int, list[str], list[str]]:
    """Write the crops; returns (images, faces written, no-face paths, unreadable paths)."""
    photos = find_images(args.input, exclude=args.output)
    written, no_face, unreadable, used = 0, [], [], set()
    for path in photos:
        relative = path.relative_to(args.input).as_posix()
        image = read_rgb(path)
        if image is None:
            print(f'warning: cannot read {path}, skipped', file=sys.stderr)
            unreadable.append(relative)
            continue
        crops = aligner.crops(image, args.size, args.margin, all_faces=args.all_faces)
        if not crops:
            no_face.append(relative)
        name = output_name(path, args.input)
        if name in used:  # a.jpg next to a.png
            name = f"{name}_{path.suffix.lower().lstrip('.')}"
        used.add(name)
        for k, (crop, _) in enumerate(crops):
            stem = f'{name}_{k}' if args.all_faces else name
            Image.fromarray(crop).save(args.output / f'{stem}.png')
            written += 1
    return len(photos), written, no_face, unreadable


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status (2 for a missing input folder)."""
    args = build_parser().parse_args(argv)
    if not args.input.is_dir():
        print(f'error: --input folder not found: {args.input}', file=sys.stderr)
        return 2
    if args.size < 1 or args.margin < 0 or args.min_face_size < 1:
        print('error: need --size ≥ 1, --margin ≥ 0 and --min_face_size ≥ 1', file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    aligner = FaceAligner(min_face_size=args.min_face_size, device=args.device)
    n_images, n_written, no_face, unreadable = process(args, aligner)
    (args.output / NO_FACE_REPORT).write_text(''.join(f'{line}\n' for line in no_face))
    print(f'{n_images} images, {n_written} faces written, {len(no_face)} without a face, '
          f'{len(unreadable)} unreadable (list: {args.output / NO_FACE_REPORT})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
