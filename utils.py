"""Small shared pieces: EMA, seeding and RNG state, atomic checkpoint I/O, image grids and heatmaps."""
from __future__ import annotations

import contextlib
import copy
import os
import random
import signal
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch import nn


class UserError(Exception):
    """A problem with the user's input; the CLI prints it on one line and exits with code 2."""


def str2bool(value: str | bool) -> bool:
    """PT's boolean flags, without its substring bug: only the usual spellings are accepted."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ('true', '1', 'yes', 'y', 'on'):
        return True
    if lowered in ('false', '0', 'no', 'n', 'off'):
        return False
    raise ValueError(f'expected a boolean (True/False/1/0/yes/no), got {value!r}')


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

    def __init__(self, model: nn.Module, beta: float, start_step: int, rampup: float | None = None) -> None:
        self.beta = beta
        self.start_step = start_step
        self.rampup = rampup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def beta_at(self, step: int) -> float:
        """The decay used at ``step`` (0: a plain copy)."""
        if step <= self.start_step:
            return 0.0
        if not self.rampup:
            return self.beta
        return min(self.beta, 0.5 ** (1.0 / (self.rampup * step)))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        beta = self.beta_at(step)
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if beta == 0.0:
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


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the old file or the complete new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; other outputs follow the umask
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain containers only), on the CPU.

    Everything read from disk lands on the CPU; callers copy into modules on the device only what
    their phase needs (``load_state_dict`` copies), and RNG states stay the CPU tensors that
    ``torch.set_rng_state`` requires. ``mmap``: map the file instead of reading it, so only the
    tensors used are paged in (inference needs the generators of a 10 GB training state). Only for
    states that are dropped after loading: a mapped tensor kept alive (a resumed optimizer's moments
    on the CPU) would crash the process (SIGBUS) if the file were later rewritten in place. Old
    non-zip files are read as usual.
    """
    if mmap:
        try:
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError as exc:
            if 'zip' not in str(exc):
                raise
    return torch.load(path, map_location='cpu', weights_only=True)


# ----------------------------------------------------------------------------------------------
# Images


def tensor_to_uint8(image: torch.Tensor) -> np.ndarray:
    """C×H×W tensor in [-1, 1] → H×W×3 RGB uint8."""
    array = (image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
    return array.round().byte().permute(1, 2, 0).numpy()


def heatmap_to_uint8(heatmap: torch.Tensor, size: int | tuple[int, int]) -> np.ndarray:
    """CAM heatmap (1×h×w) → JET-coloured RGB uint8 of size×size (or (width, height)), normalised by its range.

    PT divides by the maximum only, which yields NaN for an all-zero map.
    """
    h = heatmap.detach().float().cpu()[0]
    h = h - h.min()
    peak = h.max()
    h = h / peak if peak > 0 else h
    gray = (h.numpy() * 255).astype(np.uint8)
    gray = cv2.resize(gray, (size, size) if isinstance(size, int) else tuple(size))
    return cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def grid(columns: list[list[np.ndarray]]) -> np.ndarray:
    """Stack each column's tiles vertically, then the columns side by side (PT's preview layout)."""
    return np.concatenate([np.concatenate(col, axis=0) for col in columns], axis=1)


def save_rgb(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an H×W×3 RGB uint8 array as an image file (PNG/JPEG by extension), creating folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f'could not write {path}')


def config_to_dict(cfg) -> dict:
    """The resolved flags as plain values (paths as strings), for checkpoints and config.json."""
    items = vars(cfg).items() if not isinstance(cfg, dict) else cfg.items()
    plain = {}
    for key, value in items:
        if isinstance(value, Path):
            value = str(value)
        if isinstance(value, (list, tuple)):
            value = list(value)
        if value is None or isinstance(value, (bool, int, float, str, list)):
            plain[key] = value
    return plain


class LossMeter:
    """Running sums of loss tensors kept on the device; one host sync per flush.

    Each key is averaged over the steps that logged it (with --n_critic > 1 the G losses exist
    only on generator steps).
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        for key, value in logs.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
            self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self) -> dict[str, float]:
        """Interval means as floats (a single device→host copy), then reset."""
        if not self.sums:
            return {}
        keys = list(self.sums)
        values = torch.stack([self.sums[k] / self.counts[k] for k in keys]).cpu().tolist()
        self.sums, self.counts = {}, {}
        return dict(zip(keys, values))


# ----------------------------------------------------------------------------------------------
# Processes: torchrun ranks and signals


class DistributedContext:
    """Rank, world size and device of this process; torchrun sets the environment variables."""

    def __init__(self, device: str) -> None:
        self.world_size = int(os.environ.get('WORLD_SIZE', '1'))
        self.rank = int(os.environ.get('RANK', '0'))
        local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        self.enabled = self.world_size > 1
        if device.startswith('cuda') and self.enabled:
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(local_rank)
        self.device = torch.device(device)
        if self.enabled and not dist.is_initialized():
            dist.init_process_group('nccl' if self.device.type == 'cuda' else 'gloo')

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


class GracefulStop:
    """Turns SIGINT/SIGTERM into a flag so the loop can save a checkpoint before exiting."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under some test runners)
                pass

    def _handle(self, signum, frame) -> None:
        if self.requested:     # a second Ctrl-C exits at once
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def wrap_for_speed(G: nn.ModuleDict, D: nn.ModuleDict, dist_ctx: DistributedContext,
                   compile: bool) -> tuple[dict, dict]:
    """What the training step calls: the raw modules, in DDP wrappers (gradient all-reduce) under
    torchrun, and torch.compile'd with --compile. ``D`` is {domain: {scale: module}}."""
    G_run = dict(G.items())
    D_run = {dom: dict(critic.items()) for dom, critic in D.items()}
    if dist_ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [dist_ctx.device.index] if dist_ctx.device.type == 'cuda' else None
        G_run = {k: DDP(m, device_ids=ids) for k, m in G_run.items()}
        D_run = {dom: {s: DDP(m, device_ids=ids) for s, m in c.items()} for dom, c in D_run.items()}
    if compile:
        G_run = {k: torch.compile(m) for k, m in G_run.items()}
        D_run = {dom: {s: torch.compile(m) for s, m in c.items()} for dom, c in D_run.items()}
    return G_run, D_run
