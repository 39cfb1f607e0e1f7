"""The model a config describes, and a trained model loaded for inference.

Inference (the test/img_dir/video phases, export, the demo) needs only the two generators and the
architecture they were trained with, and a checkpoint stores both. This module owns that step, so
no inference path builds a discriminator, FaceNet or an optimizer, or needs the training data, and
no architecture flag has to be repeated by hand (a light/full mismatch was the most reported
"load failure" of the official code).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

import exports
import utils
from networks import PT, Arch, Discriminator, GeneratorOutput, ResnetGenerator

# The config fields that define the networks' shapes and function. Every checkpoint stores them
# (state['config']); inference rebuilds the networks from them.
ARCH_KEYS = ('light', 'ch', 'n_res', 'img_size', 'img_ch', 'use_se', 'attention_gan', 'attention_input',
             'use_deconv', 'sn', 'cam_D_attention', 'cam_D_weight', 'n_global_dis', 'n_local_dis',
             'use_grouploss', 'groups', 'arch', 'tf_graph', 'smoothing')

# Command-line spelling of a key where it differs from ``--<key>``.
FLAG_NAMES = {'groups': '--group'}

# Derived keys: given on the command line through another flag.
DERIVED_FROM = {'n_global_dis': ('n_global_dis', 'n_dis'), 'n_local_dis': ('n_local_dis', 'n_dis')}

PT_KEYS = {'genA2B': ('G', 'A2B'), 'genB2A': ('G', 'B2A'), 'disGA': ('D', 'A', 'G'),
           'disGB': ('D', 'B', 'G'), 'disLA': ('D', 'A', 'L'), 'disLB': ('D', 'B', 'L')}
GENERATOR_KEYS = {'A2B': 'genA2B', 'B2A': 'genB2A'}


# Values of keys that configs written before the key existed lack.
ARCH_DEFAULTS = {'arch': 'pt', 'tf_graph': None, 'smoothing': False}


def arch_config(cfg) -> dict:
    """The architecture part of a config (an argparse namespace or a dict)."""
    get = cfg.get if isinstance(cfg, dict) else lambda key, default=None: getattr(cfg, key, default)
    return {key: get(key, ARCH_DEFAULTS.get(key)) for key in ARCH_KEYS}


def flag_name(key: str) -> str:
    return FLAG_NAMES.get(key, f'--{key}')


def _same(a: object, b: object) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):   # JSON/torch give lists back
        return list(a or []) == list(b or [])
    return a == b


def arch_mismatches(stored: Mapping, wanted: Mapping, keys: object = None) -> list[str]:
    """``'--light True (checkpoint: False)'`` for each key (of ``keys``, default all) that differs."""
    out = []
    for key in ARCH_KEYS:
        if keys is not None and key not in keys or key not in stored or key not in wanted:
            continue
        if not _same(stored[key], wanted[key]):
            out.append(f'{flag_name(key)} {_show(wanted[key])} (checkpoint: {_show(stored[key])})')
    return out


def _show(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ','.join(str(v) for v in value)
    return str(value)


# ----------------------------------------------------------------------------------------------
# Building the networks


def network_arch(arch: Mapping | object) -> Arch:
    """The official graph an architecture config asks for (--arch, --tf_graph, --smoothing); configs
    from before --arch existed mean PT."""
    arch = arch_config(arch)
    if arch['arch'] != 'tf':
        return PT
    return Arch('tf', arch['tf_graph'] or 'current', bool(arch['smoothing']))


def build_generator(arch: Mapping | object) -> ResnetGenerator:
    """A generator as the architecture config (or a whole config) describes it; networks never see
    the config, only plain arguments."""
    arch = arch_config(arch)
    return ResnetGenerator(arch['img_ch'], arch['img_ch'], ngf=arch['ch'], n_blocks=arch['n_res'],
                           img_size=arch['img_size'], light=arch['light'], use_se=arch['use_se'],
                           attention_gan=arch['attention_gan'], attention_input=arch['attention_input'],
                           use_deconv=arch['use_deconv'], arch=network_arch(arch))


def build_critic(arch: Mapping | object, domain: str) -> nn.ModuleDict:
    """The global ('G') and local ('L') discriminators of one domain; group heads on the target."""
    arch = arch_config(arch)
    groups = arch.get('groups') or []
    n_groups = max(groups) + 1 if arch.get('use_grouploss') and domain == 'B' and groups else 0

    def make(n_layers: int) -> Discriminator:
        return Discriminator(arch['img_ch'], ndf=arch['ch'], n_layers=n_layers, sn=arch['sn'],
                             cam_attention=arch['cam_D_attention'] and arch['cam_D_weight'] > 0,
                             n_groups=n_groups, arch=network_arch(arch))
    return nn.ModuleDict({'G': make(arch['n_global_dis']), 'L': make(arch['n_local_dis'])})


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


# ----------------------------------------------------------------------------------------------
# Inference


class Translator:
    """The two generators of a trained model, applied in eval mode without autograd."""

    def __init__(self, generators: Mapping[str, nn.Module], arch: Mapping, device: torch.device | str,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        self.generators = dict(generators)
        self.arch = dict(arch)
        self.device = torch.device(device)
        self.autocast = autocast

    @property
    def img_size(self) -> int:
        return int(self.arch['img_size'])

    @torch.no_grad()
    def translate(self, images: torch.Tensor, direction: str) -> GeneratorOutput:
        """Translate a batch in [-1, 1] (N×3×H×W); outputs in float32."""
        net = self.generators[direction]
        was_training = net.training
        net.eval()
        with self.autocast():
            out = net(images.to(self.device))
        net.train(was_training)
        return GeneratorOutput(*(t.float() if t is not None else None for t in out))

    @torch.no_grad()
    def visual_columns(self, real: torch.Tensor, direction: str) -> list[list]:
        """PT's 7 rows per image: real, identity heatmap, identity, translation heatmap, translation,
        cycle heatmap, cycle (plus one row per attention mask with --attention_gan)."""
        backward = direction[::-1]   # 'A2B' -> 'B2A'
        size = self.img_size
        fwd = self.translate(real, direction)
        idt = self.translate(real, backward)
        cyc = self.translate(fwd.image, backward)
        columns = []
        for i in range(len(real)):
            col = [utils.tensor_to_uint8(real[i]),
                   utils.heatmap_to_uint8(idt.heatmap[i], size), utils.tensor_to_uint8(idt.image[i]),
                   utils.heatmap_to_uint8(fwd.heatmap[i], size), utils.tensor_to_uint8(fwd.image[i]),
                   utils.heatmap_to_uint8(cyc.heatmap[i], size), utils.tensor_to_uint8(cyc.image[i])]
            if fwd.attention is not None:
                col += [utils.heatmap_to_uint8(a[None], size) for a in fwd.attention[i]]
            columns.append(col)
        return columns


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint file's contents (or an export folder's, shaped like one) on the CPU, or a
    one-line UserError saying why it cannot be read."""
    path = Path(path)
    if exports.is_export(path):
        return exports.read_export(path)
    if path.is_dir():
        raise utils.UserError(f'{path} is a folder without {exports.CONFIG_NAME}: pass a checkpoint file or a '
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
    if not isinstance(state, dict) or 'genA2B' not in state or 'genB2A' not in state:
        raise utils.UserError(f'{path} is not a U-GAT-IT checkpoint (no genA2B/genB2A weights)')
    return state


def stored_arch(state: Mapping) -> dict | None:
    """The architecture a checkpoint records; None for PT-format files, which record none."""
    config = state.get('config')
    if not isinstance(config, Mapping) or any(key not in config for key in ('light', 'ch', 'n_res', 'img_size')):
        return None
    defaults = {'img_ch': 3, 'use_se': False, 'attention_gan': 0, 'attention_input': False, 'use_deconv': False,
                'sn': True, 'cam_D_attention': True, 'cam_D_weight': 1.0, 'n_global_dis': 7, 'n_local_dis': 5,
                'use_grouploss': False, 'groups': None, **ARCH_DEFAULTS}
    return {key: config.get(key, defaults.get(key)) for key in ARCH_KEYS}


def resolve_arch(state: Mapping, flags: Mapping | None, explicit: object = ()) -> dict:
    """The architecture to build for ``state``: the stored one, checked against the flags the user
    gave explicitly (a contradiction is a one-line error naming both values); PT-format files,
    which store none, take the flags."""
    arch = stored_arch(state)
    if arch is None:
        if flags is None:
            raise utils.UserError('this checkpoint records no architecture (PT format): pass its flags '
                                  '(--light, --ch, --n_res, --img_size, ...)')
        return arch_config(flags)
    if flags is not None:
        given = {key for key in ARCH_KEYS if any(name in explicit for name in DERIVED_FROM.get(key, (key,)))}
        clashes = arch_mismatches(arch, arch_config(flags), given)
        if clashes:
            raise utils.UserError(f'{"; ".join(clashes)}: the checkpoint was trained with a different '
                                  f'architecture; drop the flag (it is read from the checkpoint)')
    return arch


def load_translator(path: str | Path, device: torch.device | str = 'cpu', use_ema: bool = True,
                    flags: Mapping | object | None = None, explicit: object = (),
                    compile: bool = False) -> tuple[Translator, dict]:
    """Build the generators a checkpoint (or an export folder) describes and load its weights (EMA
    copies when present and ``use_ema``). Returns the translator and the checkpoint's contents
    (step, config, ...; ``uses_ema`` says whether the generators are EMA copies)."""
    state = read_checkpoint(path)   # CPU: only the two generators go to the device
    flag_dict = None if flags is None else (dict(flags) if isinstance(flags, Mapping) else vars(flags))
    arch = resolve_arch(state, flag_dict, explicit)
    generators = {}
    for direction, key in GENERATOR_KEYS.items():
        net = build_generator(arch)
        weights = state.get(f'{key}_ema') if use_ema and f'{key}_ema' in state else state[key]
        load_module(net, weights, key)
        net = net.to(device).eval().requires_grad_(False)
        generators[direction] = torch.compile(net) if compile else net
    state['has_ema'] = all(f'{k}_ema' in state for k in GENERATOR_KEYS.values())
    # An export holds one pair of generators; its config says whether they are the EMA copies.
    exported_ema = state.get('format') == exports.FORMAT and bool(state['config'].get('ema'))
    state['uses_ema'] = use_ema and state['has_ema'] or exported_ema
    return Translator(generators, arch, device), state
