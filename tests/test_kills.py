"""Issue 24 items 1-3, end to end: kill -9 of the trainer then an immediate resume, a dead data-loader worker,
and an error inside a step, with real processes, real data-loader workers and torchrun (2 gloo ranks, CPU).

Every training run here is the tiny model for a handful of steps; each subprocess has a timeout that fails
the test rather than hanging the suite. The end-to-end tests are marked ``slow`` (``-m 'not slow'`` leaves
them out). Faults are injected from outside (SIGKILL, SIGSTOP of a PID found in /proc) or, where their timing
matters, inside the training process by :func:`inject_from_environment` (a wrapper of main.py).
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_weights, make_dataset, tiny_flags

import checkpoints
import main
import run_folder
from errors import UserError

pytestmark = pytest.mark.usefixtures('one_torch_thread')

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300   # one training process or torchrun job: 10-40 s on 2 idle cores, minutes when others share them
DDP_STEPS = 12    # the 2-rank runs; every step saved, so any checkpoint can be compared with the unbroken run's

slow = pytest.mark.slow


# -- processes ----------------------------------------------------------------------------------------

def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR',
                                                            'MASTER_PORT', 'TORCHELASTIC_RESTART_COUNT')}
    env.update(OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT), **extra)
    return env


def _flags(dataset: Path, out: Path, *extra: str) -> list[str]:
    """The tiny model with 2 data-loader workers."""
    flags = tiny_flags(dataset, out, *extra)
    flags[flags.index('--num_workers') + 1] = '2'
    return flags


class Job:
    """A training process (``python main.py`` or a torchrun agent) whose stderr goes to a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with open(log, 'w') as stderr:
            self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env or _env(),
                                         stdout=subprocess.DEVNULL, stderr=stderr)
        self.pid = self.proc.pid
        self.started = time.monotonic()

    @classmethod
    def train(cls, flags: list[str], log: Path) -> Job:
        return cls(['main.py', *flags], log)

    @classmethod
    def torchrun(cls, flags: list[str], log: Path, *, max_restarts: int = 0, script: str = 'main.py',
                 env: dict[str, str] | None = None) -> Job:
        """2 ranks of ``script``. By default torchrun hands its rendezvous TCPStore to the ranks, and a restarted
        group then reads the failed attempt's gloo addresses from it (pytorch/pytorch#135712; torch 2.14 still:
        init_process_group hangs or fails 'connectFullMesh ... Connection refused' at random after a restart).
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 is how a job with --max-restarts must launch torchrun."""
        env = {**(env or _env()), 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'}
        return cls(['-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone', '--max-restarts',
                    str(max_restarts), script, *flags], log, env)

    def err(self) -> str:
        return self.log.read_text(errors='replace')

    def tail(self, n: int = 3000) -> str:
        """The end of stderr without the progress bars."""
        lines = re.split(r'[\r\n]+', self.err())
        return '\n'.join(line for line in lines if not line.startswith('train:'))[-n:]

    def finish(self, timeout: float = TIMEOUT_S) -> int:
        """The exit status; a job still running after ``timeout`` fails the test (and is killed)."""
        try:
            return self.proc.wait(timeout=max(1.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f'timed out after {timeout} s (hung?):\n{self.tail(4000)}')

    def kill(self) -> None:
        """SIGKILL what is left of this job's process tree (ranks, data-loader workers)."""
        if self.proc.poll() is None:
            for pid in _tree(self.pid):
                _kill(pid)
        self.proc.wait(timeout=60)


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    return sorted(int(p.name) for p in Path('/proc').iterdir() if p.name.isdigit() and _ppid(int(p.name)) == pid)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, parents first."""
    found = [pid]
    for child in _children(pid):
        found += _tree(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _data_workers(pid: int) -> list[int]:
    """The data-loader workers of the training process ``pid``: its forked children (same command line)."""
    cmdline = Path(f'/proc/{pid}/cmdline').read_bytes()
    found = []
    for child in _children(pid):
        try:
            if Path(f'/proc/{child}/cmdline').read_bytes() == cmdline:
                found.append(child)
        except OSError:
            pass
    return found


def _ranks(agent: int) -> dict[int, int]:
    """RANK -> PID of a torchrun agent's rank processes."""
    found = {}
    for pid in _children(agent):
        try:
            environ = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
        except OSError:
            continue
        for entry in environ:
            if entry.startswith(b'RANK='):
                found[int(entry[5:])] = pid
    return found


# -- checkpoints ---------------------------------------------------------------------------------------

def _path(out: Path, step: int) -> Path:
    return out / 'tiny' / 'model' / f'tiny_params_{step:07d}.pt'


def _saved_steps(out: Path) -> list[int]:
    return sorted(run_folder.step_of(p) for p in (out / 'tiny' / 'model').glob('tiny_params_[0-9]*.pt'))


def _load(out: Path, step: int) -> dict:
    return checkpoints.load_checkpoint(_path(out, step))


def _wait_for_checkpoint(job: Job, out: Path, after: int, timeout: float = TIMEOUT_S) -> int:
    """The step of the first checkpoint newer than ``after`` that ``job`` writes (files appear complete:
    atomic_save renames them into place); fails if the job ends or times out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        newer = [s for s in _saved_steps(out) if s > after]
        if newer:
            return min(newer)
        if job.proc.poll() is not None:
            pytest.fail(f'the run ended (status {job.proc.returncode}) before a checkpoint after step {after}:\n'
                        f'{job.tail(4000)}')
        time.sleep(0.02)
    job.kill()
    pytest.fail(f'no checkpoint after step {after} within {timeout} s:\n{job.tail(4000)}')


def _assert_same_state(a: dict, b: dict) -> None:
    """Same weights (assert_same_weights) and the same global RNG states."""
    assert_same_weights(a, b)
    assert a['rng'].keys() == b['rng'].keys()
    for key, value in a['rng'].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b['rng'][key]), f'rng {key}'
        else:
            assert value == b['rng'][key], f'rng {key}'


# -- 1. kill -9 of the trainer, then an immediate resume -------------------------------------------------

@slow
def test_kill_9_of_the_trainer_then_an_immediate_resume_is_accepted(tmp_path):
    """The OOM killer (or kill -9 PID) ends the trainer only: its data-loader workers live on as orphans for
    a while. Each of 3 resumes, started at once, takes the run folder and trains on. In the last cycle the
    workers are frozen (SIGSTOP, as a worker stuck in I/O is) before the kill, so their copies of the lock
    file certainly outlive the resume's start: a lock the forked workers shared would refuse it."""
    data = make_dataset(tmp_path / 'tiny')
    out = tmp_path / 'out'
    flags = _flags(data, out, '--iteration', '100000', '--save_freq', '2')
    job = Job.train(flags, tmp_path / 'run0.err')
    command = Path(f'/proc/{job.pid}/cmdline').read_bytes()
    orphans: list[int] = []
    try:
        _wait_for_checkpoint(job, out, after=0)
        for cycle in (1, 2, 3):
            workers = _data_workers(job.pid)
            assert len(workers) == 2, workers
            if cycle == 3:
                for pid in workers:
                    os.kill(pid, signal.SIGSTOP)
            os.kill(job.pid, signal.SIGKILL)   # the trainer only
            job.proc.wait(timeout=60)
            orphans += workers
            assert any(_alive(pid) for pid in workers), 'the workers ended with the trainer: nothing tested'
            newest = max(_saved_steps(out))   # what the killed trainer saved last
            job = Job.train([*flags, '--resume', 'True'], tmp_path / f'run{cycle}.err')
            _wait_for_checkpoint(job, out, after=newest)   # the resume holds the folder and trains on
            err = job.err()
            assert 'in use by another process' not in err and 'still held' not in err, job.tail()
            assert f'resumed from {_path(out, newest)} at step {newest}' in err, job.tail()
            if cycle == 3:
                assert all(_alive(pid) for pid in workers), 'the frozen workers ended: nothing tested'
            newest = max(_saved_steps(out))
    finally:
        job.kill()
        for pid in orphans:   # the frozen ones; the others have ended by themselves (checked: still ours)
            if _alive(pid) and Path(f'/proc/{pid}/cmdline').read_bytes().startswith(command):
                _kill(pid)


def test_a_forked_child_does_not_keep_the_run_lock(tmp_path):
    """The lock is released with its holder although a child forked while it was held (a data-loader
    worker) lives on: another process then takes it."""
    path = tmp_path / 'run' / '.lock'
    lock = run_folder.RunLock(path).acquire()
    child = os.fork()
    if child == 0:   # pragma: no cover - the child only waits to be killed
        try:
            time.sleep(120)
        finally:
            os._exit(0)
    try:
        lock.release()
        take = 'import fcntl, sys\nfcntl.flock(open(sys.argv[1]), fcntl.LOCK_EX | fcntl.LOCK_NB)\nprint("taken")\n'
        taken = subprocess.run([sys.executable, '-c', take, str(path)], capture_output=True, text=True, timeout=60)
        assert taken.returncode == 0 and 'taken' in taken.stdout, taken.stderr[-2000:]   # another process
        run_folder.RunLock(path, wait_for_dead_holder_s=0).acquire().release()           # another open file
        assert _alive(child)
    finally:
        _kill(child)
        os.waitpid(child, 0)


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True,
                          timeout=60)
    pid = int(proc.stdout)
    assert not _alive(pid)
    return pid


_HOLD = ('import fcntl, sys, time\n'
         'f = open(sys.argv[1], "a+")\n'
         'fcntl.flock(f, fcntl.LOCK_EX)\n'
         'print("held", flush=True)\n'
         'time.sleep(float(sys.argv[2]))\n')


def _hold(path: Path, seconds: float) -> subprocess.Popen:
    """Another process that holds the lock file's flock for ``seconds`` without recording its PID (an
    orphaned worker of a dead holder)."""
    holder = subprocess.Popen([sys.executable, '-c', _HOLD, str(path), str(seconds)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == 'held'
    return holder


def test_a_dead_recorded_holder_is_never_named_as_the_process_in_the_way(tmp_path):
    path = tmp_path / 'run' / '.lock'
    path.parent.mkdir()
    dead = _dead_pid()
    path.write_text(f'{dead}\n')
    holder = _hold(path, 120)
    try:
        with pytest.raises(UserError) as refused:
            run_folder.RunLock(path, wait_for_dead_holder_s=0.5).acquire()
    finally:
        holder.kill()
        holder.wait()
    message = str(refused.value)
    assert f'in use by another process (PID {dead})' not in message
    assert f'(PID {dead}) has ended' in message and 'still held' in message, message

    # Left by a dead holder's children that exit soon after: the lock is taken once they are gone.
    path.write_text(f'{dead}\n')
    holder = _hold(path, 1.0)
    try:
        lock = run_folder.RunLock(path, wait_for_dead_holder_s=60).acquire()
        assert path.read_text() == f'{os.getpid()}\n'
        lock.release()
    finally:
        holder.kill()
        holder.wait()


# -- 2. a dead data-loader worker -------------------------------------------------------------------------

WORKER_RUN = ('--iteration', '16', '--save_freq', '4')


@pytest.fixture(scope='module')
def single_unbroken(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, result dir) of an unbroken one-process run with 2 data-loader workers."""
    folder = tmp_path_factory.mktemp('single_unbroken')
    data = make_dataset(folder / 'tiny')
    job = Job.train(_flags(data, folder / 'out', *WORKER_RUN), folder / 'run.err')
    assert job.finish() == 0, job.tail(3000)
    return data, folder / 'out'


@slow
@pytest.mark.parametrize('when', ['from outside', 'inside a G step'])
def test_a_killed_data_worker_is_replaced_and_the_run_ends_as_an_unbroken_one(single_unbroken, tmp_path, when):
    """A worker SIGKILLed mid-run (the OOM killer's pick): the run goes on with a fresh loader at the same step
    and ends as the unbroken run. 'inside a G step': the trainer kills its worker itself after the critics'
    update and waits for it to die, so the worker's SIGCHLD lands where the step can no longer be undone."""
    data, unbroken = single_unbroken
    out = tmp_path / 'out'
    flags = _flags(data, out, *WORKER_RUN)
    if when == 'inside a G step':
        job = Job([str(_injecting_main(tmp_path)), *flags], tmp_path / 'run.err', _env(INJECT='kill_worker@6'))
    else:
        job = Job.train(flags, tmp_path / 'run.err')
    try:
        if when == 'from outside':
            _wait_for_checkpoint(job, out, after=0)
            workers = _data_workers(job.pid)
            assert len(workers) == 2, workers
            os.kill(workers[0], signal.SIGKILL)
        code = job.finish()
    finally:
        job.kill()
    err = job.err()
    assert code == 0, job.tail()
    assert 'a fresh data loader continues at step' in err and 'Traceback' not in err, job.tail()
    assert_same_weights(_load(out, 16), _load(unbroken, 16))


@pytest.fixture(scope='module')
def ddp_unbroken(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, result dir) of an unbroken 2-rank run of DDP_STEPS steps, every step saved."""
    folder = tmp_path_factory.mktemp('ddp_unbroken')
    data = make_dataset(folder / 'tiny')
    out = folder / 'out'
    job = Job.torchrun(_ddp_flags(data, out), folder / 'torchrun.err')
    assert job.finish() == 0, job.tail(4000)
    assert _saved_steps(out) == list(range(1, DDP_STEPS + 1))
    return data, out


def _ddp_flags(data: Path, out: Path, save_freq: int = 1) -> list[str]:
    return _flags(data, out, '--iteration', str(DDP_STEPS), '--save_freq', str(save_freq), '--resume', 'True')


def _resumed_at(err: str) -> list[int]:
    """The steps rank 0 resumed from: one per restart of the ranks by torchrun."""
    return [int(step) for step in re.findall(r'resumed from \S+ at step (\d+)', err)]


def _kill_in_a_two_rank_run(data: Path, out: Path, tmp_path: Path, victim: Callable[[list[int]], int]) -> tuple:
    """A restartable two-rank torchrun run; once its first checkpoint exists, SIGKILL the process
    ``victim(rank pids)`` names, and let the run finish: (the job, torchrun's exit status)."""
    job = Job.torchrun(_ddp_flags(data, out), tmp_path / 'torchrun.err', max_restarts=2)
    try:
        _wait_for_checkpoint(job, out, after=2)
        ranks = _ranks(job.pid)
        assert set(ranks) == {0, 1}, ranks
        os.kill(victim(ranks), signal.SIGKILL)
        code = job.finish()
    finally:
        job.kill()
    return job, code


@slow
def test_a_killed_data_worker_of_one_rank_is_replaced_without_a_restart(ddp_unbroken, tmp_path):
    """Rank 1 replaces its loader by itself while rank 0 waits in the all-reduce: no rank fails, torchrun
    restarts nothing (a rank ending with WorkerDied would be restarted and rank 0 would log 'resumed from')."""
    data, unbroken = ddp_unbroken
    out = tmp_path / 'out'

    def a_data_worker_of_rank_1(ranks: list[int]) -> int:
        workers = _data_workers(ranks[1])
        assert len(workers) == 2, workers
        return workers[1]
    job, code = _kill_in_a_two_rank_run(data, out, tmp_path, a_data_worker_of_rank_1)
    err = job.err()
    assert code == 0, job.tail(4000)
    assert 'failed (exitcode' not in err and _resumed_at(err) == [], job.tail(4000)   # replaced inside rank 1
    assert_same_weights(_load(out, DDP_STEPS), _load(unbroken, DDP_STEPS))


@slow
def test_a_killed_rank_is_restarted_by_torchrun_and_resumes(ddp_unbroken, tmp_path):
    """kill -9 of rank 0 (the run folder's lock holder and checkpoint writer), its workers left orphaned:
    rank 1's collective fails, torchrun restarts both ranks, and they resume from the newest checkpoint."""
    data, unbroken = ddp_unbroken
    out = tmp_path / 'out'
    # rank 0: the one holding the run folder and writing the checkpoints
    job, code = _kill_in_a_two_rank_run(data, out, tmp_path, lambda ranks: ranks[0])
    err = job.err()
    assert code == 0, job.tail(4000)
    assert len(_resumed_at(err)) == 1 and 'failed (exitcode: -9) local_rank: 0' in err, job.tail(4000)
    assert_same_weights(_load(out, DDP_STEPS), _load(unbroken, DDP_STEPS))


# -- 3. an error inside a step --------------------------------------------------------------------------

STEPS, FAIL_AT = 8, 5


def _track_step(patch: Callable[[object, str, object], None]) -> dict:
    """{'step': the training step in progress, 'd_real': its D loss calls so far}, kept up to date."""
    import ugatit
    current = {'step': 0, 'd_real': 0}
    train_step = ugatit.UGATIT.train_step

    def tracked_train_step(self, batch, step):
        current.update(step=step, d_real=0)
        return train_step(self, batch, step)
    patch(ugatit.UGATIT, 'train_step', tracked_train_step)
    return current


def inject_error(kind: str, step: int, patch: Callable[[object, str, object], None]) -> None:
    """Make training step ``step`` raise: ``'before'`` the critics' optimizer update (in the second D loss,
    once both critics' power iterations have run, after drawing from every global RNG), or ``'after'``
    it (in the generator step's L1 terms). ``patch`` is ``monkeypatch.setattr`` or ``setattr``."""
    import losses
    current = _track_step(patch)
    d_real, l1 = losses.GANLoss.d_real, losses.l1

    def failing_d_real(self, *args, **kwargs):
        current['d_real'] += 1
        if current['step'] == step and current['d_real'] == 2:
            torch.rand(1), random.random(), np.random.rand()
            raise RuntimeError(f'injected error before the critics update of step {step}')
        return d_real(self, *args, **kwargs)

    def failing_l1(*args, **kwargs):
        if current['step'] == step:
            raise RuntimeError(f'injected error after the critics update of step {step}')
        return l1(*args, **kwargs)

    if kind == 'before':
        patch(losses.GANLoss, 'd_real', failing_d_real)
    else:
        patch(losses, 'l1', failing_l1)


def kill_a_worker_inside(step: int, patch: Callable[[object, str, object], None]) -> None:
    """In training step ``step``, after the critics' update (the generator step's first L1 term), SIGKILL
    one of this process's data-loader workers and wait until it has died (its SIGCHLD is then sent)."""
    import losses
    current = _track_step(patch)
    l1 = losses.l1
    done = []

    def killing_l1(*args, **kwargs):
        if current['step'] == step and not done:
            victim = _data_workers(os.getpid())[0]
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while _alive(victim) and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(0.05)
            done.append(victim)
        return l1(*args, **kwargs)
    patch(losses, 'l1', killing_l1)


def inject_from_environment() -> None:
    """In a process started by :func:`_injecting_main`: INJECT='<what>@<step>,...' names what to do on each
    attempt of torchrun (the i-th entry on TORCHELASTIC_RESTART_COUNT i; a plain process is attempt 0) in
    rank INJECT_RANK (default 0): 'before' or 'after' (:func:`inject_error`), 'kill_worker'
    (:func:`kill_a_worker_inside`)."""
    env = os.environ
    plan = env.get('INJECT', '').split(',')
    attempt = int(env.get('TORCHELASTIC_RESTART_COUNT', '0'))
    if env.get('RANK', '0') != env.get('INJECT_RANK', '0') or attempt >= len(plan) or not plan[attempt]:
        return
    what, step = plan[attempt].split('@')
    if what == 'kill_worker':
        kill_a_worker_inside(int(step), setattr)
    else:
        inject_error(what, int(step), setattr)


def _injecting_main(folder: Path) -> Path:
    """main.py with :func:`inject_from_environment` applied first."""
    script = folder / 'injecting_main.py'
    script.write_text(f'import sys\nsys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]\nimport test_kills\n'
                      f'test_kills.inject_from_environment()\nimport main\nsys.exit(main.main(sys.argv[1:]))\n')
    return script




@pytest.fixture(scope='module')
def unbroken(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, result dir) of an unbroken in-process run of STEPS steps, every step saved."""
    folder = tmp_path_factory.mktemp('unbroken')
    data = make_dataset(folder / 'tiny')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main.main(tiny_flags(data, folder / 'out', '--iteration', str(STEPS), '--save_freq', '1')) == 0
    finally:
        torch.set_num_threads(threads)
    return data, folder / 'out'


def test_an_error_before_the_critics_update_saves_exactly_the_step_before(unbroken, tmp_path, monkeypatch,
                                                                          capsys):
    """The failed step is undone (spectral norm's u, v; every global RNG) and saved as step 4: bit for bit
    the unbroken run's step 4, RNG states included; resuming from it ends as the unbroken run."""
    data, reference = unbroken
    out = tmp_path / 'out'
    flags = tiny_flags(data, out, '--iteration', str(STEPS), '--save_freq', str(STEPS))
    inject_error('before', FAIL_AT, monkeypatch.setattr)
    with pytest.raises(RuntimeError, match='injected error before'):
        main.main(flags)
    monkeypatch.undo()
    done = FAIL_AT - 1
    assert _saved_steps(out) == [done]
    _assert_same_state(_load(out, done), _load(reference, done))   # SN's u, v and the RNG states undone
    assert f'error inside step {FAIL_AT}; saved step {done} to {_path(out, done)}' in capsys.readouterr().err

    assert main.main([*flags, '--resume', 'True']) == 0
    assert f'at step {done}' in capsys.readouterr().err
    assert_same_weights(_load(out, STEPS), _load(reference, STEPS))


def test_an_error_after_the_critics_update_keeps_the_last_good_checkpoint(unbroken, tmp_path, monkeypatch, capsys):
    """Past the critics' update the step cannot be undone: nothing is written, the message names the last
    good checkpoint, and resuming from it ends as the unbroken run."""
    data, reference = unbroken
    out = tmp_path / 'out'
    flags = tiny_flags(data, out, '--iteration', str(STEPS), '--save_freq', '3')
    inject_error('after', FAIL_AT + 1, monkeypatch.setattr)   # step 6: the last good checkpoint is step 3's
    with pytest.raises(RuntimeError, match='injected error after'):
        main.main(flags)
    monkeypatch.undo()
    assert _saved_steps(out) == [3]   # nothing named step 5, which the critics' update of step 6 has left behind
    err = capsys.readouterr().err
    assert (f'error inside step {FAIL_AT + 1} after its optimizer updates; the state of step {FAIL_AT} cannot be '
            f'restored exactly, so the last good checkpoint ({_path(out, 3)}) stays the newest') in err, err[-3000:]
    _assert_same_state(_load(out, 3), _load(reference, 3))

    assert main.main([*flags, '--resume', 'True']) == 0
    assert 'at step 3' in capsys.readouterr().err
    assert_same_weights(_load(out, STEPS), _load(reference, STEPS))


@slow
def test_errors_inside_steps_of_one_rank_restart_and_end_as_an_unbroken_run(ddp_unbroken, tmp_path):
    """Rank 1 fails inside step 6 before the critics' update, then (restarted) inside step 10 after it;
    checkpoints every 4 steps. Rank 0, whose collective fails in the same step, saves step 5 the first time
    (exactly the unbroken run's step 5) and nothing the second (step 8 stays the newest). torchrun
    restarts both ranks each time and they resume by themselves."""
    data, unbroken = ddp_unbroken
    out = tmp_path / 'out'
    job = Job.torchrun(_ddp_flags(data, out, save_freq=4), tmp_path / 'torchrun.err', max_restarts=2,
                       script=str(_injecting_main(tmp_path)), env=_env(INJECT_RANK='1', INJECT='before@6,after@10'))
    code = job.finish()
    err = job.err()
    assert code == 0, job.tail(4000)
    for step in _saved_steps(out):
        assert_same_weights(_load(out, step), _load(unbroken, step))
    assert _saved_steps(out) == [4, 5, 8, DDP_STEPS]
    assert _resumed_at(err) == [5, 8], job.tail(4000)
    assert 'injected error before the critics update of step 6' in err, job.tail(4000)
    assert 'injected error after the critics update of step 10' in err, job.tail(4000)
    assert 'error inside step 6; saved step 5' in err, job.tail(4000)
    assert 'error inside step 10 after its optimizer updates' in err, job.tail(4000)
