"""What the model is: its architecture (a typed, frozen config), the two translation directions,
the network builders and a trained pair of generators applied for inference. No disk I/O: every
stored form (training checkpoints, PT-format files, exports) is ``checkpoints.py``'s.

Inference (the test/img_dir/video phases, export, the demo) needs only the two generators and the
architecture they were trained with, and a checkpoint stores both, so no inference path builds a
discriminator, FaceNet or an optimizer, and no architecture flag has to be repeated by hand (a
light/full mismatch was the most reported "load failure" of the official code).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

import images
from networks import PT, Arch, Discriminator, GeneratorOutput, ResnetGenerator


@dataclass(frozen=True)
class ArchConfig:
    """The flags that define the networks' shapes and function, with PT's defaults.

    Stored in every training checkpoint and export (:meth:`to_dict`) and read back from any of
    them, older ones included (:meth:`from_dict` fills keys that did not exist yet with the value
    that older releases implied).
    """

    light: bool | int = False          # PT's bool, or EN's k×k pooled MLP input (k > 1; <= 0: full)
    ch: int = 64
    n_res: int = 4
    img_size: int = 256
    img_ch: int = 3
    use_se: bool = False
    attention_gan: int = 0
    attention_input: bool = False
    use_deconv: bool = False
    sn: bool = True
    cam_D_attention: bool = True
    cam_D_weight: float = 1.0
    n_global_dis: int = 7
    n_local_dis: int = 5
    use_grouploss: bool = False
    groups: tuple[int, ...] | None = None
    arch: str = 'pt'                   # the official graph: 'pt' or 'tf'
    tf_graph: str | None = None
    smoothing: bool = False

    # Keys a config must hold to describe a model at all (PT-format files store no config).
    REQUIRED = ('light', 'ch', 'n_res', 'img_size')
    # Command-line spelling where it differs from ``--<key>``, and keys set through another flag.
    FLAG_NAMES = {'groups': '--group'}
    DERIVED_FROM = {'n_global_dis': ('n_global_dis', 'n_dis'), 'n_local_dis': ('n_local_dis', 'n_dis')}

    def __post_init__(self) -> None:
        if self.groups is not None and not isinstance(self.groups, tuple):
            object.__setattr__(self, 'groups', tuple(self.groups))   # JSON and torch give lists back

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping) -> ArchConfig:
        """From any mapping holding (some of) the keys: a whole config, a checkpoint's or export's."""
        return cls(**{key: values[key] for key in cls.keys() if values.get(key) is not None})

    @classmethod
    def from_flags(cls, flags: object) -> ArchConfig:
        """From parsed flags (an argparse Namespace) or a config dict."""
        return cls.from_dict(flags if isinstance(flags, Mapping) else vars(flags))

    def to_dict(self) -> dict:
        """Plain JSON values (groups as a list)."""
        out = dataclasses.asdict(self)
        out['groups'] = list(self.groups) if self.groups is not None else None
        return out

    @property
    def network(self) -> Arch:
        """The official graph the networks reproduce (--arch, --tf_graph, --smoothing)."""
        return Arch('tf', self.tf_graph or 'current', bool(self.smoothing)) if self.arch == 'tf' else PT

    @property
    def is_full(self) -> bool:
        """PT's full model (light False) or EN's -1/0: the MLP input is the whole feature map."""
        return self.light is False or (not isinstance(self.light, bool) and int(self.light) <= 0)

    @classmethod
    def flag_name(cls, key: str) -> str:
        return cls.FLAG_NAMES.get(key, f'--{key}')

    def mismatches(self, wanted: ArchConfig, keys: object = None) -> list[str]:
        """``'--light True (checkpoint: False)'`` for each key (of ``keys``, default all) where
        ``wanted`` differs from this (stored) config."""
        out = []
        for key in self.keys():
            if keys is not None and key not in keys:
                continue
            stored, asked = getattr(self, key), getattr(wanted, key)
            if stored != asked:
                out.append(f'{self.flag_name(key)} {_show(asked)} (checkpoint: {_show(stored)})')
        return out


def _show(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ','.join(str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class Direction:
    """One translation direction: its generator, the reverse one, and the domains involved."""

    name: str
    source: str
    target: str

    @property
    def backward(self) -> str:
        return f'{self.target}2{self.source}'

    @property
    def key(self) -> str:
        """The generator's key in the official checkpoints (``genA2B``)."""
        return f'gen{self.name}'


DIRECTIONS = (Direction('A2B', 'A', 'B'), Direction('B2A', 'B', 'A'))
DIRECTION = {d.name: d for d in DIRECTIONS}


# ----------------------------------------------------------------------------------------------
# Building the networks


def build_generator(arch: ArchConfig) -> ResnetGenerator:
    """A generator as the architecture describes it; networks never see a config, only arguments."""
    return ResnetGenerator(arch.img_ch, arch.img_ch, ngf=arch.ch, n_blocks=arch.n_res, img_size=arch.img_size,
                           light=arch.light, use_se=arch.use_se, attention_gan=arch.attention_gan,
                           attention_input=arch.attention_input, use_deconv=arch.use_deconv, arch=arch.network)


def build_critic(arch: ArchConfig, domain: str) -> nn.ModuleDict:
    """The global ('G') and local ('L') discriminators of one domain; group heads on the target."""
    groups = arch.groups or ()
    n_groups = max(groups) + 1 if arch.use_grouploss and domain == 'B' and groups else 0

    def make(n_layers: int) -> Discriminator:
        return Discriminator(arch.img_ch, ndf=arch.ch, n_layers=n_layers, sn=arch.sn,
                             cam_attention=arch.cam_D_attention and arch.cam_D_weight > 0,
                             n_groups=n_groups, arch=arch.network)
    return nn.ModuleDict({'G': make(arch.n_global_dis), 'L': make(arch.n_local_dis)})


# ----------------------------------------------------------------------------------------------
# Inference


class Translator:
    """The two generators of a trained model, applied in eval mode without autograd."""

    def __init__(self, generators: Mapping[str, nn.Module], arch: ArchConfig, device: torch.device | str,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        self.generators = dict(generators)
        self.arch = arch
        self.device = torch.device(device)
        self.autocast = autocast

    @property
    def img_size(self) -> int:
        return self.arch.img_size

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
        backward = DIRECTION[direction].backward
        size = self.img_size
        fwd = self.translate(real, direction)
        idt = self.translate(real, backward)
        cyc = self.translate(fwd.image, backward)
        columns = []
        for i in range(len(real)):
            col = [images.tensor_to_uint8(real[i]),
                   images.heatmap_to_uint8(idt.heatmap[i], size), images.tensor_to_uint8(idt.image[i]),
                   images.heatmap_to_uint8(fwd.heatmap[i], size), images.tensor_to_uint8(fwd.image[i]),
                   images.heatmap_to_uint8(cyc.heatmap[i], size), images.tensor_to_uint8(cyc.image[i])]
            if fwd.attention is not None:
                col += [images.heatmap_to_uint8(a[None], size) for a in fwd.attention[i]]
            columns.append(col)
        return columns
