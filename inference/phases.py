"""Inference phases: test, val, img_dir/generate, video, video_dir and camera.

Kept apart from the trainer because they are about files, HTML and video streams rather than
optimisation. Each phase gets an :class:`Inference`: the generators of one checkpoint, built from
the architecture that checkpoint records (``checkpoints.load_translator``), and the run's folders. No
phase builds a discriminator, FaceNet or an optimizer, and only test/val read the dataset.
"""
from __future__ import annotations

import contextlib
import html
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import checkpoints
import dataset as data
import errors
import hub
import images
import model
import utils
from config import Config
from inference import sizing
from inference import video as video_io
from run_folder import RunFiles, same_dataset

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.ts', '.webm', '.m4v')


@dataclass
class Inference:
    """What every phase works with: a loaded model and where its run's files are."""

    translator: model.Translator
    cfg: Config
    files: RunFiles          # the run the checkpoint belongs to: where outputs go without --out_dir
    checkpoint: Path | str   # a file, an export folder or hf://OWNER/NAME
    aligner: object = None

    @property
    def run_dir(self) -> Path:
        return self.files.run_dir

    def output_dir(self, *in_run: str) -> Path:
        """--out_dir, else the phase's folder in the run (run_folder.PHASE_OUTPUTS) and ``in_run`` below it."""
        out = self.cfg.inference.out_dir
        return Path(out) if out else self.files.phase_output(self.cfg.run.phase).joinpath(*in_run)

    @property
    def img_size(self) -> int:
        return self.translator.img_size

    def translate(self, images: torch.Tensor, direction: str) -> torch.Tensor:
        return self.translator.translate(images, direction).image


def run(cfg: Config) -> None:
    """Load the checkpoint's generators, then run the phase (holding the run folder's lock when it
    writes there, so it never runs beside the training of that folder)."""
    job = load(cfg)
    phase = {'test': test, 'val': validate, 'img_dir': translate_folder, 'generate': translate_folder,
             'video': video, 'video_dir': video_dir, 'camera': camera}[cfg.run.phase]
    with job.files.lock() if writes_into_run(cfg) else contextlib.nullcontext():
        phase(job)


def writes_into_run(cfg: Config) -> bool:
    """Whether the phase writes into the run folder: its outputs without --out_dir, and val's
    Inception feature cache (the camera writes nothing). Phases that only read are not locked."""
    if cfg.run.phase == 'camera':
        return False
    return cfg.run.phase == 'val' or not cfg.inference.out_dir


def _dataset_root(cfg: Config) -> Path | None:
    try:
        return data.resolve_dataset_root(cfg.run.dataset)
    except images.DatasetError:
        return None   # img_dir/video need no dataset


def find_checkpoint(cfg: Config) -> Path | str:
    """``--checkpoint`` or the newest checkpoint of the run (never one of another dataset folder);
    an ``hf://`` name stays a string (a Path would fold its //) for checkpoints.resolve_location."""
    if cfg.inference.checkpoint:
        return cfg.inference.checkpoint if hub.is_hub_uri(cfg.inference.checkpoint) else Path(cfg.inference.checkpoint)
    files = RunFiles(cfg.run.result_dir, cfg.run.dataset_name)
    root = _dataset_root(cfg)
    found = files.newest(accept=lambda state: same_dataset(state, root))
    if found is None:
        raise errors.UserError(f'no checkpoint found in {files.model_dir} or {files.latest_path}: train first '
                              f'(--phase train) or pass --checkpoint FILE')
    return found.path


def load(cfg: Config) -> Inference:
    path = find_checkpoint(cfg)
    translator, state = checkpoints.load_translator(path, cfg.performance.device, use_ema=not cfg.inference.no_ema,
                                                    flags=cfg.values, explicit=cfg.explicit,
                                                    compile=cfg.performance.compile,
                                                    compile_mode=cfg.performance.compile_mode)
    translator.autocast = lambda: utils.autocast(cfg.performance.amp, translator.device.type)
    if cfg.inference.no_ema and state['uses_ema']:
        raise errors.UserError(f'--no_ema: {path} holds only the EMA generators (an export); export the raw ones '
                              f'with scripts/export.py --no_ema, or pass the training checkpoint')
    if cfg.inference.keep_size:
        sizing.check_keep_size(translator.arch)
    stored = state.get('config') or {}
    # A checkpoint alone names its run: outputs go next to the run it came from.
    name = stored.get('dataset_name') if 'dataset' not in cfg.explicit and stored.get('dataset_name') \
        else cfg.run.dataset_name
    weights = 'EMA' if state['uses_ema'] else 'raw'
    print(f'loaded {path} (step {state.get("step", "?")}, {weights} generators, {translator.img_size} px)',
          file=sys.stderr)
    return Inference(translator, cfg, RunFiles(cfg.run.result_dir, name), path)


# ----------------------------------------------------------------------------------------------
# test / img_dir / val


def test(job: Inference) -> None:
    """Every testA/testB image translated on its own (A2B/<name>.png), PT-style strips and index.html,
    under ``--out_dir`` or ``<run>/test``."""
    cfg = job.cfg
    root = data.resolve_dataset_root(cfg.run.dataset)
    out_root = job.output_dir()
    rows: dict[str, list[tuple[str, Path, Path]]] = {}
    for d in model.DIRECTIONS:
        direction, folder = d.name, root / f'test{d.source}'
        rows[direction] = _translate_tree(job, folder, out_root / direction, direction)
        _write_strips(job, folder, out_root / 'strips' / direction, direction)
    _write_index(out_root / 'index.html', rows)
    print(f'wrote {sum(len(r) for r in rows.values())} translations to {out_root}', file=sys.stderr)


def translate_folder(job: Inference) -> None:
    """``--phase img_dir``/``generate`` (the same phase under EN's two names): translate a folder
    (recursively) in one direction into ``--out_dir`` or ``<run>/<phase>/<direction>``."""
    cfg = job.cfg
    folder = Path(cfg.inference.img_dir)
    out = job.output_dir(cfg.inference.direction)
    if cfg.inference.align_faces or cfg.inference.crop == 'center':
        _translate_photos(job, folder, out)
        return
    written = _translate_tree(job, folder, out, cfg.inference.direction)
    if not cfg.inference.keep_size:
        _note_non_square([source for _, source, _ in written], job.img_size)
    print(f'wrote {len(written)} images to {out}', file=sys.stderr)


def _translate_tree(job: Inference, folder: Path, out: Path, direction: str) -> list[tuple[str, Path, Path]]:
    """Translate every image under ``folder`` into ``out/<name>.png`` (names from
    ``dataset.output_names``: unique even when stems collide); returns (name, source, output).
    Batched at img_size, or one by one at each image's own size with --keep_size."""
    cfg = job.cfg
    loader = data.build_test_loader(folder, job.img_size, batch_size=cfg.schedule.batch_size,
                                    num_workers=min(cfg.run.num_workers, 2))
    sources = dict(zip(loader.dataset.names, loader.dataset.paths))
    if cfg.inference.keep_size:
        return [(name, path, _translate_file_at_own_size(job, path, out / f'{name}.png', direction))
                for name, path in tqdm(sources.items(), desc=f'{direction} {folder.name}', file=sys.stderr)]
    written = []
    for batch, names in tqdm(loader, desc=f'{direction} {folder.name}', file=sys.stderr):
        fakes = job.translate(batch, direction)
        for name, fake in zip(names, fakes):
            target = out / f'{name}.png'
            images.save_rgb(target, images.tensor_to_uint8(fake))
            written.append((name, sources[name], target))
    return written


def _translate_file_at_own_size(job: Inference, source: Path, target: Path, direction: str) -> Path:
    translation, _ = sizing.translate_image(job.translator, images.load_rgb(source), direction, keep_size=True,
                                            max_size=job.cfg.inference.max_size)
    images.save_rgb(target, translation)
    return target


def _write_strips(job: Inference, folder: Path, strips_dir: Path, direction: str) -> None:
    """PT's visual strips (real, heatmaps, translation, cycle) per image, at img_size."""
    loader = data.build_test_loader(folder, job.img_size, batch_size=job.cfg.schedule.batch_size,
                                    num_workers=min(job.cfg.run.num_workers, 2))
    for batch, names in loader:
        for name, column in zip(names, job.translator.visual_columns(batch, direction)):
            images.save_rgb(strips_dir / f'{name}.png', images.grid([column]))


def _note_non_square(sources: list[Path], img_size: int) -> None:
    """Say once that non-square photos were squashed, and what the alternatives are."""
    squashed = 0
    for path in sources:
        try:
            width, height = images.image_size(path)
        except images.UnreadableImage:
            continue
        squashed += width != height
    if squashed:
        print(f'note: {squashed} image(s) are not square and were resized to {img_size}x{img_size} without '
              f'keeping the aspect ratio; --crop center translates the centre square and pastes it back',
              file=sys.stderr)


def _write_index(path: Path, rows: dict[str, list[tuple[str, Path, Path]]]) -> None:
    """A TF-style HTML table: name, input, output for every translated image."""
    parts = ['<!doctype html><html><head><meta charset="utf-8"><title>U-GAT-IT test</title></head><body>']
    for direction, items in rows.items():
        parts.append(f'<h2>{direction}</h2><table border="1"><tr><th>name</th><th>input</th><th>output</th></tr>')
        for name, source, output in items:
            src = html.escape(_relative(source, path.parent))
            dst = html.escape(_relative(output, path.parent))
            parts.append(f'<tr><td>{html.escape(name)}</td><td><img src="{src}" width="256"></td>'
                         f'<td><img src="{dst}" width="256"></td></tr>')
        parts.append('</table>')
    parts.append('</body></html>')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('\n'.join(parts))


def _relative(target: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(target).resolve(), Path(start).resolve())).as_posix()


def validate(job: Inference) -> None:
    """``--phase val``: FID/KID of the checkpoint's generators (raw and EMA), printed."""
    from metrics.training import TranslationMetrics
    cfg = job.cfg
    raw, state = checkpoints.load_translator(job.checkpoint, cfg.performance.device, use_ema=False, flags=cfg.values,
                                             explicit=cfg.explicit)
    if state['has_ema'] and not cfg.inference.no_ema:
        translators = {'': raw, '_ema': job.translator}
    else:   # raw weights, or an export of the EMA weights only
        translators = {'_ema' if state['uses_ema'] else '': raw}
    metrics = TranslationMetrics(data.resolve_dataset_root(cfg.run.dataset), job.img_size, cfg.run.inception_weights,
                                 cfg.performance.device, batch_size=cfg.run.fid_batch, cache_dir=job.files.metric_cache,
                                 groups=cfg.few_shot.groups, num_workers=cfg.run.num_workers)
    results, _ = metrics.evaluate(translators)
    for key in sorted(results):
        if not key.startswith('KID_std'):
            std = results.get(key.replace('KID/', 'KID_std/')) if key.startswith('KID/') else None
            print(f'{key}: {results[key]:.4f}' + (f' ± {std:.4f}' if std is not None else ''))


# ----------------------------------------------------------------------------------------------
# Photos, video and camera


def frame_translator(job: Inference) -> Callable[[np.ndarray], np.ndarray]:
    """A function RGB image → translated RGB image of the same size, per --crop/--align_faces.
    With --align_faces it returns None for an image without a face."""
    cfg = job.cfg
    size = job.img_size

    def translate_square(rgb: np.ndarray) -> np.ndarray:
        x = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
        tensor = torch.from_numpy(x).permute(2, 0, 1).float().div(127.5).sub(1).unsqueeze(0)
        return images.tensor_to_uint8(job.translate(tensor, cfg.inference.direction)[0])

    def translate_own_size(rgb: np.ndarray) -> np.ndarray:
        return sizing.translate_image(job.translator, Image.fromarray(rgb), cfg.inference.direction, keep_size=True,
                                      max_size=cfg.inference.max_size)[0]

    if cfg.inference.align_faces:
        from faceseg.align import FaceAligner
        aligner = FaceAligner(device=str(job.translator.device))
        job.aligner = aligner   # its faces_found tells img_dir which photos had no face
        return lambda rgb: aligner.apply(rgb, translate_square, out_size=size, all_faces=True)

    translate = translate_own_size if cfg.inference.keep_size else translate_square

    def translate_frame(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        if cfg.inference.crop == 'center':
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            out = rgb.copy()
            square = translate(rgb[top:top + side, left:left + side])
            out[top:top + side, left:left + side] = _resized(square, side, side)
            return out
        return _resized(translate(rgb), w, h)
    return translate_frame


def _resized(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    if rgb.shape[:2] == (height, width):
        return rgb
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_CUBIC)


def _translate_photos(job: Inference, folder: Path, out: Path) -> None:
    """img_dir with --crop center or --align_faces: each photo keeps its size; the centre square or
    the aligned faces are translated and pasted back. Unreadable files are skipped with a warning,
    photos without a face are noted (and copied unchanged)."""
    translate = frame_translator(job)
    paths = images.find_images(folder)
    names = data.output_names(paths, folder)
    written = unreadable = faceless = 0
    for path, name in tqdm(list(zip(paths, names)), desc='photos', file=sys.stderr):
        try:
            rgb = np.asarray(images.load_rgb(path))
        except images.DatasetError as exc:
            print(f'warning: skipping {path}: {exc}', file=sys.stderr)
            unreadable += 1
            continue
        result = translate(rgb)
        if job.cfg.inference.align_faces and not job.aligner.faces_found:
            tqdm.write(f'note: no face found in {path}; copied unchanged', file=sys.stderr)
            faceless += 1
        images.save_rgb(out / f'{name}.png', result)
        written += 1
    extra = f', {faceless} without a face' if job.cfg.inference.align_faces else ''
    print(f'wrote {written} images to {out}{extra}, {unreadable} unreadable skipped', file=sys.stderr)


def translate_video(job: Inference, path: Path, out_dir: Path) -> Path:
    """Original and translation side by side, frame by frame, at the source's size and frame rate
    (H.264 with the source's sound when PyAV is installed: inference.video)."""
    translate = frame_translator(job)
    target = out_dir / f'{path.stem}_{job.cfg.inference.direction}.mp4'
    if not video_io.convert(path, target, lambda rgb: np.concatenate([rgb, translate(rgb)], axis=1)):
        raise errors.UserError(f'{path} has no readable frames')
    return target


def video(job: Inference) -> None:
    out = translate_video(job, Path(job.cfg.inference.video_path), _video_out(job))
    print(f'wrote {out}', file=sys.stderr)


def video_dir(job: Inference) -> None:
    folder = Path(job.cfg.inference.video_path)
    videos = sorted(p for p in folder.rglob('*') if p.suffix.lower() in VIDEO_EXTENSIONS)
    if not videos:
        raise errors.UserError(f'no videos ({", ".join(VIDEO_EXTENSIONS)}) in {folder}')
    for path in videos:
        print(f'wrote {translate_video(job, path, _video_out(job))}', file=sys.stderr)


def _video_out(job: Inference) -> Path:
    return job.output_dir()


def camera(job: Inference) -> None:
    """Webcam preview (original | translation); press q or Esc to quit."""
    capture = cv2.VideoCapture(job.cfg.inference.camera_id)
    if not capture.isOpened():
        raise errors.UserError(f'no camera at index {job.cfg.inference.camera_id} (is a webcam connected? try '
                              f'--camera_id)')
    translate = frame_translator(job)
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            rgb = cv2.cvtColor(cv2.flip(bgr, 1), cv2.COLOR_BGR2RGB)
            both = np.concatenate([rgb, translate(rgb)], axis=1)
            try:
                cv2.imshow('U-GAT-IT', cv2.cvtColor(both, cv2.COLOR_RGB2BGR))
            except cv2.error:
                raise errors.UserError('this OpenCV build cannot open windows (opencv-python-headless): '
                                      'pip install opencv-python for --phase camera') from None
            if cv2.waitKey(1) & 0xFF in (ord('q'), 27):
                break
    finally:
        capture.release()
        cv2.destroyAllWindows()
