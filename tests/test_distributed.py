"""Multi-process training with torchrun (DDP over gloo on the CPU): outputs, resume, data split, and a table of
features and presets trained by 2 ranks on identical batches.

Run directly under torchrun (``torchrun --nproc_per_node 2 tests/test_distributed.py OUT_DIR CASES_JSON``) this
file is also the worker of the table test: for each case every rank trains ``SAME_BATCH_STEPS`` steps on the same
batches and saves its weights. Both ranks must end identical, and where the step draws nothing per rank (ADA's and
the gradient penalty's draws are seeded by rank) equal to a single-process run: DDP averages identical gradients.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import distributed

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 150
TABLE_TIMEOUT_S = 400    # ~25 s on 2 idle cores; minutes when other jobs share them
SAME_BATCH_STEPS = 3     # with --n_critic 2: G+D, D only, G+D
GROUPS = (0, 1)

# Every optional feature or preset that can leave a parameter without gradient (the reducer waits for it) or
# keeps state across ranks, as (extra flags, same as a single process?). {bisenet}/{facenet}: random weights.
SEG = ('--faceseg_weights', '{bisenet}')
ADA = ('--ada_p', '0.5', '--ada_interval', '1', '--ada_kimg', '0.1')   # p moves by 0.04 every step
CASES: dict[str, tuple[tuple[str, ...], bool]] = {
    'baseline': ((), True),
    'cam_D_weight_0': (('--cam_D_weight', '0'), True),             # the D's CAM FCs feed nothing the loss reads
    'cam_D_attention_off_weight_-1': (('--cam_D_attention', 'False', '--cam_D_weight', '-1'), True),
    'cam_D_attention_off': (('--cam_D_attention', 'False'), True),  # FCs trained by the CAM logits only
    'preset_enhanced': (('--preset', 'enhanced', '--light', 'True', '--img_size', '32', '--n_global_dis', '4',
                         '--n_local_dis', '3', *SEG), True),
    'arch_tf_cam_D_weight_0': (('--arch', 'tf', '--n_res', '4', '--cam_D_weight', '0'), True),  # L2 reaches the kernel
    'arch_tf': (('--arch', 'tf', '--n_res', '4'), True),
    'grouploss': (('--group', '0,1', '--use_grouploss', 'True'), True),
    'selective_backprop': (('--group', '0,1', '--selective_backprop', 'True', '--base_group', '0'), True),
    'preset_face2webtoon': (('--preset', 'face2webtoon', '--group', '0,1', *ADA), False),
    'ada': (('--ada', 'True', *ADA), False),
    'faceseg': ((*SEG, '--seg_fix_weight', '1', '--seg_D_mask', 'True', '--seg_G_detach', 'True',
                 '--seg_D_cam_inp_mask', 'True', '--seg_D_cam_fea_mask', 'True'), True),
    'facenet': (('--face_distance_weight', '0.5', '--facenet_weights', '{facenet}'), True),
    'n_critic_2': (('--n_critic', '2'), True),
    'wgan-gp': (('--gan_type', 'wgan-gp'), False),
    'ema': (('--ema', 'True', '--ema_start', '0'), True),
    'unstacked_blur': (('--stack_batches', 'False', '--has_blur', 'True'), True),  # several DDP forwards per backward
}


def _same_batches(flags: list[str], n: int = SAME_BATCH_STEPS, size: int = 32) -> list[dict[str, torch.Tensor]]:
    """Fixed batches, identical on every rank, with the blur images and group labels the flags need
    (round robin: step t draws group GROUPS[t % 2])."""
    import main
    cfg = main.parse_args(flags)
    g = torch.Generator().manual_seed(7)
    batches = []
    for step in range(1, n + 1):
        domains = ('A', 'B', 'blur_A', 'blur_B') if cfg.data.blur else ('A', 'B')
        batch = {k: torch.rand(2, 3, size, size, generator=g) * 2 - 1 for k in domains}
        if cfg.few_shot.groups:
            batch.update({f'group_{d}': torch.full((2,), GROUPS[step % len(GROUPS)]) for d in 'AB'})
        batches.append(batch)
    return batches


def _weights(trainer) -> dict[str, torch.Tensor]:
    """Everything that must agree across ranks: weights and buffers (SN's u, v), EMA copies, ADA's p."""
    named = {f'G.{k}': v.detach().clone() for k, v in trainer.G.state_dict().items()}
    named.update({f'D.{k}': v.detach().clone() for k, v in trainer.D.state_dict().items()})
    for name, ema in (trainer.ema or {}).items():
        named.update({f'ema.{name}.{k}': v.detach().clone() for k, v in ema.model.state_dict().items()})
    for dom, controller in (trainer.ada or {}).items():
        named[f'ada.{dom}.p'] = controller.pipe.p.detach().clone()
    return named


def _train_on_same_batches(flags: list[str]) -> dict[str, torch.Tensor]:
    """Build the trainer from main.py flags and run the fixed batches through train_step."""
    import main
    from ugatit import UGATIT
    trainer = UGATIT(main.parse_args(flags))
    for step, batch in enumerate(_same_batches(flags), start=1):
        trainer.train_step(batch, step)
    return _weights(trainer)


def _worker(out_dir: str, cases_file: str) -> None:
    """torchrun entry point of the table test: every case in turn, a traceback file where one fails."""
    sys.path.insert(0, str(ROOT))
    import torch.distributed as dist
    dist.init_process_group('gloo', timeout=timedelta(seconds=120))   # a rank left waiting fails, not hangs
    rank = dist.get_rank()
    for name, flags in json.loads(Path(cases_file).read_text()).items():
        try:
            weights = _train_on_same_batches(flags)
            torch.save(weights, Path(out_dir) / f'{name}.rank{rank}.pt')
        except Exception:
            (Path(out_dir) / f'{name}.rank{rank}.err').write_text(traceback.format_exc())
        dist.barrier()
    dist.destroy_process_group()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR',
                                                            'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    return env


def _torchrun(*args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone', *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


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


def _worker_pids(parent: int) -> dict[int, int]:
    """RANK → PID of torchrun's worker processes (children of the agent ``parent``)."""
    found = {}
    for proc in Path('/proc').iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / 'stat').read_text().rsplit(')', 1)[1].split()[1])
            env = dict(e.split('=', 1) for e in (proc / 'environ').read_bytes().decode().split('\0') if '=' in e)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and 'RANK' in env:
            found[int(env['RANK'])] = int(proc.name)
    return found


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tiny_dataset, tmp_path):
    """SLURM may signal one rank first: the ranks agree at the next logging step, rank 0 saves, and
    nobody is left waiting in an all-reduce."""
    out = tmp_path / 'out'
    latest = out / 'tiny_params_latest.pt'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone', 'main.py',
           *_tiny(tiny_dataset, out, '--iteration', '3000', '--save_freq', '3000', '--log_freq', '2',
                  '--latest_freq', '2')]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = _worker_pids(proc.pid)
        assert proc.poll() is None and set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGUSR1)   # rank 1 only
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    stops = re.findall(r'stopped by signal at step (\d+); SIGUSR1', err)
    assert len(stops) == 2 and len(set(stops)) == 1, err[-3000:]   # both ranks, the same step
    saved = torch.load(out / 'tiny' / 'model' / f'tiny_params_{int(stops[0]):07d}.pt', map_location='cpu',
                       weights_only=True)
    assert saved['step'] == int(stops[0]) and int(stops[0]) % 2 == 0


def test_ranks_draw_different_images(tiny_dataset):
    import dataset
    streams = [dataset.build_train_stream(tiny_dataset, 32, 2, seed=0, start_step=0, rank=rank, world_size=2)
               for rank in (0, 1)]
    firsts = [next(stream) for stream in streams]
    for domain in 'AB':
        assert firsts[0][domain].shape == (2, 3, 32, 32)
        assert not torch.equal(firsts[0][domain], firsts[1][domain]), domain


def _case_flags(name: str, datasets: dict[str, Path], result_dir: Path, weights: dict[str, Path]) -> list[str]:
    extra = [flag.format(**{k: str(v) for k, v in weights.items()}) for flag in CASES[name][0]]
    dataset = datasets['grouped' if '--group' in extra else 'tiny']
    return _tiny(dataset, result_dir / name, '--iteration', '10', *extra)


@pytest.fixture(scope='module')
def ddp_table(tmp_path_factory) -> tuple[Path, dict[str, list[str]], subprocess.CompletedProcess]:
    """One torchrun launch (2 ranks) trains every case of the table in turn."""
    from conftest import make_dataset, make_domain
    from facenet_pytorch import InceptionResnetV1

    from faceseg import BiSeNet
    folder = tmp_path_factory.mktemp('ddp_table')
    datasets = {'tiny': make_dataset(folder / 'tiny'), 'grouped': folder / 'grouped'}
    for group in GROUPS:
        for split in ('trainA', 'trainB', 'testA', 'testB'):
            make_domain(datasets['grouped'] / split / str(group), 2, 40, (60 + 100 * group, 90, 200), group)
    torch.manual_seed(0)
    weights = {'facenet': folder / 'facenet.pt', 'bisenet': folder / '79999_iter.pth'}
    torch.save(InceptionResnetV1(classify=False).state_dict(), weights['facenet'])
    torch.save(BiSeNet(19).state_dict(), weights['bisenet'])
    cases = {name: _case_flags(name, datasets, folder / 'out', weights) for name in CASES}
    (folder / 'cases.json').write_text(json.dumps(cases))
    (folder / 'ranks').mkdir()
    proc = _torchrun(str(Path(__file__).resolve()), str(folder / 'ranks'), str(folder / 'cases.json'),
                     timeout=TABLE_TIMEOUT_S)
    return folder / 'ranks', cases, proc


@pytest.mark.parametrize('case', list(CASES))
def test_ddp_feature_table(ddp_table, case):
    """Both ranks finish the case with identical weights (and buffers, EMA, ADA's p); without per-rank
    draws in the step they also equal a single-process run on the same batches."""
    ranks_dir, cases, proc = ddp_table
    errors = sorted(ranks_dir.glob(f'{case}.rank*.err'))
    assert not errors, errors[0].read_text()[-3000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (torch.load(ranks_dir / f'{case}.rank{r}.pt', weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name, value in rank0.items():
        torch.testing.assert_close(rank1[name], value, rtol=0, atol=0, msg=name)
    if case.startswith('ada') or case == 'preset_face2webtoon':
        assert all(float(rank0[f'ada.{d}.p']) != 0.5 for d in 'AB')   # p moved, by the all-reduced r_t
    if not CASES[case][1]:
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1): same kernels, same rounding
    try:
        single = _train_on_same_batches(cases[case])
    finally:
        torch.set_num_threads(threads)
    assert rank0.keys() == single.keys()
    for name, value in single.items():
        torch.testing.assert_close(rank0[name], value, rtol=1e-6, atol=1e-7, msg=name)



TF = ('--arch', 'tf', '--n_res', '4')


@pytest.mark.parametrize('flags', [(), ('--cam_D_weight', '0'), ('--cam_D_attention', 'False', '--cam_D_weight', '-1'),
                                   ('--cam_D_attention', 'False'), ('--sn', 'False', '--cam_D_weight', '0'),
                                   (*TF,), (*TF, '--cam_D_weight', '0'), (*TF, '--sn', 'False', '--cam_D_weight', '-1'),
                                   (*TF, '--tf_graph', '2019', '--sn', 'False', '--cam_D_weight', '0')],
                         ids=lambda f: ' '.join(f) or 'baseline')
def test_untrainable_parameters_are_exactly_the_ones_without_gradient(tiny_dataset, tmp_path, flags):
    """The rule DDP's wrapper relies on, against a real step: TF's L2 term still reaches some CAM kernels
    (not the 2019 graph's scaling FC, which TF made without the regulariser)."""
    from conftest import random_batches, record_gradients, tiny_trainer

    trainer = tiny_trainer(tiny_dataset, tmp_path, *flags)
    grads = record_gradients(trainer.D)
    trainer.train_step(random_batches(1)[0], 1)
    rule = {id(p) for p in distributed.untrainable_parameters(trainer.D, trainer.weights.cam_D_weight,
                                                              trainer.regularisers['D'])}
    assert {n for n, p in trainer.D.named_parameters() if id(p) in rule} == \
        {n for n, _ in trainer.D.named_parameters() if n not in grads}


def test_ddp_wrapper_skips_untrained_parameters_and_fails_loudly_on_a_wrong_rule():
    """DDP does not wait for the skipped parameters, and a skipped one that gets a gradient fails the step
    rather than letting the ranks drift apart (one rank, gloo, in this process)."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from torch import nn


    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.dead = nn.Linear(3, 1), nn.Linear(1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    ctx = SimpleNamespace(enabled=True, device=torch.device('cpu'))
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    try:
        net = Net()
        run, _, _ = distributed.wrap_for_speed({'A2B': net}, {}, ctx, False, untrained=list(net.dead.parameters()))
        for _ in range(2):   # without the skip, the second forward fails: the reduction never finished
            run['A2B'](torch.ones(2, 3)).sum().backward()
        assert net.used.weight.grad is not None and net.dead.weight.grad is None
        net = Net()
        run, _, _ = distributed.wrap_for_speed({'A2B': net}, {}, ctx, False, untrained=[net.used.bias])
        with pytest.raises(RuntimeError, match='untrainable'):
            run['A2B'](torch.ones(2, 3)).sum().backward()
    finally:
        dist.destroy_process_group()

if __name__ == '__main__':
    _worker(sys.argv[1], sys.argv[2])
