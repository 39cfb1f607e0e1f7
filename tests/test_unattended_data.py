"""Issue 17 (items 3 and 4, data side): a training image that breaks mid-run, too many broken images,
and SIGTERM to the whole process group with data-loader workers. Tiny model, 20-step runs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import assert_same_weights, make_dataset, tiny_flags

import checkpoints
import dataset as ds
import main
from ugatit import UGATIT

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH, SAVE = 20, 2, 10
# DataLoader workers (2, each 2 batches ahead) may read the batches of the next 4 steps before a
# damage made at step N; from step N + 5 on, every read sees it.
PREFETCHED = 4
_TRAIN_STEP = UGATIT.train_step


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def _flags(dataset: Path, out: Path, *extra: str) -> list[str]:
    flags = tiny_flags(dataset, out, '--iteration', str(STEPS), '--save_freq', str(SAVE),
                       '--batch_size', str(BATCH), *extra)
    flags[flags.index('--num_workers') + 1] = '2'
    return flags


def _dataset(root: Path) -> Path:
    """10 images per training domain: one unreadable file is within the 10 % allowed."""
    return make_dataset(root / 'tiny', counts=(10, 10, 3, 2))


def _damage_plan(dataset: Path) -> tuple[int, Path]:
    """(step N < SAVE, a trainA file) such that the file is not drawn in the prefetch window after N
    but twice or more later: its damage at N is seen at the same steps in every run."""
    paths = ds.domain_images(dataset, 'trainA')[0]
    sampler = ds.StepBatchSampler({'A': {None: list(range(len(paths)))}, 'B': {None: list(range(10))}},
                                  BATCH, seed=0)
    draws = {i: [s for s in range(1, STEPS + 1) for spec in sampler.batch(s) if spec.index_A == i]
             for i in range(len(paths))}
    for step in range(2, SAVE):
        for index, steps in draws.items():
            if not any(step < s <= step + PREFETCHED for s in steps) and sum(s > step + PREFETCHED
                                                                            for s in steps) >= 2:
                return step, paths[index]
    raise AssertionError('no damage plan for this sampler')


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _damage_at(monkeypatch: pytest.MonkeyPatch, step: int, damage: Callable[[], None]) -> None:
    """Damage the data in the main process right before training step `step` (replaces any earlier hook)."""
    def damage_then_step(self, batch, current):
        if current == step:
            damage()
        return _TRAIN_STEP(self, batch, current)
    monkeypatch.setattr(UGATIT, 'train_step', damage_then_step)


def _weights(out: Path, step: int) -> dict:
    return checkpoints.load_checkpoint(out / 'tiny' / 'model' / f'tiny_params_{step:07d}.pt')


def _warnings_naming(err: str, path: Path) -> int:
    return sum(str(path) in line for line in err.splitlines())


def test_image_truncated_mid_run_is_replaced_warned_once_and_resume_is_exact(tmp_path, monkeypatch, capfd):
    runs = {}
    for name in ('first', 'second'):   # the same damage at the same step, on two copies of the data
        data = _dataset(tmp_path / f'data_{name}')
        step, victim = _damage_plan(data)
        _damage_at(monkeypatch, step, lambda victim=victim: _truncate(victim))
        assert main.main(_flags(data, tmp_path / name)) == 0
        err = capfd.readouterr().err
        assert _warnings_naming(err, victim) == 1, err[-2000:]
        assert 'skipping unreadable image' in err and 'Traceback' not in err
        runs[name] = data
    assert_same_weights(_weights(tmp_path / 'first', STEPS), _weights(tmp_path / 'second', STEPS))

    # Resume from the checkpoint written after the damage (the file is still broken): same weights.
    monkeypatch.undo()
    (tmp_path / 'first' / 'tiny' / 'model' / f'tiny_params_{STEPS:07d}.pt').unlink()
    assert main.main(_flags(runs['first'], tmp_path / 'first', '--resume', 'True')) == 0
    assert f'at step {SAVE}' in capfd.readouterr().err
    assert_same_weights(_weights(tmp_path / 'first', STEPS), _weights(tmp_path / 'second', STEPS))


def test_too_many_unreadable_images_stop_with_one_line_and_a_checkpoint(tmp_path, monkeypatch, capfd):
    data = _dataset(tmp_path)
    truncated, deleted = ds.domain_images(data, 'trainA')[0][:2]   # 2 of 10: more than 10 %

    def damage() -> None:
        _truncate(truncated)
        deleted.unlink()
    _damage_at(monkeypatch, 3, damage)
    assert main.main(_flags(data, tmp_path / 'out')) == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'trainA' in errors[0] and '2 of 10' in errors[0], err[-2000:]
    assert 'Traceback' not in err
    saved = sorted((tmp_path / 'out' / 'tiny' / 'model').glob('tiny_params_*.pt'))
    assert saved and checkpoints.load_checkpoint(saved[-1])['step'] >= 3


# SIGINT (Ctrl-C) already worked: forked workers inherit the main process's Python handler.
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_signal_to_the_process_group_stops_cleanly_and_resumes(tmp_path, signum):
    """What `timeout`, systemd and SLURM do: SIGTERM to every process of the job, workers included;
    torch's SIGTERM handler in the workers made it a crash report."""
    data = make_dataset(tmp_path / 'tiny')
    out = tmp_path / 'out'
    first = out / 'tiny' / 'model' / 'tiny_params_0000004.pt'
    flags = _flags(data, out, '--iteration', '2000', '--save_freq', '4')
    with open(tmp_path / 'stderr.txt', 'w+') as stderr:
        proc = subprocess.Popen([sys.executable, 'main.py', *flags], cwd=REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        deadline = time.monotonic() + 120
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, 'the run ended before the signal'
        os.killpg(proc.pid, signum)
        returncode = proc.wait(timeout=120)
        stderr.seek(0)
        err = stderr.read()
    assert 'stopped by signal at step' in err and 'Traceback' not in err, err[-3000:]
    assert returncode == 128 + signum   # signals.stop_exit_code: as if killed by the signal, but after a checkpoint
    stopped = int(err.split('stopped by signal at step ')[1].split(';')[0])
    assert _weights(out, stopped)['step'] == stopped
    resumed = tiny_flags(data, out, '--iteration', str(stopped + 2), '--save_freq', '2', '--resume', 'True')
    assert main.main(resumed) == 0
    assert _weights(out, stopped + 2)['step'] == stopped + 2
