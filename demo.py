"""A web page for a trained model: upload a photo (or take one with the webcam), translate it A→B or
B→A, and see the translation next to the input with the generator's CAM heatmap.

    pip install -r requirements-extras.txt
    python demo.py --checkpoint results/selfie2anime/model/selfie2anime_params_1000000.pt [--port 7860]
    python demo.py --checkpoint exports/selfie2anime          # a folder written by scripts/export.py
    python demo.py --checkpoint hf://OWNER/NAME               # an export on the Hugging Face Hub

The page is a Gradio app, so its translate call is also an HTTP API named ``translate``:

    from gradio_client import Client, handle_file
    translation, heatmap = Client('http://127.0.0.1:7860/').predict(
        handle_file('photo.jpg'), 'A2B', False, api_name='/translate')

The model loads once at start-up. Light models translate at the photo's own size (at most
``--max_size`` on the long side, as ``main.py --phase img_dir --keep_size True``); full models at
their training size (as ``--phase img_dir``). With "align face" the faces are detected (MTCNN),
aligned, translated and pasted back into the photo (as ``--align_faces True``).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

import checkpoints
import errors
import hub
import images
import options
import utils
from inference import sizing
from model import Translator

if TYPE_CHECKING:   # gradio is an optional extra, imported where the page is built
    import gradio as gr

REPO = Path(__file__).resolve().parent
DEFAULT_EXAMPLES = (REPO / 'dataset' / 'demo' / 'testA', REPO / 'dataset' / 'demo' / 'testB')
IMAGE_HEIGHT = 320
# Small images (a 64 px demo model) fill their boxes, with visible pixels rather than blur.
CSS = ('#input img, #translation img, #heatmap img {width: 100%; height: 100%; object-fit: contain; '
       'image-rendering: pixelated} #input img {height: calc(100% - 48px)}')


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: --ch (a model flag for PT-format files) must not be taken for --checkpoint.
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                     epilog="Other flags are main.py's model flags, needed only for PT-format "
                                     'checkpoints.', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--checkpoint', required=True,
                        help='training checkpoint (.pt), export folder (scripts/export.py) or hf://OWNER/NAME[@REVISION]')
    parser.add_argument('--port', type=int, default=7860, help='port to serve the page on')
    parser.add_argument('--host', default='127.0.0.1', help="address to listen on ('0.0.0.0': every interface)")
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument('--no_ema', action='store_true', help='use the raw generators even when EMA weights exist')
    parser.add_argument('--amp', default='auto', choices=('auto', 'off', 'bf16', 'fp16'),
                        help='mixed precision. auto: time one translation with each (off and bf16; on CUDA fp16 too) '
                        'at start-up and keep the fastest, since bf16 halves the time on some CPUs and slows others; '
                        'bf16/fp16 translate within a few 8-bit levels of off; fp16 needs CUDA')
    parser.add_argument('--max_size', type=int, default=512,
                        help='light models: the long side is at most this while translating (0: no limit)')
    parser.add_argument('--examples', nargs='*', type=Path, default=None,
                        help='example images or folders shown under the input (default: a few demo test images)')
    return parser


class DemoModel:
    """The loaded generators and what the page asks of them; the face detector loads on first use."""

    def __init__(self, translator, max_size: int) -> None:
        self.translator = translator
        self.max_size = max_size
        self.keep_size = not translator.arch.is_full
        self._aligner = None

    def __call__(self, path: str | None, direction: str, align: bool) -> tuple[np.ndarray, np.ndarray]:
        """The page's ``translate`` API: what :meth:`translate` does, its errors shown on the page."""
        import gradio as gr
        try:
            return self.translate(path, direction, align)
        except errors.UserError as exc:
            raise gr.Error(str(exc)) from None

    def translate(self, path: str | None, direction: str, align: bool) -> tuple[np.ndarray, np.ndarray]:
        """Image file, 'A2B'/'B2A', align faces -> (translation, heatmap); needs no web stack."""
        if not path:
            raise errors.UserError('Upload a photo or take one with the webcam first.')
        image = open_upload(path)
        start = time.perf_counter()
        result = self.translate_faces(image, direction) if align else \
            sizing.translate_image(self.translator, image, direction, self.keep_size, self.max_size)
        print(f'{direction} {image.width}x{image.height}: {time.perf_counter() - start:.3f} s', file=sys.stderr)
        return result

    def translate_faces(self, image: Image.Image, direction: str) -> tuple[np.ndarray, np.ndarray]:
        """Align every face, translate it at img_size and paste it back; heatmap of the largest face."""
        size = self.translator.arch.img_size
        heatmaps = []

        def translate_crop(crop: np.ndarray) -> np.ndarray:
            translation, heatmap = sizing.translate_image(self.translator, Image.fromarray(crop), direction, False)
            heatmaps.append(heatmap)
            return translation

        result = self.aligner().apply(np.asarray(image), translate_crop, out_size=size, all_faces=True)
        if not heatmaps:
            raise errors.UserError('No face found in this photo: untick "align face" to translate the whole photo.')
        return result, heatmaps[0]

    def aligner(self):
        if self._aligner is None:
            from faceseg.align import FaceAligner
            self._aligner = FaceAligner(device=str(self.translator.device))
        return self._aligner


def open_upload(path: str | Path) -> Image.Image:
    """The uploaded file as RGB, read as main.py reads images; a file that is not an image, or has more
    pixels than Pillow's decompression-bomb limit, is a one-line UserError before any pixel is decoded."""
    name = Path(path).name
    check_header(path)
    try:
        return images.load_rgb(path)
    except images.UnreadableImage as exc:   # a valid header, then a truncated or corrupt body
        raise errors.UserError(f'not a readable image: {name} ({exc.__cause__ or exc})') from None


def check_header(path: str | Path) -> None:
    """Open the header only: unknown formats and decompression bombs fail here. Pillow merely warns
    between its limit and twice that and would then decode it all, so that warning is an error too."""
    name = Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            with Image.open(path):
                pass
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise errors.UserError(f'{name}: {too_many_pixels(exc)}; upload a smaller image') from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:   # Pillow's UnidentifiedImageError is an OSError
        reason = 'no image format recognises it' if isinstance(exc, Image.UnidentifiedImageError) else exc
        raise errors.UserError(f'not an image: {name} ({reason})') from None


def too_many_pixels(exc: Exception) -> str:
    """'N megapixels, above the limit of M': Pillow states the count only in its message."""
    limit = f'the limit of {Image.MAX_IMAGE_PIXELS / 1e6:.1f} megapixels'
    found = re.search(r'\((\d+) pixels\)', str(exc))
    return f'{int(found[1]) / 1e6:.1f} megapixels, above {limit}' if found else f'more pixels than {limit}'


def path_image(**kwargs: object) -> gr.Image:
    """A gr.Image that hands uploads over as their file path, unopened. gr.Image's own preprocess opens
    every upload with Pillow even for type='filepath', and answers a non-image or a decompression bomb
    with a generic "Could not preprocess input" error; :func:`open_upload` says what is wrong instead."""
    import gradio as gr
    component = gr.Image(type='filepath', **kwargs)
    opening_preprocess = component.preprocess

    def preprocess(payload: gr.data_classes.ImageData | None) -> str | None:
        if payload is not None and payload.path and not (payload.url or '').startswith('data:'):
            return str(payload.path)
        return opening_preprocess(payload)   # None, or a base64 data URL that Gradio writes to a file

    # Replaced on the instance: for a subclass, Gradio would write a demo.pyi stub beside this file.
    component.preprocess = preprocess
    return component


def example_images(sources: list[Path] | None, per_folder: int = 2) -> list[tuple[Path, str]]:
    """(file, direction) pairs: files as given, and the first few images of each folder; images of a
    folder named like testB/trainB are examples of B→A, all others of A→B."""
    found: list[tuple[Path, str]] = []
    for source in sources if sources is not None else [p for p in DEFAULT_EXAMPLES if p.is_dir()]:
        source = Path(source)
        direction = 'B2A' if source.is_dir() and source.name.endswith('B') else 'A2B'
        files = images.find_images(source)[:per_folder] if source.is_dir() else [source]
        found += [(path, direction) for path in files]
    return found


def label(direction: str) -> str:
    """'A2B' -> 'A → B' (the radio button's text; the API takes 'A2B')."""
    return direction.replace('2', ' → ')


def build_page(model: DemoModel, examples: list[tuple[Path, str]], title: str):
    """The Gradio page: input | translation | heatmap, direction and face options, examples."""
    import gradio as gr
    arch = model.translator.arch
    size_note = (f'Light model: translated at the photo\'s own size (long side at most {model.max_size} px).'
                 if model.keep_size else f'Full model: translated at {arch.img_size}x{arch.img_size} px.')
    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(f'## {title}\nUpload a photo or use the webcam, choose the direction and press '
                    f'**Translate**. {size_note}')
        with gr.Row():
            image = path_image(sources=['upload', 'webcam'], label='input', elem_id='input', height=IMAGE_HEIGHT)
            # PNG: the page shows exactly the pixels the model produced (Gradio's default is lossy WebP).
            translation = gr.Image(type='numpy', format='png', label='translation', elem_id='translation',
                                   interactive=False, height=IMAGE_HEIGHT)
            heatmap = gr.Image(type='numpy', format='png', label='CAM heatmap', elem_id='heatmap',
                               interactive=False, height=IMAGE_HEIGHT)
        with gr.Row():
            direction = gr.Radio([(label(d), d) for d in ('A2B', 'B2A')], value='A2B', label='direction',
                                 elem_id='direction')
            align = gr.Checkbox(False, label='align face and paste it back (MTCNN)', elem_id='align')
            button = gr.Button('Translate', variant='primary', elem_id='translate')
        if examples:
            gr.Examples([[str(path), d, False] for path, d in examples], inputs=[image, direction, align],
                        examples_per_page=8)
        button.click(model, inputs=[image, direction, align], outputs=[translation, heatmap], api_name='translate')
    return page


def title(checkpoint: str) -> str:
    """The page's name for a model: OWNER/NAME of an hf:// one, else the file or folder name."""
    return checkpoint.removeprefix('hf://') if hub.is_hub_uri(checkpoint) else Path(checkpoint).name


def load_model(checkpoint: str, device: str, use_ema: bool, model_flags: list[str] = ()):
    """A model.Translator from a training checkpoint or an export folder (one-line errors);
    ``model_flags``: main.py's model flags, for PT-format checkpoints only."""
    flags, explicit = options.architecture_flags(list(model_flags))
    translator, state = checkpoints.load_translator(checkpoint, device, use_ema=use_ema, flags=flags, explicit=explicit)
    if not use_ema and state['uses_ema']:
        raise errors.UserError(f'--no_ema: {checkpoint} holds only the EMA generators (an export); export the raw '
                              f'ones with scripts/export.py --no_ema, or pass the training checkpoint')
    weights = 'EMA' if state.get('uses_ema') else 'raw'
    print(f'loaded {checkpoint} (step {state.get("step", "?")}, {weights} generators, '
          f'{translator.arch.img_size} px, {"full" if translator.arch.is_full else "light"})',
          file=sys.stderr)
    return translator


def precisions(device: torch.device) -> tuple[str, ...]:
    """The --amp modes worth timing on this device (bf16 on a GPU only where it is supported)."""
    if device.type != 'cuda':
        return ('off', 'bf16')
    return ('off', 'fp16') + (('bf16',) if torch.cuda.is_bf16_supported() else ())


def time_translation(translator: Translator, amp: str) -> float:
    """Seconds for one img_size translation under ``amp``, after one untimed call (kernel choice,
    allocations and bf16 weight casts are one-off costs, not the page's)."""
    translator.autocast = lambda: utils.autocast(amp, translator.device.type)
    size = translator.arch.img_size
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seconds = 0.0
    for _ in range(2):
        start = time.perf_counter()
        translator.translate(image, 'A2B')
        if translator.device.type == 'cuda':
            torch.cuda.synchronize(translator.device)
        seconds = time.perf_counter() - start
    return seconds


def choose_precision(translator: Translator, amp: str) -> tuple[str, str]:
    """The --amp mode to serve with and the line that says why: an explicit mode as given, 'auto'
    the fastest by :func:`time_translation`. Sets the translator's autocast to it."""
    if amp == 'auto':
        times = {mode: time_translation(translator, mode) for mode in precisions(translator.device)}
        amp = min(times, key=times.get)
        measured = ', '.join(f'{mode} {seconds:.3f} s' for mode, seconds in times.items())
        note = f'precision: {amp} (the fastest at start-up: {measured} per translation; --amp sets it)'
    else:
        note = f'precision: {amp} (--amp)'
    translator.autocast = lambda: utils.autocast(amp, translator.device.type)
    return amp, note


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
    args, model_flags = build_parser().parse_known_args(argv)
    if args.max_size < 0 or 0 < args.max_size < sizing.MIN_SIDE:
        print(f'error: --max_size must be 0 (no limit) or at least {sizing.MIN_SIDE}, got {args.max_size}',
              file=sys.stderr)
        return 2
    try:
        import gradio  # noqa: F401 - checked before the model loads
    except ImportError:
        print('error: the demo needs gradio: pip install -r requirements-extras.txt', file=sys.stderr)
        return 2
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        print('note: CUDA is not available; running on the CPU', file=sys.stderr)
        args.device = 'cpu'
    if args.amp == 'fp16' and not args.device.startswith('cuda'):
        print('error: --amp fp16 needs a CUDA device; on the CPU use --amp bf16 or --amp off', file=sys.stderr)
        return 2
    try:
        translator = load_model(args.checkpoint, args.device, not args.no_ema, model_flags)
        _, note = choose_precision(translator, args.amp)
        print(note, file=sys.stderr)
        demo_model = DemoModel(translator, args.max_size)
        page = build_page(demo_model, example_images(args.examples), f'U-GAT-IT: {title(args.checkpoint)}')
    except errors.UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    page.launch(server_name=args.host, server_port=args.port, show_error=True, css=CSS)
    return 0


if __name__ == '__main__':
    sys.exit(main())
