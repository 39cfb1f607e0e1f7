"""Exported models: a folder with config.json and the two generators as safetensors (optionally ONNX).

A training checkpoint holds six networks, EMA copies and Adam moments (about 10 GB for the full
256 px model) and is readable only by this code. An export keeps what translation needs: the
architecture config and the generators the test phase would use, in safetensors (no pickle), with
float16 weights on request, and ONNX graphs for other runtimes.

    DIR/config.json          architecture keys (model.ARCH_KEYS) plus format, step, ema, dtype
    DIR/A2B.safetensors      generator state dicts, PT's parameter names
    DIR/B2A.safetensors
    DIR/A2B.onnx, B2A.onnx   with --onnx: image (N×3×H×W, float32 in [-1, 1]) -> translation, heatmap
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

import sizing
import utils
from networks import mlp_pool_size

FORMAT = 'ugatit-export/1'
CONFIG_NAME = 'config.json'
DIRECTIONS = ('A2B', 'B2A')
ONNX_INPUT = 'image'
ONNX_OUTPUTS = ('translation', 'heatmap')
ONNX_EMBED_LIMIT = 1_800_000_000   # bytes of weights kept inside the .onnx file (protobuf's limit is 2 GB)


def is_export(path: str | Path) -> bool:
    """True for a folder written by :func:`write_export` (it holds config.json)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def dynamic_size(arch: Mapping) -> bool:
    """Whether the ONNX graph takes any H×W: PT's light model pools the MLP input globally.

    The full model flattens an (img_size/4)² map into its first FC and EN's k×k pooled light model
    becomes a fixed-size average pool in ONNX, so both keep the training size there.
    """
    return not sizing.is_full(arch['light']) and mlp_pool_size(arch['img_size'], arch['light']) == 1


# ----------------------------------------------------------------------------------------------
# safetensors


def write_export(generators: Mapping[str, nn.Module], arch: Mapping, out: str | Path, *, fp16: bool = False,
                 metadata: Mapping | None = None) -> list[Path]:
    """Write config.json and <direction>.safetensors for both generators; returns the paths."""
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if fp16 else torch.float32
    paths = []
    for direction in DIRECTIONS:
        tensors = {name: t.detach().to('cpu', dtype if t.is_floating_point() else t.dtype).contiguous()
                   for name, t in generators[direction].state_dict().items()}
        path = out / f'{direction}.safetensors'
        save_file(tensors, str(path), metadata={'format': FORMAT, 'direction': direction})
        paths.append(path)
    config = {'format': FORMAT, **dict(arch), **dict(metadata or {}), 'dtype': str(dtype).removeprefix('torch.')}
    config_path = out / CONFIG_NAME
    config_path.write_text(json.dumps(utils.config_to_dict(config), indent=2) + '\n')
    return [config_path, *paths]


def read_export(folder: str | Path) -> dict:
    """An export as a checkpoint-shaped dict on the CPU: genA2B, genB2A (float32 state dicts) and its config.

    Inference then loads it like a generator-only training checkpoint; a clear UserError when a
    file is missing or unreadable.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from model import GENERATOR_KEYS
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise utils.UserError(f'{folder / CONFIG_NAME}: cannot read the export config ({exc})') from None
    if config.get('format') != FORMAT:
        raise utils.UserError(f'{folder} is not a U-GAT-IT export (config.json format {config.get("format")!r}, '
                              f'expected {FORMAT!r}); write one with scripts/export.py')
    state: dict = {'config': config, 'step': int(config.get('step', 0)), 'format': FORMAT}
    for direction, key in GENERATOR_KEYS.items():
        path = folder / f'{direction}.safetensors'
        try:
            weights = load_file(str(path), device='cpu')
        except (OSError, SafetensorError) as exc:
            raise utils.UserError(f'{path}: cannot read the exported weights ({exc})') from None
        state[key] = {name: t.float() if t.is_floating_point() else t for name, t in weights.items()}
    return state


# ----------------------------------------------------------------------------------------------
# ONNX


class OnnxGenerator(nn.Module):
    """The graph ONNX sees: image -> (translation, CAM heatmap), the two outputs users consume."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.generator(image)
        return out.image, out.heatmap


def export_onnx(generator: nn.Module, path: str | Path, arch: Mapping) -> list[Path]:
    """Export one generator with a dynamic batch size, and dynamic H and W (multiples of 4) for
    models that translate any size (:func:`dynamic_size`); other models take img_size×img_size.

    The weights are embedded in the .onnx file, or beside it in <name>.onnx.data past protobuf's
    2 GB limit (a full model above ~350 px). Returns the files written. Needs the optional packages
    onnx and onnxscript (requirements-extras.txt).
    """
    for module in ('onnx', 'onnxscript'):
        try:
            __import__(module)
        except ImportError:
            raise utils.UserError(f'ONNX export needs the {module} package: pip install -r '
                                  f'requirements-extras.txt') from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = OnnxGenerator(generator).to('cpu').eval().requires_grad_(False)
    size = int(arch['img_size'])
    # Batch 2, so that the exporter does not specialise the batch dimension to 1.
    example = torch.rand(2, int(arch['img_ch']), size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    dims: dict[int, object] = {0: torch.export.Dim('batch', min=1)}
    if dynamic_size(arch):
        dims[2] = 4 * torch.export.Dim('height_div_4', min=1)
        dims[3] = 4 * torch.export.Dim('width_div_4', min=1)
    n_bytes = sum(t.numel() * t.element_size() for t in wrapper.state_dict().values())
    external = n_bytes > ONNX_EMBED_LIMIT
    # The exporter narrates its progress on stdout and warns about internals; keep the CLI output ours.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter('ignore')
        torch.onnx.export(wrapper, (example,), str(path), input_names=[ONNX_INPUT], output_names=list(ONNX_OUTPUTS),
                          dynamic_shapes={'image': dims}, dynamo=True, external_data=external)
    data = path.with_name(path.name + '.data')
    return [path, data] if external else [path]


# ----------------------------------------------------------------------------------------------
# Reporting


def sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def human_size(n_bytes: int) -> str:
    for unit in ('B', 'KB', 'MB', 'GB'):
        if n_bytes < 1000 or unit == 'GB':
            return f'{n_bytes:.0f} {unit}' if unit == 'B' else f'{n_bytes:.2f} {unit}'
        n_bytes /= 1000
    raise AssertionError('unreachable')


def file_report(paths: list[Path]) -> list[str]:
    """One line per file: name, size and sha256 (for release notes and download checks)."""
    width = max(len(p.name) for p in paths)
    return [f'{p.name:<{width}}  {human_size(p.stat().st_size):>10}  sha256 {sha256(p)}' for p in paths]
