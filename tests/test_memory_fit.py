"""The run fits the card by itself: the start-up line (estimate against the card), the flags that fit,
and a CUDA out-of-memory error inside a step as one line with the last checkpoint kept."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_flags
from test_training_loop import TinyTrainer

import checkpoints
import main
import memory
import memory_fit
import training_loop
from errors import OutOfMemory
from memory import GiB
from run_folder import RunFiles
from ugatit import UGATIT


def _fake_estimate(config) -> memory.MemoryReport:
    """12 GiB, 10 with --recompute, 3 with --light: what the real estimate says in spirit, instantly."""
    peak = 3 if config.arch.light else 10 if config.performance.recompute is True else 12
    return memory.MemoryReport(int(peak * GiB), {}, 2, 'aten.mm')


def _on_a_card(monkeypatch, trainer, gib: float) -> None:
    trainer.device = torch.device('cuda')   # only what the loop reads; the tiny trainer runs on the CPU
    monkeypatch.setattr(training_loop, 'card_memory', lambda device: (int(gib * GiB), int(gib * GiB)))


def _run(tiny_dataset, tmp_path, trainer, *extra):
    config = main.parse_args(tiny_flags(tiny_dataset, tmp_path, '--iteration', '6', '--save_freq', '2', *extra))
    training_loop.TrainingRun(trainer, config, estimate=_fake_estimate).run()


def test_a_config_that_does_not_fit_stops_at_start_naming_the_flags_that_fit(tiny_dataset, tmp_path, monkeypatch):
    trainer = TinyTrainer()
    _on_a_card(monkeypatch, trainer, 11.0)
    with pytest.raises(OutOfMemory) as err:
        _run(tiny_dataset, tmp_path, trainer, '--light', 'False')
    message = str(err.value)
    assert 'needs about 12.00 GiB' in message and 'has 11.00 GiB' in message and 'does not fit' in message
    assert 'flags that fit: --recompute True (10.0 GiB) or --light True (3.0 GiB)' in message
    assert '\n' not in message and trainer.steps_run == []


def test_a_config_that_fits_says_so_in_one_line_and_trains(tiny_dataset, tmp_path, monkeypatch, capsys):
    trainer = TinyTrainer()
    _on_a_card(monkeypatch, trainer, 16.0)
    _run(tiny_dataset, tmp_path, trainer, '--light', 'False')
    assert 'needs about 12.00 GiB at its peak (estimated); cuda has 16.00 GiB for it of 16.00 GiB: it fits' \
        in capsys.readouterr().err
    assert trainer.steps_run == [1, 2, 3, 4, 5, 6]


def test_out_of_memory_inside_a_step_is_one_line_and_keeps_the_last_checkpoint(tiny_dataset, tmp_path,
                                                                               monkeypatch):
    class OutOfMemoryAtStep5(TinyTrainer):
        def train_step(self, batch, step):
            if step == 5:
                raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 1.00 GiB')
            return super().train_step(batch, step)

    trainer = OutOfMemoryAtStep5()
    _on_a_card(monkeypatch, trainer, 16.0)
    with pytest.raises(OutOfMemory) as err:
        _run(tiny_dataset, tmp_path, trainer, '--light', 'False')
    message = str(err.value)
    assert message.startswith('CUDA out of memory at step 5: memory: this config needs about 12.00 GiB')
    assert 'flags that fit' in message and 'resume with --resume True' in message and '\n' not in message
    files = RunFiles(tmp_path, 'tiny')
    assert sorted(checkpoints.load_checkpoint(p)['step'] for p in files.periodic()) == [2, 4]


def test_the_cli_prints_an_out_of_memory_as_one_line(tiny_dataset, tmp_path, monkeypatch, capsys):
    def oom(self, batch, step):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 MiB')
    monkeypatch.setattr(UGATIT, 'train_step', oom)
    assert main.main(tiny_flags(tiny_dataset, tmp_path, '--iteration', '3')) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('error: out of memory at step 1') and 'Traceback' not in '\n'.join(err)


def test_the_real_estimate_picks_flags_that_really_fit(tiny_dataset, tmp_path):
    """memory_fit on the real estimate of a tiny config: the flags it names fit, the config does not."""
    config = main.parse_args(tiny_flags(tiny_dataset, tmp_path, '--img_size', '64', '--n_global_dis', '5',
                                        '--n_local_dis', '4'))
    estimate = training_loop.memory_estimator(UGATIT)
    needed = estimate(config).peak_bytes
    recomputed = estimate(memory_fit.with_flags(config, {'recompute': True})).peak_bytes
    assert recomputed < needed
    usable = (recomputed + needed) // 2
    found = memory_fit.flags_that_fit(config, estimate, int(usable / (1 + memory_fit.MARGIN)))
    assert not memory_fit.Fit(needed, usable, usable).fits
    assert found and all(needed_with < usable for _, needed_with in found)


def test_recompute_auto_is_off_where_no_card_decides(tiny_dataset, tmp_path):
    """--recompute auto (the default) needs the estimate against a CUDA card; on the CPU, with
    --memory_check False, or outside training it is off, and the trainer keeps activations."""
    for extra in ((), ('--memory_check', 'False')):
        config = main.parse_args(tiny_flags(tiny_dataset, tmp_path, *extra))
        assert config.performance.recompute is False
    assert main.parse_args(tiny_flags(tiny_dataset, tmp_path, '--recompute')).performance.recompute is True


@pytest.mark.parametrize('gib, expected', [(16.0, False), (11.0, True)])
def test_recompute_auto_is_on_exactly_when_the_config_does_not_fit_without_it(tiny_dataset, tmp_path, monkeypatch,
                                                                              capsys, gib, expected):
    """12 GiB without recomputation: a 16 GiB card keeps activations, an 11 GiB card recomputes (10 GiB)."""
    config = main.parse_args(tiny_flags(tiny_dataset, tmp_path, '--light', 'False'))
    config = memory_fit.with_flags(config, {'recompute': 'auto'})   # as validation leaves it on a CUDA device
    monkeypatch.setattr(training_loop, 'card_memory', lambda device: (int(gib * GiB), int(gib * GiB)))
    settled = training_loop.settle_recompute(config, _fake_estimate)
    assert settled.performance.recompute is expected and settled.values['recompute'] is expected
    line = capsys.readouterr().err.strip()
    assert line == (f'memory: --recompute auto: {"on" if expected else "off"} (without it the config needs about '
                    f'12.00 GiB, cuda:0 has {gib:.2f} GiB for it)')


def test_the_estimator_estimates_each_config_once(tiny_dataset, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(memory, 'estimate', lambda config, build: calls.append(config) or _fake_estimate(config))
    estimate = training_loop.memory_estimator(UGATIT)
    config = main.parse_args(tiny_flags(tiny_dataset, tmp_path))
    estimate(config)
    estimate(memory_fit.with_flags(config, {}))
    estimate(memory_fit.with_flags(config, {'recompute': True}))
    assert len(calls) == 2
