"""Face / background masks from BiSeNet face parsing (SPEC Part B §1.10).

Class indices (CelebAMask-HQ): 0 background, 1 skin, 2 l_brow, 3 r_brow, 4 l_eye, 5 r_eye,
6 eye_g (glasses), 7 l_ear, 8 r_ear, 9 ear_r, 10 nose, 11 mouth, 12 u_lip, 13 l_lip, 14 neck,
15 neck_l, 16 cloth, 17 hair, 18 hat.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faceseg.bisenet import BiSeNet

N_CLASSES = 19
GLASSES = 6
MOUTH = 11
# Foreground ("face") classes; background is {0, 14, 15, 16, 18}.
FACE_CLASSES = frozenset({*range(1, 14), 17})
# --seg_fix_glass_mouth: face parts kept as foreground; glasses are added back only after erosion.
GLASS_MOUTH_PARTS = FACE_CLASSES - {GLASSES, MOUTH}

PARSER_SIZE = (512, 512)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SegMasks(NamedTuple):
    """Face masks in [0, 1], each B×1×H×W."""

    face: Tensor  # M: plain face mask
    eroded: Tensor  # Mᵉ: face mask after close + erode (the preserved background grows)


_CLASS_INDEX: dict[tuple[frozenset[int], torch.device], Tensor] = {}


def _class_index(classes: frozenset[int], device: torch.device) -> Tensor:
    """``sorted(classes)`` as an index tensor on ``device``, copied there once: indexing with a
    Python list copies the list to the device (a blocking copy on CUDA) on every call."""
    key = (classes, device)
    if key not in _CLASS_INDEX:
        _CLASS_INDEX[key] = torch.tensor(sorted(classes), dtype=torch.long).to(device)
    return _CLASS_INDEX[key]


def class_sum(probs: Tensor, classes: frozenset[int]) -> Tensor:
    """Sum of the class probabilities over ``classes``, B×1×H×W, clamped to [0, 1]."""
    return probs[:, _class_index(classes, probs.device)].sum(dim=1, keepdim=True).clamp(0.0, 1.0)


def apply_edge_rule(mask: Tensor, hard_edge: bool = False) -> Tensor:
    """Hard: m ≥ 0.5. Soft: keep m where 0.3 < m < 0.7, otherwise binarise as m > 0.7."""
    if hard_edge:
        return (mask >= 0.5).to(mask.dtype)
    uncertain = (mask > 0.3) & (mask < 0.7)
    return torch.where(uncertain, mask, (mask > 0.7).to(mask.dtype))


# The 5×5 ellipse of cv2.getStructuringElement(MORPH_ELLIPSE, (5, 5)) is the union of a 3×5
# block (rows 1-3) and a 5×1 column (column 2), so a max over the ellipse is the max of two
# max-pools. Max-pool pads with -inf, which matches OpenCV's neutral default border value.
_ELLIPSE_PARTS = (((3, 5), (1, 2)), ((5, 1), (2, 0)))  # (kernel, padding) per rectangle


def dilate(mask: Tensor) -> Tensor:
    """Grey-scale dilation (max filter) with the 5×5 ellipse, batched, B×C×H×W."""
    pooled = [F.max_pool2d(mask, kernel, stride=1, padding=pad) for kernel, pad in _ELLIPSE_PARTS]
    return torch.maximum(*pooled)


def erode(mask: Tensor) -> Tensor:
    """Grey-scale erosion (min filter) with the 5×5 ellipse."""
    return -dilate(-mask)


def close_then_erode(mask: Tensor) -> Tensor:
    """Morphological close (dilate, erode) followed by one more erosion, as in EN."""
    return erode(erode(dilate(mask)))


def masks_from_probs(probs: Tensor, hard_edge: bool = False, fix_glass_mouth: bool = False) -> SegMasks:
    """Face masks from class probabilities (B×19×H×W, summing to 1 over classes).

    face = edge rule applied to Σ p over FACE_CLASSES; eroded = close + erode of face.
    With ``fix_glass_mouth`` the eroded mask is multiplied by M′ = edge rule applied to
    Σ p over GLASS_MOUTH_PARTS plus close+erode(p_glasses), so the mouth interior and thin
    glasses frames also count as background to preserve.
    """
    face = apply_edge_rule(class_sum(probs, FACE_CLASSES), hard_edge)
    eroded = close_then_erode(face)
    if fix_glass_mouth:
        glasses = close_then_erode(probs[:, GLASSES:GLASSES + 1])
        parts = (class_sum(probs, GLASS_MOUTH_PARTS) + glasses).clamp(0.0, 1.0)
        eroded = eroded * apply_edge_rule(parts, hard_edge)
    return SegMasks(face=face, eroded=eroded)


class FaceSegmenter(nn.Module):
    """Frozen BiSeNet wrapper: images in [-1, 1] (B×3×H×W) -> SegMasks at H×W.

    The network always stays in eval mode with gradients off, even when a parent module calls
    ``.train()``.
    """

    def __init__(self, net: BiSeNet, hard_edge: bool = False, fix_glass_mouth: bool = False):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.hard_edge = hard_edge
        self.fix_glass_mouth = fix_glass_mouth
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> 'FaceSegmenter':
        """Keep the parser in eval mode whatever the parent's mode (BatchNorm stays frozen)."""
        super().train(mode)
        self.net.eval()
        return self

    @torch.no_grad()
    def probs(self, images: Tensor) -> Tensor:
        """Class probabilities B×19×H×W for images in [-1, 1] at the input resolution."""
        x = F.interpolate(images * 0.5 + 0.5, PARSER_SIZE, mode='bilinear', align_corners=True)
        logits = self.net((x - self.mean) / self.std)[0]
        logits = F.interpolate(logits, images.shape[2:], mode='bicubic', align_corners=True)
        return logits.softmax(dim=1)

    @torch.no_grad()
    def forward(self, images: Tensor) -> SegMasks:
        """Face masks (plain and eroded) for images in [-1, 1]."""
        return masks_from_probs(self.probs(images), self.hard_edge, self.fix_glass_mouth)
