"""What the lower-precision opt-ins cost: train the demo preset with each variant and several seeds,
score each with ``scripts/paired_demo_score.py`` and print mean ± standard deviation per direction, and
each variant's difference from fp32 with the same seed;
``--savings``: what each saves on the full model (256 px), from its parameter counts on the meta device.

One training process at a time (set OMP_NUM_THREADS=1 for one thread each):

    OMP_NUM_THREADS=1 python scripts/low_memory_quality.py --steps 200 --seeds 0,1,2 --out /tmp/lowmem

    python scripts/low_memory_quality.py --savings

Each run is ``main.py --preset demo --device cpu --iteration STEPS --seed S`` plus the variant's flags;
finished runs (a score file in their folder) are not run again, so an interrupted sweep continues.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GiB = 1024 ** 3
VARIANTS = {
    'fp32': [],
    '8bit moments': ['--optim_state', '8bit'],
    '4bit moments': ['--optim_state', '4bit'],
    'bf16 EMA': ['--ema_dtype', 'bf16'],
    '8bit + bf16 EMA': ['--optim_state', '8bit', '--ema_dtype', 'bf16'],
}
KEYS = ('A2B_ema', 'B2A_ema', 'A2B_raw', 'B2A_raw')


def run_one(out: Path, flags: list[str], steps: int, seed: int) -> dict:
    """Train one variant and score its last checkpoint (cached in ``score.json``)."""
    cached = out / 'score.json'
    if cached.exists():
        return json.loads(cached.read_text())
    start = time.monotonic()
    subprocess.run([sys.executable, 'main.py', '--preset', 'demo', '--device', 'cpu', '--num_workers', '0',
                    '--iteration', str(steps), '--save_freq', str(steps), '--print_freq', str(steps),
                    '--seed', str(seed), '--result_dir', str(out), '--overwrite', 'True', *flags],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - start
    checkpoint = out / 'demo' / 'model' / f'demo_params_{steps:07d}.pt'
    printed = subprocess.run([sys.executable, 'scripts/paired_demo_score.py', '--checkpoint', str(checkpoint)],
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout
    result = {k: float(v) for k, v in (item.split('=') for item in printed.split())}
    result['seconds'] = seconds
    cached.write_text(json.dumps(result))
    return result


def savings() -> list[str]:
    """Adam's moments (G and D optimizers) and the EMA copies of the full model, per variant, in GiB."""
    import torch

    import low_memory
    from model import ArchConfig, build_critic, build_generator
    arch = ArchConfig(light=False)   # the paper's full model, 256 px
    with torch.device('meta'):
        generators = [p for _ in range(2) for p in build_generator(arch).parameters()]
        critics = [p for dom in 'AB' for p in build_critic(arch, dom).parameters()]
    params = generators + critics
    ema = {'fp32': 4 * sum(p.numel() for p in generators), 'bf16': 2 * sum(p.numel() for p in generators)}
    moments = {bits: low_memory.moment_bytes(params, bits) for bits in low_memory.OPTIM_STATES}
    low = sum(p.numel() for p in params if low_memory.is_low_bit(p, '8bit')) / sum(p.numel() for p in params)
    rows = [f'full model: {sum(p.numel() for p in params) / 1e6:.0f} M parameters ({low:.2%} in tensors torchao '
            'quantises)', '| --optim_state | --ema_dtype | Adam moments GiB | EMA GiB | saved GiB |',
            '|---|---|---|---|---|']
    for bits in low_memory.OPTIM_STATES:
        for dtype in low_memory.EMA_DTYPES:
            saved = moments['fp32'] + ema['fp32'] - moments[bits] - ema[dtype]
            rows.append(f'| {bits} | {dtype} | {moments[bits] / GiB:.2f} | {ema[dtype] / GiB:.2f} | '
                        f'{-saved / GiB:.2f} |')
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=200, help='training steps of each run')
    parser.add_argument('--seeds', default='0,1,2', help='comma-separated seeds')
    parser.add_argument('--variants', default=','.join(VARIANTS), help='comma-separated names from: '
                        + ', '.join(VARIANTS))
    parser.add_argument('--out', type=Path, default=Path('results/low_memory_quality'), help='runs go here')
    parser.add_argument('--savings', action='store_true', help='print the full model\'s savings and stop')
    args = parser.parse_args(argv)
    if args.savings:
        print('\n'.join(savings()))
        return
    seeds = [int(s) for s in args.seeds.split(',')]
    names = args.variants.split(',')
    results: dict[str, list[dict]] = {name: [] for name in names}
    for seed in seeds:   # seed by seed: a sweep cut short still has every variant
        for name in names:
            folder = args.out / f"{name.replace(' ', '_').replace('+', 'and')}_seed{seed}"
            results[name].append(run_one(folder, VARIANTS[name], args.steps, seed))
            print(f'{name} seed {seed}: ' + ' '.join(f'{k}={v:.4f}' for k, v in results[name][-1].items()),
                  flush=True)
    rows = ['| variant | ' + ' | '.join(KEYS) + ' | s/run |', '|---' * (len(KEYS) + 2) + '|']
    for name, runs in results.items():
        cells = [f'{statistics.mean(r[k] for r in runs):.4f} ± {statistics.stdev(r[k] for r in runs):.4f}'
                 for k in KEYS]
        rows.append(f'| {name} | ' + ' | '.join(cells) + f' | {statistics.mean(r["seconds"] for r in runs):.0f} |')
    if 'fp32' in results and len(results) > 1:   # paired by seed: same data order and initial weights
        rows += ['', '| Δ vs fp32, same seed | ' + ' | '.join(KEYS) + ' |', '|---' * (len(KEYS) + 1) + '|']
        for name, runs in results.items():
            if name != 'fp32':
                deltas = {k: [r[k] - base[k] for r, base in zip(runs, results['fp32'])] for k in KEYS}
                rows.append(f'| {name} | ' + ' | '.join(
                    f'{statistics.mean(d):+.4f} ± {statistics.stdev(d):.4f}' for d in deltas.values()) + ' |')
    print('\n'.join(rows))


if __name__ == '__main__':
    main()
