"""Every loss term of U-GAT-IT and its extensions.

The base objective (SPEC B §1.3) is LSGAN on the patch and CAM logits of the global and local
discriminators, cycle and identity L1, and the generator's CAM classification (BCE with logits).
Optional generator terms (face identity, background L1, total variation, few-shot groups) are small
objects with a ``name``, a ``weight`` and ``__call__(ctx) -> Tensor``; the trainer keeps only the
active ones and sums them, so the training step has no per-feature branches.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from networks import DiscriminatorOutput, GeneratorOutput


def resize_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Area-resize a B×1×H×W mask to the spatial size of ``like`` (a patch map or image)."""
    if mask.shape[-2:] == like.shape[-2:]:
        return mask
    return F.interpolate(mask, size=like.shape[-2:], mode='area')


def lsgan(pred: torch.Tensor, target: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean((pred - target)²); where ``mask`` is 0 the prediction counts as already on target.

    That is EN's --seg_D_mask: background patches add zero loss but stay in the mean's denominator.
    """
    pred = pred.float()
    if mask is not None:
        m = resize_mask(mask, pred)
        pred = pred * m + target * (1 - m)
    return torch.mean((pred - target) ** 2)


class GANLoss:
    """LSGAN over a multi-scale critic's outputs: patch logits plus ``cam_weight`` × CAM logits.

    ``cam_weight`` is EN's --cam_D_weight; at 0 or below the CAM terms are dropped entirely.
    """

    def __init__(self, cam_weight: float = 1.0) -> None:
        self.cam_weight = cam_weight

    def __call__(self, outputs: Sequence[DiscriminatorOutput], target: float,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        total = outputs[0].logit.new_zeros((), dtype=torch.float32)
        for out in outputs:
            total = total + lsgan(out.logit, target, mask)
            if self.cam_weight > 0:
                total = total + self.cam_weight * lsgan(out.cam_logit, target)
        return total


def generator_cam_loss(fake_cam_logit: torch.Tensor, identity_cam_logit: torch.Tensor) -> torch.Tensor:
    """The generator's own CAM classifier: translated inputs are 'source' (1), identity inputs 0."""
    fake = fake_cam_logit.float()
    idt = identity_cam_logit.float()
    return (F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
            + F.binary_cross_entropy_with_logits(idt, torch.zeros_like(idt)))


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute error in float32."""
    return F.l1_loss(a.float(), b.float())


def total_variation(image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Anisotropic total variation mean(|∂x|) + mean(|∂y|), optionally inside a mask.

    EN's "TV" returned sqrt(2)·mean|x|; this is the real thing.
    """
    image = image.float()
    dx = (image[..., :, 1:] - image[..., :, :-1]).abs()
    dy = (image[..., 1:, :] - image[..., :-1, :]).abs()
    if mask is not None:
        m = resize_mask(mask, image)
        dx = dx * m[..., :, 1:] * m[..., :, :-1]
        dy = dy * m[..., 1:, :] * m[..., :-1, :]
    return dx.mean() + dy.mean()


# ----------------------------------------------------------------------------------------------
# Optional generator terms


@dataclass
class DirectionContext:
    """Everything an optional generator term may look at for one translation direction."""

    direction: str                        # 'A2B' or 'B2A'
    source: torch.Tensor                  # real images of the source domain
    target: torch.Tensor                  # real images of the target domain
    fake: GeneratorOutput                 # G_fwd(source)
    critic: Sequence[DiscriminatorOutput]  # target-domain critic outputs on the fake
    source_masks: object | None = None     # faceseg.SegMasks of the source images, when segmenting
    source_group: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)


class FaceDistanceTerm:
    """FN's face distance: ‖f(source) − f(G(source))‖² under a frozen FaceNet, both directions."""

    def __init__(self, identity: torch.nn.Module, weight: float) -> None:
        self.identity = identity
        self.weight = weight
        self.name = 'face_distance'

    def __call__(self, ctx: DirectionContext) -> torch.Tensor:
        return self.identity(ctx.source.float(), ctx.fake.image.float()).mean()


class BackgroundL1Term:
    """EN's --seg_fix_weight: keep the background (outside the eroded face mask) unchanged."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.name = 'seg_fix'

    def __call__(self, ctx: DirectionContext) -> torch.Tensor:
        background = 1 - ctx.source_masks.eroded
        return l1(ctx.fake.image * background, ctx.source * background)


class TotalVariationTerm:
    """Smoothness of the translation (inside the face mask when segmentation is on)."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.name = 'tv'

    def __call__(self, ctx: DirectionContext) -> torch.Tensor:
        mask = ctx.source_masks.face if ctx.source_masks is not None else None
        return total_variation(ctx.fake.image, mask)


class GroupTerm:
    """F2W's group loss, generator side: the target critic must classify G(a) as a's group."""

    def __init__(self, weight: float, direction: str = 'A2B') -> None:
        self.weight = weight
        self.direction = direction
        self.name = 'group'

    def __call__(self, ctx: DirectionContext) -> torch.Tensor:
        if ctx.direction != self.direction:
            return ctx.fake.image.new_zeros((), dtype=torch.float32)
        return group_classification_loss(ctx.critic, ctx.source_group)


def group_classification_loss(outputs: Sequence[DiscriminatorOutput], labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every critic scale's group head against ``labels`` (summed over scales)."""
    return sum(F.cross_entropy(out.group_logit.float(), labels) for out in outputs)


def build_generator_terms(cfg, device: torch.device) -> list:
    """The optional generator loss terms the flags switch on (each a small object: name, weight, call)."""
    terms: list = []
    if cfg.face_distance_weight > 0:
        from faceseg.facenet import FaceIdentity, load_facenet
        net = load_facenet(cfg.facenet_weights, cfg.facenet_pretrained, cfg.facenet_checkpoint_dir, device)
        terms.append(FaceDistanceTerm(FaceIdentity(net).to(device), cfg.face_distance_weight))
    if cfg.seg_fix_weight > 0:
        terms.append(BackgroundL1Term(cfg.seg_fix_weight))
    if cfg.tv_weight > 0:
        terms.append(TotalVariationTerm(cfg.tv_weight))
    if cfg.use_grouploss:
        terms.append(GroupTerm(cfg.group_weight, 'A2B'))
    return terms
