"""What memory savings would do to a config's peak GPU memory, simulated with memory.estimate on the CPU.

Usage (from the repository root)::

    python scripts/memory_savings.py --config full256 --savings ,free_grads,fc_in_backward,free_grads+fc_offload

It was written to choose the savings of issue 23, several of which the step now makes itself (freed
gradients, ``--early_updates``, ``--recompute``): a what-if starts from today's step, so those savings
show little here; README's "Memory without a GPU" has the figures of the step as built.

Each saving changes the unmodified trainer from outside (hooks, wrapped methods, patched functions), in
the estimate's fake-tensor run only. They simulate where tensors live and when they are freed, not
the numerics: ``fc_in_backward`` runs the FC weights' fused Adam update in their gradient hook, which
is what an implementation would do; ``fc_offload`` just drops the gradient, where an implementation
would copy it to the CPU, update there and copy the weight back (no GPU bytes either way).

- ``free_grads``: the generators' gradients set to None right after their optimizer step (today they
  live on through the next step's generator forward and D step).
- ``fc_in_backward``: the two big MLP FC weights (64·64·256 → 256) updated inside their
  post-accumulate-grad hook, their gradient dropped at once.
- ``fc_offload``: the FC weights' Adam moments on the CPU (ZeRO-Offload style): their gradient
  leaves the GPU when complete, no moments on the GPU.
- ``ckpt_norms``: ILN/adaILN maths recomputed in backward (``torch.utils.checkpoint``).
- ``ckpt_generators``: every generator call recomputed in backward.
- ``ema_on_cpu``: the EMA copies kept on the CPU (``--ema False`` on the GPU side).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import main as cli  # noqa: E402
import memory  # noqa: E402
import networks  # noqa: E402
from scripts.benchmark import PRESETS, make_dataset, trainer_flags, training_of  # noqa: E402
from ugatit import UGATIT  # noqa: E402

Saving = Callable[[UGATIT], contextlib.AbstractContextManager | None]


def free_grads(trainer: UGATIT) -> None:
    g_step = trainer.g_step

    def g_step_then_free(*args, **kwargs) -> None:
        g_step(*args, **kwargs)
        trainer.G_optim.zero_grad(set_to_none=True)
    trainer.g_step = g_step_then_free


def _fc_weights(trainer: UGATIT) -> list[torch.nn.Parameter]:
    return [g.FC[0].weight for g in trainer.G.values()]


def fc_in_backward(trainer: UGATIT) -> None:
    optim = trainer.G_optim
    group = optim.param_groups[0]

    def update(p: torch.nn.Parameter) -> None:
        state = optim.state[p]
        if not state:
            state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        torch._fused_adam_([p], [p.grad], [state['exp_avg']], [state['exp_avg_sq']], [], [state['step']],
                           lr=group['lr'], beta1=group['betas'][0], beta2=group['betas'][1],
                           weight_decay=group['weight_decay'], eps=group['eps'], amsgrad=False, maximize=False)
        p.grad = None   # the optimizer step that follows skips it
    for weight in _fc_weights(trainer):
        weight.register_post_accumulate_grad_hook(update)


def fc_offload(trainer: UGATIT) -> None:
    for weight in _fc_weights(trainer):
        weight.register_post_accumulate_grad_hook(lambda p: setattr(p, 'grad', None))


def ckpt_norms(_trainer: UGATIT) -> contextlib.AbstractContextManager:
    mix = networks._layer_instance_mix
    return mock.patch.object(networks, '_layer_instance_mix',
                             lambda *args, **kwargs: checkpoint(mix, *args, use_reentrant=False, **kwargs))


def ckpt_generators(trainer: UGATIT) -> None:
    for name, generator in list(trainer.G_run.items()):
        trainer.G_run[name] = lambda x, g=generator: checkpoint(g, x, use_reentrant=False)


SAVINGS: dict[str, Saving] = {saving.__name__: saving for saving in
                              (free_grads, fc_in_backward, fc_offload, ckpt_norms, ckpt_generators)}
FLAG_SAVINGS = {'ema_on_cpu': ['--ema', 'False']}


def simulate(config: str, names: list[str], amp: str, batch_size: int, steps: int, data: Path) -> memory.MemoryReport:
    """The estimate of ``config`` with the named savings applied (before the first step)."""
    extra = [flag for name in names for flag in FLAG_SAVINGS.get(name, [])]
    flags = trainer_flags(PRESETS[config], extra, data, data / 'results', 'cuda', amp, batch_size, False, False)
    with memory.assume_cuda():
        cfg = cli.parse_args(flags)
    with contextlib.ExitStack() as stack:
        def build(cfg) -> memory.Training:
            trainer = UGATIT(cfg)
            for name in names:
                if name in SAVINGS and (context := SAVINGS[name](trainer)) is not None:
                    stack.enter_context(context)
            return training_of(trainer)
        return memory.estimate(cfg, build, steps=steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default='full256', choices=list(PRESETS))
    parser.add_argument('--amp', default='off', choices=('off', 'bf16', 'fp16'))
    parser.add_argument('--batch_size', type=int, default=1)
    parser.add_argument('--steps', type=int, default=3, help='steps estimated (3: two after the first)')
    parser.add_argument('--savings', default=',free_grads,fc_in_backward',
                        help=f'comma-separated combinations of +-joined savings ("" = none): '
                             f'{", ".join([*SAVINGS, *FLAG_SAVINGS])}')
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix='ugatit-savings-') as tmp:
        data = make_dataset(Path(tmp) / 'data')
        for combination in args.savings.split(','):
            names = [name for name in combination.split('+') if name]
            unknown = set(names) - set(SAVINGS) - set(FLAG_SAVINGS)
            if unknown:
                raise SystemExit(f'error: unknown saving(s) {sorted(unknown)}')
            report = simulate(args.config, names, args.amp, args.batch_size, args.steps, data)
            print(f'{"+".join(names) or "none":45s} {report.summary()}', flush=True)


if __name__ == '__main__':
    main()
