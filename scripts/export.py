"""Export a trained model for sharing: the architecture config and the two generators the test
phase would use (EMA copies when the checkpoint has them) as safetensors, optionally float16 and
ONNX; prints each file's size and sha256.

    python scripts/export.py --checkpoint results/selfie2anime/model/selfie2anime_params_1000000.pt \
        --out exports/selfie2anime [--fp16] [--onnx]

Every inference phase and demo.py then take ``--checkpoint exports/selfie2anime``. Official
PT-format checkpoints record no architecture: add main.py's model flags (--light, --ch, --n_res,
--img_size, ...) as for training.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoints  # noqa: E402
import options  # noqa: E402
import utils  # noqa: E402
from inference.onnx import export_onnx  # noqa: E402
from model import DIRECTIONS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: --ch (a model flag for PT-format files) must not be taken for --checkpoint.
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                     epilog="Other flags are main.py's model flags, needed only for PT-format "
                                     'checkpoints.', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--checkpoint', required=True, help='training checkpoint (.pt), or an export to convert')
    parser.add_argument('--out', required=True, type=Path, help='folder to write (created if missing)')
    parser.add_argument('--fp16', action='store_true', help='store the weights as float16 (half the size)')
    parser.add_argument('--onnx', action='store_true', help='also write A2B.onnx and B2A.onnx (needs onnx, '
                        'onnxscript: requirements-extras.txt)')
    parser.add_argument('--no_ema', action='store_true', help='export the raw generators even when EMA weights exist')
    return parser


def export(args: argparse.Namespace, rest: list[str]) -> list[Path]:
    """Load the checkpoint's generators as the test phase would, then write the export folder."""
    flags, explicit = options.architecture_flags(rest)
    translator, state = checkpoints.load_translator(args.checkpoint, 'cpu', use_ema=not args.no_ema, flags=flags,
                                                    explicit=explicit)
    if args.out.exists() and any(args.out.iterdir()) and not checkpoints.is_export(args.out):
        raise utils.UserError(f'--out {args.out} exists and is not an export folder; choose a new or empty folder')
    config = state.get('config') or {}
    metadata = {'step': int(state.get('step', 0)), 'ema': bool(state['uses_ema']),
                'dataset_name': config.get('dataset_name'),
                'source': Path(args.checkpoint).name}
    paths = checkpoints.write_export(translator.generators, translator.arch, args.out, fp16=args.fp16,
                                     metadata=metadata)
    if args.onnx:
        for d in DIRECTIONS:
            paths += export_onnx(translator.generators[d.name], args.out / f'{d.name}.onnx', translator.arch)
    return paths


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    try:
        paths = export(args, rest)
    except utils.UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    print(f'exported {args.checkpoint} to {args.out}:')
    for line in utils.file_report(paths):
        print(f'  {line}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
