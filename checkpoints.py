"""Every stored form of a model, in one place: a run's files (PT's layout, the run lock, the newest
loadable checkpoint), training checkpoints and PT-format files, exports (config.json +
safetensors), and reading any of them back into generators for inference.

The functions take ``RunFiles``, modules and state dicts, never the trainer: the trainer owns its
``state_dict()``/``load_state_dict()`` as ``nn.Module`` and optimizers do. Everything is read onto
the CPU (see ``utils.load_checkpoint``); callers copy to the device what they need.

    <run>/model/<dataset>_params_%07d.pt   training checkpoint: PT's six keys, EMA, optimizers, ...
    <result_dir>/<dataset>_params_latest.pt PT's latest file
    EXPORT/config.json                      architecture (model.ArchConfig) plus format, step, ema, dtype
    EXPORT/A2B.safetensors, B2A.safetensors generator state dicts, PT's parameter names
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import hub
import utils
from model import DIRECTIONS, ArchConfig, Translator, build_generator

# PT's checkpoint keys and where each network lives: ('G', direction) or ('D', domain, scale).
PT_KEYS = {'genA2B': ('G', 'A2B'), 'genB2A': ('G', 'B2A'), 'disGA': ('D', 'A', 'G'),
           'disGB': ('D', 'B', 'G'), 'disLA': ('D', 'A', 'L'), 'disLB': ('D', 'B', 'L')}
TRAINING_FORMAT = 'ugatit-pytorch/1'
LOCK_NAME = '.lock'   # in the run folder, held by the process writing there (RunLock)


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
        return self.run_dir / LOCK_NAME

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
    """One process writing into a run folder: an exclusive ``flock`` on ``<run>/.lock`` held for the
    training's (or a writing inference phase's) lifetime. The OS releases it when the process dies,
    so a kill -9 leaves no stale lock; a second process gets a one-line error naming the holder's PID."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, 'a+')   # noqa: SIM115 - held open for the run's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_pid(handle)
            handle.close()
            raise utils.UserError(f'{self.path.parent} is in use by another process (PID {holder}); wait for it to '
                                  f'end or stop it, or use another --result_dir (a test/img_dir/video phase: '
                                  f'--out_dir elsewhere)') from None
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


def _holder_pid(handle, wait_s: float = 2.0) -> str:
    """The PID the lock's holder wrote; a holder that has just taken the lock writes it a moment later."""
    deadline = time.monotonic() + wait_s
    while True:
        handle.seek(0)
        pid = handle.read().strip()
        if pid or time.monotonic() > deadline:
            return pid or 'unknown'
        time.sleep(0.01)


def warn(message: str) -> None:
    print(f'warning: {message}', file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Training checkpoints: architecture records and the run they belong to


def stored_arch(state: Mapping) -> ArchConfig | None:
    """The architecture a checkpoint or export records; None for PT-format files, which record none."""
    if isinstance(state.get('architecture'), Mapping):
        return ArchConfig.from_dict(state['architecture'])
    config = state.get('config')
    if not isinstance(config, Mapping) or any(key not in config for key in ArchConfig.REQUIRED):
        return None
    return ArchConfig.from_dict(config)


def load_module(module: nn.Module, weights: Mapping, key: str) -> list[str]:
    """Load one network's weights; a missing few-shot group head is the only tolerated difference."""
    try:
        result = module.load_state_dict(weights, strict=False)
    except RuntimeError as exc:   # shape mismatches
        first = str(exc).split('\n\t')[1] if '\n\t' in str(exc) else str(exc)
        raise utils.UserError(f'checkpoint {key} does not fit the model ({first.strip()}): pass the '
                              f'architecture flags it was trained with') from None
    # A baseline checkpoint has no few-shot group head: it is trained from scratch (as F2W does).
    missing = [k for k in result.missing_keys if not k.startswith('group_fc.')]
    if missing or result.unexpected_keys:
        raise utils.UserError(
            f'checkpoint {key} does not fit the model (missing {missing[:3]}, unexpected '
            f'{result.unexpected_keys[:3]}): pass the architecture flags it was trained with')
    return [f'{key}: new group head initialised'] if result.missing_keys else []


# Architecture keys that may change on resume: adding F2W's group head to a baseline is the
# documented fine-tuning workflow (the head starts fresh).
RESUME_MAY_CHANGE = ('use_grouploss', 'groups')


def architecture_clashes(state: Mapping, arch: ArchConfig) -> list[str]:
    stored = stored_arch(state)
    if stored is None:
        return []
    return stored.mismatches(arch, [k for k in ArchConfig.keys() if k not in RESUME_MAY_CHANGE])


def check_architecture(state: Mapping, arch: ArchConfig, source: Path | str) -> None:
    """A checkpoint built with other architecture flags is a one-line error naming them."""
    clashes = architecture_clashes(state, arch)
    if clashes:
        raise utils.UserError(f'{source} was trained with other architecture flags: {"; ".join(clashes)}; '
                              f'pass the checkpoint\'s values or use a new --result_dir')


def belongs_to_run(state: Mapping, dataset_root: Path, arch: ArchConfig) -> bool:
    """PT's shared ``<dataset>_params_latest.pt`` may come from a run on another dataset folder of
    the same name, or with another architecture: such a file is never loaded for this run."""
    config = state.get('config')
    if not isinstance(config, dict):
        return True   # PT's own files record nothing to compare
    same_data = config.get('dataset_root') in (None, str(dataset_root))
    return same_data and not architecture_clashes(state, arch)


def checkpoint_to_resume(files: RunFiles, dataset_root: Path, arch: ArchConfig) -> Loaded | None:
    """The newest checkpoint of this run (None: there is none); another run's files sharing the
    folder names are a one-line error saying why they are not used."""
    found = files.newest(accept=lambda state: belongs_to_run(state, dataset_root, arch))
    if found is None:
        other = files.newest()
        if other is not None:
            check_architecture(other.state, arch, other.path)
            stored = other.state.get('config', {}).get('dataset_root')
            raise utils.UserError(f'{other.path} belongs to a run on {stored}, not {dataset_root} (two '
                                  f'datasets with the same folder name): use another --result_dir for this one')
    return found


def clear_for_fresh_run(files: RunFiles, overwrite: bool) -> Path | None:
    """A fresh run never mixes with an old one: refuse, or (``overwrite``) move the old run aside
    and return where it went."""
    existing = files.existing_run()
    if existing and overwrite:
        return files.archive()
    if existing:
        more = ' and more' if len(existing) > 1 else ''
        raise utils.UserError(
            f'{files.run_dir} already holds a run ({existing[0]}{more}): continue it with --resume True, start a '
            f'separate one with another --result_dir, or pass --overwrite True to move the old run aside')
    return None


# ----------------------------------------------------------------------------------------------
# Exports: config.json and the two generators as safetensors (no pickle)

EXPORT_FORMAT = 'ugatit-export/1'
CONFIG_NAME = 'config.json'


def is_export(path: str | Path) -> bool:
    """True for a folder written by :func:`write_export` (it holds config.json)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def write_export(generators: Mapping[str, nn.Module], arch: ArchConfig, out: str | Path, *, fp16: bool = False,
                 metadata: Mapping | None = None) -> list[Path]:
    """Write config.json and <direction>.safetensors for both generators; returns the paths."""
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if fp16 else torch.float32
    umask = os.umask(0)   # only reads it: os.umask has no getter
    os.umask(umask)
    paths = []
    for d in DIRECTIONS:
        tensors = {name: t.detach().to('cpu', dtype if t.is_floating_point() else t.dtype).contiguous()
                   for name, t in generators[d.name].state_dict().items()}
        path = out / f'{d.name}.safetensors'
        save_file(tensors, str(path), metadata={'format': EXPORT_FORMAT, 'direction': d.name})
        os.chmod(path, 0o666 & ~umask)   # safetensors writes 0600; the rest of the export follows the umask
        paths.append(path)
    config = {'format': EXPORT_FORMAT, **arch.to_dict(), **dict(metadata or {}),
              'dtype': str(dtype).removeprefix('torch.')}
    config_path = out / CONFIG_NAME
    config_path.write_text(json.dumps(utils.config_to_dict(config), indent=2) + '\n')
    return [config_path, *paths]


def read_export(folder: str | Path) -> dict:
    """An export as a checkpoint-shaped dict on the CPU: genA2B, genB2A (float32 state dicts) and its
    config. Inference then loads it like a generator-only training checkpoint; a clear UserError
    when a file is missing or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise utils.UserError(f'{folder / CONFIG_NAME}: cannot read the export config ({exc})') from None
    if config.get('format') != EXPORT_FORMAT:
        raise utils.UserError(f'{folder} is not a U-GAT-IT export (config.json format {config.get("format")!r}, '
                              f'expected {EXPORT_FORMAT!r}); write one with scripts/export.py')
    state: dict = {'config': config, 'step': int(config.get('step', 0)), 'format': EXPORT_FORMAT}
    for d in DIRECTIONS:
        path = folder / f'{d.name}.safetensors'
        try:
            weights = load_file(str(path), device='cpu')
        except (OSError, SafetensorError) as exc:
            raise utils.UserError(f'{path}: cannot read the exported weights ({exc})') from None
        state[d.key] = {name: t.float() if t.is_floating_point() else t for name, t in weights.items()}
    return state


# ----------------------------------------------------------------------------------------------
# Any stored form, back into generators for inference


def resolve_location(path: str | Path, onnx: bool = False) -> Path:
    """Where a ``--checkpoint`` lies on this machine: a local path as given; ``hf://OWNER/NAME[@REV]``
    fetched into (or found in) the Hugging Face cache, which must hold an export."""
    if not hub.is_hub_uri(path):
        return Path(path)
    folder = hub.fetch(str(path), onnx=onnx)
    try:
        found = json.loads((folder / CONFIG_NAME).read_text()).get('format')
    except (OSError, ValueError, AttributeError):
        found = None
    if found != EXPORT_FORMAT:
        raise utils.UserError(f'{path} is not a U-GAT-IT export (no {CONFIG_NAME} with format {EXPORT_FORMAT!r}); '
                              f'publish one with scripts/export.py --push_to_hub')
    return folder


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint file's contents (or an export folder's, shaped like one, also ``hf://``) on the
    CPU, or a one-line UserError saying why it cannot be read."""
    path = resolve_location(path)
    if is_export(path):
        return read_export(path)
    if path.is_dir():
        raise utils.UserError(f'{path} is a folder without {CONFIG_NAME}: pass a checkpoint file or a '
                              f'folder written by scripts/export.py')
    if not path.is_file():
        raise utils.UserError(f'checkpoint {path} not found')
    try:
        # Mapped, not read: inference needs only the generators of the (up to 10 GB) training state.
        state = utils.load_checkpoint(path, mmap=True)
    except utils.UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure is reported on one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise utils.UserError(f'cannot load checkpoint {path}: {reason[:200]}') from None
    if not isinstance(state, dict) or any(d.key not in state for d in DIRECTIONS):
        raise utils.UserError(f'{path} is not a U-GAT-IT checkpoint (no genA2B/genB2A weights)')
    return state


def resolve_arch(state: Mapping, flags: object | None, explicit: object = ()) -> ArchConfig:
    """The architecture to build for ``state``: the stored one, checked against the flags the user
    gave explicitly (a contradiction is a one-line error naming both values); PT-format files,
    which store none, take the flags."""
    arch = stored_arch(state)
    if arch is None:
        if flags is None:
            raise utils.UserError('this checkpoint records no architecture (PT format): pass its flags '
                                  '(--light, --ch, --n_res, --img_size, ...)')
        return ArchConfig.from_flags(flags)
    if flags is not None:
        given = {key for key in ArchConfig.keys()
                 if any(name in explicit for name in ArchConfig.DERIVED_FROM.get(key, (key,)))}
        clashes = arch.mismatches(ArchConfig.from_flags(flags), given)
        if clashes:
            raise utils.UserError(f'{"; ".join(clashes)}: the checkpoint was trained with a different '
                                  f'architecture; drop the flag (it is read from the checkpoint)')
    return arch


def load_translator(path: str | Path, device: torch.device | str = 'cpu', use_ema: bool = True,
                    flags: object | None = None, explicit: object = (),
                    compile: bool = False) -> tuple[Translator, dict]:
    """Build the generators a checkpoint (or an export folder) describes and load its weights (EMA
    copies when present and ``use_ema``). Returns the translator and the checkpoint's contents
    (step, config, ...; ``uses_ema`` says whether the generators are EMA copies)."""
    state = read_checkpoint(path)   # CPU: only the two generators go to the device
    return translator_from_state(state, device, use_ema, flags, explicit, compile)


def translator_from_state(state: dict, device: torch.device | str = 'cpu', use_ema: bool = True,
                          flags: object | None = None, explicit: object = (),
                          compile: bool = False) -> tuple[Translator, dict]:
    """:func:`load_translator` for contents already in memory (a converted TF checkpoint)."""
    arch = resolve_arch(state, flags, explicit)
    generators = {}
    for d in DIRECTIONS:
        net = build_generator(arch)
        weights = state.get(f'{d.key}_ema') if use_ema and f'{d.key}_ema' in state else state[d.key]
        load_module(net, weights, d.key)
        net = net.to(device).eval().requires_grad_(False)
        generators[d.name] = torch.compile(net) if compile else net
    state['has_ema'] = all(f'{d.key}_ema' in state for d in DIRECTIONS)
    # An export holds one pair of generators; its config says whether they are the EMA copies.
    exported_ema = state.get('format') == EXPORT_FORMAT and bool(state['config'].get('ema'))
    state['uses_ema'] = use_ema and state['has_ema'] or exported_ema
    return Translator(generators, arch, device), state
