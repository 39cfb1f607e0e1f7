"""Inference from a checkpoint alone: the architecture comes from the checkpoint, no dataset or
training-only network is needed, and contradicting flags are one-line errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import make_dataset, make_domain, tiny_flags

import checkpoints
import images as image_arrays
import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, checkpoint) of a 2-step tiny run with non-default architecture flags."""
    tmp = tmp_path_factory.mktemp('trained')
    root = make_dataset(tmp / 'tiny', (4, 4, 2, 2))
    flags = tiny_flags(root, tmp / 'out', '--iteration', '2', '--save_freq', '2', '--ch', '6', '--use_se', 'True')
    assert main.main(flags) == 0
    return root, tmp / 'out' / 'tiny' / 'model' / 'tiny_params_0000002.pt'


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / 'main.py'), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_img_dir_needs_only_the_checkpoint(trained, tmp_path):
    dataset, checkpoint = trained
    photos = tmp_path / 'photos'
    make_domain(photos, 2, 50, (120, 120, 120), 7)
    # A folder without any dataset, and none of the (non-default) architecture flags.
    result = _cli('--phase', 'img_dir', '--checkpoint', str(checkpoint), '--img_dir', str(photos),
                  '--out_dir', str(tmp_path / 'out'), '--device', 'cpu', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in (tmp_path / 'out').iterdir())
    assert written == ['img0.png', 'img1.png']
    # The images are what the checkpoint's EMA generator gives at the checkpoint's size.
    translator, _ = checkpoints.load_translator(checkpoint)
    image = torch.from_numpy(cv2.resize(cv2.cvtColor(cv2.imread(str(photos / 'img0.png')), cv2.COLOR_BGR2RGB),
                                        (32, 32), interpolation=cv2.INTER_LINEAR))
    out = cv2.cvtColor(cv2.imread(str(tmp_path / 'out' / 'img0.png')), cv2.COLOR_BGR2RGB)
    assert out.shape == (32, 32, 3)
    del image  # the loader's PIL resize differs from cv2's; the exact values are checked below
    from dataset import build_test_loader
    images, _ = next(iter(build_test_loader(photos, 32)))
    np.testing.assert_array_equal(out, image_arrays.tensor_to_uint8(translator.translate(images, 'A2B').image[0]))


def test_every_inference_phase_runs_from_the_checkpoint_alone(trained, tmp_path):
    dataset, checkpoint = trained
    video = tmp_path / 'clip.mp4'
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*'mp4v'), 5, (48, 36))
    for i in range(3):
        writer.write(np.full((36, 48, 3), 40 * i, np.uint8))
    writer.release()
    common = ('--checkpoint', str(checkpoint), '--device', 'cpu', '--result_dir', str(tmp_path / 'r'))
    photos = dataset / 'testA'
    runs = {
        'test': ('--dataset', str(dataset)),
        'generate': ('--img_dir', str(photos)),
        'video': ('--video_path', str(video)),
        'video_dir': ('--video_path', str(tmp_path)),
    }
    for phase, extra in runs.items():
        assert main.main(['--phase', phase, *common, *extra]) == 0, phase
    run = tmp_path / 'r' / 'tiny'   # the checkpoint names its run
    assert (run / 'test' / 'A2B' / 'img0.png').exists() and (run / 'generate' / 'A2B' / 'img1.png').exists()
    assert (run / 'video' / 'clip_A2B.mp4').exists()


def test_training_only_flags_build_nothing_at_test_time(trained, tmp_path, capsys):
    """A test run with the training command line's FaceNet flags must not load FaceNet (offline)."""
    dataset, checkpoint = trained
    flags = ['--phase', 'test', '--checkpoint', str(checkpoint), '--dataset', str(dataset), '--device', 'cpu',
             '--result_dir', str(tmp_path), '--face_distance_weight', '1', '--facenet_pretrained', 'vggface2',
             '--seg_fix_weight', '1']
    assert main.main(flags) == 0, capsys.readouterr().err


@pytest.mark.parametrize('flags,message', [
    (('--light', 'False'), '--light False (checkpoint: True)'),
    (('--ch', '8'), '--ch 8 (checkpoint: 6)'),
    (('--n_dis', '4'), '--n_global_dis 5 (checkpoint: 4)'),
])
def test_contradicting_architecture_flag_is_a_one_line_error(trained, tmp_path, flags, message):
    dataset, checkpoint = trained
    result = _cli('--phase', 'img_dir', '--checkpoint', str(checkpoint), '--img_dir', str(dataset / 'testA'),
                  '--device', 'cpu', '--img_size', '32', *flags, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count('\n') == 1 and message in result.stderr and 'Traceback' not in result.stderr


def test_matching_flags_are_accepted_and_pt_checkpoints_take_the_flags(trained, tmp_path):
    dataset, checkpoint = trained
    common = ['--phase', 'img_dir', '--img_dir', str(dataset / 'testA'), '--device', 'cpu']
    assert main.main([*common, '--checkpoint', str(checkpoint), '--ch', '6', '--light', 'True',
                      '--out_dir', str(tmp_path / 'a')]) == 0
    # A PT-format file (six keys, no config) is built from the flags.
    state = checkpoints.load_checkpoint(checkpoint)
    pt = {key: state[key] for key in checkpoints.PT_KEYS}
    torch.save(pt, tmp_path / 'pt.pt')
    flags = tiny_flags(dataset, tmp_path / 'r', '--ch', '6', '--use_se', 'True')
    assert main.main([*flags, *common, '--checkpoint', str(tmp_path / 'pt.pt'), '--no_ema', 'True',
                      '--out_dir', str(tmp_path / 'b')]) == 0
    raw = sorted((tmp_path / 'b').iterdir())
    assert len(raw) == 2


def test_checkpoint_that_is_not_one_is_a_one_line_error(tmp_path, capsys):
    bogus = tmp_path / 'bogus.pt'
    bogus.write_bytes(b'not a checkpoint')
    assert main.main(['--phase', 'img_dir', '--img_dir', str(tmp_path), '--checkpoint', str(bogus),
                      '--device', 'cpu']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'bogus.pt' in err
