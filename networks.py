"""U-GAT-IT networks: the AdaLIN generator and the CAM discriminator.

With every option at its default the modules reproduce the official PyTorch code (PT) exactly:
constructor arguments, state-dict names and shapes, and numerics, so a PT checkpoint loads with
``strict=True`` and gives PT's outputs. Options (scSE, attention masks, deconvolution, pooled
"light" MLP, discriminator depth and group heads) change the architecture only when switched on.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

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


# ----------------------------------------------------------------------------------------------
# Normalisation layers


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision activations are promoted: norm statistics need float32 under autocast."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _layer_instance_mix(x: torch.Tensor, rho: torch.Tensor, eps: float) -> torch.Tensor:
    """rho * instance-norm(x) + (1 - rho) * layer-norm(x), statistics in float32, unbiased variance."""
    xf = _at_least_float32(x)
    in_mean = xf.mean(dim=(2, 3), keepdim=True)
    in_var = xf.var(dim=(2, 3), keepdim=True)
    ln_mean = xf.mean(dim=(1, 2, 3), keepdim=True)
    ln_var = xf.var(dim=(1, 2, 3), keepdim=True)
    out_in = (xf - in_mean) / torch.sqrt(in_var + eps)
    out_ln = (xf - ln_mean) / torch.sqrt(ln_var + eps)
    rho = rho.to(xf.dtype)
    return rho * out_in + (1 - rho) * out_ln


class adaILN(nn.Module):  # noqa: N801 - PT's class name
    """Adaptive Layer-Instance Normalisation; gamma and beta come from the generator's MLP."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.rho = nn.Parameter(torch.full((1, num_features, 1, 1), 0.9))

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        out = _layer_instance_mix(x, self.rho, self.eps)
        out = out * gamma.to(out.dtype)[:, :, None, None] + beta.to(out.dtype)[:, :, None, None]
        return out.to(x.dtype)


class ILN(nn.Module):
    """Layer-Instance Normalisation with learnable per-channel gamma/beta; rho starts at 0 (pure LN)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.rho = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.gamma = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, num_features, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _layer_instance_mix(x, self.rho, self.eps)
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

    def __init__(self, dim: int, use_bias: bool = False, use_se: bool = False) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, 1, 0, bias=use_bias), InstanceNorm2d(dim),
            nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, 1, 0, bias=use_bias), InstanceNorm2d(dim))
        if use_se:
            self.se = ChannelSpatialSE(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if hasattr(self, 'se'):
            out = self.se(out)
        return x + out


class ResnetAdaILNBlock(nn.Module):
    """Decoder residual block whose two norms are AdaLIN driven by the shared gamma and beta."""

    def __init__(self, dim: int, use_bias: bool = False, use_se: bool = False) -> None:
        super().__init__()
        self.pad1 = nn.ReflectionPad2d(1)
        self.conv1 = nn.Conv2d(dim, dim, 3, 1, 0, bias=use_bias)
        self.norm1 = adaILN(dim)
        self.relu1 = nn.ReLU(True)
        self.pad2 = nn.ReflectionPad2d(1)
        self.conv2 = nn.Conv2d(dim, dim, 3, 1, 0, bias=use_bias)
        self.norm2 = adaILN(dim)
        if use_se:
            self.se = ChannelSpatialSE(dim)

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.norm1(self.conv1(self.pad1(x)), gamma, beta))
        out = self.norm2(self.conv2(self.pad2(out)), gamma, beta)
        if hasattr(self, 'se'):
            out = self.se(out)
        return out + x


def _up_layers(in_ch: int, out_ch: int, use_deconv: bool, bias: bool) -> list[nn.Module]:
    """×2 upsampling + 3×3 conv + ILN + ReLU; EN's ``--use_deconv`` swaps in a transposed conv."""
    if use_deconv:
        conv = [nn.ConvTranspose2d(in_ch, out_ch, 3, 2, 1, output_padding=1, bias=True)]
    else:
        conv = [nn.Upsample(scale_factor=2, mode='nearest'), nn.ReflectionPad2d(1),
                nn.Conv2d(in_ch, out_ch, 3, 1, 0, bias=bias)]
    return conv + [ILN(out_ch), nn.ReLU(True)]


def _cam_logits_and_features(x: torch.Tensor, gap_fc: nn.Module, gmp_fc: nn.Module,
                             weight_of: callable) -> tuple[torch.Tensor, torch.Tensor]:
    """CAM: logits from global average and max pooling, features weighted by each FC's weights."""
    n = x.shape[0]
    gap_logit = gap_fc(F.adaptive_avg_pool2d(x, 1).view(n, -1))
    gmp_logit = gmp_fc(F.adaptive_max_pool2d(x, 1).view(n, -1))
    gap = x * weight_of(gap_fc).to(x.dtype)[:, :, None, None]
    gmp = x * weight_of(gmp_fc).to(x.dtype)[:, :, None, None]
    return torch.cat([gap_logit, gmp_logit], 1), torch.cat([gap, gmp], 1)


# ----------------------------------------------------------------------------------------------
# Generator


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
    """The U-GAT-IT generator: encoder, CAM attention, AdaLIN decoder (PT layout and names)."""

    def __init__(self, input_nc: int, output_nc: int, ngf: int = 64, n_blocks: int = 6,
                 img_size: int = 256, light: bool | int = False, *, use_se: bool = False,
                 attention_gan: int = 0, attention_input: bool = False, use_deconv: bool = False) -> None:
        super().__init__()
        self.n_blocks = n_blocks
        self.pool = mlp_pool_size(img_size, light)
        self.attention_gan = attention_gan
        self.attention_input = attention_input
        n_down = 2
        dim = ngf * 2 ** n_down

        # Registration order mirrors PT so that state_dict() lists keys in PT's order.
        self.gap_fc = nn.Linear(dim, 1, bias=False)
        self.gmp_fc = nn.Linear(dim, 1, bias=False)
        self.conv1x1 = nn.Conv2d(dim * 2, dim, 1, 1, bias=True)
        self.relu = nn.ReLU(True)
        self.gamma = nn.Linear(dim, dim, bias=False)
        self.beta = nn.Linear(dim, dim, bias=False)
        for i in range(n_blocks):
            setattr(self, f'UpBlock1_{i + 1}', ResnetAdaILNBlock(dim, use_bias=False, use_se=use_se))

        down = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7, 1, 0, bias=False),
                InstanceNorm2d(ngf), nn.ReLU(True)]
        for i in range(n_down):
            mult = 2 ** i
            down += [nn.ReflectionPad2d(1), nn.Conv2d(ngf * mult, ngf * mult * 2, 3, 2, 0, bias=False),
                     InstanceNorm2d(ngf * mult * 2), nn.ReLU(True)]
        down += [ResnetBlock(dim, use_bias=False, use_se=use_se) for _ in range(n_blocks)]

        fc_in = dim * self.pool * self.pool
        mlp = [nn.Linear(fc_in, dim, bias=False), nn.ReLU(True),
               nn.Linear(dim, dim, bias=False), nn.ReLU(True)]

        up = []
        for i in range(n_down):
            mult = 2 ** (n_down - i)
            up += _up_layers(ngf * mult, ngf * mult // 2, use_deconv, bias=False)
        out_channels = output_nc * self._n_generated_candidates()
        up += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7, 1, 0, bias=False), nn.Tanh()]

        self.DownBlock = nn.Sequential(*down)
        self.FC = nn.Sequential(*mlp)
        self.UpBlock2 = nn.Sequential(*up)
        if attention_gan:
            self.attention_branch = self._build_attention_branch(ngf, dim, n_blocks, use_se, use_deconv)

    def _n_generated_candidates(self) -> int:
        """Images the decoder emits: k candidates, or k-1 when the input is itself a candidate."""
        if not self.attention_gan:
            return 1
        return self.attention_gan - 1 if self.attention_input else self.attention_gan

    def _build_attention_branch(self, ngf: int, dim: int, n_blocks: int, use_se: bool,
                                use_deconv: bool) -> nn.Sequential:
        """AttentionGAN-style mask branch from the CAM-fused features (EN's --attention_gan)."""
        layers: list[nn.Module] = [ResnetBlock(dim, use_bias=False, use_se=use_se) for _ in range(n_blocks)]
        for i in range(2):
            mult = 2 ** (2 - i)
            layers += _up_layers(ngf * mult, ngf * mult // 2, use_deconv, bias=True)
        layers += [nn.Conv2d(ngf, self.attention_gan, 1, 1, 0), nn.Softmax(dim=1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> GeneratorOutput:
        image = x
        x = self.DownBlock(x)
        cam_logit, x = _cam_logits_and_features(x, self.gap_fc, self.gmp_fc, lambda fc: fc.weight)
        x = self.relu(self.conv1x1(x))
        heatmap = torch.sum(x, dim=1, keepdim=True)

        pooled = x if x.shape[-1] == self.pool else F.adaptive_avg_pool2d(x, self.pool)
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


def discriminator_output_size(img_size: int, n_layers: int) -> int:
    """Side of the patch map for a square input, or 0 if the input is too small (PT crashes there).

    Every layer reflection-pads by 1, which needs an input of at least 2 pixels.
    """
    kernels_strides = [(4, 2)] * (n_layers - 2) + [(3, 1)] * max(0, 5 - n_layers) + [(4, 1), (4, 1)]
    size = img_size
    for kernel, stride in kernels_strides:
        if size < 2:
            return 0
        size = (size + 2 - kernel) // stride + 1
    return max(size, 0)


def min_image_size(n_layers: int) -> int:
    """Smallest square input a discriminator with ``n_layers`` accepts."""
    size = 1
    while discriminator_output_size(size, n_layers) < 1:
        size += 1
    return size


class Discriminator(nn.Module):
    """PatchGAN discriminator with a CAM head (PT layout and names).

    ``n_layers`` 7 is PT's global and 5 its local discriminator. Options: ``sn`` (spectral norm,
    EN's --sn), ``cam_attention`` (weight features by the CAM FCs, EN's --cam_D_attention) and
    ``n_groups`` (a few-shot group-classification head on the fused features, F2W).
    """

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 5, *, sn: bool = True,
                 cam_attention: bool = True, n_groups: int = 0) -> None:
        super().__init__()
        if n_layers < 3:
            raise ValueError(f'n_layers must be >= 3, got {n_layers}')
        self.cam_attention = cam_attention
        layers = [nn.ReflectionPad2d(1), spectral_norm(nn.Conv2d(input_nc, ndf, 4, 2, 0, bias=True), sn),
                  nn.LeakyReLU(0.2, True)]
        for i in range(1, n_layers - 2):
            mult = 2 ** (i - 1)
            layers += [nn.ReflectionPad2d(1),
                       spectral_norm(nn.Conv2d(ndf * mult, ndf * mult * 2, 4, 2, 0, bias=True), sn),
                       nn.LeakyReLU(0.2, True)]
        mult = 2 ** (n_layers - 3)
        for _ in range(max(0, 5 - n_layers)):   # EN: shallow Ds get extra 3×3 layers for receptive field
            layers += [nn.ReflectionPad2d(1), spectral_norm(nn.Conv2d(ndf * mult, ndf * mult, 3, 1, 0), sn),
                       nn.LeakyReLU(0.2, True)]
        layers += [nn.ReflectionPad2d(1),
                   spectral_norm(nn.Conv2d(ndf * mult, ndf * mult * 2, 4, 1, 0, bias=True), sn),
                   nn.LeakyReLU(0.2, True)]
        dim = ndf * mult * 2

        self.gap_fc = spectral_norm(nn.Linear(dim, 1, bias=False), sn)
        self.gmp_fc = spectral_norm(nn.Linear(dim, 1, bias=False), sn)
        self.conv1x1 = nn.Conv2d(dim * 2, dim, 1, 1, bias=True)
        self.leaky_relu = nn.LeakyReLU(0.2, True)
        self.pad = nn.ReflectionPad2d(1)
        self.conv = spectral_norm(nn.Conv2d(dim, 1, 4, 1, 0, bias=False), sn)
        self.model = nn.Sequential(*layers)
        if n_groups:
            self.group_fc = spectral_norm(nn.Linear(dim, n_groups), sn)

    def _cam_weight(self, fc: nn.Module) -> torch.Tensor:
        if not self.cam_attention:   # EN with --cam_D_attention off: both halves are x itself
            return torch.ones_like(fc.weight)
        return raw_weight(fc)

    def forward(self, x: torch.Tensor, feature_mask: torch.Tensor | None = None,
                cam_input: torch.Tensor | None = None) -> DiscriminatorOutput:
        """``feature_mask`` multiplies the trunk features before GAP/GMP (--seg_D_cam_fea_mask);
        ``cam_input`` computes the CAM logits from another image (--seg_D_cam_inp_mask)."""
        features = self.model(x)
        cam_logit, weighted = _cam_logits_and_features(features, self.gap_fc, self.gmp_fc, self._cam_weight)
        if cam_input is not None or feature_mask is not None:
            cam_features = self.model(cam_input) if cam_input is not None else features
            if feature_mask is not None:
                cam_features = cam_features * F.interpolate(feature_mask, size=cam_features.shape[-2:],
                                                            mode='area')
            cam_logit, _ = _cam_logits_and_features(cam_features, self.gap_fc, self.gmp_fc, self._cam_weight)
        x = self.leaky_relu(self.conv1x1(weighted))
        heatmap = torch.sum(x, dim=1, keepdim=True)
        group_logit = None
        if hasattr(self, 'group_fc'):
            group_logit = self.group_fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return DiscriminatorOutput(self.conv(self.pad(x)), cam_logit, heatmap, group_logit)
