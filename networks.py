"""U-GAT-IT networks: the AdaLIN generator and the CAM discriminator.

With every option at its default the modules reproduce the official PyTorch code (PT) exactly:
constructor arguments, state-dict names and shapes, and numerics, so a PT checkpoint loads with
``strict=True`` and gives PT's outputs. Options (scSE, attention masks, deconvolution, pooled
"light" MLP, discriminator depth and group heads) change the architecture only when switched on.
``arch=Arch('tf', ...)`` reproduces the official TensorFlow graph instead (SPEC B §2, §2a): the
:class:`Arch` object holds every difference, so both graphs share one implementation.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------------------------
# Architecture: what differs between the official PyTorch and TensorFlow graphs

ARCHS = ('pt', 'tf')
TF_GRAPHS = ('current', '2019')


@dataclass(frozen=True)
class Arch:
    """The official graph the networks reproduce: PyTorch's (``'pt'``, the default) or TensorFlow's.

    TF differs from PT only where this object says so: biases on every generator conv and FC,
    learnable scale/offset in the encoder instance norms, TF's padding rule, biased variance in the
    layer-instance norms, AdaLIN ρ initialised to 1 (``smoothing``: effective ρ = clip(ρ − 0.1, 0, 1)),
    one CAM FC with bias shared by GAP and GMP (:class:`SharedCAM`), the full model's MLP input
    flattened as (h, w, c), a bias on D's last conv, no EN extra layers in shallow discriminators,
    and N(0, 0.02) initialisation. ``graph`` picks TF's code
    version: ``'current'`` (HEAD) or ``'2019'`` (2019-08-15, which the released checkpoints most
    likely come from; its CAM differs, see :class:`SharedCAM`).
    """

    name: str = 'pt'
    graph: str = 'current'
    smoothing: bool = False

    def __post_init__(self) -> None:
        if self.name not in ARCHS:
            raise ValueError(f'arch must be one of {ARCHS}, got {self.name!r}')
        if self.graph not in TF_GRAPHS:
            raise ValueError(f'TF graph must be one of {TF_GRAPHS}, got {self.graph!r}')
        if self.smoothing and not self.tf:
            raise ValueError('smoothing is a TF option (arch "tf")')

    @property
    def tf(self) -> bool:
        return self.name == 'tf'

    @property
    def bias(self) -> bool:
        """Generator convs and FCs carry biases (PT: only the 1×1 conv does)."""
        return self.tf

    @property
    def unbiased_variance(self) -> bool:
        """PT's layer-instance norms use torch.var (unbiased); TF's tf.nn.moments is biased."""
        return not self.tf

    @property
    def adailn_rho_init(self) -> float:
        return 1.0 if self.tf else 0.9

    def pad_amounts(self, kernel: int, stride: int, pad: int) -> tuple[int, int]:
        """Reflection padding (before, after) of a conv. TF's conv() pads (pad, kernel − stride − pad)
        when kernel − stride is odd: (1, 0) for G's stride-2 3×3 convs, (1, 2) for D's stride-1 4×4."""
        if not self.tf or (kernel - stride) % 2 == 0:
            return pad, pad
        return pad, kernel - stride - pad

    def pad(self, kernel: int, stride: int, pad: int) -> ReflectionPad2d:
        before, after = self.pad_amounts(kernel, stride, pad)
        return ReflectionPad2d(pad if before == after else (before, after, before, after))

    def instance_norm(self, channels: int) -> nn.Module:
        """TF's encoder instance norms have learnable scale and offset (tf.contrib, center/scale)."""
        return InstanceNorm2d(channels, affine=self.tf)


PT = Arch()


def tf_init_(module: nn.Module) -> None:
    """TF's initialisation: N(0, 0.02) conv and FC kernels, zero biases (norms keep their inits)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(raw_weight(m), 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, SharedCAM):
            m.reset_tf_2019_weighting()


# ----------------------------------------------------------------------------------------------
# Spectral norm


class SpectralNorm:
    """Spectral normalisation as a forward pre-hook, state-compatible with ``nn.utils.spectral_norm``.

    Parameters and buffers are named ``weight_orig``, ``weight_u`` and ``weight_v`` exactly as in
    PyTorch's (old-API) implementation, so PT checkpoints load. Unlike it, the power iteration and
    the division by sigma always run in float32 (autocast disabled), which mixed precision needs.
    As in PyTorch, one power iteration runs per forward call while the module is in training mode.
    """

    def __init__(self, eps: float = 1e-12) -> None:
        self.eps = eps

    @staticmethod
    def apply(module: nn.Module, eps: float = 1e-12) -> nn.Module:
        weight = module.weight
        del module._parameters['weight']
        module.register_parameter('weight_orig', nn.Parameter(weight.data))
        height = weight.size(0)
        width = weight.numel() // height
        u = F.normalize(weight.new_empty(height).normal_(0, 1), dim=0, eps=eps)
        v = F.normalize(weight.new_empty(width).normal_(0, 1), dim=0, eps=eps)
        module.register_buffer('weight_u', u)
        module.register_buffer('weight_v', v)
        hook = SpectralNorm(eps)
        module.weight = hook.compute_weight(module, power_iteration=False)
        module.register_forward_pre_hook(hook)
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(_release_normalised_weight)
        return module

    def compute_weight(self, module: nn.Module, power_iteration: bool) -> torch.Tensor:
        weight = module.weight_orig
        with _float32_region(weight.device.type):
            weight_mat = weight.float().reshape(weight.size(0), -1)
            u, v = module.weight_u, module.weight_v
            if power_iteration:
                with torch.no_grad():
                    v = F.normalize(torch.mv(weight_mat.t(), u), dim=0, eps=self.eps, out=v)
                    u = F.normalize(torch.mv(weight_mat, v), dim=0, eps=self.eps, out=u)
                    u = u.clone(memory_format=torch.contiguous_format)
                    v = v.clone(memory_format=torch.contiguous_format)
            sigma = torch.dot(u, torch.mv(weight_mat, v))
            return weight / sigma

    def __call__(self, module: nn.Module, inputs: tuple) -> None:
        module.weight = self.compute_weight(module, power_iteration=module.training)


def _release_normalised_weight(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    """A conv's W/σ is needed by its own forward and backward only (the graph keeps it for the backward):
    the attribute does not hold it on (the critics' largest, 128 MiB at 256 px, would outlive its
    backward pass through the generators' whole backward). The next forward sets it again."""
    module.weight = None


def _float32_region(device_type: str) -> contextlib.AbstractContextManager:
    """Disable autocast where it is on, so precision-critical maths stays in float32."""
    if device_type in ('cpu', 'cuda') and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def spectral_norm(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Wrap ``module`` with :class:`SpectralNorm` when ``enabled`` (EN's ``--sn`` toggle)."""
    return SpectralNorm.apply(module) if enabled else module


def raw_weight(module: nn.Module) -> torch.Tensor:
    """The un-normalised weight: PT weights D's CAM features by ``weight_orig`` under SN."""
    return module.weight_orig if hasattr(module, 'weight_orig') else module.weight


class _ReflectionPadKeepingShape(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, padding: tuple[int, ...]) -> torch.Tensor:
        ctx.shape, ctx.padding = x.shape, padding
        return F.pad(x, padding, 'reflect')

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        shaped_like_input = grad.as_strided(ctx.shape, (0,) * len(ctx.shape))   # the kernel reads its shape only
        return torch.ops.aten.reflection_pad2d_backward(grad, shaped_like_input, list(ctx.padding)), None


class ReflectionPad2d(nn.ReflectionPad2d):
    """``nn.ReflectionPad2d`` whose backward keeps the input's shape instead of the input: the gradient
    is the same kernel's, which reads only the shape, but autograd keeps the whole tensor alive, e.g.
    a 64 MiB upsampled map per generator pass at 256 px that nothing else needs. Contiguous NCHW
    inputs only (the kernel lays the gradient out as the input it is given); otherwise as PyTorch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad and x.dim() == 4 and x.is_contiguous():
            return _ReflectionPadKeepingShape.apply(x, self.padding)
        return super().forward(x)


# ----------------------------------------------------------------------------------------------
# Normalisation layers


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision activations are promoted: norm statistics need float32 under autocast."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _layer_instance_mix(x: torch.Tensor, rho: torch.Tensor, eps: float, unbiased: bool = True) -> torch.Tensor:
    """rho * instance-norm(x) + (1 - rho) * layer-norm(x), statistics in float32 (PT: unbiased variance)."""
    xf = _at_least_float32(x)
    correction = 1 if unbiased else 0
    in_mean = xf.mean(dim=(2, 3), keepdim=True)
    in_var = xf.var(dim=(2, 3), keepdim=True, correction=correction)
    ln_mean = xf.mean(dim=(1, 2, 3), keepdim=True)
    ln_var = xf.var(dim=(1, 2, 3), keepdim=True, correction=correction)
    out_in = (xf - in_mean) / torch.sqrt(in_var + eps)
    out_ln = (xf - ln_mean) / torch.sqrt(ln_var + eps)
    rho = rho.to(xf.dtype)
    return rho * out_in + (1 - rho) * out_ln


def _maybe_recomputed(norm: nn.Module, normalise, *args: torch.Tensor) -> torch.Tensor:
    """``normalise(*args)``, or with ``norm.recompute`` set its intermediates (about eight tensors of
    the input's size) recomputed in the backward pass from the input, which is all it keeps: the same
    operations on the same values, so the same numbers (``--recompute``)."""
    if norm.recompute and torch.is_grad_enabled():
        return checkpoint(normalise, *args, use_reentrant=False)
    return normalise(*args)


class adaILN(nn.Module):  # noqa: N801 - PT's class name
    """Adaptive Layer-Instance Normalisation; gamma and beta come from the generator's MLP.

    TF: ``rho_init`` 1, biased variance, and with ``smoothing`` the forward uses clip(ρ − 0.1, 0, 1).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, *, rho_init: float = 0.9, smoothing: bool = False,
                 unbiased: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.smoothing = smoothing
        self.unbiased = unbiased
        self.rho = nn.Parameter(torch.full((1, num_features, 1, 1), rho_init))
        self.recompute = False

    def effective_rho(self) -> torch.Tensor:
        return (self.rho - 0.1).clamp(0.0, 1.0) if self.smoothing else self.rho

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return _maybe_recomputed(self, self._normalise, x, gamma, beta)

    def _normalise(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        out = _layer_instance_mix(x, self.effective_rho(), self.eps, self.unbiased)
        shape = (*gamma.shape, 1, 1)   # one view op each (indexing with None takes two)
        out = out * gamma.to(out.dtype).view(shape) + beta.to(out.dtype).view(shape)
        return out.to(x.dtype)


class ILN(nn.Module):
    """Layer-Instance Normalisation with learnable per-channel gamma/beta; rho starts at 0 (pure LN)."""

    def __init__(self, num_features: int, eps: float = 1e-5, *, unbiased: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.unbiased = unbiased
        self.rho = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.recompute = False
        self.gamma = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, num_features, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _maybe_recomputed(self, self._normalise, x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        out = _layer_instance_mix(x, self.rho, self.eps, self.unbiased)
        out = out * self.gamma.to(out.dtype) + self.beta.to(out.dtype)
        return out.to(x.dtype)


class RhoClipper:
    """Clamp every ``rho`` of a module to [clip_min, clip_max]; applied after each G step."""

    def __init__(self, clip_min: float = 0.0, clip_max: float = 1.0) -> None:
        assert clip_min < clip_max
        self.clip_min = clip_min
        self.clip_max = clip_max

    @torch.no_grad()
    def __call__(self, module: nn.Module) -> None:
        if hasattr(module, 'rho'):
            module.rho.clamp_(self.clip_min, self.clip_max)

    @torch.no_grad()
    def clip(self, rhos: list[torch.Tensor]) -> None:
        """Clamp all ``rhos`` in two foreach operations (the same values as one clamp_ per module)."""
        torch._foreach_clamp_min_(rhos, self.clip_min)
        torch._foreach_clamp_max_(rhos, self.clip_max)


# ----------------------------------------------------------------------------------------------
# Blocks


class InstanceNorm2d(nn.InstanceNorm2d):
    """nn.InstanceNorm2d (same state dict: none) that survives channels-last gradients at batch size 1.

    PyTorch's CPU instance-norm backward returns wrong input gradients when the incoming gradient
    is channels-last and the batch has one sample (checked on torch 2.14: errors of the order of the
    gradient itself). Making that gradient contiguous first costs one copy, only in that case.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if out.requires_grad and out.shape[0] == 1 and not torch.compiler.is_compiling():
            out.register_hook(_contiguous_grad)
        return out


def _contiguous_grad(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()


class ChannelSpatialSE(nn.Module):
    """scSE (Roy et al. 2018): channel squeeze-excitation plus spatial excitation, summed (EN's --use_se)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // 4, 8)
        self.cse = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(True),
                                 nn.Conv2d(hidden, channels, 1), nn.Sigmoid())
        self.sse = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cse(x) + x * self.sse(x)


class ResnetBlock(nn.Module):
    """Plain residual block with instance norm (encoder bottleneck); PT's layer indices."""

    def __init__(self, dim: int, use_bias: bool = False, use_se: bool = False, arch: Arch = PT) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, 1, 0, bias=use_bias), arch.instance_norm(dim),
            nn.ReLU(True),
            ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, 1, 0, bias=use_bias), arch.instance_norm(dim))
        if use_se:
            self.se = ChannelSpatialSE(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if hasattr(self, 'se'):
            out = self.se(out)
        return x + out


class ResnetAdaILNBlock(nn.Module):
    """Decoder residual block whose two norms are AdaLIN driven by the shared gamma and beta."""

    def __init__(self, dim: int, use_bias: bool = False, use_se: bool = False, arch: Arch = PT) -> None:
        super().__init__()
        norm = dict(rho_init=arch.adailn_rho_init, smoothing=arch.smoothing, unbiased=arch.unbiased_variance)
        self.pad1 = ReflectionPad2d(1)
        self.conv1 = nn.Conv2d(dim, dim, 3, 1, 0, bias=use_bias)
        self.norm1 = adaILN(dim, **norm)
        self.relu1 = nn.ReLU(True)
        self.pad2 = ReflectionPad2d(1)
        self.conv2 = nn.Conv2d(dim, dim, 3, 1, 0, bias=use_bias)
        self.norm2 = adaILN(dim, **norm)
        if use_se:
            self.se = ChannelSpatialSE(dim)

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.norm1(self.conv1(self.pad1(x)), gamma, beta))
        out = self.norm2(self.conv2(self.pad2(out)), gamma, beta)
        if hasattr(self, 'se'):
            out = self.se(out)
        return out + x


def _up_layers(in_ch: int, out_ch: int, use_deconv: bool, bias: bool, arch: Arch = PT) -> list[nn.Module]:
    """×2 upsampling + 3×3 conv + ILN + ReLU; EN's ``--use_deconv`` swaps in a transposed conv."""
    if use_deconv:
        conv = [nn.ConvTranspose2d(in_ch, out_ch, 3, 2, 1, output_padding=1, bias=True)]
    else:
        conv = [nn.Upsample(scale_factor=2, mode='nearest'), ReflectionPad2d(1),
                nn.Conv2d(in_ch, out_ch, 3, 1, 0, bias=bias)]
    return conv + [ILN(out_ch, unbiased=arch.unbiased_variance), nn.ReLU(True)]


def _cam_logits_and_features(x: torch.Tensor, gap_fc: nn.Module, gmp_fc: nn.Module,
                             weight_of: callable) -> tuple[torch.Tensor, torch.Tensor]:
    """PT's CAM: logits from global average and max pooling, features weighted by each FC's weights."""
    n = x.shape[0]
    gap_logit = gap_fc(F.adaptive_avg_pool2d(x, 1).view(n, -1))
    gmp_logit = gmp_fc(F.adaptive_max_pool2d(x, 1).view(n, -1))
    gap = x * weight_of(gap_fc).to(x.dtype)[:, :, None, None]
    gmp = x * weight_of(gmp_fc).to(x.dtype)[:, :, None, None]
    return torch.cat([gap_logit, gmp_logit], 1), torch.cat([gap, gmp], 1)


class SharedCAM(nn.Module):
    """TF's CAM head: one FC with bias gives both the GAP and the GMP logit, and kernel + bias (the
    scalar bias added to every weight) scales the features for both halves.

    The discriminator's FC is spectral-normalised (``sn``); the current graph then scales by the
    normalised kernel. The 2019 graph scales by the raw kernel, and where there is no spectral
    norm (its generator) takes the logits from a separate FC (``logit_fc``, TF's
    ``CAM_logit/dense``), the scaling FC being separate variables with TF's default Glorot init.
    ``attention`` False scales by ones (EN's --cam_D_attention off).
    """

    def __init__(self, dim: int, sn: bool = False, graph: str = 'current', attention: bool = True) -> None:
        super().__init__()
        self.raw_weighting = graph == '2019'
        self.attention = attention
        self.fc = spectral_norm(nn.Linear(dim, 1, bias=True), sn)
        if graph == '2019' and not sn:
            self.logit_fc = nn.Linear(dim, 1, bias=True)
            self.fc.l2_regularised = False   # TF 2019 made these variables without its l2_regularizer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cam_logit B×2 [GAP, GMP], the concatenated scaled features B×2C×h×w)."""
        pooled = torch.stack([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], 1)
        cam_logit = getattr(self, 'logit_fc', self.fc)(pooled).squeeze(-1)  # one call: one SN iteration
        weight = (raw_weight(self.fc) if self.raw_weighting else self.fc.weight) + self.fc.bias
        if not self.attention:
            weight = torch.ones_like(weight)
        scaled = x * weight.to(x.dtype)[:, :, None, None]
        return cam_logit, torch.cat([scaled, scaled], 1)

    @torch.no_grad()
    def reset_tf_2019_weighting(self) -> None:
        """TF 2019 created the generator's scaling kernel and bias with get_variable's default Glorot
        uniform init (fan_in = C, fan_out = 1; the bias fan_in = fan_out = 1)."""
        if hasattr(self, 'logit_fc'):
            dim = self.fc.weight.shape[1]
            nn.init.uniform_(self.fc.weight, -math.sqrt(6 / (dim + 1)), math.sqrt(6 / (dim + 1)))
            nn.init.uniform_(self.fc.bias, -math.sqrt(3), math.sqrt(3))


# ----------------------------------------------------------------------------------------------
# Generator


class _LinearWithFactoredWeightGrad(torch.autograd.Function):
    """``F.linear`` whose weight gradient is handed to a sink as its factors (the output's gradient
    and the input, ``grad.t() @ x``) instead of being formed: with a batch of a few images it is a
    product of thin matrices, and formed it would be the weight's size. The input's and the bias's
    gradients are computed as autograd's linear computes them (the engine sums the bias's over the
    batch), so they are bitwise the same."""

    @staticmethod
    def forward(ctx, x, weight, bias, sink):
        ctx.save_for_backward(x)
        # The parameter itself, not a saved copy: the sink knows it by identity (activation checkpointing
        # unpacks saved tensors as new objects); nothing changes it before the backward pass ends.
        ctx.weight, ctx.sink, ctx.has_bias = weight, sink, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        ctx.sink(ctx.weight, grad, x)
        grad_x = grad.mm(ctx.weight) if ctx.needs_input_grad[0] else None
        return grad_x, None, grad if ctx.has_bias else None, None


class FactoredGradLinear(nn.Linear):
    """A linear layer that can hand its weight gradient to ``weight_grad_sink(weight, grad, x)`` as
    factors (the generator's MLP input layer: 268 M weights at 256 px, its gradient 1 GiB, while
    ``grad`` and ``x`` are a few MiB). Without a sink, or under autocast, it is ``nn.Linear``; the sink
    is not copied with the module (EMA copies, pickling)."""

    weight_grad_sink = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.weight_grad_sink is None or not torch.is_grad_enabled() or x.dim() != 2
                or torch.is_autocast_enabled(x.device.type)):
            return super().forward(x)
        return _LinearWithFactoredWeightGrad.apply(x, self.weight, self.bias, self.weight_grad_sink)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop('weight_grad_sink', None)
        return state


class GeneratorOutput(NamedTuple):
    image: torch.Tensor          # B×C×H×W in [-1, 1]
    cam_logit: torch.Tensor      # B×2: [GAP logit, GMP logit]
    heatmap: torch.Tensor        # B×1×h×w, sum of the attended features
    attention: torch.Tensor | None = None  # B×k×H×W softmax masks with --attention_gan k


def mlp_pool_size(img_size: int, light: int | bool) -> int:
    """Side of the pooled feature map fed to the gamma/beta MLP.

    ``light`` False/0 (or EN's -1) is PT's full model (the whole h×w map, h = img_size/4);
    True is PT's light model (global average pool, 1×1); an integer k > 1 is EN's k×k pooling.
    """
    if light is True:
        return 1
    if light is False or int(light) <= 0:
        return img_size // 4
    return int(light)


class ResnetGenerator(nn.Module):
    """The U-GAT-IT generator: encoder, CAM attention, AdaLIN decoder (PT layout and names).

    ``arch`` TF builds the official TensorFlow generator; its MLP is ``ngf·n_blocks`` wide in TF,
    which is the 4·ngf the AdaLIN blocks need only when ``n_blocks`` is 4, so TF requires 4.
    """

    def __init__(self, input_nc: int, output_nc: int, ngf: int = 64, n_blocks: int = 6,
                 img_size: int = 256, light: bool | int = False, *, use_se: bool = False,
                 attention_gan: int = 0, attention_input: bool = False, use_deconv: bool = False,
                 arch: Arch = PT) -> None:
        super().__init__()
        if arch.tf and n_blocks != 4:
            raise ValueError(f'the TF generator needs n_blocks 4 (its MLP is ngf*n_blocks wide), got {n_blocks}')
        self.n_blocks = n_blocks
        self.pool = mlp_pool_size(img_size, light)
        self.flatten_nhwc = arch.tf   # TF flattens the MLP input as (h, w, c)
        self.attention_gan = attention_gan
        self.attention_input = attention_input
        n_down = 2
        dim = ngf * 2 ** n_down
        bias = arch.bias

        # Registration order mirrors PT so that state_dict() lists keys in PT's order.
        if arch.tf:
            self.cam = SharedCAM(dim, sn=False, graph=arch.graph)
        else:
            self.gap_fc = nn.Linear(dim, 1, bias=False)
            self.gmp_fc = nn.Linear(dim, 1, bias=False)
        self.conv1x1 = nn.Conv2d(dim * 2, dim, 1, 1, bias=True)
        self.relu = nn.ReLU(True)
        self.gamma = nn.Linear(dim, dim, bias=bias)
        self.beta = nn.Linear(dim, dim, bias=bias)
        for i in range(n_blocks):
            setattr(self, f'UpBlock1_{i + 1}', ResnetAdaILNBlock(dim, use_bias=bias, use_se=use_se, arch=arch))

        down = [arch.pad(7, 1, 3), nn.Conv2d(input_nc, ngf, 7, 1, 0, bias=bias),
                arch.instance_norm(ngf), nn.ReLU(True)]
        for i in range(n_down):
            mult = 2 ** i
            down += [arch.pad(3, 2, 1), nn.Conv2d(ngf * mult, ngf * mult * 2, 3, 2, 0, bias=bias),
                     arch.instance_norm(ngf * mult * 2), nn.ReLU(True)]
        down += [ResnetBlock(dim, use_bias=bias, use_se=use_se, arch=arch) for _ in range(n_blocks)]

        fc_in = dim * self.pool * self.pool
        mlp = [FactoredGradLinear(fc_in, dim, bias=bias), nn.ReLU(True),
               nn.Linear(dim, dim, bias=bias), nn.ReLU(True)]

        up = []
        for i in range(n_down):
            mult = 2 ** (n_down - i)
            up += _up_layers(ngf * mult, ngf * mult // 2, use_deconv, bias=bias, arch=arch)
        out_channels = output_nc * self._n_generated_candidates()
        up += [arch.pad(7, 1, 3), nn.Conv2d(ngf, out_channels, 7, 1, 0, bias=bias), nn.Tanh()]

        self.DownBlock = nn.Sequential(*down)
        self.FC = nn.Sequential(*mlp)
        self.UpBlock2 = nn.Sequential(*up)
        if attention_gan:
            self.attention_branch = self._build_attention_branch(ngf, dim, n_blocks, use_se, use_deconv, arch)
        if arch.tf:
            tf_init_(self)

    def _n_generated_candidates(self) -> int:
        """Images the decoder emits: k candidates, or k-1 when the input is itself a candidate."""
        if not self.attention_gan:
            return 1
        return self.attention_gan - 1 if self.attention_input else self.attention_gan

    def _build_attention_branch(self, ngf: int, dim: int, n_blocks: int, use_se: bool,
                                use_deconv: bool, arch: Arch) -> nn.Sequential:
        """AttentionGAN-style mask branch from the CAM-fused features (EN's --attention_gan)."""
        layers: list[nn.Module] = [ResnetBlock(dim, use_bias=arch.bias, use_se=use_se, arch=arch)
                                   for _ in range(n_blocks)]
        for i in range(2):
            mult = 2 ** (2 - i)
            layers += _up_layers(ngf * mult, ngf * mult // 2, use_deconv, bias=True, arch=arch)
        layers += [nn.Conv2d(ngf, self.attention_gan, 1, 1, 0), nn.Softmax(dim=1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> GeneratorOutput:
        image = x
        x = self.DownBlock(x)
        cam_logit, x = self._cam(x)
        x = self.relu(self.conv1x1(x))
        heatmap = torch.sum(x, dim=1, keepdim=True)

        pooled = x if x.shape[-1] == self.pool else F.adaptive_avg_pool2d(x, self.pool)
        if self.flatten_nhwc:
            pooled = pooled.permute(0, 2, 3, 1)
        style = self.FC(pooled.reshape(x.shape[0], -1))
        gamma, beta = self.gamma(style), self.beta(style)

        features = x
        for i in range(self.n_blocks):
            x = getattr(self, f'UpBlock1_{i + 1}')(x, gamma, beta)
        out = self.UpBlock2(x)
        if not self.attention_gan:
            return GeneratorOutput(out, cam_logit, heatmap)
        attention = self.attention_branch(features)
        return GeneratorOutput(self._fuse_candidates(out, image, attention), cam_logit, heatmap, attention)

    def _cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self, 'cam'):
            return self.cam(x)
        return _cam_logits_and_features(x, self.gap_fc, self.gmp_fc, lambda fc: fc.weight)

    def _fuse_candidates(self, generated: torch.Tensor, image: torch.Tensor,
                         attention: torch.Tensor) -> torch.Tensor:
        """out = sum_j A_j * candidate_j, with candidates grouped per image (fixes EN's (3, k) view)."""
        candidates = torch.cat([image, generated], 1) if self.attention_input else generated
        n, _, h, w = candidates.shape
        candidates = candidates.view(n, self.attention_gan, -1, h, w)
        return (candidates * attention.unsqueeze(2)).sum(1)


# ----------------------------------------------------------------------------------------------
# Discriminator


class DiscriminatorOutput(NamedTuple):
    logit: torch.Tensor                     # B×1×h×w patch logits
    cam_logit: torch.Tensor                 # B×2 CAM logits
    heatmap: torch.Tensor                   # B×1×h'×w'
    group_logit: torch.Tensor | None = None  # B×n_groups with a few-shot group head


def _extra_layers(n_layers: int, arch: Arch) -> int:
    """EN inserts (5 − n) stride-1 3×3 layers into shallow discriminators; TF's graph has none."""
    return 0 if arch.tf else max(0, 5 - n_layers)


def discriminator_output_size(img_size: int, n_layers: int, arch: Arch = PT) -> int:
    """Side of the patch map for a square input, or 0 if the input is too small (PT and TF crash there).

    Reflection padding needs an input larger than the padding (TF pads its stride-1 4×4 convs by 2).
    """
    kernels_strides = ([(4, 2)] * (n_layers - 2) + [(3, 1)] * _extra_layers(n_layers, arch)
                       + [(4, 1), (4, 1)])
    size = img_size
    for kernel, stride in kernels_strides:
        before, after = arch.pad_amounts(kernel, stride, 1)
        if size <= max(before, after):
            return 0
        size = (size + before + after - kernel) // stride + 1
    return max(size, 0)


def min_image_size(n_layers: int, arch: Arch = PT) -> int:
    """Smallest square input a discriminator with ``n_layers`` accepts."""
    size = 1
    while discriminator_output_size(size, n_layers, arch) < 1:
        size += 1
    return size


class Discriminator(nn.Module):
    """PatchGAN discriminator with a CAM head (PT layout and names).

    ``n_layers`` 7 is PT's global and 5 its local discriminator (TF's ``n_dis`` 6 gives the same
    depths). Options: ``sn`` (spectral norm, EN's --sn), ``cam_attention`` (weight features by the
    CAM FCs, EN's --cam_D_attention), ``n_groups`` (a few-shot group-classification head on the
    fused features, F2W) and ``arch`` (TF: its padding, CAM head and a biased last conv).
    """

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 5, *, sn: bool = True,
                 cam_attention: bool = True, n_groups: int = 0, arch: Arch = PT) -> None:
        super().__init__()
        if n_layers < 3:
            raise ValueError(f'n_layers must be >= 3, got {n_layers}')
        self.cam_attention = cam_attention
        layers = [arch.pad(4, 2, 1), spectral_norm(nn.Conv2d(input_nc, ndf, 4, 2, 0, bias=True), sn),
                  nn.LeakyReLU(0.2, True)]
        for i in range(1, n_layers - 2):
            mult = 2 ** (i - 1)
            layers += [arch.pad(4, 2, 1),
                       spectral_norm(nn.Conv2d(ndf * mult, ndf * mult * 2, 4, 2, 0, bias=True), sn),
                       nn.LeakyReLU(0.2, True)]
        mult = 2 ** (n_layers - 3)
        for _ in range(_extra_layers(n_layers, arch)):   # EN: extra 3×3 layers for receptive field
            layers += [ReflectionPad2d(1), spectral_norm(nn.Conv2d(ndf * mult, ndf * mult, 3, 1, 0), sn),
                       nn.LeakyReLU(0.2, True)]
        layers += [arch.pad(4, 1, 1),
                   spectral_norm(nn.Conv2d(ndf * mult, ndf * mult * 2, 4, 1, 0, bias=True), sn),
                   nn.LeakyReLU(0.2, True)]
        dim = ndf * mult * 2

        if arch.tf:
            self.cam = SharedCAM(dim, sn=sn, graph=arch.graph, attention=cam_attention)
        else:
            self.gap_fc = spectral_norm(nn.Linear(dim, 1, bias=False), sn)
            self.gmp_fc = spectral_norm(nn.Linear(dim, 1, bias=False), sn)
        self.conv1x1 = nn.Conv2d(dim * 2, dim, 1, 1, bias=True)
        self.leaky_relu = nn.LeakyReLU(0.2, True)
        self.pad = arch.pad(4, 1, 1)
        self.conv = spectral_norm(nn.Conv2d(dim, 1, 4, 1, 0, bias=arch.tf), sn)
        self.model = nn.Sequential(*layers)
        if n_groups:
            self.group_fc = spectral_norm(nn.Linear(dim, n_groups), sn)
        if arch.tf:
            tf_init_(self)

    def _cam_weight(self, fc: nn.Module) -> torch.Tensor:
        if not self.cam_attention:   # EN with --cam_D_attention off: both halves are x itself
            return torch.ones_like(fc.weight)
        return raw_weight(fc)

    def _cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self, 'cam'):
            return self.cam(x)
        return _cam_logits_and_features(x, self.gap_fc, self.gmp_fc, self._cam_weight)

    def forward(self, x: torch.Tensor, feature_mask: torch.Tensor | None = None,
                cam_input: torch.Tensor | None = None) -> DiscriminatorOutput:
        """``feature_mask`` multiplies the trunk features before GAP/GMP (--seg_D_cam_fea_mask);
        ``cam_input`` computes the CAM logits from another image (--seg_D_cam_inp_mask)."""
        features = self.model(x)
        cam_logit, weighted = self._cam(features)
        if cam_input is not None or feature_mask is not None:
            cam_features = self.model(cam_input) if cam_input is not None else features
            if feature_mask is not None:
                cam_features = cam_features * F.interpolate(feature_mask, size=cam_features.shape[-2:],
                                                            mode='area')
            cam_logit, _ = self._cam(cam_features)
        x = self.leaky_relu(self.conv1x1(weighted))
        heatmap = torch.sum(x, dim=1, keepdim=True)
        group_logit = None
        if hasattr(self, 'group_fc'):
            group_logit = self.group_fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return DiscriminatorOutput(self.conv(self.pad(x)), cam_logit, heatmap, group_logit)
