"""The run loop's lifecycle on a tiny trainer (one linear layer behind the Trainer protocol): saves and
pruning, resume, the NaN guard, stop signals, evaluation and the best checkpoint, errors inside a step.
None of it needs U-GAT-IT's networks: the loop only asks a trainer for what training_loop.Trainer lists."""
from __future__ import annotations

import math
import os
import signal

import numpy as np
import pytest
import torch
from conftest import tiny_flags
from torch import nn

import checkpoints
import distributed
import main
import training_loop
from errors import Stopped, TrainingDiverged
from run_folder import RunFiles


class TinyTrainer:
    """A linear layer trained by SGD on the batches' colour means; ``fail_at``/``nan_at``: a step that
    raises or whose loss is NaN; ``signal_at``: a step after which this process gets a signal."""

    has_ema = False
    skips_nonfinite_steps = False

    def __init__(self, nan_at: int = 0, fail_at: int = 0, undoable: bool = True, signal_at: tuple = ()) -> None:
        self.dist = distributed.DistributedContext('cpu')
        self.device = torch.device('cpu')
        self.step = 0
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)
        self.optim = torch.optim.SGD(self.net.parameters(), lr=0.1)
        self.nan_at, self.fail_at, self.undoable, self.signal_at = nan_at, fail_at, undoable, signal_at
        self.steps_run: list[int] = []

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        if step == self.fail_at:
            raise RuntimeError(f'injected failure in step {step}')
        loss = (self.net(batch['A'].mean(dim=(2, 3))) - batch['B'].mean()).pow(2).mean()
        self.optim.zero_grad()
        loss.backward()
        self.optim.step()
        self.step = step
        self.steps_run.append(step)
        if self.signal_at and step == self.signal_at[0]:
            os.kill(os.getpid(), self.signal_at[1])
        return {'G/total': loss.detach() * (math.nan if step == self.nan_at else 1.0)}

    def restore_last_completed_step(self) -> bool:
        return self.undoable

    def checkpoint_nbytes(self) -> int:
        return checkpoints.state_nbytes(self.state_dict())

    def state_dict(self) -> dict:
        return {'net': self.net.state_dict(), 'step': self.step}

    def load_state_dict(self, state: dict) -> list[str]:
        self.net.load_state_dict(state['net'])
        return []

    def translator(self, use_ema: bool = True) -> str:
        return 'ema' if use_ema else 'raw'

    def visual_columns(self, real: torch.Tensor, direction, use_ema: bool = True) -> list:
        return [[np.zeros((4, 4, 3), np.uint8)] for _ in real]

    def scalars(self, step: int) -> dict[str, float]:
        return {'lr': 0.1}


class FakeEvaluation:
    """FID per evaluation in turn (both directions alike)."""

    def __init__(self, fids: list[float]) -> None:
        self.fids = list(fids)

    def evaluate(self, translators: dict) -> tuple[dict, dict]:
        fid = self.fids.pop(0)
        return {'FID/A2B': fid, 'FID/B2A': fid}, {'generators': sorted(translators)}


def _config(dataset, out, *extra: str):
    return main.parse_args(tiny_flags(dataset, out, '--save_freq', '2', *extra))


def _run(config, trainer: TinyTrainer, evaluation=None) -> training_loop.TrainingRun:
    run = training_loop.TrainingRun(trainer, config, evaluation=evaluation)
    run.run()
    return run


def _saved_steps(files: RunFiles) -> list[int]:
    return sorted(checkpoints.load_checkpoint(p)['step'] for p in files.periodic())


def test_saves_prune_and_resume_where_the_run_stopped(tiny_dataset, tmp_path):
    config = _config(tiny_dataset, tmp_path, '--iteration', '6', '--keep_checkpoints', '2', '--latest_freq', '3')
    run = _run(config, TinyTrainer())
    assert _saved_steps(run.files) == [4, 6] and run.files.config_path.is_file()
    assert checkpoints.load_checkpoint(run.files.latest_path)['step'] == 6
    final = checkpoints.load_checkpoint(run.files.checkpoint_path(6))
    assert final['config']['dataset_root'] == str(run.dataset_root) and final['data_files']['files']

    resumed = TinyTrainer()
    _run(_config(tiny_dataset, tmp_path, '--iteration', '8', '--resume', 'True'), resumed)
    assert resumed.steps_run == [7, 8]   # step + 1, not from the start
    for name, value in final['net'].items():   # the weights it resumed from, then two steps on
        assert not torch.equal(resumed.net.state_dict()[name], value)
    assert _saved_steps(RunFiles(tmp_path, 'tiny')) == [4, 6, 8]


def test_a_loss_that_becomes_nan_stops_the_run_keeping_the_last_good_checkpoint(tiny_dataset, tmp_path):
    config = _config(tiny_dataset, tmp_path, '--iteration', '6')
    trainer = TinyTrainer(nan_at=3)
    with pytest.raises(TrainingDiverged, match='G/total became nan by step 3'):
        _run(config, trainer)
    assert _saved_steps(RunFiles(tmp_path, 'tiny')) == [2]


@pytest.mark.parametrize('step,saved', [(3, [2, 3]), (4, [2, 4])])
def test_a_stop_signal_saves_its_step_once_and_exits_with_the_requeue_status(tiny_dataset, tmp_path, monkeypatch,
                                                                               step, saved):
    """Step 4 is also a periodic save: one write, not two (issue 24 6b; this test failed before: 2)."""
    writes = []
    real_save = checkpoints.atomic_save
    monkeypatch.setattr(checkpoints, 'atomic_save', lambda obj, path: (writes.append(path), real_save(obj, path)))
    config = _config(tiny_dataset, tmp_path, '--iteration', '8')
    with pytest.raises(Stopped, match=f'stopped by signal at step {step}') as stop:
        _run(config, TinyTrainer(signal_at=(step, signal.SIGUSR1)))
    assert stop.value.exit_code == 3
    assert _saved_steps(RunFiles(tmp_path, 'tiny')) == saved
    assert len(writes) == len(set(writes)) == len(saved)


def test_evaluation_logs_every_score_and_keeps_the_best_checkpoint(tiny_dataset, tmp_path):
    config = _config(tiny_dataset, tmp_path, '--iteration', '6', '--metric_freq', '2')
    run = _run(config, TinyTrainer(), evaluation=FakeEvaluation([30.0, 10.0, 20.0]))
    assert checkpoints.load_checkpoint(run.files.best_path)['step'] == 4
    assert run.best_metric == 10.0
    lines = (run.files.run_dir / 'metrics.jsonl').read_text().splitlines()
    assert len(lines) == 3 and '"generators": [""]' in lines[0]   # no EMA: the raw generators only


def test_an_error_inside_a_step_saves_the_last_completed_step(tiny_dataset, tmp_path, capsys):
    config = _config(tiny_dataset, tmp_path, '--iteration', '8', '--save_freq', '4')
    with pytest.raises(RuntimeError, match='injected failure in step 3'):
        _run(config, TinyTrainer(fail_at=3))
    assert _saved_steps(RunFiles(tmp_path, 'tiny')) == [2]
    assert 'error inside step 3; saved step 2' in capsys.readouterr().err


def test_an_error_past_the_optimizer_update_keeps_the_last_good_checkpoint(tiny_dataset, tmp_path, capsys):
    config = _config(tiny_dataset, tmp_path, '--iteration', '8', '--save_freq', '2')
    with pytest.raises(RuntimeError, match='injected failure in step 5'):
        _run(config, TinyTrainer(fail_at=5, undoable=False))
    assert _saved_steps(RunFiles(tmp_path, 'tiny')) == [2, 4]
    assert 'cannot be restored exactly, so the last good checkpoint' in capsys.readouterr().err
