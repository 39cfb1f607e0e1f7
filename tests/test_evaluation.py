"""Metrics during training (FID/KID logged, best checkpoint kept) and --phase val."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_flags
from scipy import linalg
from test_metrics import _range_sqrtm

import main
from metrics import fid_inception_backbone


@pytest.fixture
def inception_file(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = tmp_path / 'inception.pth'
    torch.save(fid_inception_backbone().state_dict(), path)
    # A 2048×2048 sqrtm takes ~15 s on 2 cores; the stand-in (checked in test_metrics) gives its trace.
    monkeypatch.setattr(linalg, 'sqrtm', _range_sqrtm)
    return path


def test_training_logs_metrics_and_keeps_best_checkpoint(tiny_dataset, tmp_path, inception_file, capsys):
    out = tmp_path / 'r'
    flags = tiny_flags(tiny_dataset, out, '--iteration', '2', '--save_freq', '2', '--metric_freq', '1',
                       '--inception_weights', str(inception_file), '--ema_start', '0')
    assert main.main(flags) == 0
    lines = [json.loads(line) for line in (out / 'tiny' / 'metrics.jsonl').read_text().splitlines()]
    assert [line['step'] for line in lines] == [1, 2]
    for key in ('FID/A2B', 'FID/B2A', 'KID/A2B', 'KID/B2A', 'FID/A2B_ema', 'KID/B2A_ema'):
        assert all(isinstance(line[key], float) for line in lines), key
    assert (out / 'tiny' / 'model' / 'tiny_params_best_fid.pt').exists()
    assert 'new best mean FID' in capsys.readouterr().err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / 'tiny' / 'logs'))
    events.Reload()
    assert {'FID/A2B', 'KID/B2A_ema', 'G/adv_A2B', 'D/adv_B', 'lr'} <= set(events.Tags()['scalars'])

    capsys.readouterr()
    assert main.main(tiny_flags(tiny_dataset, out, '--phase', 'val', '--inception_weights', str(inception_file))) == 0
    printed = capsys.readouterr().out
    assert 'FID/A2B: ' in printed and 'KID/B2A_ema: ' in printed and '±' in printed


def test_missing_inception_weights_is_a_one_line_error(tiny_dataset, tmp_path, capsys):
    out = tmp_path / 'r'
    flags = tiny_flags(tiny_dataset, out, '--iteration', '1', '--metric_freq', '1',
                       '--inception_weights', str(tmp_path / 'missing.pth'))
    assert main.main(flags) == 2
    err = capsys.readouterr().err
    assert 'missing.pth' in err and 'Traceback' not in err


def test_kid_per_group_matches_direct_computation(tmp_path, inception_file):
    from conftest import make_domain

    from metrics import kernel_inception_distance
    from ugatit import UGATIT
    root = tmp_path / 'grouped'
    for g, colour in enumerate([(200, 60, 60), (60, 200, 60)]):
        for split, seed in (('trainA', 0), ('trainB', 10), ('testA', 20), ('testB', 30)):
            make_domain(root / split / str(g), 3, 40, colour, seed + g)
    from metrics.training import TranslationMetrics
    trainer = UGATIT(main.parse_args(tiny_flags(root, tmp_path / 'out', '--group', '0,1')))
    evaluation = TranslationMetrics(root, 32, str(inception_file), 'cpu', groups=[0, 1])
    results, record = trainer.evaluate(evaluation, (False,))
    assert record['images']['A2B'] == {'real': 6, 'fake': 6}
    for g in (0, 1):
        real, fakes = evaluation.features(trainer.translator(False), 'A2B', 'A', 'B', str(g))
        assert len(real) == len(fakes) == 3       # only that group's images on each side
        assert results[f'KID/A2B_group{g}'] == kernel_inception_distance(real, fakes)[0]
    assert results['KID/A2B_group0'] != results['KID/A2B_group1']
    assert 'KID/B2A_group1' in results and 'FID/A2B' in results


def test_logged_scores_are_reproduced_from_the_written_test_images(tiny_dataset, tmp_path, inception_file):
    """Training scores quantised translations, so `python -m metrics` on the PNGs the test phase
    writes (real images resized to img_size) gives the logged FID and KID."""
    from metrics.__main__ import build_parser, run
    out = tmp_path / 'r'
    flags = tiny_flags(tiny_dataset, out, '--iteration', '2', '--save_freq', '2', '--metric_freq', '2',
                       '--inception_weights', str(inception_file), '--ema_start', '0')
    assert main.main(flags) == 0
    logged = json.loads((out / 'tiny' / 'metrics.jsonl').read_text().splitlines()[-1])
    assert logged['images']['A2B_ema'] == {'real': 5, 'fake': 3}
    assert len(logged['generators']['A2B_ema']) == 64 and 'bilinear' in logged['resize']
    assert main.main(tiny_flags(tiny_dataset, out, '--phase', 'test')) == 0     # EMA generators
    for direction, real in (('A2B', 'trainB'), ('B2A', 'trainA')):
        args = build_parser().parse_args([str(tiny_dataset / real), str(out / 'tiny' / 'test' / direction),
                                          '--weights', str(inception_file), '--device', 'cpu', '--img_size', '32'])
        scores = run(args)
        assert scores['FID'] == pytest.approx(logged[f'FID/{direction}_ema'], rel=1e-6, abs=1e-6)
        assert scores['KID'] == pytest.approx(logged[f'KID/{direction}_ema'], rel=1e-6, abs=1e-9)
