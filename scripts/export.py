"""Export a trained model for sharing: the architecture config and the two generators the test
phase would use (EMA copies when the checkpoint has them) as safetensors, optionally float16 and
ONNX, with a model card (README.md in the Hugging Face Hub's convention, samples.png); prints each
file's size and sha256, and optionally uploads the folder to the Hub.

    python scripts/export.py --checkpoint results/selfie2anime/model/selfie2anime_params_1000000.pt \
        --out exports/selfie2anime [--fp16] [--onnx] [--license mit] [--samples DIR] \
        [--push_to_hub OWNER/NAME [--private]]

Every inference phase and demo.py then take ``--checkpoint exports/selfie2anime`` (or, once pushed,
``--checkpoint hf://OWNER/NAME``). Official PT-format checkpoints record no architecture: add
main.py's model flags (--light, --ch, --n_res, --img_size, ...) as for training.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoints  # noqa: E402
import errors  # noqa: E402
import hub  # noqa: E402
import options  # noqa: E402
import utils  # noqa: E402
from inference import model_card  # noqa: E402
from inference.onnx import export_onnx  # noqa: E402
from model import DIRECTIONS, Translator  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: --ch (a model flag for PT-format files) must not be taken for --checkpoint.
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                     epilog="Other flags are main.py's model flags, needed only for PT-format "
                                     'checkpoints.', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--checkpoint', required=True, help='training checkpoint (.pt), or an export (folder or '
                        'hf://OWNER/NAME) to convert')
    parser.add_argument('--out', required=True, type=Path, help='folder to write (created if missing)')
    parser.add_argument('--fp16', action='store_true', help='store the weights as float16 (half the size)')
    parser.add_argument('--no_ema', action='store_true', help='export the raw generators even when EMA weights exist')
    add_sharing_flags(parser)
    parser.add_argument('--push_to_hub', default=None, metavar='OWNER/NAME',
                        help='upload the folder to this Hugging Face model repository (created if missing) with your '
                        'login (hf auth login); needs huggingface_hub: requirements-extras.txt')
    parser.add_argument('--private', action='store_true', help='with --push_to_hub: create the repository private')
    return parser


def add_sharing_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of what an export carries besides its weights (shared with the TF converter)."""
    parser.add_argument('--onnx', action='store_true', help='also write A2B.onnx and B2A.onnx (needs onnx, '
                        'onnxscript: requirements-extras.txt)')
    parser.add_argument('--license', default=None, help="the model card's license (a Hub license id such as mit, "
                        'apache-2.0, cc-by-nc-4.0); None: unspecified')
    parser.add_argument('--samples', type=Path, default=None, metavar='DIR',
                        help='a folder with testA/ and testB/ images for samples.png; None: the test folders of the '
                        'dataset the checkpoint was trained on, when they are on this machine')


def export(args: argparse.Namespace, rest: list[str]) -> list[Path]:
    """Load the checkpoint's generators as the test phase would, then write the export folder."""
    flags, explicit = options.architecture_flags(rest)
    translator, state = checkpoints.load_translator(args.checkpoint, 'cpu', use_ema=not args.no_ema, flags=flags,
                                                    explicit=explicit)
    config = state.get('config') or {}
    card = model_card.CardOptions(args.license, model_card.samples_root(args.samples, config), args.push_to_hub)
    return write_folder(translator, state, args.out, source=args.checkpoint, fp16=args.fp16, onnx=args.onnx,
                        card=card, run_dir=model_card.run_dir_of(args.checkpoint, config.get('dataset_name')))


def write_folder(translator: Translator, state: dict, out: Path, *, source: str | Path, fp16: bool = False,
                 onnx: bool = False, card: model_card.CardOptions = model_card.CardOptions(),
                 run_dir: Path | None = None) -> list[Path]:
    """Config, weights (and ONNX graphs), then the card written from the folder as a reader loads it."""
    if out.exists() and any(out.iterdir()) and not checkpoints.is_export(out):
        raise errors.UserError(f'--out {out} exists and is not an export folder; choose a new or empty folder')
    paths = checkpoints.write_export(translator.generators, translator.arch, out, fp16=fp16,
                                     metadata=export_metadata(state, source))
    if onnx:
        for d in DIRECTIONS:
            paths += export_onnx(translator.generators[d.name], out / f'{d.name}.onnx', translator.arch)
    exported, _ = checkpoints.load_translator(out)   # the card's hashes and samples: exactly these weights
    return paths + model_card.write_card(out, exported, card, run_dir=run_dir, samples=card.samples)


def export_metadata(state: dict, source: str | Path) -> dict:
    """What config.json records besides the architecture: enough for the card of a re-export too."""
    config = state.get('config') or {}
    exported = state.get('format') == checkpoints.EXPORT_FORMAT   # an export's config carries these already
    flags = config.get('training_flags') if exported or not config else model_card.changed_flags(config)
    return {'step': int(state.get('step', 0)), 'ema': bool(state['uses_ema']),
            'dataset_name': config.get('dataset_name'), 'seed': config.get('seed'), 'training_flags': flags,
            **model_card.provenance(state), 'source': source if hub.is_hub_uri(source) else Path(source).name}


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    try:
        if args.private and not args.push_to_hub:
            raise errors.UserError('--private applies to --push_to_hub OWNER/NAME; add that, or drop --private')
        if args.push_to_hub:   # a name the Hub rejects fails before the export is written
            hub.check_repo_id(args.push_to_hub, f'--push_to_hub {args.push_to_hub}')
        paths = export(args, rest)
        print(f'exported {args.checkpoint} to {args.out}:')
        for line in utils.file_report(paths):
            print(f'  {line}')
        if args.push_to_hub:
            print(f'pushed to {hub.push(args.out, args.push_to_hub, private=args.private)}')
    except errors.UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
