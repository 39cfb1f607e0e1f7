"""Small shared pieces: EMA, seeding and RNG state, atomic checkpoint I/O, image grids and heatmaps."""
from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import math
import os
import pickle
import random
import shutil
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


class DiskFull(UserError):
    """A checkpoint did not fit on its disk; the partial file is gone, the older ones are intact."""


class UnsafeCheckpoint(UserError):
    """A checkpoint holding pickled Python objects, which ``weights_only`` loading refuses."""


TEMP_SUFFIX = '.tmp'


def temp_pattern(path: Path) -> str:
    """The glob of :func:`atomic_save`'s temporary files for ``path`` (left behind by a kill -9)."""
    return f'.{path.name}.*{TEMP_SUFFIX}'


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the old file or the complete new one, never a torn file; a
    full disk removes the partial file and raises :class:`DiskFull` naming the space needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; other outputs follow the umask
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if _is_disk_full(exc):
            free, needed = human_size(free_bytes(path.parent)), human_size(state_nbytes(obj))
            raise DiskFull(f'no space left for {path.name} in {path.parent}: {free} free, '
                           f'a checkpoint needs {needed}; free some space (older checkpoints, '
                           f'--keep_checkpoints N) and resume with --resume True') from None
        raise


def _is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain: torch's zip writer turns it into a RuntimeError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(folder: str | os.PathLike) -> int:
    """Free space on the disk of ``folder`` (or of its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def state_nbytes(obj: object) -> int:
    """The bytes of the tensors in a (nested) state dict: about the size of its checkpoint file."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


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
    try:
        if mmap:
            try:
                return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
            except RuntimeError as exc:
                if 'zip' not in str(exc):
                    raise
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        raise UnsafeCheckpoint(f'{path} is not a plain tensor checkpoint: it holds pickled Python objects, and it is '
                               f'not unpickled because unpickling can run arbitrary code') from None


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
    only on generator steps). With ``skip_nonfinite`` (fp16: the GradScaler skips a step whose
    scaled gradients overflowed, so its losses may be inf/nan without harm to the weights)
    non-finite values are left out of the means, and ``nonfinite_streak`` counts the steps in a row,
    up to the last flush, whose losses were not all finite.
    """

    def __init__(self, skip_nonfinite: bool = False) -> None:
        self.skip_nonfinite = skip_nonfinite
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor | int] = {}
        self._streak: torch.Tensor | None = None
        self.nonfinite_streak = 0

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        all_finite = None
        for key, value in logs.items():
            value = value.detach().float()
            count: torch.Tensor | int = 1
            if self.skip_nonfinite:
                finite = torch.isfinite(value)
                value, count = torch.where(finite, value, 0.0), finite.float()
                all_finite = finite if all_finite is None else all_finite & finite
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
            self.counts[key] = self.counts.get(key, 0) + count
        if all_finite is not None:   # on the device: (streak + 1) on a bad step, 0 on a good one
            streak = self._streak if self._streak is not None else torch.zeros_like(all_finite, dtype=torch.float32)
            self._streak = (streak + 1) * (~all_finite)

    def flush(self) -> dict[str, float]:
        """Interval means as floats (a single device→host copy), then reset. Keys without a finite
        value in the interval are left out under ``skip_nonfinite``."""
        if not self.sums:
            return {}
        keys = list(self.sums)
        parts = [self.sums[k] / self.counts[k] for k in keys]
        if self._streak is not None:
            parts.append(self._streak)
        values = torch.stack(parts).cpu().tolist()
        if self._streak is not None:
            self.nonfinite_streak = int(values.pop())
        self.sums, self.counts = {}, {}
        means = dict(zip(keys, values))
        if self.skip_nonfinite:
            means = {k: v for k, v in means.items() if math.isfinite(v)}
        return means


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


class Stopped(Exception):
    """The run stopped on a signal after saving a checkpoint; ``exit_code`` tells a job script why."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# SIGUSR1 is what SLURM's --signal sends before a time limit: exit status 3 means "requeue me and
# resume". SIGINT/SIGTERM exit as a process killed by them would (128 + signal number).
REQUEUE_EXIT_CODE = 3
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def stop_exit_code(signum: int) -> int:
    return REQUEUE_EXIT_CODE if signum == signal.SIGUSR1 else 128 + signum


class GracefulStop:
    """Records the first of SIGINT/SIGTERM/SIGUSR1 (``signum``) so the loop can save a checkpoint
    before exiting."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under some test runners)
                pass

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:     # a second Ctrl-C exits at once
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def untrainable_parameters(D: nn.ModuleDict, cam_D_weight: float, regularisers: list | None = None
                           ) -> list[nn.Parameter]:
    """The discriminator parameters no loss term of the config reaches, for :func:`wrap_for_speed`.

    At ``--cam_D_weight`` <= 0 the losses drop D's CAM logits and ``build_critic`` switches CAM
    attention off, so the CAM FCs (PT's ``gap_fc``/``gmp_fc``, TF's ``cam``) produce nothing a loss
    reads -- except kernels one of ``regularisers`` covers (TF's L2 term: objects with ``.params``),
    which still get its gradient every step. Every other parameter of every config gets a gradient in
    each backward of its network (``tests/test_distributed.py`` checks the table of features).
    """
    if cam_D_weight > 0:
        return []
    regularised = {id(p) for term in regularisers or [] for p in term.params}
    return [p for critic in D.values() for net in critic.values() for name in ('gap_fc', 'gmp_fc', 'cam')
            if hasattr(net, name) for p in getattr(net, name).parameters() if id(p) not in regularised]


def _ddp(module: nn.Module, ids: list[int] | None, untrained: set[int]) -> nn.Module:
    """DDP over ``module``, leaving the parameters in ``untrained`` (ids) out of its gradient all-reduce.

    DDP's reducer waits for a gradient of every parameter it tracks in each backward; one that never
    comes makes the next forward fail ("Expected to have finished reduction in the prior iteration"),
    and ``find_unused_parameters`` is no way out: it walks the graph of each forward separately (G and
    the unstacked D run several forwards per backward) and breaks on parameters used outside forward
    (TF's L2 term). So what a config cannot train is left out, and a hook fails the step loudly should
    one of them get a gradient after all: it would not be averaged, and the ranks would drift apart.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP
    skipped = [(name, p) for name, p in module.named_parameters() if id(p) in untrained]
    for name, p in skipped:
        p.register_post_accumulate_grad_hook(_fail_on_gradient(name))
    DDP._set_params_and_buffers_to_ignore_for_model(module, [name for name, _ in skipped])
    return DDP(module, device_ids=ids)


def _fail_on_gradient(name: str):
    def hook(param: torch.Tensor) -> None:
        raise RuntimeError(f'{name} is left out of the DDP gradient all-reduce as untrainable under this config '
                           f'(utils.untrainable_parameters), but it received a gradient: the rule is wrong')
    return hook


def wrap_for_speed(G: nn.ModuleDict, D: nn.ModuleDict, dist_ctx: DistributedContext, compile: bool,
                   untrained: list[nn.Parameter] | None = None) -> tuple[dict, dict, dict]:
    """What the training step calls: the raw modules, in DDP wrappers (gradient all-reduce) under
    torchrun, and torch.compile'd with --compile. ``D`` is {domain: {scale: module}}. Returns
    (G, D, D for the generator step): the G step's critic needs no all-reduce of D's gradients
    (D is frozen then), so it is the compiled module without DDP.

    ``untrained`` (:func:`untrainable_parameters`) are the parameters no loss of the config reaches:
    DDP must not wait for their gradients. Everything else rests on every rank computing the same:
    identical initial weights (one seed), averaged gradients, hence identical Adam updates, ρ clipping
    and EMA; ADA all-reduces its r_t counts; DDP broadcasts rank 0's buffers (spectral norm's u, v)
    before each forward, before the power iteration runs on them.
    """
    G_run = dict(G.items())
    D_local = {dom: dict(critic.items()) for dom, critic in D.items()}
    if compile:
        D_local = {dom: {s: torch.compile(m) for s, m in c.items()} for dom, c in D_local.items()}
    D_run = D_local
    if dist_ctx.enabled:
        ids = [dist_ctx.device.index] if dist_ctx.device.type == 'cuda' else None
        skip = {id(p) for p in untrained or []}
        G_run = {k: _ddp(m, ids, skip) for k, m in G_run.items()}
        D_run = {dom: {s: _ddp(m, ids, skip) for s, m in c.items()} for dom, c in D.items()}
        if compile:
            D_run = {dom: {s: torch.compile(m) for s, m in c.items()} for dom, c in D_run.items()}
    if compile:
        G_run = {k: torch.compile(m) for k, m in G_run.items()}
    return G_run, D_run, D_local
