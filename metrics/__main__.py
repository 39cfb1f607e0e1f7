"""``python -m metrics DIR1 DIR2``: FID and KID between two image folders."""

from __future__ import annotations

import argparse
import sys

import torch

from .evaluator import Evaluator, require_images
from .scores import MetricsError


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m metrics``."""
    parser = argparse.ArgumentParser(
        prog='python -m metrics', formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description='FID and KID (pytorch-fid Inception, 2048-d pool3) between two image folders.')
    parser.add_argument('dirs', nargs=2, metavar='DIR', help='image folders (searched recursively)')
    parser.add_argument('--weights', default=None,
                        help='pt_inception-2015-12-05-6726825d.pth; default: pytorch-fid download')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='torch device, e.g. cpu or cuda:0')
    parser.add_argument('--batch_size', type=int, default=50, help='images per Inception batch')
    parser.add_argument('--num_workers', type=int, default=0, help='DataLoader worker processes')
    parser.add_argument('--kid_subsets', type=int, default=100, help='number of KID subsets')
    parser.add_argument('--kid_subset_size', type=int, default=1000,
                        help='KID subset size (capped at the smaller folder size)')
    parser.add_argument('--img_size', type=int, default=None,
                        help='resize the images of the FIRST folder to this square size (bilinear), as '
                        'training does with the real images; None: native size')
    return parser


def run(args: argparse.Namespace) -> dict[str, float]:
    """Compute FID/KID for parsed arguments."""
    for folder in args.dirs:
        require_images(folder)  # report a bad folder before the slow network build
    evaluator = Evaluator(args.weights, args.device, args.batch_size, num_workers=args.num_workers)
    feats1 = evaluator.real_features(args.dirs[0], img_size=args.img_size)
    feats2 = evaluator.real_features(args.dirs[1])
    return evaluator.score(feats1, feats2, args.kid_subsets, args.kid_subset_size)


def main(argv: list[str] | None = None) -> int:
    """Entry point: prints ``FID: <value>`` and ``KID: <mean> ± <std>``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        scores = run(args)
    except MetricsError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    print(f'FID: {scores["FID"]:.6f}')
    print(f'KID: {scores["KID"]:.8f} ± {scores["KID_std"]:.8f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
