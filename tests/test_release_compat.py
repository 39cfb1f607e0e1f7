"""Files written by the release before issue 18's restructuring (tests/data/release_v1, see make.py
there) load as they did: a training checkpoint, a PT-format file and an export translate the probe
image to the stored outputs, and the training checkpoint resumes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_dataset

import checkpoints
import main

DATA = Path(__file__).resolve().parent / 'data' / 'release_v1'


@pytest.fixture(scope='module')
def expected() -> dict:
    return torch.load(DATA / 'expected.pt', weights_only=True)


def _check(translator, expected: dict, weights: str) -> None:
    for d in ('A2B', 'B2A'):
        out = translator.translate(expected['probe'], d)
        torch.testing.assert_close(out.image, expected[f'{weights}_{d}'], rtol=0, atol=1e-6)
        torch.testing.assert_close(out.heatmap, expected[f'{weights}_{d}_heatmap'], rtol=0, atol=1e-5)


@pytest.mark.parametrize('use_ema', [True, False])
def test_training_checkpoint_translates_as_before(expected, use_ema):
    translator, state = checkpoints.load_translator(DATA / 'tiny_params_0000003.pt', 'cpu', use_ema=use_ema)
    assert state['step'] == 3
    _check(translator, expected, 'ema' if use_ema else 'raw')


def test_export_translates_as_before(expected):
    translator, state = checkpoints.load_translator(DATA / 'export', 'cpu')
    assert state['uses_ema']
    _check(translator, expected, 'ema')


def test_pt_format_file_translates_as_before_with_its_flags(expected):
    flags, _ = main.architecture_flags(['--light', 'True', '--ch', '4', '--n_res', '1', '--img_size', '32',
                             '--n_global_dis', '4', '--n_local_dis', '3', '--use_se', 'True'])
    assert flags is not None
    translator, _ = checkpoints.load_translator(DATA / 'pt_format.pt', 'cpu', use_ema=False, flags=flags)
    _check(translator, expected, 'raw')


def test_training_checkpoint_restores_the_whole_training_state(tmp_path):
    """Weights, EMA, optimizer moments, ADA and the step come back; training goes on from there."""
    from conftest import random_batches

    from ugatit import UGATIT
    data = make_dataset(tmp_path / 'tiny')
    flags = ['--dataset', str(data), '--result_dir', str(tmp_path / 'out'), '--device', 'cpu', '--light', 'True',
             '--ch', '4', '--n_res', '1', '--img_size', '32', '--n_global_dis', '4', '--n_local_dis', '3',
             '--use_se', 'True', '--ada', 'True', '--iteration', '4', '--num_workers', '0', '--seed', '5']
    trainer = UGATIT(main.parse_args(flags))
    state = torch.load(DATA / 'tiny_params_0000003.pt', weights_only=True)
    assert trainer.load_state_dict(state) == []
    assert trainer.step == 3
    for key in ('genA2B', 'disLB'):
        for name, value in trainer.pt_module(key).state_dict().items():
            torch.testing.assert_close(value, state[key][name], rtol=0, atol=0)
    moments = trainer.G_optim.state_dict()['state'][0]['exp_avg']
    torch.testing.assert_close(moments, state['G_optim']['state'][0]['exp_avg'], rtol=0, atol=0)
    assert trainer.ada['A'].state_dict()['p'] == state['ada']['A']['p']
    logs = trainer.train_step(random_batches(1)[0], 4)
    assert torch.isfinite(logs['G/total'])
