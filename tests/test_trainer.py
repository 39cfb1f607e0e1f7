"""Trainer: the fast step against PT's reference step, A/B symmetry, checkpoints and resume."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from conftest import random_batches, signal_after_step, tiny_flags, tiny_trainer

import checkpoints
import main
from checkpoints import PT_KEYS
from scripts.reference_step import reference_train_step
from ugatit import UGATIT

_trainer = tiny_trainer
_batches = random_batches


def _params(trainer: UGATIT) -> dict[str, torch.Tensor]:
    named = {f'G.{k}': v for k, v in trainer.G.state_dict().items()}
    named.update({f'D.{k}': v for k, v in trainer.D.state_dict().items()})
    return named


@pytest.mark.parametrize('stack', ['True', 'False'])
def test_fast_step_equals_reference_step(tiny_dataset, tmp_path, stack):
    fast = _trainer(tiny_dataset, tmp_path, '--stack_batches', stack)
    ref = _trainer(tiny_dataset, tmp_path)
    ref.G.load_state_dict(fast.G.state_dict())
    ref.D.load_state_dict(fast.D.state_dict())
    for step, batch in enumerate(_batches(3), start=1):
        got = fast.train_step(batch, step)
        want = reference_train_step(ref, batch, step)
        for key in ('D/total', 'G/total'):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
    want_params = _params(ref)
    for name, value in _params(fast).items():
        torch.testing.assert_close(value, want_params[name], rtol=1e-5, atol=1e-5, msg=name)


def test_swapping_domains_swaps_direction_losses(tiny_dataset, tmp_path):
    a = _trainer(tiny_dataset, tmp_path)
    b = _trainer(tiny_dataset, tmp_path)
    b.G['A2B'].load_state_dict(a.G['B2A'].state_dict())
    b.G['B2A'].load_state_dict(a.G['A2B'].state_dict())
    b.D['A'].load_state_dict(a.D['B'].state_dict())
    b.D['B'].load_state_dict(a.D['A'].state_dict())
    batch = _batches(1)[0]
    logs_a = a.train_step(batch, 1)
    logs_b = b.train_step({'A': batch['B'], 'B': batch['A']}, 1)
    for term in ('adv', 'cycle', 'identity', 'cam'):
        torch.testing.assert_close(logs_a[f'G/{term}_A2B'], logs_b[f'G/{term}_B2A'], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs_a['D/adv_A'], logs_b['D/adv_B'], rtol=1e-5, atol=1e-6)


def test_loss_decreases_when_training_on_one_batch(tiny_dataset, tmp_path):
    trainer = _trainer(tiny_dataset, tmp_path, '--lr', '0.002', '--cam_weight', '1', '--iteration', '100')
    g = torch.Generator().manual_seed(0)
    smooth = lambda: torch.nn.functional.interpolate(torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, size=32,  # noqa: E731
                                                     mode='bilinear')
    batch = {'A': smooth(), 'B': smooth()}
    first = trainer.train_step(batch, 1)
    for step in range(2, 31):
        last = trainer.train_step(batch, step)
    recon = lambda logs: float(logs['G/cycle_A2B'] + logs['G/identity_A2B'])  # noqa: E731
    assert recon(last) < 0.7 * recon(first)


def test_lr_schedule_is_pts_linear_decay(tiny_dataset, tmp_path):
    trainer = _trainer(tiny_dataset, tmp_path, '--lr', '0.1')   # --iteration 10
    assert [round(trainer.lr_at(s), 6) for s in (1, 5, 6, 8, 10)] == [0.1, 0.1, 0.08, 0.04, 0.0]
    no_decay = _trainer(tiny_dataset, tmp_path, '--lr', '0.1', '--decay_flag', 'False')
    assert no_decay.lr_at(10) == 0.1


def test_rho_is_clipped_after_each_step(tiny_dataset, tmp_path):
    trainer = _trainer(tiny_dataset, tmp_path)
    with torch.no_grad():
        trainer.G['A2B'].UpBlock1_1.norm1.rho.fill_(3.0)
    trainer.train_step(_batches(1)[0], 1)
    rhos = torch.cat([m.rho.flatten() for m in trainer.G.modules() if hasattr(m, 'rho')])
    assert rhos.min() >= 0 and rhos.max() <= 1


def _run(tiny_dataset, out, *extra) -> int:
    return main.main(tiny_flags(tiny_dataset, out, *extra))


def _final_weights(out: Path, step: int) -> dict:
    return checkpoints.load_checkpoint(out / 'tiny' / 'model' / f'tiny_params_{step:07d}.pt')


def _assert_same_state(a: dict, b: dict) -> None:
    for key in (*PT_KEYS, 'genA2B_ema', 'genB2A_ema'):
        for name, value in a[key].items():
            torch.testing.assert_close(value, b[key][name], rtol=0, atol=0, msg=f'{key}.{name}')
    torch.testing.assert_close(a['G_optim']['state'], b['G_optim']['state'], rtol=0, atol=0)
    assert a['step'] == b['step']


def test_checkpoint_is_weights_only_loadable_and_complete(tiny_dataset, tmp_path):
    assert _run(tiny_dataset, tmp_path / 'r', '--iteration', '3', '--save_freq', '3') == 0
    state = torch.load(tmp_path / 'r' / 'tiny' / 'model' / 'tiny_params_0000003.pt', weights_only=True)
    assert set(PT_KEYS) <= set(state)
    assert {'G_optim', 'D_optim', 'step', 'lr', 'rng', 'config', 'genA2B_ema', 'genB2A_ema'} <= set(state)
    assert state['step'] == 3 and state['config']['seed'] == 0


def test_resume_after_kill_equals_unbroken_run(tiny_dataset, tmp_path):
    """kill -9 after the step-2 checkpoint: resuming reproduces step 4 bit for bit."""
    straight = tmp_path / 'straight'
    assert _run(tiny_dataset, straight, '--iteration', '4', '--save_freq', '2') == 0
    broken = tmp_path / 'broken'
    assert _run(tiny_dataset, broken, '--iteration', '4', '--save_freq', '2') == 0
    (broken / 'tiny' / 'model' / 'tiny_params_0000004.pt').unlink()   # as if killed during step 3
    assert _run(tiny_dataset, broken, '--iteration', '4', '--save_freq', '2', '--resume', 'True') == 0
    _assert_same_state(_final_weights(straight, 4), _final_weights(broken, 4))


def test_resume_with_critic_steps_penalty_and_epochs_equals_unbroken_run(tiny_dataset, tmp_path):
    """Resume after the step-2 checkpoint: step 3 is critic-only (n_critic 3), the penalty draws its
    points, and TF's epoch schedule decays the LR; the result equals an unbroken run bit for bit."""
    flags = ('--epoch', '2', '--iteration', '2', '--decay_epoch', '1', '--n_critic', '3', '--gan_type', 'dragan',
             '--save_freq', '2')
    straight = tmp_path / 'straight'
    assert _run(tiny_dataset, straight, *flags) == 0
    broken = tmp_path / 'broken'
    assert _run(tiny_dataset, broken, *flags) == 0
    (broken / 'tiny' / 'model' / 'tiny_params_0000004.pt').unlink()
    assert _run(tiny_dataset, broken, *flags, '--resume', 'True') == 0
    _assert_same_state(_final_weights(straight, 4), _final_weights(broken, 4))


def test_real_kill_9_mid_run_then_resume_equals_unbroken_run(tiny_dataset, tmp_path):
    """SIGKILL a real training process at an arbitrary moment after its first checkpoint."""
    import subprocess
    import sys
    import time
    flags = ('--iteration', '30', '--save_freq', '2')
    straight = tmp_path / 'straight'
    assert _run(tiny_dataset, straight, *flags) == 0
    broken = tmp_path / 'broken'
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, 'main.py', *tiny_flags(tiny_dataset, broken, *flags)], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = broken / 'tiny' / 'model' / 'tiny_params_0000002.pt'
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.15)   # a few steps further: possibly in the middle of writing a checkpoint
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
    assert not (broken / 'tiny' / 'model' / 'tiny_params_0000030.pt').exists()
    assert _run(tiny_dataset, broken, *flags, '--resume', 'True') == 0
    _assert_same_state(_final_weights(straight, 30), _final_weights(broken, 30))


def test_sigterm_saves_then_resume_equals_unbroken_run(tiny_dataset, tmp_path, monkeypatch):
    straight = tmp_path / 'straight'
    assert _run(tiny_dataset, straight, '--iteration', '4', '--save_freq', '4') == 0

    signal_after_step(monkeypatch, 2, signal.SIGTERM)
    stopped = tmp_path / 'stopped'
    assert _run(tiny_dataset, stopped, '--iteration', '4', '--save_freq', '4') == 128 + signal.SIGTERM
    assert (stopped / 'tiny' / 'model' / 'tiny_params_0000002.pt').exists()
    monkeypatch.undo()
    assert _run(tiny_dataset, stopped, '--iteration', '4', '--save_freq', '4', '--resume', 'True') == 0
    _assert_same_state(_final_weights(straight, 4), _final_weights(stopped, 4))


def test_corrupt_newest_checkpoint_is_skipped(tiny_dataset, tmp_path, capsys):
    out = tmp_path / 'r'
    assert _run(tiny_dataset, out, '--iteration', '4', '--save_freq', '2') == 0
    (out / 'tiny' / 'model' / 'tiny_params_0000004.pt').write_bytes(b'torn file')
    assert _run(tiny_dataset, out, '--iteration', '4', '--save_freq', '2', '--resume', 'True') == 0
    assert 'is not a PyTorch checkpoint' in capsys.readouterr().err   # skipped with a warning saying why
    assert checkpoints.load_checkpoint(out / 'tiny' / 'model' / 'tiny_params_0000004.pt')['step'] == 4


def test_pt_format_checkpoint_resumes_and_tests(tiny_dataset, tmp_path, capsys):
    out = tmp_path / 'r'
    assert _run(tiny_dataset, out, '--iteration', '2', '--save_freq', '2') == 0
    path = out / 'tiny' / 'model' / 'tiny_params_0000002.pt'
    full = checkpoints.load_checkpoint(path)
    torch.save({k: full[k] for k in PT_KEYS}, path)   # what PT writes: six state dicts, nothing else
    assert _run(tiny_dataset, out, '--iteration', '3', '--save_freq', '3', '--resume', 'True') == 0
    assert 'optimizer moments start fresh' in capsys.readouterr().err
    resumed = checkpoints.load_checkpoint(out / 'tiny' / 'model' / 'tiny_params_0000003.pt')
    assert resumed['step'] == 3
    assert _run(tiny_dataset, out, '--phase', 'test', '--checkpoint', str(path)) == 0
    assert len(list((out / 'tiny' / 'test' / 'A2B').glob('*.png'))) == 3


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tiny_dataset, tmp_path, monkeypatch, capsys):
    import losses
    out = tmp_path / 'r'
    original = losses.l1
    calls = {'n': 0}

    def l1_goes_nan(a, b):
        calls['n'] += 1
        value = original(a, b)
        return value * float('nan') if calls['n'] > 8 else value   # 4 l1 calls per step

    monkeypatch.setattr(losses, 'l1', l1_goes_nan)
    assert _run(tiny_dataset, out, '--iteration', '6', '--save_freq', '1') == 2
    err = capsys.readouterr().err
    assert 'became nan' in err and 'Traceback' not in err
    saved = sorted(p.name for p in (out / 'tiny' / 'model').glob('*.pt'))
    assert saved == ['tiny_params_0000001.pt', 'tiny_params_0000002.pt']
