"""Inference phases: test, val, img_dir/generate, video, video_dir and camera.

Kept apart from the trainer because they are about files, HTML and video streams rather than
optimisation; each takes a built :class:`ugatit.UGATIT` and only calls ``translate``.
"""
from __future__ import annotations

import html
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

import dataset as data
import utils
from ugatit import DIRECTIONS, UGATIT

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.ts', '.webm', '.m4v')


def run(trainer: UGATIT, cfg) -> None:
    """Load the weights the phase needs, then run it."""
    load_weights(trainer, cfg)
    phase = {'test': test, 'val': validate, 'img_dir': translate_folder, 'generate': translate_folder,
             'video': video, 'video_dir': video_dir, 'camera': camera}[cfg.phase]
    phase(trainer, cfg)


def load_weights(trainer: UGATIT, cfg) -> None:
    """``--checkpoint FILE`` or the newest checkpoint of the run; a clear error when there is none."""
    if cfg.checkpoint:
        trainer.load_file(Path(cfg.checkpoint))
        source = cfg.checkpoint
    else:
        path = trainer.load_newest(weights_only=True)
        if path is None:
            raise utils.UserError(f'no checkpoint found in {trainer.model_dir} or {trainer.latest_path}: train '
                                  f'first (--phase train) or pass --checkpoint FILE')
        source = str(path)
    ema = trainer.ema is not None and not cfg.no_ema
    print(f'loaded {source} (step {trainer.step}, {"EMA" if ema else "raw"} generators)', file=sys.stderr)


def _use_ema(cfg) -> bool:
    return not cfg.no_ema


# ----------------------------------------------------------------------------------------------
# test / img_dir / val


def test(trainer: UGATIT, cfg) -> None:
    """Every testA/testB image translated on its own (test/A2B/<stem>.png), PT-style strips and index.html."""
    out_root = trainer.run_dir / 'test'
    rows: dict[str, list[tuple[str, Path, Path]]] = {}
    for d in DIRECTIONS:
        folder = trainer.dataset_root / f'test{d.source}'
        rows[d.name] = _translate_tree(trainer, cfg, folder, out_root / d.name, d.name,
                                       strips_dir=out_root / 'strips' / d.name)
    _write_index(out_root / 'index.html', rows)
    print(f'wrote {sum(len(r) for r in rows.values())} translations to {out_root}', file=sys.stderr)


def translate_folder(trainer: UGATIT, cfg) -> None:
    """``--phase img_dir``/``generate``: translate any folder (recursively) in one direction."""
    folder = Path(cfg.img_dir)
    out = Path(cfg.out_dir) if cfg.out_dir else trainer.run_dir / cfg.phase / cfg.direction
    if cfg.align_faces:
        _translate_faces_in_folder(trainer, cfg, folder, out)
        return
    written = _translate_tree(trainer, cfg, folder, out, cfg.direction)
    print(f'wrote {len(written)} images to {out}', file=sys.stderr)


def _translate_tree(trainer: UGATIT, cfg, folder: Path, out: Path, direction: str,
                    strips_dir: Path | None = None) -> list[tuple[str, Path, Path]]:
    """Translate every image under ``folder`` into ``out/<relative stem>.png``; returns the pairs."""
    loader = data.build_test_loader(folder, cfg.img_size, batch_size=cfg.batch_size,
                                    num_workers=min(cfg.num_workers, 2))
    sources = {_stem(p, folder): p for p in data.find_images(folder)}
    d = next(x for x in DIRECTIONS if x.name == direction)
    written = []
    for images, names in tqdm(loader, desc=f'{direction} {folder.name}', file=sys.stderr):
        fakes = trainer.translate(images, direction, _use_ema(cfg)).image
        for name, fake in zip(names, fakes):
            target = out / f'{name}.png'
            utils.save_rgb(target, utils.tensor_to_uint8(fake))
            written.append((name, sources.get(name, target), target))
        if strips_dir is not None:
            columns = trainer.visual_columns(images, d, _use_ema(cfg))
            for name, column in zip(names, columns):
                utils.save_rgb(strips_dir / f'{name}.png', utils.grid([column]))
    return written


def _stem(path: Path, folder: Path) -> str:
    return str(path.relative_to(folder).with_suffix(''))


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
    import os
    return Path(os.path.relpath(Path(target).resolve(), Path(start).resolve())).as_posix()


def validate(trainer: UGATIT, cfg) -> None:
    """``--phase val``: FID/KID of the loaded checkpoint, printed (EN parsed this phase and did nothing)."""
    options = (False, True) if trainer.ema is not None and not cfg.no_ema else (False,)
    results = trainer.evaluate(options)
    for key in sorted(results):
        if not key.startswith('KID_std'):
            std = results.get(key.replace('KID/', 'KID_std/')) if key.startswith('KID/') else None
            print(f'{key}: {results[key]:.4f}' + (f' ± {std:.4f}' if std is not None else ''))


# ----------------------------------------------------------------------------------------------
# Video and camera


def frame_translator(trainer: UGATIT, cfg) -> Callable[[np.ndarray], np.ndarray]:
    """A function RGB frame → translated RGB frame of the same size, per the --crop/--align_faces flags."""
    size = cfg.img_size
    use_ema = _use_ema(cfg)

    def translate_square(rgb: np.ndarray) -> np.ndarray:
        x = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
        tensor = torch.from_numpy(x).permute(2, 0, 1).float().div(127.5).sub(1).unsqueeze(0)
        return utils.tensor_to_uint8(trainer.translate(tensor, cfg.direction, use_ema).image[0])

    if cfg.align_faces:
        from faceseg.align import FaceAligner
        aligner = FaceAligner(device=str(trainer.device))
        return lambda rgb: aligner.apply(rgb, translate_square, out_size=size, all_faces=True)

    def translate_frame(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        if cfg.crop == 'center':
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            out = rgb.copy()
            square = translate_square(rgb[top:top + side, left:left + side])
            out[top:top + side, left:left + side] = cv2.resize(square, (side, side), interpolation=cv2.INTER_CUBIC)
            return out
        return cv2.resize(translate_square(rgb), (w, h), interpolation=cv2.INTER_CUBIC)
    return translate_frame


def translate_video(trainer: UGATIT, cfg, path: Path, out_dir: Path) -> Path:
    """Original and translation side by side, frame by frame, at the source's size and frame rate."""
    reader = cv2.VideoCapture(str(path))
    if not reader.isOpened():
        raise utils.UserError(f'cannot open video {path} (unsupported format or codec?)')
    fps = reader.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(reader.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    translate = frame_translator(trainer, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f'{path.stem}_{cfg.direction}.mp4'
    writer = None
    try:
        for _ in tqdm(range(total) if total else iter(int, 1), desc=path.name, file=sys.stderr):
            ok, bgr = reader.read()
            if not ok:
                break
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            both = np.concatenate([rgb, translate(rgb)], axis=1)
            if writer is None:
                writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*'mp4v'), fps,
                                         (both.shape[1], both.shape[0]))
            writer.write(cv2.cvtColor(both, cv2.COLOR_RGB2BGR))
    finally:
        reader.release()
        if writer is not None:
            writer.release()
    if writer is None:
        raise utils.UserError(f'{path} has no readable frames')
    return target


def video(trainer: UGATIT, cfg) -> None:
    out = translate_video(trainer, cfg, Path(cfg.video_path), _video_out(trainer, cfg))
    print(f'wrote {out}', file=sys.stderr)


def video_dir(trainer: UGATIT, cfg) -> None:
    folder = Path(cfg.video_path)
    videos = sorted(p for p in folder.rglob('*') if p.suffix.lower() in VIDEO_EXTENSIONS)
    if not videos:
        raise utils.UserError(f'no videos ({", ".join(VIDEO_EXTENSIONS)}) in {folder}')
    for path in videos:
        print(f'wrote {translate_video(trainer, cfg, path, _video_out(trainer, cfg))}', file=sys.stderr)


def _video_out(trainer: UGATIT, cfg) -> Path:
    return Path(cfg.out_dir) if cfg.out_dir else trainer.run_dir / 'video'


def camera(trainer: UGATIT, cfg) -> None:
    """Webcam preview (original | translation); press q or Esc to quit."""
    capture = cv2.VideoCapture(cfg.camera_id)
    if not capture.isOpened():
        raise utils.UserError(f'no camera at index {cfg.camera_id} (is a webcam connected? try --camera_id)')
    translate = frame_translator(trainer, cfg)
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
                raise utils.UserError('this OpenCV build cannot open windows (opencv-python-headless): '
                                      'pip install opencv-python for --phase camera') from None
            if cv2.waitKey(1) & 0xFF in (ord('q'), 27):
                break
    finally:
        capture.release()
        cv2.destroyAllWindows()


def _translate_faces_in_folder(trainer: UGATIT, cfg, folder: Path, out: Path) -> None:
    translate = frame_translator(trainer, cfg)
    count = 0
    for path in tqdm(data.find_images(folder), desc='faces', file=sys.stderr):
        rgb = np.asarray(data.load_rgb(path))
        utils.save_rgb(out / f'{_stem(path, folder)}.png', translate(rgb))
        count += 1
    print(f'wrote {count} images to {out}', file=sys.stderr)
