"""CLI: PT flags and defaults, boolean parsing, grouped help, and one-line errors for bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_flags

import errors
import main

REPO = Path(__file__).resolve().parents[1]


def test_pt_defaults_are_kept():
    cfg = main.build_parser().parse_args([])
    assert (cfg.phase, cfg.dataset, cfg.iteration, cfg.batch_size, cfg.print_freq, cfg.save_freq) == \
        ('train', 'selfie2anime', 1000000, 1, 1000, 100000)
    assert (cfg.lr, cfg.weight_decay, cfg.adv_weight, cfg.cycle_weight, cfg.identity_weight, cfg.cam_weight) == \
        (1e-4, 1e-4, 1.0, 10.0, 10.0, 1000.0)
    assert (cfg.ch, cfg.n_res, cfg.n_dis, cfg.img_size, cfg.img_ch, cfg.light, cfg.decay_flag, cfg.resume) == \
        (64, 4, 6, 256, 3, False, True, False)


@pytest.mark.parametrize('text,value', [('True', True), ('false', False), ('1', True), ('0', False),
                                        ('yes', True), ('no', False)])
def test_booleans_accept_usual_spellings(text, value):
    assert main.build_parser().parse_args(['--decay_flag', text]).decay_flag is value


def test_boolean_flag_alone_means_true_and_light_takes_pool_size():
    cfg = main.build_parser().parse_args(['--resume', '--light', '4'])
    assert cfg.resume is True and cfg.light == 4


def test_n_dis_maps_to_pt_depths(tiny_dataset):
    arch = main.parse_args(['--dataset', str(tiny_dataset), '--device', 'cpu']).arch
    assert (arch.n_global_dis, arch.n_local_dis) == (7, 5)
    arch = main.parse_args(['--dataset', str(tiny_dataset), '--device', 'cpu', '--n_dis', '5']).arch
    assert (arch.n_global_dis, arch.n_local_dis) == (6, 4)


def test_help_documents_groups():
    text = main.build_parser().format_help()
    for group in ('model', 'loss weights', 'optimisation', 'data', 'logging and checkpoints', 'evaluation',
                  'face-aware losses', 'few-shot and ADA', 'performance and distributed'):
        assert f'\n{group}:' in text


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / 'main.py'), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize('bad', [
    ['--decay_flag', 'ue'],                       # PT's substring test took this as True
    ['--img_size', '64'],                         # 7-layer global D needs >= 96 (PT crashes)
    ['--amp', 'fp16', '--device', 'cpu'],
    ['--img_ch', '1'],
    ['--phase', 'img_dir'],
    ['--use_grouploss'],
])
def test_bad_flags_exit_2_with_one_line(tiny_dataset, bad):
    result = _cli('--dataset', str(tiny_dataset), *bad)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith('note:')]
    assert len(lines) == 1 and lines[0].startswith('error:'), result.stderr
    assert 'Traceback' not in result.stderr


def test_missing_dataset_and_missing_checkpoint_are_one_line_errors(tmp_path, tiny_dataset):
    missing = _cli('--dataset', 'no_such_dataset', '--device', 'cpu', cwd=tmp_path)
    assert missing.returncode == 2 and 'no_such_dataset' in missing.stderr and 'Traceback' not in missing.stderr
    no_ckpt = _cli(*tiny_flags(tiny_dataset, tmp_path / 'r', '--phase', 'test'))
    assert no_ckpt.returncode == 2 and 'no checkpoint found' in no_ckpt.stderr
    assert 'Traceback' not in no_ckpt.stderr


def test_img_size_error_suggests_shallower_discriminator(tiny_dataset):
    with pytest.raises(errors.UserError, match='--n_global_dis'):
        main.parse_args(['--dataset', str(tiny_dataset), '--img_size', '64', '--device', 'cpu'])


def test_test_phase_writes_one_image_per_file_named_after_source(tiny_dataset, tmp_path):
    from PIL import Image
    nested = tiny_dataset / 'testA' / 'sub'
    nested.mkdir()
    Image.new('RGB', (50, 30), (10, 200, 30)).save(nested / 'odd.JPG')
    out = tmp_path / 'r'
    assert main.main(tiny_flags(tiny_dataset, out, '--iteration', '1', '--save_freq', '1')) == 0
    assert main.main(tiny_flags(tiny_dataset, out, '--phase', 'test')) == 0
    test_dir = out / 'tiny' / 'test'
    a2b = sorted(str(p.relative_to(test_dir / 'A2B')) for p in (test_dir / 'A2B').rglob('*.png'))
    assert a2b == ['img0.png', 'img1.png', 'img2.png', 'sub/odd.png']
    assert sorted(p.name for p in (test_dir / 'B2A').glob('*.png')) == ['img0.png', 'img1.png']
    assert Image.open(test_dir / 'A2B' / 'sub' / 'odd.png').size == (32, 32)
    strip = Image.open(test_dir / 'strips' / 'A2B' / 'img0.png')
    assert strip.size == (32, 7 * 32)
    html = (test_dir / 'index.html').read_text()
    assert html.count('<tr>') == 4 + 2 + 2 and 'sub/odd' in html


def test_img_dir_phase_translates_any_folder(tiny_dataset, tmp_path):
    out = tmp_path / 'r'
    assert main.main(tiny_flags(tiny_dataset, out, '--iteration', '1', '--save_freq', '1')) == 0
    target = tmp_path / 'translated'
    assert main.main(tiny_flags(tiny_dataset, out, '--phase', 'img_dir', '--img_dir', str(tiny_dataset / 'trainB'),
                                '--direction', 'B2A', '--out_dir', str(target))) == 0
    assert sorted(p.name for p in target.glob('*.png')) == [f'img{i}.png' for i in range(5)]
