"""Every loss term of U-GAT-IT and its extensions.

The base objective (SPEC B §1.3) is an adversarial loss (LSGAN by default, or another of TF's
``--gan_type`` objectives with its gradient penalty) on the patch and CAM logits of the global and
local discriminators, cycle and identity L1, and the generator's CAM classification (BCE with logits).
Optional generator terms (face identity, background L1, total variation, few-shot groups) are small
objects with a ``name``, a ``weight`` and ``__call__(ctx) -> Tensor``; the trainer keeps only the
active ones and sums them, so the training step has no per-feature branches.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

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


# ----------------------------------------------------------------------------------------------
# GAN objectives (TF's --gan_type): each owns its formulas for D on real and fake logits and for G


def _masked_mean(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """mean(loss · m²): background patches add zero loss and stay in the denominator, soft edges
    count m², which is exactly what :func:`lsgan`'s replace-by-target masking does."""
    if mask is None:
        return loss.mean()
    m = resize_mask(mask, loss)
    return (loss * m * m).mean()


class GANObjective(ABC):
    """Element-wise adversarial losses; subclasses give TF's formulas (ops.py discriminator_loss and
    generator_loss). ``threshold`` is the logit that separates 'real' from 'fake' decisions (for the
    logged D accuracy and ADA's overfitting signal)."""

    name = ''
    threshold = 0.0

    @abstractmethod
    def real(self, logit: torch.Tensor) -> torch.Tensor:
        """D's loss on real inputs, element-wise."""

    @abstractmethod
    def fake(self, logit: torch.Tensor) -> torch.Tensor:
        """D's loss on generated inputs, element-wise."""

    @abstractmethod
    def generator(self, logit: torch.Tensor) -> torch.Tensor:
        """G's loss on D's logits for generated inputs, element-wise."""

    def d_real(self, logit: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return _masked_mean(self.real(logit.float()), mask)

    def d_fake(self, logit: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return _masked_mean(self.fake(logit.float()), mask)

    def g_fake(self, logit: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return _masked_mean(self.generator(logit.float()), mask)


class LSGANObjective(GANObjective):
    """Least squares: D pushes real to 1 and fake to 0, G pushes fake to 1 (PT's only objective)."""

    name = 'lsgan'
    threshold = 0.5

    # The reductions keep PT's exact arithmetic (and EN's masking) through :func:`lsgan`.
    def d_real(self, logit, mask=None):
        return lsgan(logit, 1.0, mask)

    def d_fake(self, logit, mask=None):
        return lsgan(logit, 0.0, mask)

    def g_fake(self, logit, mask=None):
        return lsgan(logit, 1.0, mask)

    def real(self, logit):
        return (logit - 1) ** 2

    def fake(self, logit):
        return logit ** 2

    def generator(self, logit):
        return (logit - 1) ** 2


class CrossEntropyObjective(GANObjective):
    """The original GAN (TF's 'gan' and 'dragan'): sigmoid cross-entropy, non-saturating G loss."""

    name = 'gan'

    def real(self, logit):
        return F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit), reduction='none')

    def fake(self, logit):
        return F.binary_cross_entropy_with_logits(logit, torch.zeros_like(logit), reduction='none')

    def generator(self, logit):
        return self.real(logit)


class WassersteinObjective(GANObjective):
    """WGAN critic (TF's 'wgan-gp', 'wgan-lp'): D minimises −real + fake, G minimises −fake."""

    name = 'wgan'

    def real(self, logit):
        return -logit

    def fake(self, logit):
        return logit

    def generator(self, logit):
        return -logit


class HingeObjective(WassersteinObjective):
    """Hinge loss: D minimises relu(1 − real) + relu(1 + fake); G minimises −fake."""

    name = 'hinge'

    def real(self, logit):
        return F.relu(1 - logit)

    def fake(self, logit):
        return F.relu(1 + logit)


class GradientPenalty:
    """TF's gradient penalty at random points x̂ = real + α·(fake − real), α ~ U[0, 1) per image:
    weight·mean_i (‖∇ₓ D(x̂)_i‖ − 1)² ('wgan-gp'), or the one-sided weight·mean_i max(0, ‖∇‖ − 1)²
    ('wgan-lp'). ∇ is the gradient of the sum of a D output over its elements, the norm is over
    all pixels of an image, as in TF's ``gradient_panalty``."""

    def __init__(self, weight: float, one_sided: bool = False) -> None:
        self.weight = weight
        self.one_sided = one_sided

    def points(self, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """Where to penalise (a leaf tensor that requires grad)."""
        real, fake = real.detach().float(), fake.detach().float()
        alpha = torch.rand(len(real), 1, 1, 1, generator=generator, device=real.device)
        return (real + alpha * (fake - real)).requires_grad_(True)

    def __call__(self, output: torch.Tensor, points: torch.Tensor, scale: torch.Tensor | float = 1.0
                 ) -> torch.Tensor:
        """The penalty of one D output computed on ``points`` (differentiable: create_graph).

        ``scale``: the GradScaler's current scale under fp16 autocast. AMP's gradient-penalty recipe:
        the output is scaled before ``autograd.grad`` so fp16 gradients do not underflow, and the
        gradient unscaled after (an overflow gives inf, which the scaler then skips as a bad step).
        """
        grad, = torch.autograd.grad(output.float().sum() * scale, points, create_graph=True)
        grad = grad / scale
        excess = grad.flatten(1).norm(dim=1) - 1
        if self.one_sided:
            excess = excess.clamp(min=0)
        return self.weight * excess.square().mean()


class DraganPenalty(GradientPenalty):
    """DRAGAN: the same two-sided penalty, between the reals and reals perturbed by
    0.5·std(real)·U[0, 1) noise (std over the whole batch, biased, as ``tf.nn.moments``)."""

    def points(self, real, fake, generator=None):
        real = real.detach().float()
        noise = torch.rand(real.shape, generator=generator, device=real.device)
        perturbed = real + 0.5 * real.var(unbiased=False).sqrt() * noise
        return super().points(real, perturbed, generator)


GAN_TYPES = ('gan', 'lsgan', 'wgan-gp', 'wgan-lp', 'dragan', 'hinge')
PENALTY_GAN_TYPES = ('wgan-gp', 'wgan-lp', 'dragan')


def gan_objective(gan_type: str, gp_weight: float = 10.0) -> tuple[GANObjective, GradientPenalty | None]:
    """The objective and gradient penalty (None for gan, lsgan, hinge) of a ``--gan_type``."""
    objectives = {'gan': (CrossEntropyObjective(), None), 'lsgan': (LSGANObjective(), None),
                  'wgan-gp': (WassersteinObjective(), GradientPenalty(gp_weight)),
                  'wgan-lp': (WassersteinObjective(), GradientPenalty(gp_weight, one_sided=True)),
                  'dragan': (CrossEntropyObjective(), DraganPenalty(gp_weight)),
                  'hinge': (HingeObjective(), None)}
    if gan_type not in objectives:
        raise ValueError(f'gan_type must be one of {GAN_TYPES}, got {gan_type!r}')
    return objectives[gan_type]


class GANLoss:
    """An objective over a multi-scale critic's outputs: patch logits plus ``cam_weight`` × CAM logits.

    ``cam_weight`` is EN's --cam_D_weight; at 0 or below the CAM terms (and their penalty) are
    dropped entirely. The patch mask (EN's --seg_D_mask) applies to the patch logits only.
    """

    def __init__(self, cam_weight: float = 1.0, objective: GANObjective | None = None,
                 penalty: GradientPenalty | None = None) -> None:
        self.cam_weight = cam_weight
        self.objective = objective or LSGANObjective()
        self.penalty = penalty

    @property
    def threshold(self) -> float:
        return self.objective.threshold

    def _sum(self, role, outputs: Sequence[DiscriminatorOutput], mask: torch.Tensor | None) -> torch.Tensor:
        total = outputs[0].logit.new_zeros((), dtype=torch.float32)
        for out in outputs:
            total = total + role(out.logit, mask)
            if self.cam_weight > 0:
                total = total + self.cam_weight * role(out.cam_logit)
        return total

    def d_real(self, outputs: Sequence[DiscriminatorOutput], mask: torch.Tensor | None = None) -> torch.Tensor:
        """D's loss on the critic outputs of real images."""
        return self._sum(self.objective.d_real, outputs, mask)

    def d_fake(self, outputs: Sequence[DiscriminatorOutput], mask: torch.Tensor | None = None) -> torch.Tensor:
        """D's loss on the critic outputs of generated (or blurred) images."""
        return self._sum(self.objective.d_fake, outputs, mask)

    def g(self, outputs: Sequence[DiscriminatorOutput], mask: torch.Tensor | None = None) -> torch.Tensor:
        """G's adversarial loss on the critic outputs of its translations."""
        return self._sum(self.objective.g_fake, outputs, mask)

    def gradient_penalty(self, critics: Sequence, real: torch.Tensor, fake: torch.Tensor,
                         generator: torch.Generator | None = None, scale: torch.Tensor | float = 1.0
                         ) -> torch.Tensor:
        """The penalty summed over every critic (``critics``: callables image -> DiscriminatorOutput)
        on the patch logit and, weighted by ``cam_weight``, the CAM logit; zero without a penalty.
        ``scale``: the fp16 GradScaler's scale (see ``GradientPenalty.__call__``)."""
        if self.penalty is None:
            return real.new_zeros((), dtype=torch.float32)
        points = self.penalty.points(real, fake, generator)
        total = 0.0
        for critic in critics:
            out = critic(points)
            total = total + self.penalty(out.logit, points, scale)
            if self.cam_weight > 0:
                total = total + self.cam_weight * self.penalty(out.cam_logit, points, scale)
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


class GeneratorTerm:
    """An optional generator loss term: its ``name`` (logged as ``G/<name>_<direction>``), its
    ``weight``, the ``directions`` it applies to, and a call on a :class:`DirectionContext`."""

    name: str
    weight: float
    directions: tuple[str, ...] = ('A2B', 'B2A')


class FaceDistanceTerm(GeneratorTerm):
    """FN's face distance: ‖f(source) − f(G(source))‖² under a frozen FaceNet, both directions."""

    def __init__(self, identity: torch.nn.Module, weight: float) -> None:
        self.identity = identity
        self.weight = weight
        self.name = 'face_distance'

    def __call__(self, ctx: DirectionContext) -> torch.Tensor:
        return self.identity(ctx.source.float(), ctx.fake.image.float()).mean()


class BackgroundL1Term(GeneratorTerm):
    """EN's --seg_fix_weight: keep the background (outside the eroded face mask) unchanged."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.name = 'seg_fix'

    def __call__(self, ctx: DirectionContext) -> torch.Tensor:
        background = 1 - ctx.source_masks.eroded
        return l1(ctx.fake.image * background, ctx.source * background)


class TotalVariationTerm(GeneratorTerm):
    """Smoothness of the translation (inside the face mask when segmentation is on)."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.name = 'tv'

    def __call__(self, ctx: DirectionContext) -> torch.Tensor:
        mask = ctx.source_masks.face if ctx.source_masks is not None else None
        return total_variation(ctx.fake.image, mask)


class PairTerm(GeneratorTerm):
    """FN's pair loss for paired data (--paired): the translation must equal the paired target image,
    L1(G_AB(a), b) for A2B and L1(G_BA(b), a) for B2A."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.name = 'pair'

    def __call__(self, ctx: DirectionContext) -> torch.Tensor:
        return l1(ctx.fake.image, ctx.target)


class GroupTerm(GeneratorTerm):
    """F2W's group loss, generator side: the target critic must classify G(a) as a's group (one
    direction only: the other has no term, rather than a zero logged every step)."""

    def __init__(self, weight: float, direction: str = 'A2B') -> None:
        self.weight = weight
        self.directions = (direction,)
        self.name = 'group'

    def __call__(self, ctx: DirectionContext) -> torch.Tensor:
        return group_classification_loss(ctx.critic, ctx.source_group)


def group_classification_loss(outputs: Sequence[DiscriminatorOutput], labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every critic scale's group head against ``labels`` (summed over scales)."""
    return sum(F.cross_entropy(out.group_logit.float(), labels) for out in outputs)


@dataclass(frozen=True)
class GeneratorTermOptions:
    """The optional generator loss terms' flags: each term is on when its weight is positive."""

    face_distance_weight: float = 0.0      # FN's FaceNet identity term
    facenet_weights: str | None = None
    facenet_pretrained: str | None = None
    facenet_checkpoint_dir: str | None = None
    seg_fix_weight: float = -1.0           # EN's background L1 (needs face masks)
    tv_weight: float = 0.0
    pair_weight: float = 0.0
    group_loss: bool = False               # F2W's --use_grouploss
    group_weight: float = 1.0


def build_generator_terms(options: GeneratorTermOptions, device: torch.device) -> list:
    """The generator loss terms ``options`` switch on (each a small object: name, weight, call)."""
    terms: list = []
    if options.face_distance_weight > 0:
        from faceseg.facenet import FaceIdentity, load_facenet  # facenet-pytorch: only when asked for
        net = load_facenet(options.facenet_weights, options.facenet_pretrained, options.facenet_checkpoint_dir,
                           device)
        terms.append(FaceDistanceTerm(FaceIdentity(net).to(device), options.face_distance_weight))
    if options.seg_fix_weight > 0:
        terms.append(BackgroundL1Term(options.seg_fix_weight))
    if options.tv_weight > 0:
        terms.append(TotalVariationTerm(options.tv_weight))
    if options.pair_weight > 0:
        terms.append(PairTerm(options.pair_weight))
    if options.group_loss:
        terms.append(GroupTerm(options.group_weight, 'A2B'))
    return terms


# ----------------------------------------------------------------------------------------------
# Regularisation


def kernels(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The conv and dense kernels of a network (the un-normalised ``weight_orig`` under spectral
    norm): what TF's ``l2_regularizer`` covers. Biases, norm scales and offsets, and ρ are left out,
    as are layers marked ``l2_regularised = False`` (variables TF made without the regulariser)."""
    layers = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)
    found = []
    for layer in module.modules():
        if isinstance(layer, layers) and getattr(layer, 'l2_regularised', True):
            weight = layer.weight_orig if hasattr(layer, 'weight_orig') else layer.weight
            if isinstance(weight, torch.nn.Parameter):
                found.append(weight)
    return found


class KernelL2:
    """TF's regularisation: weight·Σ w²/2 over the kernels of a network, a loss term (its gradient
    weight·w equals Adam's coupled weight decay, but on kernels only)."""

    def __init__(self, module: torch.nn.Module, weight: float) -> None:
        self.params = kernels(module)
        self.weight = weight
        self.name = 'l2'

    def __call__(self) -> torch.Tensor:
        return self.weight * sum(p.float().square().sum() for p in self.params) / 2
