"""BiSeNet face parser of zllrunning/face-parsing.PyTorch (19 CelebAMask-HQ classes).

Module and parameter names mirror the original model.py/resnet.py exactly so that the public
checkpoint ``79999_iter.pth`` loads with ``strict=True``. Unlike the original, nothing is
downloaded: the ResNet-18 backbone starts from PyTorch's default initialisation and all weights
come from the checkpoint.
"""

import os
import pickle

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faceseg.errors import weights_error


def conv_bn(in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1) -> nn.Sequential:
    """Bias-free convolution followed by batch norm (the ResNet ``downsample`` branch)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convolutions with an identity or 1×1 projection shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        needs_projection = in_ch != out_ch or stride != 1
        self.downsample = conv_bn(in_ch, out_ch, stride=stride) if needs_projection else None

    def forward(self, x: Tensor) -> Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def resnet_stage(in_ch: int, out_ch: int, stride: int, blocks: int = 2) -> nn.Sequential:
    """A ResNet stage: the first block may change width/stride, the rest keep it."""
    layers = [BasicBlock(in_ch, out_ch, stride)]
    layers += [BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class Resnet18(nn.Module):
    """ResNet-18 trunk without the classifier; returns the 1/8, 1/16 and 1/32 feature maps."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = resnet_stage(64, 64, stride=1)
        self.layer2 = resnet_stage(64, 128, stride=2)
        self.layer3 = resnet_stage(128, 256, stride=2)
        self.layer4 = resnet_stage(256, 512, stride=2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


class ConvBNReLU(nn.Module):
    """Bias-free convolution, batch norm, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class AttentionRefinementModule(nn.Module):
    """3×3 conv, then channel attention from globally pooled features."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = ConvBNReLU(in_ch, out_ch)
        self.conv_atten = nn.Conv2d(out_ch, out_ch, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * atten


class ContextPath(nn.Module):
    """ResNet-18 with ARMs and a global-context branch; returns (feat8, context8, context16)."""

    def __init__(self):
        super().__init__()
        self.resnet = Resnet18()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, kernel=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        global_ctx = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))
        global_ctx = F.interpolate(global_ctx, feat32.shape[2:], mode='nearest')

        feat32_sum = self.arm32(feat32) + global_ctx
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, feat16.shape[2:], mode='nearest'))

        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, feat8.shape[2:], mode='nearest'))
        return feat8, feat16_up, feat32_up


class FeatureFusionModule(nn.Module):
    """Fuses spatial and context features with a squeeze-excitation style residual attention."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.convblk = ConvBNReLU(in_ch, out_ch, kernel=1)
        self.conv1 = nn.Conv2d(out_ch, out_ch // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out_ch // 4, out_ch, 1, bias=False)

    def forward(self, spatial: Tensor, context: Tensor) -> Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        atten = F.adaptive_avg_pool2d(feat, 1)
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(atten))))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    """Segmentation head: 3×3 ConvBNReLU then a 1×1 classifier."""

    def __init__(self, in_ch: int, mid_ch: int, n_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(in_ch, mid_ch)
        self.conv_out = nn.Conv2d(mid_ch, n_classes, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """Face-parsing BiSeNet; the ResNet 1/8 features stand in for the spatial path.

    ``forward`` returns (main, aux16, aux32) logits, each B×n_classes×H×W at the input size.
    """

    def __init__(self, n_classes: int = 19):
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, n_classes)
        self.conv_out16 = BiSeNetOutput(128, 64, n_classes)
        self.conv_out32 = BiSeNetOutput(128, 64, n_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        size = x.shape[2:]
        feat8, context8, context16 = self.cp(x)
        logits = (
            self.conv_out(self.ffm(feat8, context8)),
            self.conv_out16(context8),
            self.conv_out32(context16),
        )
        return tuple(F.interpolate(out, size, mode='bilinear', align_corners=True) for out in logits)


# What torch.load / load_state_dict raise for a missing, truncated or foreign file.
_LOAD_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError)


def _describe_mismatch(net: nn.Module, state: dict) -> str:
    """One-line summary of how ``state`` differs from ``net``'s state dict."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state)
                      if tuple(getattr(state[k], 'shape', ())) != tuple(expected[k].shape))
    parts = [f'{len(keys)} {what} (e.g. {keys[0]})'
             for what, keys in (('missing keys', missing), ('unexpected keys', unexpected),
                                ('shape mismatches', reshaped)) if keys]
    return ', '.join(parts)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_bisenet(path: str | os.PathLike, device: str | torch.device = 'cpu') -> BiSeNet:
    """Build a frozen, eval-mode BiSeNet from a face-parsing checkpoint (strict load).

    Raises FaceWeightsError (naming ``--faceseg_weights``) if the file is missing or does not hold
    the 19-class BiSeNet state dict.
    """
    if not os.path.isfile(path):
        raise weights_error(path, 'file not found')
    net = BiSeNet(n_classes=19)
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except _LOAD_ERRORS as err:
        raise weights_error(path, f'unreadable: {_first_line(err)}') from err
    if not isinstance(state, dict):
        raise weights_error(path, f'expected a state dict, found {type(state).__name__}')
    try:
        net.load_state_dict(state, strict=True)
    except _LOAD_ERRORS as err:
        reason = _describe_mismatch(net, state) or _first_line(err)
        raise weights_error(path, f'not the 19-class face-parsing BiSeNet: {reason}') from err
    net.requires_grad_(False)
    return net.eval().to(device)
