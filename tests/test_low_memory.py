"""--optim_state 8bit/4bit (torchao's low-bit Adam) and --ema_dtype bf16: the state really is low
precision, checkpoints round-trip (weights_only, resume after a kill reproduces the next steps),
the defaults keep the fp32 path, bad combinations are one-line errors.

torchao's optimizer step is ``torch.compile``d per parameter shape; on a CPU a cold compile of the
tiny model's shapes takes minutes, so these tests run it eagerly (``force_eager``: the same
function, uncompiled). ``UGATIT_SLOW_TESTS=1`` also runs the kill/resume round trip compiled.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_bitwise, random_batches, tiny_flags, tiny_trainer

import checkpoints
import low_memory
import main
import options
import utils
from errors import UserError

torchao = pytest.importorskip('torchao', reason='--optim_state 8bit/4bit needs torchao (requirements-extras.txt)')
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def eager_torchao():
    torch.compiler.set_stance('force_eager')
    yield
    torch.compiler.set_stance('default')


def _run(dataset: Path, out: Path, *extra: str) -> int:
    return main.main(tiny_flags(dataset, out, *extra))


def _checkpoint(out: Path, step: int) -> dict:
    return torch.load(out / 'tiny' / 'model' / f'tiny_params_{step:07d}.pt', weights_only=True)


def test_defaults_keep_the_fp32_path(tiny_dataset, tmp_path):
    trainer = tiny_trainer(tiny_dataset, tmp_path)
    assert trainer.config.memory.exact
    assert type(trainer.G_optim) is torch.optim.Adam and type(trainer.D_optim) is torch.optim.Adam
    assert all(type(ema) is utils.EMA for ema in trainer.ema.values())
    assert all(p.dtype == torch.float32 for ema in trainer.ema.values() for p in ema.model.parameters())
    trainer.train_step(random_batches(1)[0], 1)
    state = trainer.state_dict()
    assert state['G_optim']['state'][0]['exp_avg'].dtype == torch.float32
    assert low_memory.encode_optimizer_state(state['G_optim']) is state['G_optim']   # stored as before


@pytest.mark.parametrize('bits, max_fraction', [('8bit', 0.27), ('4bit', 0.14)])
def test_moments_of_large_tensors_are_low_bit(tiny_dataset, tmp_path, bits, max_fraction):
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit
    trainer = tiny_trainer(tiny_dataset, tmp_path, '--optim_state', bits, '--ch', '8', '--light', 'False')
    trainer.train_step(random_batches(1)[0], 1)
    low = {'8bit': OptimState8bit, '4bit': OptimState4bit}[bits]
    n_low = 0
    for optim in (trainer.G_optim, trainer.D_optim):
        for p, state in optim.state.items():
            expected = low if low_memory.is_low_bit(p, bits) else torch.Tensor
            for key in ('exp_avg', 'exp_avg_sq'):   # our rule (README's savings) is torchao's
                assert type(state[key]) is expected, (tuple(p.shape), key)
            if expected is low:
                n_low += 1
                stored = sum(t.numel() * t.element_size() for t in (state['exp_avg'].codes, state['exp_avg'].scale))
                assert state['exp_avg'].codes.dtype == torch.uint8
                assert stored <= max_fraction * p.numel() * 4   # vs float32: 1/4 (8 bits), 1/8 (4 bits) + scales
            else:
                assert state['exp_avg'].dtype == torch.float32
    assert n_low >= 4
    G = trainer.G['A2B']
    fc = max(G.FC.parameters(), key=lambda p: p.numel())   # the full model's MLP FC: 8·8·32 → 32 here
    assert fc.numel() == 65536 and type(trainer.G_optim.state[fc]['exp_avg']) is low


def test_low_bit_adam_is_coupled_l2_adam(tmp_path):
    """With the moments' quantisation error aside, torchao's step is torch's Adam with coupled weight
    decay: for a tensor torchao keeps in fp32 the two agree to float rounding."""
    torch.manual_seed(0)
    weights = [torch.randn(64, 8) for _ in range(2)]
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    ref = [torch.nn.Parameter(w.clone()) for w in weights]
    low = low_memory.low_bit_adam(params, '8bit', 1e-2, (0.5, 0.999), 0.1)
    adam = torch.optim.Adam(ref, lr=1e-2, betas=(0.5, 0.999), weight_decay=0.1)
    for _ in range(5):
        for p, r in zip(params, ref):
            p.grad = r.grad = torch.randn_like(p) * 1e-3   # small grads: the decay term matters
        low.step()
        adam.step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


def test_low_bit_checkpoint_loads_weights_only_without_torchao(tiny_dataset, tmp_path):
    out = tmp_path / 'r'
    assert _run(tiny_dataset, out, '--iteration', '2', '--save_freq', '2', '--optim_state', '8bit',
                '--ema_dtype', 'bf16', '--ch', '8') == 0
    path = out / 'tiny' / 'model' / 'tiny_params_0000002.pt'
    probe = ('import sys, torch; s = torch.load(sys.argv[1], weights_only=True); '
             "assert 'torchao' not in sys.modules; "
             "print(s['config']['optim_state'], s['genA2B_ema']['FC.0.weight'].dtype)")
    done = subprocess.run([sys.executable, '-c', probe, str(path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ['8bit', 'torch.bfloat16']
    translator, _ = checkpoints.load_translator(path)   # inference reads the bf16 EMA into fp32 generators
    image = translator.translate(torch.zeros(1, 3, 32, 32), 'A2B').image
    assert image.dtype == torch.float32 and torch.isfinite(image).all()


@pytest.mark.parametrize('bits', ['8bit', '4bit'])
def test_resume_after_kill_equals_unbroken_run(tiny_dataset, tmp_path, bits):
    """Killed after the step-2 checkpoint: the resumed run's step 4 equals an unbroken run's, bit for
    bit (networks, bf16 EMA copies, the quantised moments' codes and scales)."""
    _resume_round_trip(tiny_dataset, tmp_path, bits)


def _resume_round_trip(dataset: Path, tmp_path: Path, bits: str) -> None:
    flags = ('--iteration', '4', '--save_freq', '2', '--optim_state', bits, '--ema_dtype', 'bf16',
             '--ema_start', '0.25', '--ch', '8')
    straight, broken = tmp_path / 'straight', tmp_path / 'broken'
    assert _run(dataset, straight, *flags) == 0
    assert _run(dataset, broken, *flags) == 0
    (broken / 'tiny' / 'model' / 'tiny_params_0000004.pt').unlink()   # as if killed during step 3
    assert _run(dataset, broken, *flags, '--resume', 'True') == 0
    want, got = _checkpoint(straight, 4), _checkpoint(broken, 4)
    for key in ('genA2B', 'genB2A', 'disGA', 'disGB', 'disLA', 'disLB', 'genA2B_ema', 'genB2A_ema',
                'G_optim', 'D_optim'):
        assert_bitwise(want[key], got[key], key)
    encoded = [v for s in got['G_optim']['state'].values() for v in s.values() if isinstance(v, dict)]
    assert encoded and all(v['tensors']['codes'].dtype == torch.uint8 for v in encoded)
    assert got['genA2B_ema']['FC.0.weight'].dtype == torch.bfloat16
    assert not torch.equal(want['genA2B_ema']['FC.0.weight'], want['genA2B']['FC.0.weight'].bfloat16())


def test_ema_dtype_may_change_on_resume(tiny_dataset, tmp_path):
    out = tmp_path / 'r'
    assert _run(tiny_dataset, out, '--iteration', '3', '--save_freq', '2') == 0
    (out / 'tiny' / 'model' / 'tiny_params_0000003.pt').unlink()
    assert _run(tiny_dataset, out, '--iteration', '3', '--save_freq', '3', '--ema_dtype', 'bf16',
                '--resume', 'True') == 0   # fp32 copies rounded into bf16 ones
    before, after = _checkpoint(out, 2), _checkpoint(out, 3)
    assert before['genA2B_ema']['FC.0.weight'].dtype == torch.float32
    assert after['genA2B_ema']['FC.0.weight'].dtype == torch.bfloat16


def test_bad_combinations_are_one_line_errors(tiny_dataset, tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r'^--ema_dtype has no effect without --ema True'):
        options.parse_args(tiny_flags(tiny_dataset, tmp_path, '--ema', 'False', '--ema_dtype', 'bf16'))
    monkeypatch.setattr(low_memory, 'cpp_compiler', lambda: None)
    with pytest.raises(UserError, match=r"^--optim_state 8bit on the CPU: torchao's step is compiled by torch.compile"
                                        r', which needs a C\+\+ compiler'):
        options.parse_args(tiny_flags(tiny_dataset, tmp_path, '--optim_state', '8bit'))
    monkeypatch.setattr(low_memory, 'torchao_import_error', lambda: "ImportError: cannot import name 'x'")
    with pytest.raises(UserError, match=r'^--optim_state 8bit: torchao does not import with this torch .*'
                                        r'pip install -U torchao$'):
        options.parse_args(tiny_flags(tiny_dataset, tmp_path, '--optim_state', '8bit'))
    monkeypatch.setattr(low_memory, 'torchao_missing', lambda: True)
    with pytest.raises(UserError, match=r'^--optim_state 4bit needs torchao: pip install torchao'):
        options.parse_args(tiny_flags(tiny_dataset, tmp_path, '--optim_state', '4bit'))
    options.parse_args(tiny_flags(tiny_dataset, tmp_path))   # fp32 needs none of it
    options.parse_args(tiny_flags(tiny_dataset, tmp_path, '--optim_state', '8bit', '--phase', 'test'))   # no Adam


def test_bf16_ema_follows_the_weights_at_beta_0_9999():
    """Round-to-nearest would leave a bf16 copy where it is (each step moves it 1e-4 of the way,
    far below half of bf16's spacing); stochastic rounding follows the fp32 EMA on average, with noise."""
    source = torch.nn.Linear(256, 64)
    with torch.no_grad():
        source.weight.fill_(1.0)
    ema = low_memory.BF16EMA(source, beta=0.9999, start_step=0, rampup=None, seed=1)
    reference = utils.EMA(source, beta=0.9999, start_step=0, rampup=None)
    with torch.no_grad():
        source.weight.fill_(1.5)
    for step in range(1, 2001):
        ema.update(source, step)
        reference.update(source, step)
    want = reference.model.weight   # 1 + 0.5·(1 − 0.9999^2000) ≈ 1.0906
    got = ema.model.weight
    assert got.dtype == torch.bfloat16 and got.element_size() == 2
    assert float(want.mean()) == pytest.approx(1.0906, abs=1e-3)
    assert float(got.float().mean()) == pytest.approx(float(want.mean()), abs=2e-3)   # unbiased
    # The price: per-value noise of about sqrt(spacing · distance / 2) = sqrt(2^-7 · 0.41 / 2) ≈ 0.04 here
    # (a 50% jump of every weight; weights that drift slowly give less).
    assert float((got.float() - want).std()) < 0.06
    nearest = torch.full((4,), 1.0, dtype=torch.bfloat16)
    assert torch.equal(nearest.float().lerp(torch.full((4,), 1.5), 1e-4).bfloat16(), nearest)   # frozen


def test_bf16_ema_previews_and_memory(tiny_dataset, tmp_path):
    trainer = tiny_trainer(tiny_dataset, tmp_path, '--ema_dtype', 'bf16', '--ema_start', '0')
    ema = trainer.ema['A2B'].model
    assert all(p.dtype == torch.bfloat16 for p in ema.parameters())
    trainer.train_step(random_batches(1)[0], 1)
    out = trainer.translate(torch.zeros(1, 3, 32, 32), 'A2B')   # fp32 images into a bf16 copy
    assert out.image.dtype == torch.float32 and torch.isfinite(out.image).all()


def test_moment_bytes_of_the_full_model():
    """What README's savings come from: the full model's parameter counts, on the meta device."""
    from model import ArchConfig, build_critic, build_generator
    with torch.device('meta'):
        arch = ArchConfig(light=False)
        params = [p for g in (build_generator(arch), build_generator(arch)) for p in g.parameters()]
        params += [p for dom in 'AB' for p in build_critic(arch, dom).parameters()]
    fp32 = low_memory.moment_bytes(params, 'fp32')
    assert fp32 == 2 * 4 * sum(p.numel() for p in params)
    assert 0.25 < low_memory.moment_bytes(params, '8bit') / fp32 < 0.26
    assert 0.13 < low_memory.moment_bytes(params, '4bit') / fp32 < 0.14


@pytest.mark.skipif(not os.environ.get('UGATIT_SLOW_TESTS'), reason='minutes of torch.compile on a CPU; '
                    'UGATIT_SLOW_TESTS=1 runs it')
def test_compiled_low_bit_resume_equals_unbroken_run(tiny_dataset, tmp_path):
    """The same round trip with torchao's step compiled, as a real run does."""
    torch.compiler.set_stance('default')
    _resume_round_trip(tiny_dataset, tmp_path, '8bit')


@pytest.mark.parametrize('bits', ['8bit', '4bit'])
def test_early_updates_of_low_bit_moments_are_bitwise_the_whole_step(tiny_dataset, tmp_path, monkeypatch, bits):
    """torchao's Adam steps the big layer (32 × 2048) at the end of the backward pass from its gradient's
    factors, 16 rows at a time here (its quantisation blocks lie within rows), as exactly as inside its
    whole step."""
    import step_memory
    monkeypatch.setattr(step_memory, 'LOW_BIT_CHUNK_BYTES', 16 * 2048 * 4)
    flags = ('--optim_state', bits, '--ch', '8', '--light', 'False', '--ema', 'True', '--ema_start', '0')
    batches = random_batches(3)
    late = tiny_trainer(tiny_dataset, tmp_path, '--early_updates', 'False', *flags)
    early = tiny_trainer(tiny_dataset, tmp_path, *flags)
    assert early.early_updates.params and early.G['A2B'].FC[0].weight_grad_sink is not None
    for trainer in (late, early):
        for step, batch in enumerate(batches, start=1):
            trainer.train_step(batch, step)
    assert_bitwise(late.state_dict()['genA2B'], early.state_dict()['genA2B'])
    assert_bitwise(*(low_memory.encode_optimizer_state(t.state_dict()['G_optim']) for t in (late, early)))
