"""A run's folder: PT's layout of its files, every name in it, its lock, and which checkpoint to resume.

    <result_dir>/<dataset>/model/<dataset>_params_%07d.pt   periodic training checkpoints
    <result_dir>/<dataset>/model/<dataset>_params_best_fid.pt  the best mean FID (--metric_freq)
    <result_dir>/<dataset>_params_latest.pt                  PT's latest file (--latest_freq)
    <result_dir>/<dataset>/{logs,img,metric_cache}/, metrics.jsonl, config.json   the training's outputs
    <result_dir>/<dataset>/{test,img_dir,generate,video}/    the translating phases' outputs (no --out_dir)
    <result_dir>/<dataset>/.lock                             held by the one process writing there

Apart from ``checkpoints.py`` (what a checkpoint or export holds): this is where files live and who
may write them. Every name a phase writes under the run folder comes from here, so ``--overwrite``
moves all of them aside.
"""
from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import checkpoints
from errors import UnreadableCheckpoint, UnsafeCheckpoint, UserError
from model import ArchConfig

LOCK_NAME = '.lock'
MODEL_DIR = 'model'
LOGS_DIR = 'logs'                  # TensorBoard
PREVIEWS_DIR = 'img'               # PT's preview grids
METRIC_CACHE = 'metric_cache'      # Inception features of the test folders
METRICS_FILE = 'metrics.jsonl'
CONFIG_FILE = 'config.json'
# Where each translating phase writes without --out_dir (video_dir shares video's folder).
PHASE_OUTPUTS = {'test': 'test', 'img_dir': 'img_dir', 'generate': 'generate', 'video': 'video',
                 'video_dir': 'video'}
# What runs write into their folder (the folder itself may hold other things, even the dataset).
RUN_ENTRIES = tuple(dict.fromkeys((MODEL_DIR, LOGS_DIR, PREVIEWS_DIR, METRIC_CACHE, METRICS_FILE, CONFIG_FILE,
                                   *PHASE_OUTPUTS.values())))


def step_of(path: Path) -> int:
    """The step in a periodic checkpoint's name (PT's naming); -1 for other files."""
    tail = path.stem.rsplit('_', 1)[-1]
    return int(tail) if tail.isdigit() else -1


@dataclass(frozen=True)
class Loaded:
    """A checkpoint read from disk: its file, its step and its contents."""

    path: Path
    step: int
    state: dict


class RunFiles:
    """The files of the run on ``dataset_name`` under ``result_dir`` (PT's layout, see the module)."""

    def __init__(self, result_dir: str | Path, dataset_name: str) -> None:
        self.result_dir = Path(result_dir)
        self.name = dataset_name
        self.run_dir = self.result_dir / dataset_name
        self.model_dir = self.run_dir / MODEL_DIR

    def checkpoint_path(self, step: int) -> Path:
        return self.model_dir / f'{self.name}_params_{step:07d}.pt'

    @property
    def latest_path(self) -> Path:
        return self.result_dir / f'{self.name}_params_latest.pt'

    @property
    def best_path(self) -> Path:
        return self.model_dir / f'{self.name}_params_best_fid.pt'

    @property
    def config_path(self) -> Path:
        return self.run_dir / CONFIG_FILE

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / LOGS_DIR

    @property
    def previews_dir(self) -> Path:
        return self.run_dir / PREVIEWS_DIR

    @property
    def metrics_file(self) -> Path:
        return self.run_dir / METRICS_FILE

    @property
    def metric_cache(self) -> Path:
        return self.run_dir / METRIC_CACHE

    @property
    def lock_path(self) -> Path:
        return self.run_dir / LOCK_NAME

    def phase_output(self, phase: str) -> Path:
        """Where a translating phase writes when no --out_dir is given."""
        return self.run_dir / PHASE_OUTPUTS[phase]

    def periodic(self) -> list[Path]:
        """Periodic checkpoints, newest first."""
        return sorted(self.model_dir.glob(f'{self.name}_params_[0-9]*.pt'), reverse=True)

    def candidates(self) -> list[Path]:
        """Periodic checkpoints newest first, with PT's ``_params_latest.pt`` considered too."""
        latest = [self.latest_path] if self.latest_path.exists() else []
        return latest + self.periodic()

    def existing_run(self) -> list[Path]:
        """Files of an earlier run in this run's folder: checkpoints and TensorBoard logs."""
        logs = self.logs_dir
        found = self.periodic() + [p for p in (self.best_path, self.latest_path) if p.exists()]
        if logs.is_dir() and any(logs.iterdir()):
            found.append(logs)
        return found

    def archive(self) -> Path:
        """Move every output of the run (and PT's latest file) aside into ``<run>.old-<time>``; nothing
        is deleted."""
        archive = self.run_dir.with_name(f'{self.run_dir.name}.old-{time.strftime("%Y%m%d-%H%M%S")}')
        archive.mkdir(parents=True)
        for name in RUN_ENTRIES:
            if (self.run_dir / name).exists():
                (self.run_dir / name).rename(archive / name)
        if self.latest_path.exists():
            self.latest_path.rename(archive / self.latest_path.name)
        return archive

    def clear_for_fresh_run(self, overwrite: bool) -> Path | None:
        """A fresh run never mixes with an old one: refuse, or (``overwrite``) move the old run aside
        and return where it went."""
        existing = self.existing_run()
        if existing and overwrite:
            return self.archive()
        if existing:
            more = ' and more' if len(existing) > 1 else ''
            raise UserError(
                f'{self.run_dir} already holds a run ({existing[0]}{more}): continue it with --resume True, start a '
                f'separate one with another --result_dir, or pass --overwrite True to move the old run aside')
        return None

    def prune(self, keep: int) -> list[Path]:
        """Delete the oldest periodic checkpoints beyond the newest ``keep`` (--keep_checkpoints; 0
        keeps all). The best-FID and PT's latest file are not periodic and never touched."""
        if keep <= 0:
            return []
        doomed = self.periodic()[keep:]
        for path in doomed:
            path.unlink(missing_ok=True)
        return doomed

    def remove_leftovers(self) -> list[Path]:
        """Temporary files of a writer that died mid-save (kill -9): only atomic_save's own pattern,
        only for this run's checkpoint names. Call it holding the run lock: no live writer then."""
        patterns = [(self.model_dir, checkpoints.temp_pattern(self.model_dir / f'{self.name}_params_*.pt')),
                    (self.result_dir, checkpoints.temp_pattern(self.latest_path))]
        found = [path for folder, pattern in patterns if folder.is_dir() for path in folder.glob(pattern)]
        for path in found:
            path.unlink(missing_ok=True)
        return found

    def lock(self) -> RunLock:
        """Hold the run folder for this process (see RunLock)."""
        return RunLock(self.lock_path)

    def newest(self, accept: Callable[[Mapping], bool] = lambda state: True) -> Loaded | None:
        """The newest loadable checkpoint that ``accept`` takes (a corrupt one is skipped with a
        warning; ``accept`` keeps PT's shared ``_params_latest.pt`` of another run out)."""
        best: Loaded | None = None
        for path in self.candidates():
            if best is not None and path != self.latest_path and step_of(path) <= best.step:
                break
            try:
                state = checkpoints.load_checkpoint(path)
            except (UnsafeCheckpoint, UnreadableCheckpoint) as exc:
                warn(f'skipping {exc}')
                continue
            except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, not fatal
                warn(f'skipping unreadable checkpoint {path} ({type(exc).__name__})')
                continue
            if not accept(state):
                continue
            step = int(state.get('step', step_of(path)))
            if best is None or step > best.step:
                best = Loaded(path, step, state)
        return best


# ----------------------------------------------------------------------------------------------
# Which checkpoint belongs to this run


def same_dataset(state: Mapping, dataset_root: Path | None) -> bool:
    """Whether a checkpoint was trained on ``dataset_root`` (PT's files, which record nothing, and a
    phase that has no dataset folder accept any)."""
    config = state.get('config')
    if dataset_root is None or not isinstance(config, Mapping):
        return True
    return config.get('dataset_root') in (None, str(dataset_root))


def belongs_to_run(state: Mapping, dataset_root: Path, arch: ArchConfig) -> bool:
    """PT's shared ``<dataset>_params_latest.pt`` may come from a run on another dataset folder of
    the same name, or with another architecture: such a file is never loaded for this run."""
    return same_dataset(state, dataset_root) and not checkpoints.architecture_clashes(state, arch)


def checkpoint_to_resume(files: RunFiles, dataset_root: Path, arch: ArchConfig) -> Loaded | None:
    """The newest checkpoint of this run (None: there is none); another run's files sharing the
    folder names are a one-line error saying why they are not used."""
    found = files.newest(accept=lambda state: belongs_to_run(state, dataset_root, arch))
    if found is None:
        other = files.newest()
        if other is not None:
            checkpoints.check_architecture(other.state, arch, other.path)
            stored = other.state.get('config', {}).get('dataset_root')
            raise UserError(f'{other.path} belongs to a run on {stored}, not {dataset_root} (two '
                            f'datasets with the same folder name): use another --result_dir for this one')
    return found


# ----------------------------------------------------------------------------------------------
# The lock


class RunLock:
    """One process writing into a run folder: an exclusive ``flock`` on ``<run>/.lock`` held for the
    training's (or a writing inference phase's) lifetime.

    A ``flock`` belongs to the open file, which forked children (data-loader workers) share: were
    they to keep it, a kill -9 of the trainer would leave the lock held by its orphaned workers and
    refuse an immediate resume. So every child forked while the lock is held closes its copy at once
    (``os.register_at_fork``); the lock then dies with its holder alone. A second process gets a
    one-line error naming the holder's PID, and a recorded holder that is no longer alive is never
    named as the one in the way.
    """

    def __init__(self, path: Path, wait_for_dead_holder_s: float = 10.0) -> None:
        self.path = path
        self.wait_for_dead_holder_s = wait_for_dead_holder_s
        self._file = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, 'a+')   # noqa: SIM115 - held open for the run's lifetime
        deadline = time.monotonic() + self.wait_for_dead_holder_s
        while not _try_flock(handle):
            holder = _holder_pid(handle)
            if _is_alive(holder):
                handle.close()
                raise UserError(f'{self.path.parent} is in use by another process (PID {holder}); wait for it to '
                                f'end or stop it, or use another --result_dir (a test/img_dir/video phase: '
                                f'--out_dir elsewhere)')
            if time.monotonic() > deadline:   # its holder died, yet something still holds the file
                handle.close()
                raise UserError(f'{self.path} is still held although the process that took it (PID {holder}) has '
                                f'ended: a process it started lives on; end it (fuser {self.path}) and start again')
            time.sleep(0.1)   # the dead holder's children (workers of a run before this fix) exit by themselves
        handle.seek(0)
        handle.truncate()
        handle.write(f'{os.getpid()}\n')
        handle.flush()
        self._file = handle
        _HELD.add(handle)
        return self

    def release(self) -> None:
        if self._file is not None:
            _HELD.discard(self._file)
            self._file.close()   # closing drops the flock
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: set = set()   # the lock files this process holds, closed in every forked child


def _close_held_locks_in_child() -> None:
    for handle in list(_HELD):
        try:
            os.close(handle.fileno())   # the child's copy only: the parent's lock stands
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_locks_in_child)


def _try_flock(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder_pid(handle, wait_s: float = 2.0) -> str:
    """The PID the lock's holder wrote; a holder that has just taken the lock writes it a moment later."""
    deadline = time.monotonic() + wait_s
    while True:
        handle.seek(0)
        pid = handle.read().strip()
        if pid or time.monotonic() > deadline:
            return pid or 'unknown'
        time.sleep(0.01)


def _is_alive(pid: str) -> bool:
    """Whether the recorded holder still runs ('unknown' counts as alive: it cannot be ruled out)."""
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def warn(message: str) -> None:
    print(f'warning: {message}', file=sys.stderr)
