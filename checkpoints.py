"""Every stored form of a model, in one place: training checkpoints and PT-format files, written
atomically and read safely, exports (config.json + safetensors), and reading any of them back into
generators for inference. Where a run keeps its files, and which of them to resume, is
``run_folder.py``'s.

The functions take modules and state dicts, never the trainer: the trainer owns its
``state_dict()``/``load_state_dict()`` as ``nn.Module`` and optimizers do. Everything is read onto
the CPU (see :func:`load_checkpoint`); callers copy to the device what they need.

    <run>/model/<dataset>_params_%07d.pt   training checkpoint: PT's six keys, EMA, optimizers, ...
    <result_dir>/<dataset>_params_latest.pt PT's latest file
    EXPORT/config.json                      architecture (model.ArchConfig) plus format, step, ema, dtype
    EXPORT/A2B.safetensors, B2A.safetensors generator state dicts, PT's parameter names
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

import hub
import utils
from errors import DiskFull, UnreadableCheckpoint, UnsafeCheckpoint, UserError
from model import DIRECTIONS, ArchConfig, Translator, build_generator

# PT's checkpoint keys and where each network lives: ('G', direction) or ('D', domain, scale).
PT_KEYS = {'genA2B': ('G', 'A2B'), 'genB2A': ('G', 'B2A'), 'disGA': ('D', 'A', 'G'),
           'disGB': ('D', 'B', 'G'), 'disLA': ('D', 'A', 'L'), 'disLB': ('D', 'B', 'L')}
TRAINING_FORMAT = 'ugatit-pytorch/1'


# ----------------------------------------------------------------------------------------------
# Checkpoint files: atomic writes, safe reads


TEMP_SUFFIX = '.tmp'


def temp_pattern(path: Path) -> str:
    """The glob of :func:`atomic_save`'s temporary files for ``path`` (left behind by a kill -9)."""
    return f'.{path.name}.*{TEMP_SUFFIX}'


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, rename over ``path``, fsync the folder.

    A crash or power loss at any moment leaves either the old file or the complete new one, never a
    torn file, and a save reported as written stays written (the folder's entry is on disk too); a
    full disk removes the partial file and raises :class:`DiskFull` naming the space needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; other outputs follow the umask
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)   # the rename itself must reach the disk before the save counts as written
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if _is_disk_full(exc):
            free, needed = utils.human_size(free_bytes(path.parent)), utils.human_size(state_nbytes(obj))
            raise DiskFull(f'no space left for {path.name} in {path.parent}: {free} free, '
                           f'a checkpoint needs {needed}; free some space (older checkpoints, '
                           f'--keep_checkpoints N) and resume with --resume True') from None
        raise


ZIP_MAGIC, PICKLE_PROTOCOL = b'PK\x03\x04', b'\x80'   # how torch.save's zip and legacy files begin


def _check_torch_file(path: str | os.PathLike) -> None:
    """A one-line UnreadableCheckpoint for what torch.load would answer cryptically: a file that is not
    a torch.save file at all (a text file gave ``KeyError: 101``), or a zip archive cut short."""
    with open(path, 'rb') as f:
        head = f.read(len(ZIP_MAGIC))
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            size = utils.human_size(os.path.getsize(path))
            raise UnreadableCheckpoint(f'{path} is cut short or damaged ({size}, its archive index is missing): an '
                                       f'interrupted copy or download? copy it again or use an earlier checkpoint')
        return
    if not head.startswith(PICKLE_PROTOCOL):
        raise UnreadableCheckpoint(f'{path} is not a PyTorch checkpoint (a file written by torch.save begins as a zip '
                                   f'archive or a pickle); pass a .pt checkpoint or an export folder')


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain: torch's zip writer turns it into a RuntimeError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(folder: str | os.PathLike) -> int:
    """Free space on the disk of ``folder`` (or of its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def state_nbytes(obj: object) -> int:
    """The bytes of the tensors in a (nested) state dict: about the size of its checkpoint file."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


def _umask() -> int:
    """The process's umask (os.umask has no getter: set and put back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain containers only), on the CPU.

    Everything read from disk lands on the CPU; callers copy into modules on the device only what
    their phase needs (``load_state_dict`` copies), and RNG states stay the CPU tensors that
    ``torch.set_rng_state`` requires. ``mmap``: map the file instead of reading it, so only the
    tensors used are paged in (inference needs the generators of a 10 GB training state). Only for
    states that are dropped after loading: a mapped tensor kept alive (a resumed optimizer's moments
    on the CPU) would crash the process (SIGBUS) if the file were later rewritten in place. Old
    non-zip files are read as usual.
    """
    _check_torch_file(path)
    try:
        if mmap:
            try:
                return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
            except RuntimeError as exc:
                if 'zip' not in str(exc):
                    raise
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        raise UnsafeCheckpoint(f'{path} is not a plain tensor checkpoint: it holds pickled Python objects, and it is '
                               f'not unpickled because unpickling can run arbitrary code') from None


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
        raise UserError(f'checkpoint {key} does not fit the model ({first.strip()}): pass the '
                              f'architecture flags it was trained with') from None
    # A baseline checkpoint has no few-shot group head: it is trained from scratch (as F2W does).
    missing = [k for k in result.missing_keys if not k.startswith('group_fc.')]
    if missing or result.unexpected_keys:
        raise UserError(
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
        raise UserError(f'{source} was trained with other architecture flags: {"; ".join(clashes)}; '
                              f'pass the checkpoint\'s values or use a new --result_dir')


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
    paths = []
    for d in DIRECTIONS:
        tensors = {name: t.detach().to('cpu', dtype if t.is_floating_point() else t.dtype).contiguous()
                   for name, t in generators[d.name].state_dict().items()}
        path = out / f'{d.name}.safetensors'
        save_file(tensors, str(path), metadata={'format': EXPORT_FORMAT, 'direction': d.name})
        os.chmod(path, 0o666 & ~_umask())   # safetensors writes 0600; the rest of the export follows the umask
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
        raise UserError(f'{folder / CONFIG_NAME}: cannot read the export config ({exc})') from None
    if config.get('format') != EXPORT_FORMAT:
        raise UserError(f'{folder} is not a U-GAT-IT export (config.json format {config.get("format")!r}, '
                              f'expected {EXPORT_FORMAT!r}); write one with scripts/export.py')
    state: dict = {'config': config, 'step': int(config.get('step', 0)), 'format': EXPORT_FORMAT}
    for d in DIRECTIONS:
        path = folder / f'{d.name}.safetensors'
        try:
            weights = load_file(str(path), device='cpu')
        except (OSError, SafetensorError) as exc:
            raise UserError(f'{path}: cannot read the exported weights ({exc})') from None
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
        raise UserError(f'{path} is not a U-GAT-IT export (no {CONFIG_NAME} with format {EXPORT_FORMAT!r}); '
                              f'publish one with scripts/export.py --push_to_hub')
    return folder


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint file's contents (or an export folder's, shaped like one, also ``hf://``) on the
    CPU, or a one-line UserError saying why it cannot be read."""
    path = resolve_location(path)
    if is_export(path):
        return read_export(path)
    if path.is_dir():
        raise UserError(f'{path} is a folder without {CONFIG_NAME}: pass a checkpoint file or a '
                              f'folder written by scripts/export.py')
    if not path.is_file():
        raise UserError(f'checkpoint {path} not found')
    try:
        # Mapped, not read: inference needs only the generators of the (up to 10 GB) training state.
        state = load_checkpoint(path, mmap=True)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure is reported on one line
        raise UserError(f'cannot load checkpoint {path}: {first_sentence(exc)}') from None
    if not isinstance(state, dict) or any(d.key not in state for d in DIRECTIONS):
        raise UserError(f'{path} is not a U-GAT-IT checkpoint (no genA2B/genB2A weights)')
    return state


def first_sentence(exc: BaseException, limit: int = 300) -> str:
    """An exception's first sentence (whole words, at most ``limit`` characters), or its type's name."""
    text = ' '.join(str(exc).split())
    if not text:
        return type(exc).__name__
    sentence = text.split('. ')[0].rstrip('.')
    return sentence if len(sentence) <= limit else sentence[:limit].rsplit(' ', 1)[0] + ' …'


def resolve_arch(state: Mapping, flags: object | None, explicit: object = ()) -> ArchConfig:
    """The architecture to build for ``state``: the stored one, checked against the flags the user
    gave explicitly (a contradiction is a one-line error naming both values); PT-format files,
    which store none, take the flags."""
    arch = stored_arch(state)
    if arch is None:
        if flags is None:
            raise UserError('this checkpoint records no architecture (PT format): pass its flags '
                                  '(--light, --ch, --n_res, --img_size, ...)')
        return ArchConfig.from_flags(flags)
    if flags is not None:
        given = {key for key in ArchConfig.keys()
                 if any(name in explicit for name in ArchConfig.DERIVED_FROM.get(key, (key,)))}
        clashes = arch.mismatches(ArchConfig.from_flags(flags), given)
        if clashes:
            raise UserError(f'{"; ".join(clashes)}: the checkpoint was trained with a different '
                                  f'architecture; drop the flag (it is read from the checkpoint)')
    return arch


def load_translator(path: str | Path, device: torch.device | str = 'cpu', use_ema: bool = True,
                    flags: object | None = None, explicit: object = (),
                    compile: bool = False, compile_mode: str = 'default') -> tuple[Translator, dict]:
    """Build the generators a checkpoint (or an export folder) describes and load its weights (EMA
    copies when present and ``use_ema``). Returns the translator and the checkpoint's contents
    (step, config, ...; ``uses_ema`` says whether the generators are EMA copies)."""
    state = read_checkpoint(path)   # CPU: only the two generators go to the device
    return translator_from_state(state, device, use_ema, flags, explicit, compile, compile_mode)


def translator_from_state(state: dict, device: torch.device | str = 'cpu', use_ema: bool = True,
                          flags: object | None = None, explicit: object = (),
                          compile: bool = False, compile_mode: str = 'default') -> tuple[Translator, dict]:
    """:func:`load_translator` for contents already in memory (a converted TF checkpoint)."""
    arch = resolve_arch(state, flags, explicit)
    generators = {}
    for d in DIRECTIONS:
        net = build_generator(arch)
        weights = state.get(f'{d.key}_ema') if use_ema and f'{d.key}_ema' in state else state[d.key]
        load_module(net, weights, d.key)
        net = net.to(device).eval().requires_grad_(False)
        generators[d.name] = torch.compile(net, mode=compile_mode) if compile else net
    state['has_ema'] = all(f'{d.key}_ema' in state for d in DIRECTIONS)
    # An export holds one pair of generators; its config says whether they are the EMA copies.
    exported_ema = state.get('format') == EXPORT_FORMAT and bool(state['config'].get('ema'))
    state['uses_ema'] = use_ema and state['has_ema'] or exported_ema
    return Translator(generators, arch, device), state
