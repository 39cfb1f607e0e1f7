"""ONNX export of a generator: image (N×3×H×W, float32 in [-1, 1]) -> translation, CAM heatmap.

    EXPORT/A2B.onnx, B2A.onnx   written next to an export's safetensors (scripts/export.py --onnx)
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import nn

import errors
from model import ArchConfig
from networks import mlp_pool_size

ONNX_INPUT = 'image'
ONNX_OUTPUTS = ('translation', 'heatmap')
ONNX_EMBED_LIMIT = 1_800_000_000   # bytes of weights kept inside the .onnx file (protobuf's limit is 2 GB)


def dynamic_size(arch: ArchConfig) -> bool:
    """Whether the ONNX graph takes any H×W: PT's light model pools the MLP input globally.

    The full model flattens an (img_size/4)² map into its first FC and EN's k×k pooled light model
    becomes a fixed-size average pool in ONNX, so both keep the training size there.
    """
    return not arch.is_full and mlp_pool_size(arch.img_size, arch.light) == 1


class OnnxGenerator(nn.Module):
    """The graph ONNX sees: image -> (translation, CAM heatmap), the two outputs users consume."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.generator(image)
        return out.image, out.heatmap


def export_onnx(generator: nn.Module, path: str | Path, arch: ArchConfig) -> list[Path]:
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
            raise errors.UserError(f'ONNX export needs the {module} package: pip install -r '
                                  f'requirements-extras.txt') from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = OnnxGenerator(generator).to('cpu').eval().requires_grad_(False)
    size = arch.img_size
    # Batch 2, so that the exporter does not specialise the batch dimension to 1.
    example = torch.rand(2, arch.img_ch, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
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
