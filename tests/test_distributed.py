"""Multi-process training with torchrun (DDP over gloo on the CPU): outputs, resume, data split, gradients.

Run directly under torchrun (``torchrun --nproc_per_node 2 tests/test_distributed.py OUT FLAGS...``) this
file is also the worker of the gradient test: every rank trains two steps on the same batches and rank 0
saves the weights, which must match a single-process run (DDP averages identical gradients).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 150
SAME_BATCH_STEPS = 2


def _same_batches(n: int = SAME_BATCH_STEPS, size: int = 32) -> list[dict[str, torch.Tensor]]:
    """Fixed batches, identical on every rank."""
    g = torch.Generator().manual_seed(7)
    return [{'A': torch.rand(2, 3, size, size, generator=g) * 2 - 1,
             'B': torch.rand(2, 3, size, size, generator=g) * 2 - 1} for _ in range(n)]


def _weights(trainer) -> dict[str, torch.Tensor]:
    named = {f'G.{k}': v.detach().clone() for k, v in trainer.G.state_dict().items()}
    named.update({f'D.{k}': v.detach().clone() for k, v in trainer.D.state_dict().items()})
    return named


def _train_on_same_batches(flags: list[str]) -> dict[str, torch.Tensor]:
    """Build the trainer from main.py flags and run the fixed batches through train_step."""
    import main
    from ugatit import UGATIT
    trainer = UGATIT(main.parse_args(flags))
    for step, batch in enumerate(_same_batches(), start=1):
        trainer.train_step(batch, step)
    return _weights(trainer)


def _worker(out_file: str, flags: list[str]) -> None:
    """torchrun entry point of the gradient test."""
    sys.path.insert(0, str(ROOT))
    weights = _train_on_same_batches(flags)
    if int(os.environ.get('RANK', '0')) == 0:
        torch.save(weights, out_file)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR',
                                                            'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    return env


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone', *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)


def _tiny(tiny_dataset: Path, result_dir: Path, *extra: str) -> list[str]:
    from conftest import tiny_flags
    return tiny_flags(tiny_dataset, result_dir, *extra)


def test_torchrun_trains_saves_once_and_resumes_single_process(tiny_dataset, tmp_path):
    import main
    out = tmp_path / 'out'
    proc = _torchrun('main.py', *_tiny(tiny_dataset, out, '--iteration', '3', '--save_freq', '3'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = out / 'tiny'
    assert [p.name for p in (run_dir / 'model').iterdir()] == ['tiny_params_0000003.pt']
    assert len(list((run_dir / 'logs').glob('events.out.tfevents.*'))) == 1
    state = torch.load(run_dir / 'model' / 'tiny_params_0000003.pt', map_location='cpu', weights_only=True)
    assert state['step'] == 3 and 'genA2B' in state and 'D_optim' in state

    code = main.main(_tiny(tiny_dataset, out, '--iteration', '4', '--save_freq', '4', '--resume', 'True'))
    assert code == 0
    resumed = torch.load(run_dir / 'model' / 'tiny_params_0000004.pt', map_location='cpu', weights_only=True)
    assert resumed['step'] == 4
    # Adam's per-parameter step count continues from the DDP run's 3 (the last LR is 0 in PT's schedule).
    assert float(resumed['G_optim']['state'][0]['step']) == 4.0


def test_ranks_draw_different_images(tiny_dataset):
    import dataset
    streams = [dataset.build_train_stream(tiny_dataset, 32, 2, seed=0, start_step=0, rank=rank, world_size=2)
               for rank in (0, 1)]
    firsts = [next(stream) for stream in streams]
    for domain in 'AB':
        assert firsts[0][domain].shape == (2, 3, 32, 32)
        assert not torch.equal(firsts[0][domain], firsts[1][domain]), domain


def test_ddp_step_on_identical_batches_equals_single_process_step(tiny_dataset, tmp_path):
    flags = _tiny(tiny_dataset, tmp_path / 'out', '--iteration', '10')
    saved = tmp_path / 'ddp_weights.pt'
    proc = _torchrun(str(Path(__file__).resolve()), str(saved), *flags)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = torch.load(saved, weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1): same kernels, same rounding
    try:
        single = _train_on_same_batches(flags)
    finally:
        torch.set_num_threads(threads)
    assert ddp.keys() == single.keys()
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-6, atol=1e-7, msg=name)


if __name__ == '__main__':
    _worker(sys.argv[1], sys.argv[2:])
