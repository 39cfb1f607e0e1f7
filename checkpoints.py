"""A run's files on disk: where checkpoints go (PT's layout), which exist, and the newest loadable one.

Its own module because both the trainer (save, resume) and the inference phases (find the newest
checkpoint of a run) need it, and neither should carry the other's code.
"""
from __future__ import annotations

import fcntl
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import utils


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
    """PT's layout: ``<result_dir>/<dataset>/model/<dataset>_params_%07d.pt`` plus
    ``<result_dir>/<dataset>_params_latest.pt`` and a best-metric checkpoint."""

    def __init__(self, result_dir: str | Path, dataset_name: str) -> None:
        self.result_dir = Path(result_dir)
        self.name = dataset_name
        self.run_dir = self.result_dir / dataset_name
        self.model_dir = self.run_dir / 'model'

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
        return self.run_dir / 'config.json'

    def periodic(self) -> list[Path]:
        """Periodic checkpoints, newest first."""
        return sorted(self.model_dir.glob(f'{self.name}_params_[0-9]*.pt'), reverse=True)

    def candidates(self) -> list[Path]:
        """Periodic checkpoints newest first, with PT's ``_params_latest.pt`` considered too."""
        latest = [self.latest_path] if self.latest_path.exists() else []
        return latest + self.periodic()

    def existing_run(self) -> list[Path]:
        """Files of an earlier run in this run's folder: checkpoints and TensorBoard logs."""
        logs = self.run_dir / 'logs'
        found = self.periodic() + [p for p in (self.best_path, self.latest_path) if p.exists()]
        if logs.is_dir() and any(logs.iterdir()):
            found.append(logs)
        return found

    # What a run writes into its folder (the folder itself may hold other things, even the dataset).
    RUN_ENTRIES = ('model', 'logs', 'img', 'test', 'metric_cache', 'metrics.jsonl', 'config.json')

    def archive(self) -> Path:
        """Move the run's outputs (and PT's latest file) aside into ``<run>.old-<time>``; nothing is deleted."""
        archive = self.run_dir.with_name(f'{self.run_dir.name}.old-{time.strftime("%Y%m%d-%H%M%S")}')
        archive.mkdir(parents=True)
        for name in self.RUN_ENTRIES:
            if (self.run_dir / name).exists():
                (self.run_dir / name).rename(archive / name)
        if self.latest_path.exists():
            self.latest_path.rename(archive / self.latest_path.name)
        return archive

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
        patterns = [(self.model_dir, utils.temp_pattern(self.model_dir / f'{self.name}_params_*.pt')),
                    (self.result_dir, utils.temp_pattern(self.latest_path))]
        found = [path for folder, pattern in patterns if folder.is_dir() for path in folder.glob(pattern)]
        for path in found:
            path.unlink(missing_ok=True)
        return found

    @property
    def lock_path(self) -> Path:
        return self.run_dir / '.lock'

    def lock(self) -> RunLock:
        """Hold the run folder for this process (see RunLock)."""
        return RunLock(self.lock_path)

    def newest(self, accept=lambda state: True) -> Loaded | None:
        """The newest loadable checkpoint that ``accept`` takes (a corrupt one is skipped with a
        warning; ``accept`` keeps PT's shared ``_params_latest.pt`` of another run out)."""
        best: Loaded | None = None
        for path in self.candidates():
            if best is not None and path != self.latest_path and step_of(path) <= best.step:
                break
            try:
                state = utils.load_checkpoint(path)
            except utils.UnsafeCheckpoint as exc:
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


class RunLock:
    """One training process per run folder: an exclusive ``flock`` on ``<run>/.lock`` held for the
    run's lifetime. The OS releases it when the process dies, so a kill -9 leaves no stale lock; a
    second process (fresh or --resume) gets a one-line error naming the holder's PID."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, 'a+')   # noqa: SIM115 - held open for the run's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or 'unknown'
            handle.close()
            raise utils.UserError(f'{self.path.parent} is in use by another training process (PID {holder}); wait '
                                  f'for it to end or stop it, or use another --result_dir') from None
        handle.seek(0)
        handle.truncate()
        handle.write(f'{os.getpid()}\n')
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()   # closing drops the flock
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def warn(message: str) -> None:
    print(f'warning: {message}', file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# The training state of a trainer (ugatit.UGATIT), as one weights_only-loadable dict


def training_state(trainer) -> dict:
    """The whole training state; PT's six keys first, so PT tools can read it."""
    from model import PT_KEYS
    state = {key: trainer.pt_module(key).state_dict() for key in PT_KEYS}
    if trainer.ema is not None:
        state.update({f'gen{name}_ema': ema.model.state_dict() for name, ema in trainer.ema.items()})
    state.update({
        'G_optim': trainer.G_optim.state_dict(), 'D_optim': trainer.D_optim.state_dict(),
        'scaler': trainer.scaler.state_dict(), 'step': trainer.step, 'lr': trainer.lr_at(trainer.step),
        'best_metric': trainer.best_metric, 'rng': utils.rng_state(),
        'config': {**utils.config_to_dict(trainer.cfg), 'dataset_root': str(trainer.dataset_root)},
        'format': 'ugatit-pytorch/1',
    })
    if trainer.ada is not None:
        state['ada'] = {dom: ada.state_dict() for dom, ada in trainer.ada.items()}
    return state


def restore_training_state(trainer, state: dict, *, weights_only: bool = False) -> list[str]:
    """Restore a checkpoint (ours or PT's six-key format) into ``trainer``; returns notes for the user."""
    from model import PT_KEYS, load_module
    notes = []
    for key in PT_KEYS:
        if key not in state:
            raise utils.UserError(f'checkpoint has no {key!r}: not a U-GAT-IT training checkpoint')
        notes += load_module(trainer.pt_module(key), state[key], key)
    if trainer.ema is not None:
        for name, ema in trainer.ema.items():
            ema.model.load_state_dict(state.get(f'gen{name}_ema', state[f'gen{name}']))
    if weights_only:
        return notes
    if 'G_optim' in state:
        trainer.G_optim.load_state_dict(state['G_optim'])
        if notes:   # a new group head changed D's parameter list: its moments cannot be matched
            notes.append('discriminator optimizer moments start fresh (new group head)')
        else:
            trainer.D_optim.load_state_dict(state['D_optim'])
        if state.get('scaler'):   # an --amp off/bf16 run stores an empty (disabled) scaler: fp16 starts fresh
            trainer.scaler.load_state_dict(state['scaler'])
        utils.set_rng_state(state['rng'])
    else:
        notes.append('checkpoint without optimizer state (PT format or converted): optimizer moments start fresh')
    if trainer.ada is not None and 'ada' in state:
        for dom, ada in trainer.ada.items():
            ada.load_state_dict(state['ada'][dom])
    trainer.best_metric = state.get('best_metric', float('inf'))
    trainer.step = int(state.get('step', 0))
    return notes


# Architecture keys that may change on resume: adding F2W's group head to a baseline is the
# documented fine-tuning workflow (the head starts fresh).
RESUME_MAY_CHANGE = ('use_grouploss', 'groups')


def architecture_clashes(state: dict, arch: dict) -> list[str]:
    from model import arch_mismatches, stored_arch
    stored = stored_arch(state)
    if stored is None:
        return []
    return arch_mismatches(stored, arch, [k for k in stored if k not in RESUME_MAY_CHANGE])


def check_architecture(state: dict, arch: dict, source: Path | str) -> None:
    """A checkpoint built with other architecture flags is a one-line error naming them."""
    clashes = architecture_clashes(state, arch)
    if clashes:
        raise utils.UserError(f'{source} was trained with other architecture flags: {"; ".join(clashes)}; '
                              f'pass the checkpoint\'s values or use a new --result_dir')


def belongs_to_run(state: dict, dataset_root: Path, arch: dict) -> bool:
    """PT's shared ``<dataset>_params_latest.pt`` may come from a run on another dataset folder of
    the same name, or with another architecture: such a file is never loaded for this run."""
    config = state.get('config')
    if not isinstance(config, dict):
        return True   # PT's own files record nothing to compare
    same_data = config.get('dataset_root') in (None, str(dataset_root))
    return same_data and not architecture_clashes(state, arch)


def resume(trainer) -> Path | None:
    """Load the newest checkpoint of the trainer's run (weights, optimizers, RNG, EMA, ADA)."""
    def ours(state: dict) -> bool:
        return belongs_to_run(state, trainer.dataset_root, trainer.arch)

    found = trainer.files.newest(accept=ours)
    if found is None:
        other = trainer.files.newest()
        if other is not None:   # only another run's files: say why they are not used
            check_architecture(other.state, trainer.arch, other.path)
            stored = other.state.get('config', {}).get('dataset_root')
            raise utils.UserError(f'{other.path} belongs to a run on {stored}, not {trainer.dataset_root} (two '
                                  f'datasets with the same folder name): use another --result_dir for this one')
        return None
    for note in restore_training_state(trainer, found.state):
        trainer.log(f'note: {note}')
    trainer.step = found.step
    return found.path


def start_step(trainer) -> int:
    """1 for a fresh run, step + 1 after resuming; a fresh run never mixes with an old one."""
    cfg = trainer.cfg
    if cfg.resume:
        path = resume(trainer)
        if path is not None:
            trainer.log(f'resumed from {path} at step {trainer.step}')
            return trainer.step + 1
        trainer.log(f'no checkpoint in {trainer.files.model_dir}: starting from scratch')
        return 1
    files = trainer.files
    existing = files.existing_run() if trainer.dist.is_main else []
    if existing and cfg.overwrite:
        trainer.log(f'--overwrite: moved the earlier run to {files.archive()}')
    elif existing:
        more = ' and more' if len(existing) > 1 else ''
        raise utils.UserError(
            f'{files.run_dir} already holds a run ({existing[0]}{more}): continue it with --resume True, start a '
            f'separate one with another --result_dir, or pass --overwrite True to move the old run aside')
    trainer.dist.barrier()
    return 1
