"""The speed options on the CPU: bf16 autocast, channels-last, torch.compile, and scripts/benchmark.py.

fp16 needs CUDA: its test runs only where a GPU is present and is skipped cleanly otherwise. The
torch.compile test takes minutes of compilation and runs with UGATIT_SLOW_TESTS=1.
"""
from __future__ import annotations

import os

import pytest
import torch
from conftest import random_batches, record_gradients, tiny_flags, tiny_trainer

import main
from scripts import benchmark
from ugatit import UGATIT

_trainer = tiny_trainer


def _batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    return random_batches(n, batch=1, seed=3)


def _train(trainer: UGATIT, batches) -> list[dict[str, torch.Tensor]]:
    return [trainer.train_step(batch, step) for step, batch in enumerate(batches, start=1)]


def test_bf16_autocast_trains_on_cpu(tiny_dataset, tmp_path):
    trainer = _trainer(tiny_dataset, tmp_path, '--amp', 'bf16')
    before = [p.detach().clone() for p in trainer.G.parameters()]
    logs = _train(trainer, _batches())
    for step_logs in logs:
        for name, value in step_logs.items():
            assert value.dtype == torch.float32, name   # losses are reduced in float32
            assert torch.isfinite(value), name
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.G.parameters()))
    assert all(p.dtype == torch.float32 for p in trainer.G.parameters())  # master weights stay fp32
    with trainer.autocast():
        out = trainer.G['A2B'](_batches(1)[0]['A'])
    assert out.image.dtype == torch.bfloat16      # the convolutions really ran in bf16


@pytest.mark.skipif(not torch.cuda.is_available(), reason='fp16 autocast with a GradScaler needs CUDA')
def test_fp16_with_grad_scaler_trains_on_cuda(tiny_dataset, tmp_path):
    trainer = _trainer(tiny_dataset, tmp_path, '--amp', 'fp16', '--device', 'cuda')
    logs = _train(trainer, _batches())
    assert all(torch.isfinite(v) for step_logs in logs for v in step_logs.values())
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() > 0


def test_fp16_on_cpu_is_a_clear_error(tiny_dataset, tmp_path, capsys):
    assert main.main(tiny_flags(tiny_dataset, tmp_path, '--amp', 'fp16')) == 2
    err = capsys.readouterr().err
    assert 'fp16' in err and 'bf16' in err and 'Traceback' not in err


def test_channels_last_gives_the_same_step(tiny_dataset, tmp_path):
    plain = _trainer(tiny_dataset, tmp_path)
    nhwc = _trainer(tiny_dataset, tmp_path, '--channels_last', 'True')
    nhwc.G.load_state_dict(plain.G.state_dict())
    nhwc.D.load_state_dict(plain.D.state_dict())
    conv = next(m for m in nhwc.G.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    batch = _batches(1)
    plain_grads, nhwc_grads = record_gradients(plain.G), record_gradients(nhwc.G)
    expected, got = _train(plain, batch)[0], _train(nhwc, batch)[0]
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)
    # Gradients, not updated weights: Adam's first step turns rounding-level differences of
    # near-zero gradients into ±lr changes.
    assert plain_grads.keys() == nhwc_grads.keys() and plain_grads
    for name, p in plain_grads.items():
        assert (nhwc_grads[name] - p).abs().max() <= 1e-4 * p.abs().max(), name


@pytest.mark.skipif(not os.environ.get('UGATIT_SLOW_TESTS'),
                    reason='inductor compilation takes minutes on a small CPU; set UGATIT_SLOW_TESTS=1')
def test_compile_gives_the_same_first_step(tiny_dataset, tmp_path):
    eager = _trainer(tiny_dataset, tmp_path, '--stack_batches', 'True')
    compiled = _trainer(tiny_dataset, tmp_path, '--compile', 'True')
    compiled.G.load_state_dict(eager.G.state_dict())
    compiled.D.load_state_dict(eager.D.state_dict())
    batch = _batches(1)
    expected, got = _train(eager, batch)[0], _train(compiled, batch)[0]
    for name in ('D/total', 'G/total', 'G/cycle_A2B'):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4, msg=name)


def test_benchmark_reports_fast_and_reference_side_by_side(capsys):
    rows = benchmark.main(['--configs', 'tiny', '--iters', '2', '--warmup', '1', '--device', 'cpu',
                           '--amp', 'off,fp16'])
    printed = capsys.readouterr().out
    off, fp16 = rows
    assert fp16.fast is None and 'skipped' in fp16.note
    assert off.fast.s_per_it > 0 and off.reference.s_per_it > 0
    assert off.speedup == pytest.approx(off.reference.s_per_it / off.fast.s_per_it)
    assert off.img_per_s == pytest.approx(2 / off.fast.s_per_it)
    assert off.test_img_per_s > 0 and off.fast.host_increase_bytes > 0
    # The fast step skips the reference's second generator pass and D's backward into G.
    assert 0.6 < off.fast.flops / off.reference.flops < 0.9
    assert 'speed-up fast/ref' in printed and 'GFLOP/it' in printed and 'tiny' in printed


@pytest.mark.parametrize('phase', ['train', 'test'])
def test_compile_mode_reaches_torch_compile_on_every_path(tiny_dataset, tmp_path, monkeypatch, phase):
    """--compile_mode reduce-overhead (CUDA graphs of each compiled network) is handed to every
    torch.compile of the phase; without --compile it is a one-line error."""
    import main
    modes = []
    monkeypatch.setattr(torch, 'compile', lambda module, mode='default', **kw: (modes.append(mode), module)[1])
    flags = ['--compile', 'True', '--compile_mode', 'reduce-overhead']
    if phase == 'train':
        tiny_trainer(tiny_dataset, tmp_path, *flags)
        assert len(modes) == 6   # two generators, four critics
    else:
        out = tmp_path / 'out'
        assert main.main(tiny_flags(tiny_dataset, out, '--iteration', '1')) == 0
        assert main.main(tiny_flags(tiny_dataset, out, '--phase', 'test', *flags)) == 0
        assert len(modes) == 2
    assert set(modes) == {'reduce-overhead'}
    assert main.main(tiny_flags(tiny_dataset, tmp_path / 'x', '--compile_mode', 'reduce-overhead')) == 2
