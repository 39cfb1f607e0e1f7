"""The pytorch-fid InceptionV3 (TF-ported FID weights, 2048-d pool3), loadable from a local file."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
import torchvision
from pytorch_fid.inception import (
    FIDInceptionA,
    FIDInceptionC,
    FIDInceptionE_1,
    FIDInceptionE_2,
    InceptionV3,
)
from torch import nn

from .scores import MetricsError

FID_WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
FEATURE_DIM = 2048
POOL3_BLOCK = InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]


def fid_inception_backbone() -> nn.Module:
    """The FID Inception architecture (torchvision Inception with pytorch-fid's patched blocks).

    Randomly initialised and never downloads; its ``state_dict`` has the format of
    ``pt_inception-2015-12-05-6726825d.pth``.
    """
    inception = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                                init_weights=False)
    inception.Mixed_5b = FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = FIDInceptionE_1(1280)
    inception.Mixed_7c = FIDInceptionE_2(2048)
    return inception


class _Pool3InceptionV3(InceptionV3):
    """pytorch-fid's ``InceptionV3([3])`` built around a given backbone instead of downloading one.

    The blocks are laid out exactly as in ``InceptionV3.__init__`` (pytorch-fid 0.3.0), so the
    inherited ``forward`` (bilinear resize to 299, [0,1] -> [-1,1]) and the state-dict keys match.
    """

    def __init__(self, inception: nn.Module) -> None:
        nn.Module.__init__(self)
        self.resize_input = True
        self.normalize_input = True
        self.output_blocks = [POOL3_BLOCK]
        self.last_needed_block = POOL3_BLOCK
        pool = nn.MaxPool2d(kernel_size=3, stride=2)
        self.blocks = nn.ModuleList([
            nn.Sequential(inception.Conv2d_1a_3x3, inception.Conv2d_2a_3x3, inception.Conv2d_2b_3x3, pool),
            nn.Sequential(inception.Conv2d_3b_1x1, inception.Conv2d_4a_3x3,
                          nn.MaxPool2d(kernel_size=3, stride=2)),
            nn.Sequential(inception.Mixed_5b, inception.Mixed_5c, inception.Mixed_5d, inception.Mixed_6a,
                          inception.Mixed_6b, inception.Mixed_6c, inception.Mixed_6d, inception.Mixed_6e),
            nn.Sequential(inception.Mixed_7a, inception.Mixed_7b, inception.Mixed_7c,
                          nn.AdaptiveAvgPool2d(output_size=(1, 1))),
        ])
        for param in self.parameters():
            param.requires_grad = False


def pool3_model(backbone: nn.Module) -> nn.Module:
    """Wrap a FID backbone (see :func:`fid_inception_backbone`) as pytorch-fid's pool3 InceptionV3."""
    return _Pool3InceptionV3(backbone).eval()


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict, turning every failure into a one-line MetricsError naming the file."""
    if not path.is_file():
        raise MetricsError(f'Inception weights file not found: {path}; pass the path of {FID_WEIGHTS_NAME}')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # noqa: BLE001 - the unpickler raises many types (IndexError, ...) on junk
        raise MetricsError(f'cannot read Inception weights {path} ({type(err).__name__}); '
                           f'pass a valid {FID_WEIGHTS_NAME}') from err
    if not isinstance(state, dict):
        raise MetricsError(f'{path} holds no state dict; pass {FID_WEIGHTS_NAME}')
    return state


def _inception_from_file(path: Path) -> nn.Module:
    backbone = fid_inception_backbone()
    state = _load_weight_file(path)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise MetricsError(f'{path} is not an FID Inception state dict (keys or shapes differ); '
                           f'pass {FID_WEIGHTS_NAME}') from err
    return pool3_model(backbone)


def _inception_downloaded() -> nn.Module:
    try:
        # pytorch-fid's standard path: torch hub cache, downloaded once when online.
        return InceptionV3([POOL3_BLOCK]).eval()
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise MetricsError(f'cannot download the FID Inception weights ({type(err).__name__}); pass '
                           f'--inception_weights FILE (python -m metrics: --weights FILE) with '
                           f'{FID_WEIGHTS_NAME}') from err


def build_inception(weights: str | None = None, device: str | torch.device = 'cpu') -> nn.Module:
    """pytorch-fid's InceptionV3 (2048-d pool3, FID blocks, resize to 299, [0,1] input) in eval mode.

    ``weights`` is a local ``pt_inception-2015-12-05-6726825d.pth`` (loaded strictly, never downloads);
    ``None`` uses pytorch-fid's download into the torch hub cache.
    """
    model = _inception_from_file(Path(weights)) if weights is not None else _inception_downloaded()
    return model.to(resolve_device(device))


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse a device string, failing with a one-line MetricsError when it is unusable here."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise MetricsError(f'invalid device {device!r}; use e.g. cpu, cuda or cuda:0') from err
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise MetricsError(f'device {device!r} requested but CUDA is not available; use --device cpu')
    return dev


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def unit_range_features(model: nn.Module, images01: torch.Tensor) -> torch.Tensor:
    """Pool3 features (N x 2048, float32, CPU) of images in [0, 1], exactly as pytorch-fid feeds them."""
    with torch.inference_mode():
        pred = model(images01.to(_model_device(model), torch.float32))[0]
        if pred.shape[2] != 1 or pred.shape[3] != 1:
            pred = nn.functional.adaptive_avg_pool2d(pred, output_size=(1, 1))
        return pred.flatten(1).float().cpu()


def inception_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pool3 features (N x 2048, float32, CPU) of images in [-1, 1] (the trainer's range), any size."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise MetricsError(f'expected RGB images N x 3 x H x W, got shape {tuple(images.shape)}')
    # The network rescales [0,1] -> [-1,1] itself (pytorch-fid's normalize_input).
    return unit_range_features(model, (images.detach().float() + 1.0) / 2.0)
