"""Runs never lose hours or mix: start-up failures before step 1, a checkpoint on any later error,
a fresh run never reuses an old run's files, one-line errors for mismatches, img_dir naming."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import make_domain, tiny_flags

import checkpoints
import main
from ugatit import UGATIT

REPO = Path(__file__).resolve().parents[1]


def _train(dataset: Path, out: Path, *extra: str) -> int:
    return main.main(tiny_flags(dataset, out, '--iteration', '2', '--save_freq', '2', *extra))


# -- 1. fail before the first step; a checkpoint on any later error --------------------------------


def test_unavailable_inception_fails_before_the_first_step(tiny_dataset, tmp_path, monkeypatch, capsys):
    import metrics.inception as inception
    from metrics import MetricsError

    def offline():
        raise MetricsError('cannot download the FID Inception weights (URLError); pass --inception_weights FILE')
    monkeypatch.setattr(inception, '_inception_downloaded', offline)
    steps = []
    monkeypatch.setattr(UGATIT, 'train_step', lambda self, batch, step: steps.append(step))
    assert main.main(tiny_flags(tiny_dataset, tmp_path, '--iteration', '20', '--metric_freq', '10')) == 2
    assert steps == [] and 'cannot download the FID Inception weights' in capsys.readouterr().err
    assert not (tmp_path / 'tiny' / 'model').exists()


def test_missing_test_folder_for_previews_fails_at_start(tiny_dataset, tmp_path, capsys):
    for path in (tiny_dataset / 'testB').iterdir():
        path.unlink()
    assert _train(tiny_dataset, tmp_path) == 2
    assert 'testB' in capsys.readouterr().err


def test_error_after_step_one_writes_a_checkpoint_and_resumes(tiny_dataset, tmp_path, monkeypatch, capsys):
    import monitor

    def broken_previews(self, step, columns, ema):
        raise OSError('disk full')
    monkeypatch.setattr(monitor.TrainingMonitor, 'previews', broken_previews)
    with pytest.raises(OSError, match='disk full'):
        main.main(tiny_flags(tiny_dataset, tmp_path, '--iteration', '5', '--print_freq', '3'))
    saved = tmp_path / 'tiny' / 'model' / 'tiny_params_0000003.pt'
    assert saved.exists() and checkpoints.load_checkpoint(saved)['step'] == 3
    assert f'saved step 3 to {saved}' in capsys.readouterr().err
    monkeypatch.undo()
    assert main.main(tiny_flags(tiny_dataset, tmp_path, '--iteration', '5', '--print_freq', '3',
                                '--resume', 'True')) == 0
    assert 'resumed from' in capsys.readouterr().err


# -- 2. runs never mix --------------------------------------------------------------------------------


def test_fresh_run_in_a_used_folder_refuses(tiny_dataset, tmp_path, capsys):
    assert _train(tiny_dataset, tmp_path) == 0
    capsys.readouterr()
    assert _train(tiny_dataset, tmp_path) == 2
    err = capsys.readouterr().err
    assert 'already holds a run' in err and '--resume True' in err and '--overwrite True' in err
    assert err.count('\n') == 1


def test_overwrite_moves_the_old_run_aside(tiny_dataset, tmp_path):
    assert _train(tiny_dataset, tmp_path) == 0
    assert _train(tiny_dataset, tmp_path, '--overwrite', 'True') == 0
    archived = [p for p in tmp_path.iterdir() if p.name.startswith('tiny.old-')]
    assert len(archived) == 1 and (archived[0] / 'model' / 'tiny_params_0000002.pt').exists()
    assert (tmp_path / 'tiny' / 'model' / 'tiny_params_0000002.pt').exists()


def test_same_folder_name_other_dataset_is_never_loaded(tiny_dataset, tmp_path, capsys):
    other = tmp_path / 'elsewhere' / 'tiny'
    for split in ('trainA', 'trainB', 'testA', 'testB'):
        make_domain(other / split, 2, 40, (10, 200, 10), 9)
    out = tmp_path / 'out'
    assert _train(tiny_dataset, out, '--latest_freq', '1') == 0
    capsys.readouterr()
    assert _train(other, out, '--resume', 'True') == 2
    err = capsys.readouterr().err
    assert str(tiny_dataset) in err and str(other) in err and '--result_dir' in err


def test_resume_with_other_architecture_names_the_flag(tiny_dataset, tmp_path, capsys):
    assert _train(tiny_dataset, tmp_path) == 0
    capsys.readouterr()
    assert main.main(tiny_flags(tiny_dataset, tmp_path, '--iteration', '4', '--resume', 'True', '--ch', '8')) == 2
    err = capsys.readouterr().err
    assert '--ch 8 (checkpoint: 4)' in err and err.count('\n') == 1 and 'size mismatch' not in err


def test_training_ends_naming_the_final_checkpoint_with_user_permissions(tiny_dataset, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert _train(tiny_dataset, tmp_path) == 0
    finally:
        os.umask(old)
    path = tmp_path / 'tiny' / 'model' / 'tiny_params_0000002.pt'
    assert f'final checkpoint: {path}' in capsys.readouterr().err
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# -- 3. one-line errors -------------------------------------------------------------------------------


def test_metrics_cli_bad_weights_is_one_line(tmp_path):
    for folder in ('a', 'b'):
        make_domain(tmp_path / folder, 2, 16, (50, 50, 50), 0)
    (tmp_path / 'bogus.pth').write_bytes(b'bogus')
    result = subprocess.run([sys.executable, '-m', 'metrics', str(tmp_path / 'a'), str(tmp_path / 'b'),
                             '--weights', str(tmp_path / 'bogus.pth'), '--device', 'cpu'],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count('\n') == 1 and 'bogus.pth' in result.stderr


# -- 4. img_dir / test outputs -----------------------------------------------------------------------


@pytest.fixture
def checkpoint(tiny_dataset, tmp_path) -> Path:
    assert _train(tiny_dataset, tmp_path / 'run') == 0
    return tmp_path / 'run' / 'tiny' / 'model' / 'tiny_params_0000002.pt'


def _img_dir(checkpoint: Path, folder: Path, out: Path, *extra: str) -> int:
    return main.main(['--phase', 'img_dir', '--img_dir', str(folder), '--checkpoint', str(checkpoint),
                      '--device', 'cpu', '--out_dir', str(out), *extra])


def test_img_dir_keeps_colliding_stems_apart(checkpoint, tmp_path):
    photos = tmp_path / 'photos'
    make_domain(photos, 1, 40, (200, 10, 10), 0)
    (photos / 'img0.png').rename(photos / 'a.png')
    cv2.imwrite(str(photos / 'a.jpg'), np.full((40, 40, 3), 30, np.uint8))
    assert _img_dir(checkpoint, photos, tmp_path / 'out') == 0
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['a.jpg.png', 'a.png.png']


def test_img_dir_honours_crop_center_and_notes_squashed_photos(checkpoint, tmp_path, capsys):
    photos = tmp_path / 'photos'
    photos.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(photos / 'wide.png'), rng.integers(0, 255, (40, 80, 3), dtype=np.uint8))
    assert _img_dir(checkpoint, photos, tmp_path / 'plain') == 0
    assert 'not square' in capsys.readouterr().err
    assert _img_dir(checkpoint, photos, tmp_path / 'crop', '--crop', 'center') == 0
    plain = cv2.imread(str(tmp_path / 'plain' / 'wide.png'))
    cropped = cv2.imread(str(tmp_path / 'crop' / 'wide.png'))
    assert plain.shape == (32, 32, 3) and cropped.shape == (40, 80, 3)
    source = cv2.imread(str(photos / 'wide.png'))
    np.testing.assert_array_equal(cropped[:, :20], source[:, :20])        # outside the square: untouched
    assert not np.array_equal(cropped[:, 20:60], source[:, 20:60])        # the centre square: translated


def test_test_phase_honours_out_dir(checkpoint, tiny_dataset, tmp_path):
    assert main.main(['--phase', 'test', '--dataset', str(tiny_dataset), '--checkpoint', str(checkpoint),
                      '--device', 'cpu', '--out_dir', str(tmp_path / 'mine')]) == 0
    assert (tmp_path / 'mine' / 'A2B' / 'img0.png').exists() and (tmp_path / 'mine' / 'index.html').exists()
