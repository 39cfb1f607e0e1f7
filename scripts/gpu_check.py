"""One command that runs every device-sensitive path of the project for real and prints a table.

Usage (from the repository root)::

    python scripts/gpu_check.py --device cuda [--out results/gpu_check] [--only 'resume-*,benchmark-*']
        [--skip compile] [--budget_s 420] [--jobs 6] [--keep_work]
    python scripts/gpu_check.py --device cpu      # the same paths, small; part of the test suite

Every row runs ``main.py`` (or ``scripts/benchmark.py``, ``scripts/export.py``, ``demo.py``'s translate
call, ``torchrun``) as a subprocess on a small generated dataset:

- ``resume-<gan>-<amp>-nc<n>`` for lsgan and wgan-gp × ``--amp off|bf16|fp16`` × ``--n_critic 1|2``: an
  unbroken run, then a run killed with SIGKILL once its first periodic checkpoint exists, ``--resume True``
  to the end, and ``--phase test`` on the result. The resumed final weights must equal the unbroken run's
  bit for bit on the CPU; on CUDA (not deterministic) the difference is reported, and fails only when it
  is not finite or half as large as the training's own movement since the checkpoint. On the CPU fp16
  skips, and two of the eight other combinations (each value once) run unless ``--full``.
- ``benchmark-*``: ``scripts/benchmark.py`` against the reference step in the same process (CUDA: full and
  light 256 px, ``--amp off,bf16,fp16``; CPU: the tiny config, off and bf16); its table is printed too.
- ``low-memory``: ``--optim_state 8bit --ema_dtype bf16`` killed and resumed as above (torchao compiles
  its step: on the CPU only with ``UGATIT_SLOW_TESTS=1``).
- ``memory-full256`` (CUDA): the full model's peak memory at batch 1, defaults and ``--recompute True``,
  measured (``scripts/benchmark.py --estimate``) next to ``memory.estimate``'s figure.
- ``cuda-graph`` (CUDA): ``--cuda_graph True`` against an eager run, and killed, resumed and tested;
  ``cuda-graph-full256`` (CUDA, alone): the captured full-model step at batch 1 timed against the reference
  and the eager step (``scripts/benchmark.py --cuda_graph``).
- ``recompute`` (``--recompute True``) and ``ada``, each killed and resumed as above, ``channels_last``,
  ``compile`` (on the CPU only with ``UGATIT_SLOW_TESTS=1``: minutes of compilation), ``faceseg`` and
  ``facenet`` (random weights written to a file, as a user's downloaded ones), ``ddp`` and
  ``ddp-cam_D_off`` (torchrun, 2 processes: on CUDA only with 2 devices, on the CPU over gloo; ``ddp``
  also resumes on CUDA and with ``--full``), ``export``, ``onnx`` and ``demo`` (from a checkpoint
  trained on the device).

Rows run ``--jobs`` at a time in this order: compile (it compiles for minutes, so it starts first), the
resume rows, the benchmark rows (on CUDA alone, once the rows before them have ended), the other
features. A row that would start after ``--budget_s`` is reported as skipped; rows still running
``--grace_s`` later are stopped. The table (row, pass/fail/skip, seconds, s/it, peak memory, note) and a
JSON go to ``--out`` after every row, so a run cut short still leaves its results. Exit status 1 when
any row failed. Peak memory comes from each child process itself: a ``sitecustomize`` put first on the
children's PYTHONPATH records ``torch.cuda.max_memory_allocated`` (CUDA) and the peak RSS as the
process exits.
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))   # the project's modules (faceseg's BiSeNet, for its random weights)
from checkpoints import PT_KEYS as NETWORK_KEYS  # noqa: E402
from run_folder import LOGS_DIR, RunFiles  # noqa: E402

WEIGHT_KEYS = (*NETWORK_KEYS, 'genA2B_ema', 'genB2A_ema')   # every network a training checkpoint holds
MEMORY_NOTE = ('peak MB: the largest torch.cuda.max_memory_allocated of the row\'s processes (CUDA) or the '
               'largest peak RSS (ru_maxrss) of its processes (CPU), read as each process exits')

# Loaded by every Python child through PYTHONPATH: the children run unmodified commands, and each records
# its own peak memory as it exits (a SIGKILLed process records nothing; none of them is needed).
MEMORY_HOOK = '''"""Written by scripts/gpu_check.py: record this process's peak memory at exit."""
import atexit, json, os, resource, sys


def _gpu_check_record():
    folder = os.environ.get('GPU_CHECK_MEM_DIR')
    if not folder or not os.path.isdir(folder):
        return
    cuda = None
    torch = sys.modules.get('torch')
    try:
        if torch is not None and torch.cuda.is_initialized():
            cuda = torch.cuda.max_memory_allocated()
    except Exception:
        pass
    record = {'argv': sys.argv[:2], 'cuda_peak_bytes': cuda,
              'rss_peak_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    with open(os.path.join(folder, '%d.json' % os.getpid()), 'w') as f:
        json.dump(record, f)


atexit.register(_gpu_check_record)

# A sitecustomize further down the path (a distribution's) still runs.
import importlib.machinery, importlib.util
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    'sitecustomize', [p for p in sys.path if os.path.abspath(p or '.') != _here])
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
'''


class Skip(Exception):
    """The row cannot run here (missing package, device); the message says why."""


class Failure(Exception):
    """The row failed; the message is one line, ``log`` the tail of the failing command's stderr."""

    def __init__(self, message: str, log: str = '') -> None:
        super().__init__(message)
        self.log = log


class BudgetStop(Exception):
    """The hard end of the time budget stopped the row."""


@dataclass
class Result:
    """One table row."""

    name: str
    status: str = 'pending'     # pass, fail, skip
    seconds: float = 0.0
    s_per_it: float | None = None
    peak_mb: float | None = None
    note: str = ''
    log_tail: str = ''


@dataclass
class Row:
    """A named check: ``run(ctx, row_run)`` returns (s/it, note) or raises Skip/Failure."""

    name: str
    run: Callable[[Context, RowRun], tuple[float | None, str]]
    timeout_s: float
    alone: bool = False


@dataclass
class Context:
    """What every row shares: device, model flags, dataset, work folder, time limits, shared artefacts."""

    device: str
    work: Path
    data: Path
    jobs: int
    start: float
    budget_s: float
    grace_s: float
    full: bool = False
    bench_batch: str = '1'
    hook_dir: Path | None = None
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _shared: dict[str, object] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.startswith('cuda')

    @property
    def hard_deadline(self) -> float:
        return self.start + self.budget_s + self.grace_s

    def model_flags(self) -> list[str]:
        """CPU: the tests' 32-px model (tens of ms a step). CUDA: a 64-px light model with ch 32 and
        batch 2, so that checkpoints (0.37 GB) and steps stay short."""
        if self.cuda:
            return ['--light', 'True', '--ch', '32', '--n_res', '4', '--img_size', '64', '--n_global_dis', '5',
                    '--n_local_dis', '4', '--batch_size', '2', '--num_workers', '2']
        return ['--light', 'True', '--ch', '4', '--n_res', '1', '--img_size', '32', '--n_global_dis', '4',
                '--n_local_dis', '3', '--num_workers', '0']

    def schedule(self) -> tuple[int, int]:
        """(steps, checkpoint interval) of the training rows."""
        return (6, 3) if self.cuda else (6, 2)

    def main_cmd(self, result_dir: Path, *flags: str) -> list[str]:
        steps, every = self.schedule()
        return [sys.executable, 'main.py', '--dataset', str(self.data), '--result_dir', str(result_dir),
                '--device', self.device, '--seed', '0', *self.model_flags(), '--iteration', str(steps),
                '--save_freq', str(every), '--print_freq', str(steps), '--log_freq', '1', '--latest_freq', '0',
                *flags]

    def test_cmd(self, result_dir: Path, *flags: str) -> list[str]:
        return [sys.executable, 'main.py', '--phase', 'test', '--dataset', str(self.data), '--result_dir',
                str(result_dir), '--device', self.device, '--num_workers', '0', *flags]

    def threads(self, alone: bool) -> int:
        cores = os.cpu_count() or 1
        return cores if alone else max(1, cores // self.jobs)

    def shared(self, key: str, make: Callable[[], object]) -> object:
        """``make()`` once per key, whichever row asks first; a failure is re-raised to every asker."""
        lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._shared:
                try:
                    self._shared[key] = make()
                except (Failure, Skip, BudgetStop) as exc:
                    self._shared[key] = exc
            value = self._shared[key]
        if isinstance(value, Exception):
            raise value
        return value


class RowRun:
    """One row's folder, time limit and commands (stdout and stderr of each kept in the folder)."""

    def __init__(self, ctx: Context, name: str, timeout_s: float, alone: bool = False) -> None:
        self.ctx, self.timeout_s, self.alone = ctx, timeout_s, alone
        self.dir = ctx.work / name
        self.mem_dir = self.dir / 'mem'
        self.mem_dir.mkdir(parents=True, exist_ok=True)
        self.deadline = min(time.monotonic() + timeout_s, ctx.hard_deadline)
        self.count = 0
        self.started: dict[int, float] = {}

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
        threads = str(self.ctx.threads(self.alone))
        path = [str(self.ctx.hook_dir), str(ROOT), env.get('PYTHONPATH', '')]
        env.update(GPU_CHECK_MEM_DIR=str(self.mem_dir), OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
                   PYTHONPATH=os.pathsep.join(p for p in path if p), GRADIO_ANALYTICS_ENABLED='False')
        return env

    def start(self, label: str, cmd: list[str]) -> tuple[subprocess.Popen, Path]:
        """Start ``cmd`` in the repository root; its command line, stdout and stderr go to the row folder."""
        self.count += 1
        stem = self.dir / f'{self.count:02d}-{label}'
        stem.with_suffix('.cmd').write_text(' '.join(cmd) + '\n')
        with open(stem.with_suffix('.out'), 'w') as out, open(stem.with_suffix('.err'), 'w') as err:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdout=out, stderr=err, start_new_session=True)
        self.started[proc.pid] = time.monotonic()
        return proc, stem.with_suffix('.err')

    def finished(self, proc: subprocess.Popen, err: Path) -> None:
        """Note the command's wall time and exit status beside its command line."""
        seconds = time.monotonic() - self.started.pop(proc.pid, time.monotonic())
        with open(err.with_suffix('.cmd'), 'a') as f:
            f.write(f'# exit {proc.returncode} after {seconds:.1f} s\n')

    def timed_out(self, proc: subprocess.Popen, label: str, err: Path) -> Exception:
        stop_group(proc)
        self.finished(proc, err)
        if self.deadline >= self.ctx.hard_deadline:
            return BudgetStop(f'{label}: stopped at the end of the time budget')
        return Failure(f'{label}: timed out after {self.timeout_s:.0f} s', tail(err))

    def wait(self, proc: subprocess.Popen, label: str, err: Path) -> None:
        try:
            proc.wait(timeout=max(0.1, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise self.timed_out(proc, label, err) from None
        self.finished(proc, err)
        if proc.returncode != 0:
            raise Failure(f'{label}: exit {proc.returncode}: {last_line(err)}', tail(err))

    def run(self, label: str, cmd: list[str]) -> str:
        """Run to completion; the command's stdout. Non-zero exit: Failure with its error line."""
        proc, err = self.start(label, cmd)
        self.wait(proc, label, err)
        return err.with_suffix('.out').read_text()

    def run_and_kill(self, label: str, cmd: list[str], checkpoint: Path) -> str:
        """Start a training run and SIGKILL it as soon as ``checkpoint`` exists. Returns a note when the
        run ended before the kill came (a fast device): its last checkpoint is then deleted instead."""
        proc, err = self.start(label, cmd)
        while not checkpoint.exists() and proc.poll() is None:
            if time.monotonic() > self.deadline:
                raise self.timed_out(proc, label, err)
            time.sleep(0.002)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)   # the training process alone, as a user's kill -9
        proc.wait()
        stop_group(proc)                        # then its data-loader workers, if any are left
        if proc.returncode == -signal.SIGKILL:
            self.finished(proc, err)
            return ''
        self.wait(proc, label, err)             # raises the run's error, if any
        if not checkpoint.exists():
            raise Failure(f'{label}: ended without writing {checkpoint.name}', tail(err))
        return 'the run ended before the kill came, so its last checkpoint was deleted instead'

    def peak_mb(self) -> float | None:
        records = [json.loads(p.read_text()) for p in self.mem_dir.glob('*.json')]
        key = 'cuda_peak_bytes' if self.ctx.cuda else 'rss_peak_bytes'
        values = [r[key] for r in records if r.get(key)]
        return max(values) / 2 ** 20 if values else None


def stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


ERROR_LINE = re.compile(r'^error:|\b\w*(Error|Exception)\b: ')


def last_line(path: Path) -> str:
    """The error line of a command's stderr: the last exception or 'error:' line (torchrun's own
    ChildFailedError comes after the ranks' errors), else the last line."""
    try:
        lines = [line.strip() for line in path.read_text(errors='replace').replace('\r', '\n').splitlines()]
    except OSError:
        return '(no stderr)'
    lines = [line for line in lines if line]
    errors = [line for line in lines if ERROR_LINE.search(line) and 'ChildFailedError' not in line]
    found = errors[-1] if errors else lines[-1] if lines else '(no stderr)'
    return found[:300]


def tail(path: Path, n: int = 30) -> str:
    try:
        return '\n'.join(path.read_text(errors='replace').replace('\r', '\n').splitlines()[-n:])
    except OSError:
        return ''


# ----------------------------------------------------------------------------------------------
# What the rows check


def checkpoint(result_dir: Path, data: Path, step: int) -> Path:
    return RunFiles(result_dir, data.name).checkpoint_path(step)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    return {f'{key}.{name}': value.float() for key in WEIGHT_KEYS if key in state
            for name, value in state[key].items() if value.is_floating_point()}


def resume_difference(unbroken: Path, resumed: Path, at_kill: Path) -> tuple[float, float]:
    """(max |resumed − unbroken|, mean |resumed − unbroken| ÷ mean |unbroken − its weights at the kill
    checkpoint|): the second compares the difference with how far training moved the weights meanwhile."""
    a, b, k = load_weights(unbroken), load_weights(resumed), load_weights(at_kill)
    if a.keys() != b.keys():
        extra = sorted(a.keys() ^ b.keys())[:3]
        raise Failure(f'the resumed checkpoint holds other tensors than the unbroken one: {extra}')
    diffs = [(a[n] - b[n]).abs() for n in a]
    moved = torch.cat([(a[n] - k[n]).abs().flatten() for n in a]).mean().item()
    biggest = max(d.max().item() for d in diffs)
    mean = torch.cat([d.flatten() for d in diffs]).mean().item()
    return biggest, (mean / moved if moved > 0 else float('inf') if mean > 0 else 0.0)


def seconds_per_step(logs: Path) -> float | None:
    """Median interval between consecutive logged steps (``--log_freq 1``) after the first, from the
    TensorBoard event times: steady-state s/it, with checkpoint writes and warm-up outliers dropped."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    times: dict[int, float] = {}
    for events in sorted(logs.glob('events.out.tfevents.*')):
        acc = EventAccumulator(str(events), size_guidance={'scalars': 0})
        acc.Reload()
        if 'D/total' in acc.Tags().get('scalars', []):
            for event in acc.Scalars('D/total'):
                times.setdefault(event.step, event.wall_time)
    steps = sorted(times)
    gaps = [times[b] - times[a] for a, b in zip(steps[1:], steps[2:]) if b == a + 1]
    return statistics.median(gaps) if gaps else None


def check_test_outputs(result_dir: Path, data: Path) -> None:
    expected = len(list((data / 'testA').iterdir()))
    written = list(RunFiles(result_dir, data.name).phase_output('test').joinpath('A2B').glob('*.png'))
    if len(written) != expected:
        raise Failure(f'--phase test wrote {len(written)} A2B images, expected {expected}')


def resume_cycle(ctx: Context, row: RowRun, *flags: str,
                 schedule: tuple[int, int] | None = None) -> tuple[float | None, str]:
    """Unbroken run; run killed after its first checkpoint; resume; test; compare final weights.
    ``schedule``: (steps, checkpoint interval) other than the context's."""
    steps, every = schedule or ctx.schedule()
    if schedule:
        flags = (*flags, '--iteration', str(steps), '--save_freq', str(every), '--print_freq', str(steps))
    unbroken, broken = row.dir / 'unbroken', row.dir / 'broken'
    row.run('unbroken', ctx.main_cmd(unbroken, *flags))
    note = row.run_and_kill('killed', ctx.main_cmd(broken, *flags), checkpoint(broken, ctx.data, every))
    final = checkpoint(broken, ctx.data, steps)
    if note:
        final.unlink()   # as if killed before the last checkpoint
    row.run('resume', ctx.main_cmd(broken, *flags, '--resume', 'True'))
    row.run('test', ctx.test_cmd(broken))
    check_test_outputs(broken, ctx.data)
    biggest, relative = resume_difference(checkpoint(unbroken, ctx.data, steps), final,
                                          checkpoint(unbroken, ctx.data, every))
    if not np.isfinite(biggest) or not np.isfinite(relative):
        raise Failure(f'non-finite weights after resume (max |Δ| {biggest}, relative {relative})')
    if not ctx.cuda and biggest != 0:
        raise Failure(f'resumed weights differ from the unbroken run on the CPU: max |Δ| {biggest:.3g}')
    if ctx.cuda and relative >= 0.5:
        raise Failure(f'resumed run does not continue the unbroken one: mean |Δ| is {relative:.2f} of the '
                      f'weights\' movement since step {every} (max |Δ| {biggest:.3g})')
    exact = 'resumed = unbroken bit for bit' if biggest == 0 else \
        f'resumed vs unbroken: max |Δ| {biggest:.2g}, mean |Δ| {relative:.2g} of the movement since step {every}'
    logs = RunFiles(unbroken, ctx.data.name).run_dir / LOGS_DIR
    return seconds_per_step(logs), '; '.join(filter(None, [exact, note]))


def train_and_test(ctx: Context, row: RowRun, *flags: str,
                   test: tuple[str, ...] | None = ()) -> tuple[float | None, str]:
    """Train with ``flags``, then (unless ``test`` is None) run the test phase with the flags in ``test``."""
    out = row.dir / 'run'
    row.run('train', ctx.main_cmd(out, *flags))
    if test is not None:
        row.run('test', ctx.test_cmd(out, *test))
        check_test_outputs(out, ctx.data)
    return seconds_per_step(RunFiles(out, ctx.data.name).run_dir / LOGS_DIR), ''


def needs(*modules: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise Skip(f'{module} is not installed (pip install -r requirements-extras.txt / requirements.txt)')


def shared_checkpoint(ctx: Context) -> Path:
    """A 2-step run trained on the device with EMA weights, for export, ONNX and demo."""
    def make() -> Path:
        row = RowRun(ctx, 'shared-checkpoint', 180)
        out = row.dir / 'run'
        row.run('train', ctx.main_cmd(out, '--iteration', '2', '--save_freq', '2', '--ema_start', '0'))
        return checkpoint(out, ctx.data, 2)
    try:
        return ctx.shared('checkpoint', make)
    except Failure as exc:
        raise Failure(f'the shared 2-step training failed: {exc}', exc.log) from None


def weight_file(ctx: Context, kind: str) -> Path:
    """Random FaceNet or BiSeNet weights saved to a file, loaded through the flags as a user's would be."""
    def make() -> Path:
        path = ctx.work / f'{kind}.pt'
        torch.manual_seed(0)
        if kind == 'facenet':
            from facenet_pytorch import InceptionResnetV1
            torch.save(InceptionResnetV1(classify=False).state_dict(), path)
        else:
            from faceseg import BiSeNet
            torch.save(BiSeNet(19).state_dict(), path)
        return path
    return ctx.shared(kind, make)


# ----------------------------------------------------------------------------------------------
# The rows


def resume_row(gan: str, amp: str, n_critic: int, cpu_subset: bool) -> Callable:
    def run(ctx: Context, row: RowRun) -> tuple[float | None, str]:
        if amp == 'fp16' and not ctx.cuda:
            raise Skip('--amp fp16 needs CUDA')
        if not ctx.cuda and not cpu_subset and not ctx.full:
            raise Skip('the quick CPU run covers each value in two rows (--full: every combination)')
        return resume_cycle(ctx, row, '--gan_type', gan, '--amp', amp, '--n_critic', str(n_critic))
    return run


def benchmark_row(config: str) -> Callable:
    def run(ctx: Context, row: RowRun) -> tuple[float | None, str]:
        out = row.dir / 'benchmark.json'
        # On an H200 the first run's 10 iterations with the FLOP count outran the budget: 5 and no count
        # (scripts/benchmark.py run directly gives the FLOPs).
        amps, iters = ('off,bf16,fp16', ['--iters', '5', '--warmup', '2', '--no_flops']) if ctx.cuda else \
            ('off,bf16', ['--iters', '2', '--warmup', '1', '--no_flops'])
        printed = row.run('benchmark', [sys.executable, 'scripts/benchmark.py', '--device', ctx.device,
                                        '--configs', config, '--amp', amps, '--batch_size', ctx.bench_batch,
                                        *iters, '--json', str(out)])
        table = printed[printed.find('U-GAT-IT benchmark:'):] if 'U-GAT-IT benchmark:' in printed else printed
        (row.dir / 'table.txt').write_text(''.join(line for line in table.splitlines(keepends=True)
                                                   if not line.startswith('wrote ')))
        measured = [r for r in json.loads(out.read_text())['rows'] if r['fast']]
        if not measured:
            raise Failure('the benchmark measured no row')
        # The fastest amp mode at the first batch size; the test phase at the largest batch.
        best = min((r for r in measured if r['batch_size'] == measured[0]['batch_size']),
                   key=lambda r: r['fast']['s_per_it'])
        speedup = f', {best["speedup"]:.2f}x the reference step' if best['speedup'] else ''
        memory = f', peak memory {best["mem_ratio"]:.2f}x the reference\'s' if best['mem_ratio'] else ''
        test = max(measured, key=lambda r: (r['batch_size'], r['test_img_per_s']))
        return best['fast']['s_per_it'], (f'best --amp {best["amp"]} at batch {best["batch_size"]}{speedup}{memory}; '
                                           f'test phase {test["test_img_per_s"]:.0f} img/s at batch '
                                           f'{test["batch_size"]} (--amp {test["amp"]}); table below')
    return run


def ada(ctx: Context, row: RowRun) -> tuple[float | None, str]:
    return resume_cycle(ctx, row, '--ada', 'True', '--ada_p', '0.3', '--ada_interval', '1')


def channels_last(ctx: Context, row: RowRun) -> tuple[float | None, str]:
    return train_and_test(ctx, row, '--channels_last', 'True', '--amp', 'bf16')


def compile_row(ctx: Context, row: RowRun) -> tuple[float | None, str]:
    if not ctx.cuda and os.environ.get('UGATIT_SLOW_TESTS') != '1':
        raise Skip('minutes of compilation on a CPU: set UGATIT_SLOW_TESTS=1')
    return train_and_test(ctx, row, '--compile', 'True', '--iteration', '10', test=('--compile', 'True'))


def low_memory_row(ctx: Context, row: RowRun) -> tuple[float | None, str]:
    """--optim_state 8bit --ema_dtype bf16 (torchao's compiled low-bit Adam): kill, resume, test."""
    if not ctx.cuda and os.environ.get('UGATIT_SLOW_TESTS') != '1':
        raise Skip("minutes of compiling torchao's step on a CPU: set UGATIT_SLOW_TESTS=1")
    needs('torchao')
    return resume_cycle(ctx, row, '--optim_state', '8bit', '--ema_dtype', 'bf16')


def recompute_row(ctx: Context, row: RowRun) -> tuple[float | None, str]:
    """--recompute True (generators and norms recomputed, the big layer updated from its factors): kill,
    resume, test."""
    return resume_cycle(ctx, row, '--recompute', 'True')


def memory_row(ctx: Context, row: RowRun) -> tuple[float | None, str]:
    """The full model's peak memory, default and --recompute, measured next to memory.estimate's figure."""
    if not ctx.cuda:
        raise Skip("the estimate models CUDA's allocator: measured against it on a CUDA device only")
    notes, s_per_it = [], None
    for flags in ('', '--recompute True'):
        out = row.dir / f'memory{len(notes)}.json'
        row.run('memory', [sys.executable, 'scripts/benchmark.py', '--device', ctx.device, '--configs', 'full256',
                           '--flags', flags, '--iters', '2', '--warmup', '3', '--no_flops', '--no_reference',
                           '--estimate', '--json', str(out)])
        result = json.loads(out.read_text())['rows'][0]
        measured, estimated = result['fast']['gpu_peak_bytes'], result['estimate']['fast']['peak_bytes']
        s_per_it = s_per_it or result['fast']['s_per_it']
        notes.append(f'{flags or "defaults"}: measured {measured / 2 ** 30:.2f} GiB, estimated '
                     f'{estimated / 2 ** 30:.2f} ({100 * (estimated / measured - 1):+.1f}%), '
                     f'{result["fast"]["s_per_it"]:.3f} s/it')
    return s_per_it, '; '.join(notes)


def cuda_graph_row(ctx: Context, row: RowRun) -> tuple[float | None, str]:
    """--cuda_graph (12 steps, a checkpoint every 4) killed after step 4 and resumed (warm-up 5-7, capture at
    8, replays 9-12), then tested; its unbroken run against an eager one with the same seed."""
    if not ctx.cuda:
        raise Skip('CUDA graphs need CUDA (the CPU tests replay an emulated graph: tests/test_cuda_graph.py)')
    eager = row.dir / 'eager'
    row.run('eager', ctx.main_cmd(eager, '--iteration', '12', '--save_freq', '4', '--print_freq', '12'))
    graph_s, resumed = resume_cycle(ctx, row, '--cuda_graph', 'True', schedule=(12, 4))
    captured = checkpoint(row.dir / 'unbroken', ctx.data, 12)
    biggest, relative = resume_difference(checkpoint(eager, ctx.data, 12), captured, checkpoint(eager, ctx.data, 4))
    if not np.isfinite(biggest) or relative >= 0.5:
        raise Failure(f'captured vs eager: mean |Δ| is {relative:.2f} of the weights\' movement since step 4 '
                      f'(max |Δ| {biggest:.3g})')
    eager_s = seconds_per_step(RunFiles(eager, ctx.data.name).run_dir / LOGS_DIR)
    return graph_s, (f'captured vs eager: max |Δ| {biggest:.2g}, mean |Δ| {relative:.2g} of the movement since step '
                     f'4; {resumed}; {fmt(graph_s, ".4f")} s/it captured, {fmt(eager_s, ".4f")} eager (64 px light, '
                     'whole loop)')


def cuda_graph_speed_row(ctx: Context, row: RowRun) -> tuple[float | None, str]:
    """The full model, 256 px, batch 1, fp32: the captured step timed against the reference step in one
    process, and the eager step in another (scripts/benchmark.py)."""
    if not ctx.cuda:
        raise Skip('CUDA graphs need CUDA')
    results = {}
    for mode, flags in (('captured', ['--cuda_graph']), ('eager', ['--no_reference'])):
        out = row.dir / f'{mode}.json'
        row.run(mode, [sys.executable, 'scripts/benchmark.py', '--device', ctx.device, '--configs', 'full256',
                       '--iters', '10', '--warmup', '5', '--no_flops', *flags, '--json', str(out)])
        results[mode] = json.loads(out.read_text())['rows'][0]
    captured, eager = results['captured'], results['eager']
    s_per_it = captured['fast']['s_per_it']
    reference = captured['reference']['s_per_it'] if captured.get('reference') else None
    return s_per_it, (f'captured {s_per_it:.4f} s/it ({fmt(reference and reference / s_per_it, ".2f")}x the reference '
                      f'step, {eager["fast"]["s_per_it"] / s_per_it:.2f}x the eager step at '
                      f'{eager["fast"]["s_per_it"]:.4f}); peak {captured["fast"]["gpu_peak_bytes"] / 2 ** 30:.2f} GiB '
                      f'captured, {eager["fast"]["gpu_peak_bytes"] / 2 ** 30:.2f} eager')


def face_steps(ctx: Context) -> list[str]:
    """The face networks run at 512 (BiSeNet) and 160 px (FaceNet) whatever the model's size: on the CPU
    three steps, the fewest that give an s/it."""
    return [] if ctx.cuda else ['--iteration', '3']


def faceseg(ctx: Context, row: RowRun) -> tuple[float | None, str]:
    weights = weight_file(ctx, 'bisenet')
    return train_and_test(ctx, row, '--faceseg_weights', str(weights), '--seg_fix_weight', '1', '--seg_D_mask', 'True',
                          '--seg_G_detach', 'True', '--seg_D_cam_inp_mask', 'True', *face_steps(ctx), test=None)


def facenet(ctx: Context, row: RowRun) -> tuple[float | None, str]:
    needs('facenet_pytorch')
    weights = weight_file(ctx, 'facenet')
    return train_and_test(ctx, row, '--face_distance_weight', '1', '--facenet_weights', str(weights),
                          *face_steps(ctx), test=None)


def ddp_row(*flags: str, resume: bool, test: bool) -> Callable:
    def run(ctx: Context, row: RowRun) -> tuple[float | None, str]:
        if ctx.cuda and torch.cuda.device_count() < 2:
            raise Skip(f'needs 2 CUDA devices, found {torch.cuda.device_count()}')
        steps, every = ctx.schedule()
        out = row.dir / 'run'
        torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
        row.run('torchrun', torchrun + ctx.main_cmd(out, *flags)[1:])
        if resume:
            checkpoint(out, ctx.data, steps).unlink()
            row.run('torchrun-resume', torchrun + ctx.main_cmd(out, *flags, '--resume', 'True')[1:])
        if test:
            row.run('test', ctx.test_cmd(out))
            check_test_outputs(out, ctx.data)
        done = ', '.join(['2-process training', *(['resumed'] if resume else []), *(['tested'] if test else [])])
        return seconds_per_step(RunFiles(out, ctx.data.name).run_dir / LOGS_DIR), done
    return run


def export(ctx: Context, row: RowRun) -> tuple[float | None, str]:
    needs('safetensors')
    folder = row.dir / 'export'
    row.run('export', [sys.executable, 'scripts/export.py', '--checkpoint', str(shared_checkpoint(ctx)),
                       '--out', str(folder)])
    out = row.dir / 'test'
    row.run('test', ctx.test_cmd(row.dir / 'results', '--checkpoint', str(folder), '--out_dir', str(out)))
    written = list((out / 'A2B').glob('*.png'))
    if not written:
        raise Failure('the test phase from the export wrote no A2B image')
    return None, f'test phase from the export on {ctx.device}: {len(written)} A2B images'


ONNX_RUN = '''
import sys, numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])
size = int(sys.argv[2])
image = np.random.default_rng(0).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
outputs = session.run(None, {session.get_inputs()[0].name: image})
assert outputs[0].shape == image.shape and np.isfinite(outputs[0]).all(), outputs[0].shape
print('onnxruntime ok', [o.shape for o in outputs])
'''


def onnx(ctx: Context, row: RowRun) -> tuple[float | None, str]:
    needs('onnx', 'onnxscript')
    folder = row.dir / 'export'
    row.run('export-onnx', [sys.executable, 'scripts/export.py', '--checkpoint', str(shared_checkpoint(ctx)),
                            '--out', str(folder), '--onnx'])
    if importlib.util.find_spec('onnxruntime') is None:
        return None, 'A2B.onnx written; onnxruntime not installed, so not run'
    size = ctx.model_flags()[ctx.model_flags().index('--img_size') + 1]
    row.run('onnxruntime', [sys.executable, '-c', ONNX_RUN, str(folder / 'A2B.onnx'), size])
    return None, 'A2B.onnx runs in onnxruntime (batch 2)'


DEMO_CALL = '''
import statistics, sys, time
import numpy as np
from PIL import Image
import demo, utils
checkpoint, device, photo = sys.argv[1:4]
translator = demo.load_model(checkpoint, device, use_ema=True)
times = []
for amp in sys.argv[4].split(','):
    translator.autocast = lambda amp=amp: utils.autocast(amp, translator.device.type)
    model = demo.DemoModel(translator, max_size=512)
    for _ in range(3):
        start = time.perf_counter()
        translation, heatmap = model.translate(photo, 'A2B', False)
        times.append(time.perf_counter() - start)
    assert translation.shape == heatmap.shape == (70, 100, 3), (translation.shape, heatmap.shape)
print('seconds per call', statistics.median(times))
'''


def demo_call(ctx: Context, row: RowRun) -> tuple[float | None, str]:
    photo = row.dir / 'photo.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 100, 3), dtype=np.uint8)).save(photo)
    amps = 'off,bf16,fp16' if ctx.cuda else 'off,bf16'
    printed = row.run('demo', [sys.executable, '-c', DEMO_CALL, str(shared_checkpoint(ctx)), ctx.device,
                               str(photo), amps])
    per_call = float(printed.split('seconds per call')[-1])
    return per_call, f'DemoModel.translate(photo 100x70, A2B), --amp {amps.replace(",", "|")}; s/it: s per call'


def build_rows(ctx: Context) -> list[Row]:
    """Every row in the order it starts: compile (minutes of compilation, so it starts first and runs
    beside the others), the resume paths and amp modes, the benchmark alone, then the other features."""
    cuda = ctx.cuda
    cpu_subset = {('lsgan', 'off', 1), ('wgan-gp', 'bf16', 2)}
    rows = [Row('compile', compile_row, 360 if cuda else 900), Row('low-memory', low_memory_row, 360 if cuda else 900)]
    rows += [Row(f'resume-{gan}-{amp}-nc{n}', resume_row(gan, amp, n, (gan, amp, n) in cpu_subset), 180)
             for amp in ('off', 'fp16', 'bf16') for gan in ('lsgan', 'wgan-gp') for n in (1, 2)]
    if cuda:   # alone: timings without other rows on the GPU
        rows += [Row('benchmark-full256', benchmark_row('full256'), 240, alone=True),
                 Row('benchmark-light256', benchmark_row('light256'), 240, alone=True)]
    else:
        rows.append(Row('benchmark-tiny', benchmark_row('tiny'), 180))
    if cuda:
        rows += [Row('memory-full256', memory_row, 240, alone=True),
                 Row('cuda-graph-full256', cuda_graph_speed_row, 300, alone=True)]
    rows += [Row('recompute', recompute_row, 180), Row('cuda-graph', cuda_graph_row, 240), Row('ada', ada, 180),
             Row('channels_last', channels_last, 120), Row('faceseg', faceseg, 150), Row('facenet', facenet, 150),
             Row('ddp', ddp_row(resume=cuda or ctx.full, test=True), 180),
             Row('ddp-cam_D_off', ddp_row('--cam_D_weight', '-1', '--cam_D_attention', 'False', resume=False,
                                          test=False), 150),
             Row('export', export, 150), Row('onnx', onnx, 180), Row('demo', demo_call, 150)]
    return rows


# ----------------------------------------------------------------------------------------------
# Running and reporting


def make_dataset(root: Path, size: int, counts: tuple[int, int, int, int]) -> Path:
    """trainA/trainB/testA/testB of noisy images around a warm (A) and a cool (B) colour."""
    colours = {'A': (200, 80, 60), 'B': (60, 90, 200)}
    for seed, (split, n) in enumerate(zip(('trainA', 'trainB', 'testA', 'testB'), counts)):
        rng = np.random.default_rng(seed)
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            noise = rng.integers(-40, 40, size=(size, size, 3))
            image = np.clip(np.array(colours[split[-1]])[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / split / f'img{i}.png')
    return root


def header(ctx: Context) -> dict[str, object]:
    info: dict[str, object] = {'torch': torch.__version__, 'python': platform.python_version(),
                               'device': ctx.device, 'cpu_cores': os.cpu_count(), 'jobs': ctx.jobs,
                               'budget_s': ctx.budget_s}
    if ctx.cuda:
        info.update(gpu=torch.cuda.get_device_name(ctx.device), gpus=torch.cuda.device_count(),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        info['cpu'] = platform.processor() or platform.machine()
    return info


def fmt(value: float | None, spec: str) -> str:
    return '-' if value is None else format(value, spec)


def markdown(info: dict[str, object], results: list[Result], work: Path) -> str:
    head = ', '.join(f'{k} {v}' for k, v in info.items())
    lines = [f'gpu_check: {head}', '',
             f'Rows ran {info["jobs"]} at a time (s/it includes that contention), CUDA benchmark rows alone. '
             f's/it: median interval between logged training steps (benchmark: its best fast step). {MEMORY_NOTE}.',
             '', '| row | status | s | s/it | peak MB | note |', '|---|---|---|---|---|---|']
    for r in results:
        note = r.note.replace('|', '/').replace('\n', ' ')
        lines.append(f'| {r.name} | {r.status} | {r.seconds:.1f} | {fmt(r.s_per_it, ".4f")} | '
                     f'{fmt(r.peak_mb, ".0f")} | {note} |')
    for r in results:
        table = work / r.name / 'table.txt'
        if r.status == 'pass' and table.exists():
            lines += ['', f'{r.name}:', '```', table.read_text().rstrip(), '```']
    return '\n'.join(lines) + '\n'


class Report:
    """The results so far, written to --out after every row."""

    def __init__(self, out: Path, info: dict[str, object], rows: list[Row], work: Path) -> None:
        self.out, self.info, self.work = out, info, work
        self.results = {row.name: Result(row.name) for row in rows}
        self.lock = threading.Lock()
        out.mkdir(parents=True, exist_ok=True)

    def update(self, result: Result | None, start: float, finished: bool = False) -> None:
        with self.lock:
            if result is not None:
                self.results[result.name] = result
            rows = list(self.results.values())
            text = markdown(self.info, rows, self.work)
            data = {'header': self.info, 'finished': finished, 'wall_s': round(time.monotonic() - start, 1),
                    'rows': [asdict(r) for r in rows], 'benchmark': self.benchmarks()}
            (self.out / 'gpu_check.md').write_text(text)
            (self.out / 'gpu_check.json').write_text(json.dumps(data, indent=2))

    def benchmarks(self) -> dict[str, object]:
        found = {}
        for name in self.results:
            path = self.work / name / 'benchmark.json'
            if path.exists():
                found[name] = json.loads(path.read_text())
        return found


def execute(ctx: Context, row: Row, report: Report) -> Result:
    """Run one row, never raising: its result, with skip (budget) when the budget is spent."""
    result = Result(row.name)
    if time.monotonic() - ctx.start > ctx.budget_s:
        result.status, result.note = 'skip', f'budget: {ctx.budget_s:.0f} s spent before it started'
        report.update(result, ctx.start)
        return result
    begin = time.monotonic()
    run = RowRun(ctx, row.name, row.timeout_s, row.alone)
    try:
        result.s_per_it, result.note = row.run(ctx, run)
        result.status = 'pass'
    except Skip as exc:
        result.status, result.note = 'skip', str(exc)
    except BudgetStop as exc:
        result.status, result.note = 'skip', f'budget: {exc}'
    except Failure as exc:
        result.status, result.note, result.log_tail = 'fail', str(exc), exc.log
    except Exception as exc:   # a bug in this script or an unreadable output: the row fails, the rest run
        result.status, result.note = 'fail', f'{type(exc).__name__}: {exc}'
    result.seconds, result.peak_mb = time.monotonic() - begin, run.peak_mb()
    print(f'[{time.monotonic() - ctx.start:6.1f} s] {row.name}: {result.status} {result.note}', flush=True)
    report.update(result, ctx.start)
    return result


def run_rows(ctx: Context, rows: list[Row], report: Report, keep: bool) -> list[Result]:
    """Consecutive rows run ``ctx.jobs`` at a time; a row marked ``alone`` waits for the others."""
    results: list[Result] = []
    groups: list[list[Row]] = []
    for row in rows:
        if row.alone or not groups or groups[-1][0].alone:
            groups.append([row])
        else:
            groups[-1].append(row)
    for group in groups:
        with ThreadPoolExecutor(max_workers=1 if group[0].alone else ctx.jobs) as pool:
            done = list(pool.map(lambda row: execute(ctx, row, report), group))
        for result in done:
            if result.status == 'pass' and not keep:   # a passing row's checkpoints are not needed
                for sub in ('unbroken', 'broken', 'run'):
                    shutil.rmtree(ctx.work / result.name / sub, ignore_errors=True)
        results += done
    return results


def select(rows: list[Row], only: str, skip: str) -> list[Row]:
    def matches(name: str, patterns: str) -> bool:
        return any(fnmatch.fnmatch(name, p.strip()) for p in patterns.split(',') if p.strip())
    return [r for r in rows if (not only or matches(r.name, only)) and not matches(r.name, skip)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--device', default='cuda', help="'cuda', 'cuda:N' or 'cpu'")
    parser.add_argument('--out', type=Path, default=ROOT / 'results' / 'gpu_check',
                        help='folder for gpu_check.md and gpu_check.json')
    parser.add_argument('--only', default='', help="comma-separated row names or patterns, e.g. 'resume-*,demo'")
    parser.add_argument('--skip', default='', help='comma-separated row names or patterns to leave out')
    parser.add_argument('--budget_s', type=float, default=None,
                        help='rows that would start later are skipped (default: 420 on CUDA, 1800 on the CPU)')
    parser.add_argument('--grace_s', type=float, default=45,
                        help='rows still running this long after the budget are stopped')
    parser.add_argument('--jobs', type=int, default=None, help='rows at a time (default: 6 on CUDA, 2 on the CPU)')
    parser.add_argument('--full', action='store_true',
                        help='CPU: every resume combination and the DDP resume, not the quick subset')
    parser.add_argument('--bench_batch', default='1',
                        help="benchmark rows' --batch_size, e.g. 1,8 for the batched test-phase speed")
    parser.add_argument('--work', type=Path, default=None, help='working folder (default: a temporary one)')
    parser.add_argument('--keep_work', action='store_true', help='keep the working folder and every checkpoint')
    return parser


def check(ctx: Context, args: argparse.Namespace) -> int:
    """Write the dataset and the memory hook, run the selected rows, print and write the report."""
    rows = select(build_rows(ctx), args.only, args.skip)
    if not rows:
        print(f'error: no row matches --only {args.only!r} --skip {args.skip!r}', file=sys.stderr)
        return 2
    ctx.hook_dir.mkdir(exist_ok=True)
    (ctx.hook_dir / 'sitecustomize.py').write_text(MEMORY_HOOK)
    make_dataset(ctx.data, 72 if ctx.cuda else 40, (8, 8, 4, 4) if ctx.cuda else (6, 5, 3, 2))
    info = header(ctx)
    print('gpu_check: ' + ', '.join(f'{k} {v}' for k, v in info.items()), flush=True)
    report = Report(args.out, info, rows, ctx.work)
    results = run_rows(ctx, rows, report, args.keep_work)
    report.update(None, ctx.start, finished=True)
    print()
    print(markdown(info, results, ctx.work))
    print(f'wall time {time.monotonic() - ctx.start:.1f} s; wrote {args.out / "gpu_check.md"} and gpu_check.json')
    return 1 if any(r.status == 'fail' for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cuda = args.device.startswith('cuda')
    if cuda and not torch.cuda.is_available():
        print('error: --device cuda but CUDA is not available; use --device cpu', file=sys.stderr)
        return 2
    torch.set_num_threads(1)   # this process only compares weights; the cores are the rows'
    work = args.work or Path(tempfile.mkdtemp(prefix='gpu_check-'))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.device, work, work / 'data', args.jobs or (6 if cuda else 2), time.monotonic(),
                  args.budget_s if args.budget_s is not None else (420 if cuda else 1800), args.grace_s,
                  args.full, args.bench_batch, work / 'hook')
    try:
        return check(ctx, args)
    finally:
        if args.work is None and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f'working folder kept: {work}')


if __name__ == '__main__':
    sys.exit(main())
