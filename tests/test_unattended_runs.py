"""A week unattended (issue 17): a full disk, --keep_checkpoints, one run per folder, left-over
temporary files, pickled checkpoints and SLURM's SIGUSR1. Tiny model, CPU, a few steps each."""
from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import random_batches, signal_after_step, tiny_flags, tiny_trainer

import checkpoints
import main
import run_folder
import signals
from ugatit import UGATIT

REPO = Path(__file__).resolve().parents[1]


def _model_dir(out: Path) -> Path:
    return out / 'tiny' / 'model'


def _run(dataset: Path, out: Path, *extra: str) -> int:
    return main.main(tiny_flags(dataset, out, *extra))


class _FillsUp(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, 'No space left on device')
        self.room -= len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        self.f.close()
        super().close()


def _disk_fills_after_step(monkeypatch, full_from: int) -> None:
    """From step ``full_from`` on, every file opened by atomic_save runs out of space mid-write."""
    real_fdopen, real_step = os.fdopen, UGATIT.train_step
    state = {'full': False}

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        return _FillsUp(f, 4096) if state['full'] else f

    def train_step(self, batch, step):
        state['full'] = step >= full_from
        return real_step(self, batch, step)

    monkeypatch.setattr(os, 'fdopen', fdopen)
    monkeypatch.setattr(UGATIT, 'train_step', train_step)


def test_full_disk_is_one_line_and_keeps_the_last_complete_checkpoint(tiny_dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'out'
    _disk_fills_after_step(monkeypatch, full_from=3)
    assert _run(tiny_dataset, out, '--iteration', '6', '--save_freq', '2') == 2
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(message) == 1 and 'no space left' in message[0] and str(_model_dir(out)) in message[0], err[-2000:]
    assert 'free' in message[0] and 'needs' in message[0]
    assert 'Traceback' not in err and 'could not save after the error' not in err   # no second try
    files = sorted(p.name for p in _model_dir(out).iterdir())
    assert files == ['tiny_params_0000002.pt'], files   # no partial file
    monkeypatch.undo()
    assert _run(tiny_dataset, out, '--iteration', '4', '--save_freq', '2', '--resume', 'True') == 0
    assert 'resumed from' in capsys.readouterr().err


def test_start_refuses_when_no_checkpoint_fits_and_warns_when_two_do_not(tiny_dataset, tmp_path, monkeypatch, capsys):
    needed = {}
    real_nbytes = UGATIT.checkpoint_nbytes

    def nbytes(self):
        needed['n'] = real_nbytes(self)
        return needed['n']

    monkeypatch.setattr(UGATIT, 'checkpoint_nbytes', nbytes)
    monkeypatch.setattr(checkpoints, 'free_bytes', lambda folder: needed['n'] - 1)
    assert _run(tiny_dataset, tmp_path / 'a', '--iteration', '2') == 2
    err = capsys.readouterr().err
    assert 'no room for a single checkpoint' in err and 'train:' not in err
    monkeypatch.setattr(checkpoints, 'free_bytes', lambda folder: needed['n'] * 3 // 2)
    assert _run(tiny_dataset, tmp_path / 'b', '--iteration', '2') == 0
    assert 'room for only one more checkpoint' in capsys.readouterr().err


def test_disk_check_of_a_fresh_run_counts_the_optimizer_moments_it_will_save(tiny_dataset, tmp_path):
    """Issue 24 6a: a fresh trainer has no Adam moments yet; sizing its state alone estimated about half
    of the real checkpoint (this test failed before: 0.5 of it)."""
    trainer = tiny_trainer(tiny_dataset, tmp_path, '--ema', 'False')
    estimate = trainer.checkpoint_nbytes()
    trainer.train_step(random_batches(1)[0], 1)
    saved = checkpoints.state_nbytes(trainer.state_dict())   # the tensors a checkpoint after step 1 holds
    assert 0.98 < estimate / saved <= 1.0


def test_keep_checkpoints_deletes_the_oldest_periodic_ones_only(tiny_dataset, tmp_path):
    out = tmp_path / 'out'
    assert _run(tiny_dataset, out, '--iteration', '8', '--save_freq', '2', '--keep_checkpoints', '2') == 0
    assert sorted(p.name for p in _model_dir(out).glob('*.pt')) == ['tiny_params_0000006.pt', 'tiny_params_0000008.pt']
    best = _model_dir(out) / 'tiny_params_best_fid.pt'
    best.write_bytes((_model_dir(out) / 'tiny_params_0000006.pt').read_bytes())
    assert _run(tiny_dataset, out, '--iteration', '12', '--save_freq', '2', '--keep_checkpoints', '1',
                '--resume', 'True') == 0
    assert sorted(p.name for p in _model_dir(out).glob('*.pt')) == ['tiny_params_0000012.pt', best.name]
    assert main.main(['--keep_checkpoints', '-1', '--dataset', str(tiny_dataset)]) == 2


def test_leftover_temporary_checkpoints_are_removed_at_start(tiny_dataset, tmp_path, capsys):
    out = tmp_path / 'out'
    assert _run(tiny_dataset, out, '--iteration', '2', '--save_freq', '2') == 0
    leftover = _model_dir(out) / '.tiny_params_0000004.pt.k3x9_q.tmp'
    leftover.write_bytes(b'half a checkpoint')
    other = _model_dir(out) / 'notes.tmp'   # not ours: stays
    other.write_text('mine')
    assert _run(tiny_dataset, out, '--iteration', '3', '--save_freq', '3', '--resume', 'True') == 0
    assert not leftover.exists() and other.exists()
    assert f'removed {leftover}' in capsys.readouterr().err


class _Pickled:
    pass


def test_pickled_checkpoint_is_refused_plainly(tiny_dataset, tmp_path, capsys):
    path = tmp_path / 'pickled.pt'
    torch.save({'genA2B': _Pickled(), 'genB2A': {}}, path)
    assert _run(tiny_dataset, tmp_path / 'out', '--phase', 'test', '--checkpoint', str(path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'not a plain tensor checkpoint' in err[0] and 'can run arbitrary code' in err[0]
    assert 'weights_only' not in err[0] and 'Re-running' not in err[0]


def _start_run(dataset: Path, out: Path, go: Path, *extra: str) -> subprocess.Popen:
    """A training process that waits for ``go`` to exist, so that two start at the same moment."""
    script = (f'import pathlib, sys, time\n'
              f'while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.002)\n'
              f'import main\nsys.exit(main.main(sys.argv[1:]))\n')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO)}
    return subprocess.Popen([sys.executable, '-c', script, *tiny_flags(dataset, out, *extra)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_two_runs_started_together_never_share_a_folder(tiny_dataset, tmp_path):
    for attempt, resume in enumerate(('False', 'False', 'True')):
        go = tmp_path / f'go{attempt}'
        out = tmp_path / f'out{attempt}'
        flags = ('--iteration', '40', '--save_freq', '40', '--resume', resume)
        procs = [_start_run(tiny_dataset, out, go, *flags) for _ in range(2)]
        time.sleep(1.0)   # both are waiting at the barrier
        go.touch()
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 2], results
        loser = next(err for code, err in results if code == 2)
        winner = next(p for p, (code, _) in zip(procs, results) if code == 0)
        assert f'is in use by another process (PID {winner.pid})' in loser, loser[-2000:]
        assert 'Traceback' not in loser


def test_sigusr1_saves_and_exits_with_the_requeue_status(tiny_dataset, tmp_path, monkeypatch, capsys):
    signal_after_step(monkeypatch, 2, signal.SIGUSR1)
    out = tmp_path / 'out'
    assert _run(tiny_dataset, out, '--iteration', '6', '--save_freq', '6') == signals.REQUEUE_EXIT_CODE
    assert 'stopped by signal at step 2; SIGUSR1' in capsys.readouterr().err
    assert checkpoints.load_checkpoint(_model_dir(out) / 'tiny_params_0000002.pt')['step'] == 2
    monkeypatch.undo()
    assert _run(tiny_dataset, out, '--iteration', '3', '--save_freq', '3', '--resume', 'True') == 0


def _delete_after_step(monkeypatch, step: int, path: Path) -> None:
    """Delete ``path`` once ``step`` has trained (num_workers 0: the next batch is read after it)."""
    original = UGATIT.train_step

    def train_step(self, batch, current):
        logs = original(self, batch, current)
        if current == step:
            path.unlink()
        return logs
    monkeypatch.setattr(UGATIT, 'train_step', train_step)


def test_image_deleted_mid_run_then_resume_draws_as_the_unbroken_run(tmp_path, monkeypatch, capsys):
    """The resumed run keeps the file lists the run started with, so a deleted file is replaced as
    the unbroken run replaced it (before: the resumed run listed one file less and drew otherwise)."""
    from conftest import assert_same_weights, make_dataset
    counts = (12, 12, 3, 2)   # 1 of 12 unreadable stays under the 10% that stops a run
    unbroken_data = make_dataset(tmp_path / 'd1' / 'tiny', counts)
    broken_data = make_dataset(tmp_path / 'd2' / 'tiny', counts)
    flags = ('--iteration', '16', '--batch_size', '1', '--seed', '3')
    victim = 'img2.png'   # batch 1: every image of trainA is drawn once in steps 1-12 and again from 13 on
    _delete_after_step(monkeypatch, 8, unbroken_data / 'trainA' / victim)
    assert _run(unbroken_data, tmp_path / 'u', *flags, '--save_freq', '16') == 0
    monkeypatch.undo()
    signal_after_step(monkeypatch, 8, signal.SIGUSR1)   # the unbroken run's schedule, stopped at step 8
    assert _run(broken_data, tmp_path / 'b', *flags, '--save_freq', '16') == signals.REQUEUE_EXIT_CODE
    monkeypatch.undo()
    (broken_data / 'trainA' / victim).unlink()
    assert _run(broken_data, tmp_path / 'b', *flags, '--save_freq', '16', '--resume', 'True') == 0
    assert capsys.readouterr().err.count(f'skipping unreadable image {broken_data / "trainA" / victim}') == 1
    assert_same_weights(checkpoints.load_checkpoint(_model_dir(tmp_path / 'u') / 'tiny_params_0000016.pt'),
                        checkpoints.load_checkpoint(_model_dir(tmp_path / 'b') / 'tiny_params_0000016.pt'))


def test_images_added_before_resume_are_used_with_a_note(tiny_dataset, tmp_path, capsys):
    assert _run(tiny_dataset, tmp_path / 'o', '--iteration', '2', '--save_freq', '2') == 0
    (tiny_dataset / 'trainA' / 'new.png').write_bytes((tiny_dataset / 'trainA' / 'img0.png').read_bytes())
    assert _run(tiny_dataset, tmp_path / 'o', '--iteration', '3', '--save_freq', '3', '--resume', 'True') == 0
    assert 'note: 1 image(s) added to' in capsys.readouterr().err
    state = checkpoints.load_checkpoint(_model_dir(tmp_path / 'o') / 'tiny_params_0000003.pt')
    assert 'new.png' in state['data_files']['files']['A']


def test_phases_writing_into_the_run_folder_wait_for_its_training(tiny_dataset, tmp_path, capsys):
    """The lock is the run folder's: a test phase writing into it refuses while the training holds it;
    with --out_dir elsewhere it only reads and runs."""
    out = tmp_path / 'out'
    assert _run(tiny_dataset, out, '--iteration', '2', '--save_freq', '2') == 0
    capsys.readouterr()
    lock = run_folder.RunLock(out / 'tiny' / '.lock').acquire()   # what the training process holds
    try:
        assert _run(tiny_dataset, out, '--phase', 'test') == 2
        assert f'in use by another process (PID {os.getpid()})' in capsys.readouterr().err
        assert _run(tiny_dataset, out, '--phase', 'test', '--out_dir', str(tmp_path / 'elsewhere')) == 0
        assert _run(tiny_dataset, out, '--iteration', '4', '--resume', 'True') == 2
    finally:
        lock.release()
    assert _run(tiny_dataset, out, '--phase', 'test') == 0
