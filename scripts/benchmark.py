"""Training and test-phase speed of named configurations, with the reference step measured alongside.

Usage (from the repository root)::

    python scripts/benchmark.py --configs cpu-light128-ch16 --amp off,bf16 --iters 10 --warmup 2
    python scripts/benchmark.py --configs light128,full256 --amp off,bf16,fp16 --batch_size 1,4 --json o.json
    python scripts/benchmark.py --configs full256 --amp off,fp16 --batch_size 1,8 --estimate --no_timing   # no GPU

For every config × amp × batch size it builds the trainer through ``main.parse_args`` on a small
synthetic dataset (random PNGs in a temporary folder) and feeds random batches that already sit on the
device straight to ``UGATIT.train_step``, so no data loading is timed. Definitions:

- **s/it**: the median wall time of one ``train_step`` over ``--iters`` iterations after ``--warmup``
  untimed ones (``torch.cuda.synchronize`` before and after each on a GPU, ``perf_counter`` alone on a CPU).
- **img/s**: ``2 × batch_size / (s/it)``: one iteration trains on ``batch_size`` images of each domain.
- **ref s/it**: the same for ``scripts.reference_step.reference_train_step`` (the official code's step:
  generators run again for the G step, fakes not detached, fp32, no stacking) on a second trainer built
  from the same flags with ``--amp off`` and no channels-last/compile/CUDA graph, in the same process. The timed
  reference and fast iterations alternate one by one, so load changes on a shared machine hit both;
  both trainers are held at once (twice the memory of one).
- **speed-up**: ``ref s/it ÷ fast s/it`` (above 1: the fast step is faster).
- **peak mem**: on a GPU ``torch.cuda.max_memory_allocated`` (reset before each measurement); on a CPU
  the peak resident set size while the trainer is built and runs its warm-up iterations, minus the
  resident size before (sampled every 2 ms from /proc/self/statm, so it includes the weights and the
  optimizer state; sampling stops before the timed iterations). The fast trainer is built second; the
  increase over the level with the reference trainer alive is its own, on a GPU too.
  The process-wide peak (``ru_maxrss``) is printed too. **mem ratio**: fast peak ÷ reference peak.
- **test img/s**: ``batch_size / median time`` of ``trainer.translate(batch, 'A2B', use_ema=False)``.
- **GFLOP/it**: ``torch.utils.flop_counter.FlopCounterMode`` over one whole step (forward and backward
  of D and G); **floor**: GFLOP/it ÷ the measured matmul rate of the device (bf16 on a GPU, fp32 on a
  CPU); **floor %**: floor ÷ s/it.
- **ops/it**, **ref ops**: the ops one whole step dispatches (forward, backward, optimizer steps, EMA:
  ``memory.count_ops``, a ``TorchDispatchMode``), counted with the FLOPs on the timed device.
- **est GB**, **ref est GB** (``--estimate``): ``memory.estimate``, the peak GPU memory of the fast and
  the reference step computed on the CPU from fake tensors, as on ``--estimate_device`` (CUDA's
  caching allocator, autocast policy and fused Adam), over construction and ``--warmup`` steps like
  **peak mem**. Printed per row with its parts (weights, gradients, optimizer, EMA, activations) and
  the ops per step of both steps as the estimate ran them. Step 1 creates Adam's moments at its very
  end, so ``--warmup 1`` measures less than training needs; the default 2 shows the steady state.
  ``--no_timing`` runs nothing for real (no GPU needed, ``--amp fp16`` rows included).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import main as cli  # noqa: E402
import memory  # noqa: E402
import step_capture  # noqa: E402
from scripts.measure import (  # noqa: E402
    MemoryMeter,
    count_flops,
    matmul_rate,
    max_rss,
    release_memory,
    time_calls,
    warm_up,
)
from scripts.reference_step import reference_train_step  # noqa: E402
from ugatit import UGATIT  # noqa: E402

# The 64-px presets use a 6-layer global discriminator: PT's 7-layer one needs at least 96 px.
SMALL_D = ['--n_global_dis', '6', '--n_local_dis', '5']
PRESETS: dict[str, list[str]] = {
    'tiny': ['--light', 'True', '--img_size', '32', '--ch', '4', '--n_res', '1',
             '--n_global_dis', '4', '--n_local_dis', '3'],
    'cpu-light128-ch16': ['--light', 'True', '--img_size', '128', '--ch', '16'],
    'light64': ['--light', 'True', '--img_size', '64', '--ch', '64', *SMALL_D],
    'light128': ['--light', 'True', '--img_size', '128', '--ch', '64'],
    'light256': ['--light', 'True', '--img_size', '256', '--ch', '64'],
    'full64': ['--light', 'False', '--img_size', '64', '--ch', '64', *SMALL_D],
    'full128': ['--light', 'False', '--img_size', '128', '--ch', '64'],
    'full256': ['--light', 'False', '--img_size', '256', '--ch', '64'],
}

GB = 1024 ** 3


# ----------------------------------------------------------------------------------------------
# Set-up


def make_dataset(root: Path, n: int = 4, size: int = 32, seed: int = 0) -> Path:
    """trainA/trainB/testA/testB with n random PNGs each (the trainer only needs them to exist)."""
    rng = np.random.default_rng(seed)
    for split in ('trainA', 'trainB', 'testA', 'testB'):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    return root


def trainer_flags(preset: list[str], extra: list[str], data: Path, result_dir: Path, device: str,
                  amp: str, batch_size: int, channels_last: bool, compile_: bool,
                  cuda_graph: bool = False) -> list[str]:
    """main.py flags for one benchmark row (a long schedule, so the LR and EMA stay in their first phase)."""
    return ['--dataset', str(data), '--result_dir', str(result_dir), '--device', device,
            *preset, *extra, '--amp', amp, '--batch_size', str(batch_size), '--num_workers', '0',
            '--iteration', '1000000', '--channels_last', str(channels_last), '--compile', str(compile_),
            *(['--cuda_graph', 'True'] if cuda_graph else [])]


def random_batches(n: int, batch_size: int, size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{dom: (torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1).to(device) for dom in 'AB'}
            for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Measurements


@dataclass
class StepResult:
    """Timing, memory and FLOPs of one kind of step (fast or reference) on one configuration."""

    s_per_it: float
    times: list[float]
    gpu_peak_bytes: int | None
    host_increase_bytes: int
    flops: float | None = None
    ops: int | None = None


@dataclass
class Estimate:
    """The estimated peak GPU memory of the fast and the reference step (``memory.estimate``)."""

    device: str
    steps: int
    fast: memory.MemoryReport
    reference: memory.MemoryReport | None = None


@dataclass
class Row:
    """One table row: config × amp × batch size."""

    config: str
    device: str
    amp: str
    batch_size: int
    fast: StepResult | None = None
    reference: StepResult | None = None
    test_img_per_s: float | None = None
    estimate: Estimate | None = None
    process_max_rss_bytes: int = 0
    note: str = ''
    extra: dict = field(default_factory=dict)

    @property
    def img_per_s(self) -> float | None:
        return 2 * self.batch_size / self.fast.s_per_it if self.fast else None

    @property
    def speedup(self) -> float | None:
        if self.fast and self.reference:
            return self.reference.s_per_it / self.fast.s_per_it
        return None

    @property
    def mem_ratio(self) -> float | None:
        if not (self.fast and self.reference):
            return None
        fast, ref = _peak(self.fast), _peak(self.reference)
        return fast / ref if ref else None


def _peak(result: StepResult) -> int:
    return result.gpu_peak_bytes if result.gpu_peak_bytes is not None else result.host_increase_bytes


@dataclass
class Runner:
    """A built and warmed-up trainer with its step function, batches and measured peak memory."""

    trainer: UGATIT
    step_fn: Callable
    batches: list[dict[str, torch.Tensor]]
    gpu_peak_bytes: int | None
    host_increase_bytes: int

    def __call__(self, i: int) -> object:
        return self.step_fn(self.trainer, self.batches[i % len(self.batches)], i + 1)


def prepare(flags: list[str], step_fn: Callable, warmup: int) -> Runner:
    """Build the trainer and run the warm-up steps while measuring peak memory.

    Host memory is sampled while the trainer is built and warmed up, not while it is timed: a sampling
    thread waking every few ms preempts the intra-op worker threads and slows small models severalfold.
    """
    cfg = cli.parse_args(flags)
    with MemoryMeter(torch.device(cfg.performance.device)) as meter:
        trainer = UGATIT(cfg)
        batches = random_batches(2, cfg.schedule.batch_size, cfg.arch.img_size, trainer.device)
        runner = Runner(trainer, step_fn, batches, None, 0)
        warm_up(runner, trainer.device, warmup)
    runner.gpu_peak_bytes, runner.host_increase_bytes = meter.gpu_peak(), meter.host_increase
    return runner


def time_interleaved(runners: list[Runner], device: torch.device, iters: int,
                     start: int) -> list[list[float]]:
    """Per runner, the seconds of each timed call; the runners alternate call by call, so a change
    in machine load during the run affects them alike."""
    times: list[list[float]] = [[] for _ in runners]
    for i in range(start, start + iters):
        for runner, out in zip(runners, times):
            out += time_calls(runner, device, 1, start=i)
    return times


def result_of(runner: Runner, times: list[float], args: argparse.Namespace) -> StepResult:
    result = StepResult(statistics.median(times), times, runner.gpu_peak_bytes, runner.host_increase_bytes)
    if not args.no_flops:
        step = args.warmup + args.iters
        with memory.OpCounter() as ops:
            result.flops = count_flops(lambda: runner(step))
        result.ops = ops.count
    return result


def measure_row(row: Row, fast_flags: list[str], ref_flags: list[str] | None,
                args: argparse.Namespace) -> None:
    """Fill ``row`` with the fast step (and the reference step, timed alternately with it)."""
    runners = []
    if ref_flags is not None:
        runners.append(prepare(ref_flags, reference_train_step, args.warmup))
    runners.append(prepare(fast_flags, fast_step, args.warmup))
    device = runners[-1].trainer.device
    times = time_interleaved(runners, device, args.iters, args.warmup)
    results = [result_of(runner, t, args) for runner, t in zip(runners, times)]
    row.fast, row.reference = results[-1], (results[0] if ref_flags is not None else None)
    row.test_img_per_s = time_translate(runners[-1].trainer, runners[-1].batches, args)


def time_translate(trainer: UGATIT, batches: list[dict[str, torch.Tensor]],
                   args: argparse.Namespace) -> float:
    """Images per second of the test phase (raw generator, eval mode, no autograd)."""
    images = [b['A'] for b in batches]
    run = lambda i: trainer.translate(images[i % len(images)], 'A2B', use_ema=False)  # noqa: E731
    warm_up(run, trainer.device, args.warmup)
    return len(images[0]) / statistics.median(time_calls(run, trainer.device, args.iters))


def fast_step(trainer: UGATIT, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    return trainer.train_step(batch, step)


def training_of(trainer: UGATIT, step_fn: Callable = fast_step) -> memory.Training:
    """The trainer as memory.py sees it (``UGATIT.memory_training``), stepped by ``step_fn``."""
    training = trainer.memory_training()
    return memory.Training(training.parts, lambda batch, step: step_fn(trainer, batch, step))


def estimate_row(fast_flags: list[str], ref_flags: list[str] | None, args: argparse.Namespace) -> Estimate:
    """The fast and reference steps' peak memory on ``--estimate_device``, from fake tensors on the
    CPU, over as many steps as the benchmark measures its peak on (``--warmup``)."""
    def report(flags: list[str], step_fn: Callable) -> memory.MemoryReport:
        flags = [args.estimate_device if prev == '--device' else flag for prev, flag in zip(['', *flags], flags)]
        with memory.assume_cuda() if args.estimate_device.startswith('cuda') else contextlib.nullcontext():
            cfg = cli.parse_args(flags)
        return memory.estimate(cfg, lambda cfg: training_of(UGATIT(cfg), step_fn), steps=args.warmup)

    return Estimate(args.estimate_device, args.warmup, report(fast_flags, fast_step),
                    report(ref_flags, reference_train_step) if ref_flags is not None else None)


def skip_reason(device: torch.device, amp: str) -> str:
    if amp == 'fp16' and device.type != 'cuda':
        return 'skipped: --amp fp16 needs a CUDA device (use bf16 on the CPU)'
    if amp == 'bf16' and device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        return 'skipped: this GPU has no bf16 support'
    return ''


def prime(data: Path, out_dir: Path, device: str) -> None:
    """One tiny fast and reference step first, so one-time costs (kernel libraries' buffers, lazy
    initialisation) are not charged to the memory of the first measured trainer."""
    flags = trainer_flags(PRESETS['tiny'], [], data, out_dir, device, 'off', 1, False, False)
    for step_fn in (reference_train_step, fast_step):
        prepare(flags, step_fn, 1)
    release_memory()


def run_benchmark(args: argparse.Namespace, data: Path, out_dir: Path) -> list[Row]:
    """Every requested config × batch size × amp row, each with its own reference measurement."""
    device = torch.device(args.device)
    extra = args.flags.split() if args.flags else []
    if not args.no_timing:
        prime(data, out_dir, args.device)
    rows = []
    for name in args.configs:
        for batch_size in args.batch_size:
            common = (PRESETS[name], extra, data, out_dir, args.device)
            ref_flags = None if args.no_reference else trainer_flags(*common, 'off', batch_size, False, False)
            for amp in args.amp:
                row = Row(name, str(device), amp, batch_size,
                          note='' if args.no_timing else skip_reason(device, amp))
                if not row.note:
                    fast_flags = trainer_flags(*common, amp, batch_size, args.channels_last, args.compile,
                                               args.cuda_graph)
                    if not args.no_timing:
                        measure_row(row, fast_flags, ref_flags, args)
                    if args.estimate:
                        row.estimate = estimate_row(fast_flags, ref_flags, args)
                release_memory()
                row.process_max_rss_bytes = max_rss()
                rows.append(row)
                print_row_details(row, args.matmul)
    return rows


# ----------------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None, spec: str) -> str:
    return '-' if value is None else format(value, spec)


def _gb(value: int | None) -> str:
    return '-' if value is None else f'{value / GB:.2f}'


def _count(value: int | None) -> str:
    return '-' if value is None else str(value)


def print_row_details(row: Row, matmul: tuple[float, str] | None) -> None:
    """The per-row lines (printed as each row finishes, so long runs show progress)."""
    head = f'[{row.config} amp={row.amp} batch={row.batch_size} {row.device}]'
    if row.note:
        print(f'{head} {row.note}', flush=True)
        return
    if row.fast is not None:
        print_timing_details(head, row, matmul)
    if row.estimate is not None:
        est = row.estimate
        steps = f'{est.steps} step' + 's' * (est.steps != 1)
        for label, report in (('fast', est.fast), ('reference', est.reference)):
            if report is not None:
                print(f'{head} estimate on {est.device} ({steps}), {label}: {report.summary()}; '
                      f'{report.ops_per_step[-1]} ops in the last step', flush=True)


def print_timing_details(head: str, row: Row, matmul: tuple[float, str] | None) -> None:
    print(f'{head} fast: {row.fast.s_per_it:.4f} s/it, {row.img_per_s:.2f} img/s, '
          f'test {row.test_img_per_s:.2f} img/s', flush=True)
    if row.reference is not None:
        print(f'{head} reference: {row.reference.s_per_it:.4f} s/it', flush=True)
        print(f'{head} speed-up fast/ref: {row.speedup:.2f}x (ref {row.reference.s_per_it:.4f} s/it / '
              f'fast {row.fast.s_per_it:.4f} s/it); memory ratio fast/ref: {_fmt(row.mem_ratio, ".2f")}',
              flush=True)
    for label, result in (('fast', row.fast), ('reference', row.reference)):
        if result is not None and result.flops is not None:
            line = f'{head} {label}: {result.flops / 1e9:.2f} GFLOP/it, {result.ops} ops/it'
            if matmul is not None:
                floor = result.flops / matmul[0]
                line += (f', floor {floor * 1e3:.3f} ms at {matmul[0] / 1e12:.2f} TFLOP/s {matmul[1]} '
                         f'({100 * floor / result.s_per_it:.1f}% of the floor achieved)')
            print(line, flush=True)


TABLE = [('config', 18), ('amp', 5), ('batch', 5), ('s/it', 9), ('img/s', 8), ('ref s/it', 9),
         ('speed-up', 8), ('peak GB', 8), ('ref GB', 7), ('mem f/r', 7), ('est GB', 7), ('ref est', 7),
         ('test img/s', 10), ('GFLOP/it', 9), ('ops/it', 7), ('ref ops', 7)]


def _ops(result: StepResult | None, report: memory.MemoryReport | None) -> int | None:
    """Ops per step as counted on the timed device, else as the estimate ran the step."""
    if result is not None and result.ops is not None:
        return result.ops
    return report.ops_per_step[-1] if report is not None else None


def table_cells(row: Row) -> list[str]:
    fast, ref, est = row.fast, row.reference, row.estimate
    if fast is None and est is None:
        return [row.config, row.amp, str(row.batch_size), 'skipped'] + ['-'] * (len(TABLE) - 4)
    est_fast, est_ref = (est.fast, est.reference) if est else (None, None)
    return [row.config, row.amp, str(row.batch_size), _fmt(fast.s_per_it if fast else None, '.4f'),
            _fmt(row.img_per_s, '.2f'), _fmt(ref.s_per_it if ref else None, '.4f'), _fmt(row.speedup, '.2f'),
            _gb(_peak(fast) if fast else None), _gb(_peak(ref) if ref else None), _fmt(row.mem_ratio, '.2f'),
            _gb(est_fast.peak_bytes if est_fast else None), _gb(est_ref.peak_bytes if est_ref else None),
            _fmt(row.test_img_per_s, '.2f'), _fmt(fast.flops / 1e9 if fast and fast.flops else None, '.2f'),
            _count(_ops(fast, est_fast)), _count(_ops(ref, est_ref))]


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    mem = 'GPU max allocated' if torch.device(args.device).type == 'cuda' else 'host RSS increase'
    timing = 'no timing' if args.no_timing else (
        f'median of {args.iters} iterations after {args.warmup} warm-up')
    print(f'\nU-GAT-IT benchmark: device {args.device}, torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads, {timing}; '
          f'img/s = 2 x batch / (s/it); peak = {mem}; speed-up = ref s/it / fast s/it')
    if args.estimate:
        print(f'est = memory.estimate: peak GPU memory on {args.estimate_device} computed on the CPU '
              f'(construction + {args.warmup} warm-up step(s)); ops/it: counted on the timed device, else by the '
              'estimate')
    print('  '.join(name.rjust(width) for name, width in TABLE))
    for row in rows:
        print('  '.join(cell.rjust(width) for cell, (_, width) in zip(table_cells(row), TABLE)))
        if row.note:
            print(f'  note: {row.note}')
    print(f'process peak RSS (ru_maxrss): {max_rss() / GB:.2f} GB')


def to_json(rows: list[Row], args: argparse.Namespace) -> dict:
    out = []
    for row in rows:
        item = asdict(row)
        item.update(img_per_s=row.img_per_s, speedup=row.speedup, mem_ratio=row.mem_ratio)
        out.append(item)
    matmul = {'flop_per_s': args.matmul[0], 'dtype': args.matmul[1]} if args.matmul else None
    return {'device': args.device, 'torch': torch.__version__, 'threads': torch.get_num_threads(),
            'iters': args.iters, 'warmup': args.warmup, 'matmul_rate': matmul, 'rows': out}


# ----------------------------------------------------------------------------------------------
# Command line


def _csv(kind: Callable[[str], object]) -> Callable[[str], list]:
    def parse(value: str) -> list:
        items = [kind(v.strip()) for v in value.split(',') if v.strip()]
        if not items:
            raise argparse.ArgumentTypeError('expected a comma-separated list')
        return items
    return parse


def _config_name(value: str) -> str:
    if value not in PRESETS:
        raise argparse.ArgumentTypeError(f'unknown config {value!r}; choose from {", ".join(PRESETS)}')
    return value


def _amp_mode(value: str) -> str:
    if value not in ('off', 'bf16', 'fp16'):
        raise argparse.ArgumentTypeError(f'--amp items must be off, bf16 or fp16, got {value!r}')
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    default_device = 'cuda' if torch.cuda.is_available() else 'cpu'
    default_config = 'light128' if default_device == 'cuda' else 'cpu-light128-ch16'
    parser.add_argument('--configs', type=_csv(_config_name), default=[default_config],
                        help=f'comma-separated presets: {", ".join(PRESETS)}')
    parser.add_argument('--amp', type=_csv(_amp_mode), default=['off'], help='comma-separated: off,bf16,fp16')
    parser.add_argument('--batch_size', type=_csv(int), default=[1],
                        help='comma-separated per-domain batch sizes')
    parser.add_argument('--iters', type=int, default=10, help='timed iterations (the median is reported)')
    parser.add_argument('--warmup', type=int, default=2,
                        help='untimed iterations first (peak memory is measured on these)')
    parser.add_argument('--device', default=default_device, help="'cuda', 'cuda:N' or 'cpu'")
    parser.add_argument('--threads', type=int, default=None,
                        help='torch.set_num_threads (default: torch default)')
    parser.add_argument('--no_reference', action='store_true', help='do not time the reference step')
    parser.add_argument('--no_flops', action='store_true', help='skip the FLOP count and the matmul rate')
    parser.add_argument('--channels_last', action='store_true', help='fast step with channels-last layout')
    parser.add_argument('--compile', action='store_true', help='fast step with torch.compile')
    parser.add_argument('--cuda_graph', action='store_true',
                        help=f'fast step captured as a CUDA graph (CUDA; --warmup > {step_capture.WARMUP}, so that '
                        'the timed steps are replays; ops/it then counts what a replay dispatches)')
    parser.add_argument('--flags', default='', help='extra main.py flags for every config, e.g. "--n_res 2"')
    parser.add_argument('--estimate', action='store_true',
                        help='also estimate each row\'s peak GPU memory and its parts on the CPU (memory.py: fake '
                             'tensors, seconds, no memory), for the fast and the reference step')
    parser.add_argument('--estimate_device', default='cuda',
                        help="what --estimate models: 'cuda' (caching allocator, CUDA autocast, fused Adam) or 'cpu'")
    parser.add_argument('--no_timing', action='store_true',
                        help='run nothing for real, estimate only (implies --estimate; needs no GPU, even for fp16)')
    parser.add_argument('--json', default=None, help='also write the results to this JSON file')
    return parser


def main(argv: list[str] | None = None) -> list[Row]:
    """Run the benchmark; prints the table and returns the rows."""
    args = build_parser().parse_args(argv)
    if args.iters < 1 or args.warmup < 1:
        raise SystemExit('error: --iters and --warmup must be >= 1 (memory is measured during the warm-up)')
    args.estimate = args.estimate or args.no_timing
    if args.cuda_graph and not args.no_timing and not args.device.startswith('cuda'):
        raise SystemExit('error: --cuda_graph needs --device cuda (or --no_timing, to estimate its memory)')
    if args.cuda_graph and args.warmup <= step_capture.WARMUP and not args.no_timing:
        raise SystemExit(f'error: --cuda_graph needs --warmup {step_capture.WARMUP + 1} or more: the first '
                         f'{step_capture.WARMUP} steps run eagerly and the next is captured, so that only replays '
                         'are timed')
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available() and not args.no_timing:
        raise SystemExit('error: --device cuda but CUDA is not available; use --device cpu (or --no_timing)')
    args.matmul = None if args.no_flops or args.no_timing else matmul_rate(device)
    with tempfile.TemporaryDirectory(prefix='ugatit-bench-') as tmp:
        data = make_dataset(Path(tmp) / 'bench')
        rows = run_benchmark(args, data, Path(tmp) / 'results')
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(rows, args), indent=2))
        print(f'wrote {args.json}')
    return rows


if __name__ == '__main__':
    main()
