"""The step's exact memory savings change no number: weights, Adam moments and EMA copies are bitwise those
of the step without them, over several steps, for the GAN types, n_critic, EMA, ADA, TF's L2 term and a
resume. The generators' big MLP layer is updated inside the backward pass (--early_updates, on by default:
in float32 from its gradient's factors, a few rows at a time; otherwise in its gradient hook), and
--recompute recomputes the generators' activations and, within them, the norms' intermediates."""
from __future__ import annotations

import io

import pytest
import torch
from conftest import assert_bitwise, random_batches, tiny_trainer
from torch.utils._python_dispatch import TorchDispatchMode

import step_memory

ADA = ('--ada', 'True', '--ada_p', '0.5', '--ada_interval', '1', '--ada_kimg', '0.1')
CASES = {
    'lsgan': (),
    'n_critic_2': ('--n_critic', '2'),
    'wgan-gp': ('--gan_type', 'wgan-gp'),
    'ema': ('--ema', 'True', '--ema_start', '0'),
    'ada': ADA,
    'arch_tf': ('--arch', 'tf', '--n_res', '4'),          # the L2 term reads the big layer's weight too
    'unstacked': ('--stack_batches', 'False', '--has_blur', 'False'),   # three forward uses per generator
    'full_mlp': ('--light', 'False'),     # the MLP's input layer takes the whole 8×8 map: 16 × 1024 weights
}
STEPS = 4


def _state(trainer) -> dict:
    state = trainer.state_dict()
    return {k: state[k] for k in ('genA2B', 'genB2A', 'disGA', 'disGB', 'disLA', 'disLB', 'G_optim', 'D_optim',
                                  'genA2B_ema', 'genB2A_ema', 'ada') if k in state}


def _train(trainer, batches, first: int = 1):
    for step, batch in enumerate(batches, start=first):
        trainer.train_step(batch, step)
    return trainer


@pytest.mark.parametrize('case', list(CASES))
def test_early_updates_are_bitwise_the_whole_step(tiny_dataset, tmp_path, case):
    batches = random_batches(STEPS)
    late = _train(tiny_trainer(tiny_dataset, tmp_path, '--early_updates', 'False', *CASES[case]), batches)
    early = tiny_trainer(tiny_dataset, tmp_path, *CASES[case])
    assert early.early_updates.params, 'the big layers are updated early by default'
    _train(early, batches)
    assert_bitwise(_state(late), _state(early))


class _MmShapes(TorchDispatchMode):
    """The output shapes of every matrix product dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.mm.default:
            self.shapes.add(tuple(out.shape))
        return out


@pytest.mark.parametrize('case', ['full_mlp', 'unstacked', 'n_critic_2', 'ema'])
def test_the_big_layer_gradient_is_formed_a_few_rows_at_a_time(tiny_dataset, tmp_path, monkeypatch, case):
    """In float32 the layer hands its weight gradient over as factors: it is never formed whole, only
    16 of its 32 rows at a time here, each slice taking its Adam step at once, and the result is bitwise
    the step that forms it whole and updates after the backward pass."""
    flags = (*CASES[case], '--light', 'False', '--ch', '8')
    monkeypatch.setattr(step_memory, 'CHUNK_BYTES', 16 * 2048 * 4)
    batches = random_batches(STEPS)
    late = _train(tiny_trainer(tiny_dataset, tmp_path, '--early_updates', 'False', *flags), batches)
    early = tiny_trainer(tiny_dataset, tmp_path, *flags)
    weight = early.G['A2B'].FC[0].weight
    assert weight.shape == (32, 2048) and early.G['A2B'].FC[0].weight_grad_sink is not None
    with _MmShapes() as products:
        _train(early, batches)
    assert (32, 2048) not in products.shapes and (16, 2048) in products.shapes
    assert_bitwise(_state(late), _state(early))


def test_early_updates_free_the_gradient_as_soon_as_it_is_whole(tiny_dataset, tmp_path):
    """Where the gradient is formed by autograd (TF's L2 term reads the weight too), the hook steps and frees it."""
    trainer = tiny_trainer(tiny_dataset, tmp_path, *CASES['arch_tf'])
    seen = []
    for g in trainer.G.values():
        g.FC[0].weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad is None))
    trainer.train_step(random_batches(1)[0], 1)
    assert all(g.FC[0].weight.grad is None for g in trainer.G.values())
    assert seen == [True, True]   # each hook after the update's own (registered first) finds the gradient freed


def test_a_resumed_run_with_early_updates_continues_bitwise(tiny_dataset, tmp_path):
    """Resumed where PT's schedule decays the LR (a 4-step run: from step 3): load_state_dict replaces
    the optimizer's state and group dicts, which the early steps must follow (they kept the old group's
    lr before the fix; the CLI resume of tests/test_kills.py found it)."""
    flags = ('--ema', 'True', '--ema_start', '0', '--iteration', str(STEPS))
    batches = random_batches(STEPS)
    unbroken = _train(tiny_trainer(tiny_dataset, tmp_path, *flags), batches)
    first = _train(tiny_trainer(tiny_dataset, tmp_path, *flags), batches[:2])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)   # through a file's bytes, as a resume reads it
    buffer.seek(0)
    resumed = tiny_trainer(tiny_dataset, tmp_path, *flags)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    _train(resumed, batches[2:], first=3)
    assert_bitwise(_state(unbroken), _state(resumed))


@pytest.mark.parametrize('flags', [('--amp', 'bf16', '--compile', 'True')])
def test_paths_that_must_wait_for_every_gradient_update_late(tiny_dataset, tmp_path, flags):
    assert not tiny_trainer(tiny_dataset, tmp_path, *flags).early_updates.params


@pytest.mark.parametrize('case', ['lsgan', 'n_critic_2', 'arch_tf', 'full_mlp'])
def test_recomputed_generators_are_bitwise_the_kept_activations(tiny_dataset, tmp_path, case):
    """--recompute: activation checkpointing of the generators, and within it of each norm, changes no
    number (full_mlp: the factored big layer inside the recomputed generator)."""
    batches = random_batches(STEPS)
    kept = _train(tiny_trainer(tiny_dataset, tmp_path, *CASES[case]), batches)
    recomputed = tiny_trainer(tiny_dataset, tmp_path, '--recompute', 'True', *CASES[case])
    norms = [m for m in recomputed.G.modules() if hasattr(m, 'recompute')]
    assert norms and all(m.recompute for m in norms)
    _train(recomputed, batches)
    assert_bitwise(_state(kept), _state(recomputed))


def test_gradients_are_freed_after_each_optimizer_step(tiny_dataset, tmp_path):
    """The generators' gradients lived through the next D step (2 GiB at 256 px), the critics' through
    the G step; neither is needed after its optimizer step."""
    trainer = tiny_trainer(tiny_dataset, tmp_path)
    alive_in_g_step = []
    real_g_step = trainer.g_step

    def g_step(*args, **kwargs):
        alive_in_g_step.append(any(p.grad is not None for p in trainer.D.parameters()))
        return real_g_step(*args, **kwargs)
    trainer.g_step = g_step
    trainer.train_step(random_batches(1)[0], 1)
    assert alive_in_g_step == [False]
    assert all(p.grad is None for p in [*trainer.G.parameters(), *trainer.D.parameters()])
