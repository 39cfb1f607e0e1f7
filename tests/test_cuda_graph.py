"""--cuda_graph: the whole training step captured once and replayed (step_capture.py).

No GPU here, so the graphs are step_capture.EmulatedGraphs: the capture records the step's operations at
the dispatcher and a replay runs them again on the recorded tensors without running any Python, as a CUDA
graph replays its kernels on their addresses. The first tests hold the emulation to that (a host read is
refused, Python state is frozen at the capture); the rest train with it: a replayed step is bitwise the
eager step with the same optimizer, within float rounding of the default step, and a stopped run resumes
exactly, across graph and eager runs too.
"""
from __future__ import annotations

import signal

import pytest
import torch
from conftest import assert_bitwise, random_batches, signal_after_step, tiny_flags, tiny_trainer

import checkpoints
import main
import step_capture
import utils
from errors import UserError

CASES = {
    'default': (),
    'full_mlp': ('--light', 'False'),                       # the factored early update of the big layer
    'n_critic_2': ('--n_critic', '2'),                      # two kinds of step, two graphs
    'recompute': ('--light', 'False', '--recompute', 'True'),
    'bf16': ('--amp', 'bf16'),
    'unstacked': ('--stack_batches', 'False', '--has_blur', 'False'),
    'no_ema': ('--ema', 'False'),
}
STEPS = 7   # warm-up 1-3, capture at 4, replays 5-7 (n_critic 2: each kind's fourth step is captured)


def _steps(case: str) -> int:
    return 2 * STEPS if case == 'n_critic_2' else STEPS


@pytest.fixture
def emulated_graphs(monkeypatch):
    """--cuda_graph on the CPU, with graphs emulated (what validation and the trainer ask for)."""
    monkeypatch.setitem(step_capture.BACKENDS, 'cpu', lambda device: step_capture.EmulatedGraphs())


def _run_steps(trainer, batches) -> list[dict]:
    return [{k: v.clone() for k, v in trainer.train_step(batch, step).items()}
            for step, batch in enumerate(batches, start=1)]


def _state(trainer) -> dict:
    state = trainer.state_dict()
    return {k: state[k] for k in ('genA2B', 'genB2A', 'disGA', 'disGB', 'disLA', 'disLB', 'G_optim', 'D_optim',
                                  'genA2B_ema', 'genB2A_ema') if k in state}


# -- the emulation is a graph --------------------------------------------------------------------------


def test_emulated_replay_reruns_the_operations_not_the_python():
    x, lr = torch.ones(3), torch.tensor(0.5)
    calls = []

    def step() -> dict:
        calls.append(1)
        y = x * lr                     # a fresh result: written back where the capture put it
        x.add_(y).add_(len(calls))     # Python's value at the capture (1) is what every replay adds
        return {'y': y}
    replay, logs = step_capture.EmulatedGraphs().capture(step)
    assert torch.equal(x, torch.full((3,), 2.5))
    lr.fill_(2.0)                      # a device scalar set on the host between replays is read again
    replay()
    assert calls == [1]
    assert torch.equal(logs['y'], torch.full((3,), 5.0)) and torch.equal(x, torch.full((3,), 8.5))


@pytest.mark.parametrize('read', [lambda t: t.sum().item(), lambda t: bool(t.sum() > 0), lambda t: t[t > 0],
                                  lambda t: t + torch.tensor([1.0, 2.0, 3.0])])
def test_emulated_capture_refuses_host_reads(read):
    x = torch.ones(3)
    with pytest.raises(step_capture.CaptureError, match='host'):
        step_capture.EmulatedGraphs().capture(lambda: {'y': read(x)})


# -- the trainer's captured step ------------------------------------------------------------------------


@pytest.mark.parametrize('case', list(CASES))
def test_replayed_steps_are_bitwise_the_eager_steps(tiny_dataset, tmp_path, emulated_graphs, monkeypatch, case):
    batches = random_batches(_steps(case))
    captured = tiny_trainer(tiny_dataset, tmp_path, '--cuda_graph', 'True', *CASES[case])
    captured_logs = _run_steps(captured, batches)
    kinds = {True, False} if case == 'n_critic_2' else {True}
    assert set(captured.run_device_step.graphs) == kinds   # captured, and the later steps replayed
    monkeypatch.setattr(step_capture, 'WARMUP', len(batches))   # the same step, never captured
    eager = tiny_trainer(tiny_dataset, tmp_path, '--cuda_graph', 'True', *CASES[case])
    eager_logs = _run_steps(eager, batches)
    assert not eager.run_device_step.graphs
    assert_bitwise(eager_logs, captured_logs)
    assert_bitwise(_state(eager), _state(captured))


def test_captured_step_is_the_default_step_within_rounding(tiny_dataset, tmp_path, emulated_graphs):
    """Only the optimizer's kernel differs (fused, the LR a tensor, instead of the CPU's foreach)."""
    batches = random_batches(STEPS)
    captured = tiny_trainer(tiny_dataset, tmp_path, '--cuda_graph', 'True')
    default = tiny_trainer(tiny_dataset, tmp_path)
    assert isinstance(captured.G_optim.param_groups[0]['lr'], torch.Tensor)
    torch.testing.assert_close(_run_steps(default, batches), _run_steps(captured, batches), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_state(default)['genA2B'], _state(captured)['genA2B'], rtol=0, atol=1e-6)
    torch.testing.assert_close(_state(default)['genA2B_ema'], _state(captured)['genA2B_ema'], rtol=0, atol=1e-6)


def test_a_batch_of_another_shape_is_a_clear_error(tiny_dataset, tmp_path, emulated_graphs):
    trainer = tiny_trainer(tiny_dataset, tmp_path, '--cuda_graph', 'True')
    trainer.train_step(random_batches(1, batch=2)[0], 1)
    with pytest.raises(UserError, match='batches of one shape'):
        trainer.train_step(random_batches(1, batch=1)[0], 2)


def test_ema_decay_from_a_device_scalar_is_bitwise_the_eager_update():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7))
    eager = utils.EMA(net, 0.999, start_step=2, rampup=0.05)
    on_device = utils.EMA(net, 0.999, start_step=2, rampup=0.05, decay_on_device=True)
    for step in range(1, 7):   # a copy up to the start, then the ramped-up decay
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        eager.update(net, step)
        on_device.set_step(step)
        on_device.update(net)
        assert_bitwise(eager.model.state_dict(), on_device.model.state_dict(), f'step {step}')


# -- runs ----------------------------------------------------------------------------------------------------


def _weights(out, step: int) -> dict:
    return checkpoints.load_checkpoint(out / 'tiny' / 'model' / f'tiny_params_{step:07d}.pt')


def test_stopped_graph_run_resumes_exactly(tiny_dataset, tmp_path, emulated_graphs, monkeypatch):
    """With data workers: stopped at step 2 (SIGTERM), the resumed run warms up again, captures at step 6 and
    replays 7-8; the unbroken run captured at step 4."""
    flags = ('--iteration', '8', '--save_freq', '8', '--cuda_graph', 'True', '--num_workers', '1')
    straight = tmp_path / 'straight'
    assert main.main(tiny_flags(tiny_dataset, straight, *flags)) == 0
    signal_after_step(monkeypatch, 2, signal.SIGTERM)
    stopped = tmp_path / 'stopped'
    assert main.main(tiny_flags(tiny_dataset, stopped, *flags)) == 128 + signal.SIGTERM
    monkeypatch.undo()
    monkeypatch.setitem(step_capture.BACKENDS, 'cpu', lambda device: step_capture.EmulatedGraphs())
    assert main.main(tiny_flags(tiny_dataset, stopped, *flags, '--resume', 'True')) == 0
    assert_bitwise(_state_of(_weights(straight, 8)), _state_of(_weights(stopped, 8)))


def _state_of(checkpoint: dict) -> dict:
    return {k: checkpoint[k] for k in ('genA2B', 'genB2A', 'disGA', 'disGB', 'disLA', 'disLB', 'G_optim',
                                       'genA2B_ema', 'step')}


@pytest.mark.parametrize('first, then', [((), ('--cuda_graph', 'True')), (('--cuda_graph', 'True'), ())])
def test_graph_and_eager_runs_resume_each_other(tiny_dataset, tmp_path, emulated_graphs, first, then):
    """The LR is a tensor in a graph run's optimizer and a float in an eager one's: each resumes the other's
    checkpoint with its own kind (an eager run failed on a graph run's tensor LR before)."""
    out = tmp_path / 'r'
    assert main.main(tiny_flags(tiny_dataset, out, '--iteration', '6', '--save_freq', '3', '--decay_flag', 'True',
                                *first)) == 0
    (out / 'tiny' / 'model' / 'tiny_params_0000006.pt').unlink()
    assert main.main(tiny_flags(tiny_dataset, out, '--iteration', '6', '--save_freq', '3', '--decay_flag', 'True',
                                '--resume', 'True', *then)) == 0
    resumed = _weights(out, 6)
    assert resumed['step'] == 6
    assert all(torch.isfinite(v).all() for v in resumed['genA2B'].values())
    lrs = [group['lr'] for group in resumed['G_optim']['param_groups']]
    assert lrs and all(isinstance(lr, torch.Tensor) == bool(then) for lr in lrs)


def test_cuda_graph_without_cuda_is_a_clear_error(tiny_dataset, tmp_path, capsys):
    assert main.main(tiny_flags(tiny_dataset, tmp_path, '--cuda_graph', 'True')) == 2
    err = capsys.readouterr().err
    assert '--cuda_graph needs a CUDA device' in err and 'Traceback' not in err


def test_cuda_graph_names_the_flags_it_cannot_capture(tiny_dataset, tmp_path, emulated_graphs, capsys):
    flags = tiny_flags(tiny_dataset, tmp_path, '--cuda_graph', 'True', '--ada', 'True', '--gan_type', 'wgan-gp')
    assert main.main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert '--ada True' in err and '--gan_type wgan-gp' in err and 'Traceback' not in err


@pytest.mark.parametrize('flags, says', [(['--device', 'cpu'], 'needs --device cuda'),
                                          (['--device', 'cuda', '--warmup', '3'], 'needs --warmup 4')])
def test_benchmark_cuda_graph_flag_errors(flags, says):
    """scripts/benchmark.py --cuda_graph times replays only: on CUDA, after the warm-up and the capture."""
    from scripts import benchmark
    with pytest.raises(SystemExit, match=says):
        benchmark.main(['--cuda_graph', '--configs', 'tiny', *flags])


def test_a_checkpoint_does_not_bring_its_runs_adam_kernel(tiny_dataset, tmp_path):
    """A checkpoint written on CUDA (fused Adam) resumed on the CPU keeps the CPU's foreach kernel, and one
    written on the CPU resumed on CUDA kept foreach before instead of fused; the step counts follow the kernel."""
    trainer = tiny_trainer(tiny_dataset, tmp_path)
    trainer.train_step(random_batches(1)[0], 1)
    state = trainer.state_dict()
    for group in state['G_optim']['param_groups']:   # as a CUDA run saves them
        group.update(foreach=None, fused=True)
    resumed = tiny_trainer(tiny_dataset, tmp_path)
    resumed.load_state_dict(state)
    group = resumed.G_optim.param_groups[0]
    assert (group['foreach'], group['fused'], group['capturable']) == (True, None, False)
    assert isinstance(group['lr'], float)
    resumed.train_step(random_batches(1)[0], 2)   # foreach Adam with the state it was handed
