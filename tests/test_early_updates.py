"""The generators' big MLP layer updated inside its gradient hook (--early_updates, on by default) changes
no number: weights, Adam moments and EMA copies are bitwise those of the step that updates after the whole
backward pass, over several steps, for the GAN types, n_critic, EMA, ADA, TF's L2 term and a resume."""
from __future__ import annotations

import io

import pytest
import torch
from conftest import assert_bitwise, random_batches, tiny_trainer

ADA = ('--ada', 'True', '--ada_p', '0.5', '--ada_interval', '1', '--ada_kimg', '0.1')
CASES = {
    'lsgan': (),
    'n_critic_2': ('--n_critic', '2'),
    'wgan-gp': ('--gan_type', 'wgan-gp'),
    'ema': ('--ema', 'True', '--ema_start', '0'),
    'ada': ADA,
    'arch_tf': ('--arch', 'tf', '--n_res', '4'),          # the L2 term reads the big layer's weight too
    'unstacked': ('--stack_batches', 'False', '--has_blur', 'False'),   # three forward uses per generator
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


def test_early_updates_free_the_gradient_as_soon_as_it_is_whole(tiny_dataset, tmp_path):
    trainer = tiny_trainer(tiny_dataset, tmp_path)
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


@pytest.mark.parametrize('case', ['lsgan', 'n_critic_2', 'arch_tf'])
def test_recomputed_generators_are_bitwise_the_kept_activations(tiny_dataset, tmp_path, case):
    """--recompute: activation checkpointing of the generators changes no number."""
    batches = random_batches(STEPS)
    kept = _train(tiny_trainer(tiny_dataset, tmp_path, *CASES[case]), batches)
    recomputed = _train(tiny_trainer(tiny_dataset, tmp_path, '--recompute', 'True', *CASES[case]), batches)
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
