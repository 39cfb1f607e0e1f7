"""EN's face-aware training (--seg_* flags) as one object the trainer holds, None when it is off.

``FaceMasking`` segments the real images once per step; the ``FaceMasks`` it returns say, for each
use the flags switch on, what the discriminators and generators see: D's keyword arguments (CAM on
masked features or a masked input), the patch mask of D's losses, and the generator output whose
background passes no adversarial gradient. The training step asks; it holds no --seg_* branch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from faceseg.bisenet import load_bisenet
from faceseg.segmenter import FaceSegmenter, SegMasks


@dataclass(frozen=True)
class FaceMaskOptions:
    """The --seg_* flags (EN) and the parser's weights."""

    weights: str = ''
    hard_edge: bool = False          # --hard_seg_edge
    fix_glass_mouth: bool = False    # --seg_fix_glass_mouth
    patch_mask: bool = False         # --seg_D_mask: D's patch losses count face patches only
    cam_feature_mask: bool = False   # --seg_D_cam_fea_mask: D's CAM logits from masked features
    cam_input_mask: bool = False     # --seg_D_cam_inp_mask: D's CAM logits from the masked image
    detach_background: bool = False  # --seg_G_detach: no adversarial gradient through the background


class FaceMasks:
    """One step's face masks of the real images (per domain) and the options applied to them.
    ``NO_MASKS`` (no masks, every option off) is what a step without face masking uses: D gets no
    extra arguments, every patch counts and the translation is judged whole."""

    def __init__(self, per_domain: dict[str, SegMasks], options: FaceMaskOptions) -> None:
        self.per_domain = per_domain
        self.options = options

    def of(self, domain: str) -> SegMasks | None:
        return self.per_domain.get(domain)

    def patch(self, domain: str) -> Tensor | None:
        """The mask of D's patch losses on images of ``domain``'s faces (None: every patch counts)."""
        return self.per_domain[domain].face if self.options.patch_mask else None

    def critic_kwargs(self, images: list[Tensor], domains: list[str | None]) -> list[dict]:
        """D's keyword arguments for each image; ``domains[i]`` names whose face the image shows
        (None: no face to mask, e.g. EN's blurred images, which count as all face)."""
        if not (self.options.cam_feature_mask or self.options.cam_input_mask):
            return [{} for _ in images]
        out = []
        for image, domain in zip(images, domains):
            face = self.per_domain[domain].face if domain is not None else torch.ones_like(image[:, :1])
            extra = {}
            if self.options.cam_feature_mask:
                extra['feature_mask'] = face
            if self.options.cam_input_mask:
                extra['cam_input'] = image * face
            out.append(extra)
        return out

    def generator_view(self, fake: Tensor, domain: str) -> Tensor:
        """The translation D judges in the G step: with --seg_G_detach its background is detached."""
        if not self.options.detach_background:
            return fake
        face = self.per_domain[domain].face
        return fake * face + fake.detach() * (1 - face)


NO_MASKS = FaceMasks({}, FaceMaskOptions())


class FaceMasking:
    """The frozen face segmenter and the --seg_* options."""

    def __init__(self, segmenter: FaceSegmenter, options: FaceMaskOptions) -> None:
        self.segmenter = segmenter
        self.options = options

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor]) -> FaceMasks:
        """The masks of the real images of both domains (computed once per step, no gradients)."""
        return FaceMasks({dom: self.segmenter(batch[dom]) for dom in 'AB'}, self.options)


def build_face_masking(options: FaceMaskOptions, device: torch.device) -> FaceMasking:
    """BiSeNet from ``options.weights`` on ``device``, wrapped for the step."""
    net = load_bisenet(options.weights, device)
    segmenter = FaceSegmenter(net, hard_edge=options.hard_edge, fix_glass_mouth=options.fix_glass_mouth).to(device)
    return FaceMasking(segmenter, options)
