"""Small shared pieces: seeding and RNG state, EMA, autocast, file sizes and hashes, plain config values.

Everything with a concern of its own lives in its own module: errors (``errors.py``), torchrun and
DDP (``distributed.py``), stop signals (``signals.py``), checkpoint I/O (``checkpoints.py``), the run
folder (``run_folder.py``), the loss meter (``training_loop.py``), image arrays (``images.py``).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

# ----------------------------------------------------------------------------------------------
# Seeding and RNG state


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Global RNG states as tensors and plain Python values (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    state = {
        'torch': torch.get_rng_state(),
        'python': list(random.getstate()[1]) + [random.getstate()[2] or 0],
        'numpy_keys': torch.from_numpy(np_state[1].astype(np.int64)),
        'numpy_pos': int(np_state[2]),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where devices match)."""
    torch.set_rng_state(state['torch'])
    py = state['python']
    random.setstate((3, tuple(py[:-1]), py[-1] or None))
    np.random.set_state(('MT19937', state['numpy_keys'].numpy().astype(np.uint32), state['numpy_pos'], 0, 0.0))
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


# ----------------------------------------------------------------------------------------------
# EMA


class EMA:
    """Exponential moving average of a network's weights (EN's ``--ema_beta``/``--ema_start``),
    with StyleGAN2-ADA's ramp-up of the averaging horizon.

    Until ``start_step`` the average is a copy of the weights; afterwards
    θ_ema ← β_t·θ_ema + (1−β_t)·θ. β_t is ``beta`` (EN's long-run decay), except early in training:
    with ``rampup`` r the half-life (in steps) is at most r·step, i.e.
    β_t = min(beta, 0.5^(1/(r·step))), so a short run averages its recent weights instead of
    staying near the weights of ``start_step``. Buffers are always copied. Runs without autograd
    (EN ran it with autograd on, growing a graph every step).
    """

    def __init__(self, model: nn.Module, beta: float, start_step: int, rampup: float | None = None, *,
                 decay_on_device: bool = False) -> None:
        self.beta = beta
        self.start_step = start_step
        self.rampup = rampup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.step = 0
        # --cuda_graph: 1 - β_t in a device scalar, set on the host each step, read by the captured update
        device = next(self.model.parameters()).device
        self._weight = torch.zeros((), device=device) if decay_on_device else None

    def beta_at(self, step: int) -> float:
        """The decay used at ``step`` (0: a plain copy)."""
        if step <= self.start_step:
            return 0.0
        if not self.rampup:
            return self.beta
        return min(self.beta, 0.5 ** (1.0 / (self.rampup * step)))

    def set_step(self, step: int) -> None:
        """The step whose decay the next :meth:`update` uses."""
        self.step = step
        if self._weight is not None:
            self._weight.fill_(1.0 - self.beta_at(step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Average ``model`` in at the decay of ``step`` (default: the one :meth:`set_step` set)."""
        if step is not None:
            self.set_step(step)
        beta = self.beta_at(self.step)
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if self._weight is not None:   # one kernel per tensor (no foreach lerp takes a tensor weight); at
            for ema, p in zip(ema_params, params):   # weight 1 (β = 0) lerp gives the copy exactly
                ema.lerp_(p, self._weight)
        elif beta == 0.0:
            torch._foreach_copy_(ema_params, params)
        else:
            torch._foreach_lerp_(ema_params, params, 1.0 - beta)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            ema_buf.copy_(buf)


def autocast(amp: str, device_type: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``--amp off|bf16|fp16``."""
    if amp == 'off':
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16 if amp == 'bf16' else torch.float16)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def human_size(n_bytes: float) -> str:
    for unit in ('B', 'KB', 'MB', 'GB'):
        if n_bytes < 1000 or unit == 'GB':
            return f'{n_bytes:.0f} {unit}' if unit == 'B' else f'{n_bytes:.2f} {unit}'
        n_bytes /= 1000
    raise AssertionError('unreachable')


def file_report(paths: list[Path]) -> list[str]:
    """One line per file: name, size and sha256 (for release notes and download checks)."""
    width = max(len(p.name) for p in paths)
    return [f'{p.name:<{width}}  {human_size(p.stat().st_size):>10}  sha256 {file_sha256(p)}' for p in paths]


def config_to_dict(cfg) -> dict:
    """The resolved flags as plain values (paths as strings), for checkpoints and config.json."""
    items = cfg.items() if isinstance(cfg, Mapping) else vars(cfg).items()
    plain = {}
    for key, value in items:
        if isinstance(value, Path):
            value = str(value)
        if isinstance(value, (list, tuple)):
            value = list(value)
        if value is None or isinstance(value, (bool, int, float, str, list)):
            plain[key] = value
    return plain
