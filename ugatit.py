"""The U-GAT-IT trainer: builds the networks once, runs the training step, saves and restores state.

The step (SPEC A3) computes every generator output once, updates the discriminators on detached
fakes, then the generators on the same outputs. A→B and B→A share one code path: each direction is
a small record, networks live in ``nn.ModuleDict``s, and losses are logged as ``'G/adv_A2B'``.
Optional features (EMA, ADA, face segmentation, extra loss terms, metrics) are objects that are
``None`` or absent when off, so the step itself has no per-feature branches.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import dataset as data
import losses as L
import utils
from networks import (
    PT,
    Arch,
    Discriminator,
    DiscriminatorOutput,
    GeneratorOutput,
    ResnetGenerator,
    RhoClipper,
)

PT_KEYS = {'genA2B': ('G', 'A2B'), 'genB2A': ('G', 'B2A'), 'disGA': ('D', 'A', 'G'),
           'disGB': ('D', 'B', 'G'), 'disLA': ('D', 'A', 'L'), 'disLB': ('D', 'B', 'L')}


@dataclass(frozen=True)
class Direction:
    """One translation direction: its generator, the reverse one, and the domains involved."""

    name: str
    source: str
    target: str

    @property
    def backward(self) -> str:
        return f'{self.target}2{self.source}'


DIRECTIONS = (Direction('A2B', 'A', 'B'), Direction('B2A', 'B', 'A'))


@dataclass
class Translation:
    """The generator outputs of one direction: G(source), G(target) (identity), cycle image."""

    fake: GeneratorOutput
    identity: GeneratorOutput
    cycle: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Building blocks


def network_arch(cfg) -> Arch:
    """The official graph the config asks for (configs from before --arch mean PT)."""
    if getattr(cfg, 'arch', 'pt') != 'tf':
        return PT
    return Arch('tf', cfg.tf_graph or 'current', bool(cfg.smoothing))


def build_generator(cfg) -> ResnetGenerator:
    """A generator as the flags describe it (plain arguments; networks never see the config)."""
    return ResnetGenerator(cfg.img_ch, cfg.img_ch, ngf=cfg.ch, n_blocks=cfg.n_res, img_size=cfg.img_size,
                           light=cfg.light, use_se=cfg.use_se, attention_gan=cfg.attention_gan,
                           attention_input=cfg.attention_input, use_deconv=cfg.use_deconv,
                           arch=network_arch(cfg))


def build_critic(cfg, domain: str) -> nn.ModuleDict:
    """The global ('G') and local ('L') discriminators of one domain; group heads on the target."""
    n_groups = len(cfg.groups) if cfg.use_grouploss and domain == 'B' else 0
    n_groups = max(cfg.groups) + 1 if n_groups else 0
    make = lambda n: Discriminator(cfg.img_ch, ndf=cfg.ch, n_layers=n, sn=cfg.sn,  # noqa: E731
                                   cam_attention=cfg.cam_D_attention and cfg.cam_D_weight > 0,
                                   n_groups=n_groups, arch=network_arch(cfg))
    return nn.ModuleDict({'G': make(cfg.n_global_dis), 'L': make(cfg.n_local_dis)})


def _split(output: tuple, sizes: list[int]) -> list[tuple]:
    """Split a batched network output (a NamedTuple of tensors/None) back into per-input chunks."""
    chunks = [t.split(sizes) if t is not None else [None] * len(sizes) for t in output]
    return [type(output)(*parts) for parts in zip(*chunks)]


class DistributedContext:
    """Rank, world size and device of this process; torchrun sets the environment variables."""

    def __init__(self, device: str) -> None:
        import os
        self.world_size = int(os.environ.get('WORLD_SIZE', '1'))
        self.rank = int(os.environ.get('RANK', '0'))
        local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        self.enabled = self.world_size > 1
        if device.startswith('cuda') and self.enabled:
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(local_rank)
        self.device = torch.device(device)
        if self.enabled and not dist.is_initialized():
            dist.init_process_group('nccl' if self.device.type == 'cuda' else 'gloo')

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


# ----------------------------------------------------------------------------------------------
# The trainer


class UGATIT:
    """U-GAT-IT training, resumption, translation and evaluation."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.dist = DistributedContext(cfg.device)
        self.device = self.dist.device
        self.dataset_root = data.resolve_dataset_root(cfg.dataset)
        self.run_dir = Path(cfg.result_dir) / cfg.dataset_name
        self.model_dir = self.run_dir / 'model'
        self.step = 0
        self.best_metric = math.inf
        if self.device.type == 'cuda':
            torch.backends.cudnn.benchmark = cfg.benchmark_flag
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        utils.seed_everything(cfg.seed)
        self.G = nn.ModuleDict({d.name: build_generator(cfg) for d in DIRECTIONS}).to(self.device)
        self.D = nn.ModuleDict({dom: build_critic(cfg, dom) for dom in 'AB'}).to(self.device)
        torch.manual_seed(cfg.seed + self.dist.rank)   # same weights everywhere, own augmentation draws
        if cfg.channels_last:
            self.G.to(memory_format=torch.channels_last)
            self.D.to(memory_format=torch.channels_last)
        self.G_optim = self._adam(self.G.parameters())
        self.D_optim = self._adam(self.D.parameters())
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == 'fp16')
        self.rho_clipper = RhoClipper(0, 1)
        self.gan_loss = L.GANLoss(cam_weight=cfg.cam_D_weight)
        self.adv_weight = {'A2B': cfg.adv_weight * cfg.forward_adv_weight,
                           'B2A': cfg.adv_weight * cfg.backward_adv_weight}
        self.ema = self._build_ema()
        self.ada = self._build_ada()
        # ADA's draws come from their own generator, reseeded from (seed, rank, step) every step, so a
        # resumed run augments exactly as an unbroken one (DataLoader start-up also draws globally).
        self.ada_rng = torch.Generator(device=self.device) if self.ada is not None else None
        self.segmenter = self._build_segmenter()
        self.g_terms = self._build_generator_terms()
        self.frozen_on_other_groups = self._selective_backprop_params()
        self.G_run, self.D_run = self._wrap_for_speed()

    # -- construction helpers --------------------------------------------------------------------

    def _adam(self, params) -> torch.optim.Adam:
        fast = {'fused': True} if self.device.type == 'cuda' else {'foreach': True}
        return torch.optim.Adam(params, lr=self.cfg.lr, betas=(0.5, 0.999), weight_decay=self.cfg.weight_decay,
                                **fast)

    def _build_ema(self) -> dict[str, utils.EMA] | None:
        if not self.cfg.ema:
            return None
        start = int(self.cfg.ema_start * self.cfg.iteration)
        return {d.name: utils.EMA(self.G[d.name], self.cfg.ema_beta, start) for d in DIRECTIONS}

    def _build_ada(self) -> dict | None:
        """One ADA controller per domain's discriminators (F2W's ``ada`` and ``ada2``)."""
        if not self.cfg.ada:
            return None
        import augment
        cfg = self.cfg
        return {dom: augment.AdaController(
            augment.AugmentPipe(cfg.ada_pipeline, p=cfg.ada_p).to(self.device), target=cfg.ada_target,
            interval=cfg.ada_interval, kimg=cfg.ada_kimg, batch_size=cfg.batch_size * self.dist.world_size)
            for dom in 'AB'}

    def _build_segmenter(self):
        if not self.cfg.use_faceseg:
            return None
        from faceseg import FaceSegmenter, load_bisenet
        net = load_bisenet(self.cfg.faceseg_weights, self.device)
        return FaceSegmenter(net, hard_edge=self.cfg.hard_seg_edge,
                             fix_glass_mouth=self.cfg.seg_fix_glass_mouth).to(self.device)

    def _build_generator_terms(self) -> list:
        cfg = self.cfg
        terms = []
        if cfg.face_distance_weight > 0:
            from faceseg.facenet import FaceIdentity, load_facenet
            net = load_facenet(cfg.facenet_weights, cfg.facenet_pretrained, cfg.facenet_checkpoint_dir,
                               self.device)
            terms.append(L.FaceDistanceTerm(FaceIdentity(net).to(self.device), cfg.face_distance_weight))
        if cfg.seg_fix_weight > 0:
            terms.append(L.BackgroundL1Term(cfg.seg_fix_weight))
        if cfg.tv_weight > 0:
            terms.append(L.TotalVariationTerm(cfg.tv_weight))
        if cfg.use_grouploss:
            terms.append(L.GroupTerm(cfg.group_weight, 'A2B'))
        return terms

    def _selective_backprop_params(self) -> list[nn.Parameter]:
        """F2W's bottleneck: the encoder residual blocks of both generators."""
        if not self.cfg.selective_backprop:
            return []
        from networks import ResnetBlock
        return [p for g in self.G.values() for block in g.DownBlock if isinstance(block, ResnetBlock)
                for p in block.parameters()]

    def _wrap_for_speed(self) -> tuple[dict, dict]:
        """DDP wrappers (gradient all-reduce) and torch.compile around the raw modules."""
        G_run = {name: g for name, g in self.G.items()}
        D_run = {dom: {scale: d for scale, d in critic.items()} for dom, critic in self.D.items()}
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == 'cuda' else None
            G_run = {k: DDP(m, device_ids=ids) for k, m in G_run.items()}
            D_run = {dom: {s: DDP(m, device_ids=ids) for s, m in c.items()} for dom, c in D_run.items()}
        if self.cfg.compile:
            G_run = {k: torch.compile(m) for k, m in G_run.items()}
            D_run = {dom: {s: torch.compile(m) for s, m in c.items()} for dom, c in D_run.items()}
        return G_run, D_run

    # -- schedule ----------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """PT's schedule as a pure function: constant, then linear to 0 over the second half."""
        cfg = self.cfg
        half = cfg.iteration // 2
        if not cfg.decay_flag or step <= half:
            return cfg.lr
        return cfg.lr * max(0.0, 1.0 - (step - half) / (cfg.iteration - half))

    def _set_lr(self, lr: float) -> None:
        for optim in (self.G_optim, self.D_optim):
            for group in optim.param_groups:
                group['lr'] = lr

    # -- the training step -----------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.amp == 'off':
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.amp == 'bf16' else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        out = {}
        for key, value in batch.items():
            value = value.to(self.device, non_blocking=True)
            out[key] = value.contiguous(memory_format=fmt) if value.dim() == 4 else value
        return out

    def generate(self, batch: dict[str, torch.Tensor]) -> dict[str, Translation]:
        """All six generator outputs, each generator run once per stage on a stacked batch."""
        stage1 = {}
        for d in DIRECTIONS:
            src, tgt = batch[d.source], batch[d.target]
            if self.cfg.stack_batches:
                stage1[d.name] = _split(self.G_run[d.name](torch.cat([src, tgt])), [len(src), len(tgt)])
            else:
                stage1[d.name] = [self.G_run[d.name](src), self.G_run[d.name](tgt)]
        return {d.name: Translation(fake=stage1[d.name][0], identity=stage1[d.name][1],
                                    cycle=self.G_run[d.backward](stage1[d.name][0].image).image)
                for d in DIRECTIONS}

    def critic(self, domain: str, images: list[torch.Tensor], masks: list[dict] | None = None,
               update_sn: bool = False, distributed: bool = True) -> list[list[DiscriminatorOutput]]:
        """Run both discriminators of ``domain`` on each image batch: result[i] = [global, local].

        Spectral norm's power iteration runs on the first call of the D step only (exactly once
        per step, however the inputs are batched). ADA, when on, augments every input here, once
        for both scales.
        """
        nets = self.D_run[domain] if distributed else self.D[domain]
        masks = masks or [{} for _ in images]
        sizes = [len(x) for x in images]
        if self.cfg.stack_batches:
            images = [torch.cat(images)]
            masks = [{k: torch.cat([m[k] for m in masks]) for k in masks[0]}]
        if self.ada is not None:
            images = [self.ada[domain].pipe(x, generator=self.ada_rng) for x in images]
        per_input = [[] for _ in images]
        for scale in ('G', 'L'):
            for i, (x, extra) in enumerate(zip(images, masks)):
                nets[scale].train(update_sn and i == 0)
                per_input[i].append(nets[scale](x, **extra))
        if not self.cfg.stack_batches:
            return per_input
        by_scale = [_split(out, sizes) for out in per_input[0]]
        return [list(outs) for outs in zip(*by_scale)]

    def _critic_masks(self, images_masks: list[torch.Tensor | None], images: list[torch.Tensor]) -> list[dict]:
        """Keyword arguments for D from face masks (EN's --seg_D_cam_fea_mask / --seg_D_cam_inp_mask)."""
        out = []
        for mask, image in zip(images_masks, images):
            extra = {}
            if mask is not None and self.cfg.seg_D_cam_fea_mask:
                extra['feature_mask'] = mask
            if mask is not None and self.cfg.seg_D_cam_inp_mask:
                extra['cam_input'] = image * mask
            out.append(extra)
        return out

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """One full iteration; returns detached loss tensors (no host sync)."""
        batch = self._prepare(batch)
        self._set_lr(self.lr_at(step))
        if self.ada_rng is not None:
            self.ada_rng.manual_seed(data.derive_seed(self.cfg.seed, 'ada', self.dist.rank, step))
        masks = self.segment(batch)
        self.G.train()
        with self.autocast():
            translations = self.generate(batch)
        logs: dict[str, torch.Tensor] = {}
        self.d_step(batch, translations, masks, logs)
        self.g_step(batch, translations, masks, logs, step)
        self.after_step(step)
        return logs

    @torch.no_grad()
    def segment(self, batch: dict[str, torch.Tensor]) -> dict | None:
        """Face masks of the real images, computed once per step without gradients."""
        if self.segmenter is None:
            return None
        return {dom: self.segmenter(batch[dom]) for dom in 'AB'}

    def _seg_face(self, masks: dict | None, domain: str) -> torch.Tensor | None:
        return masks[domain].face if masks is not None else None

    def _patch_mask(self, masks: dict | None, domain: str) -> torch.Tensor | None:
        return self._seg_face(masks, domain) if self.cfg.seg_D_mask else None

    def d_step(self, batch, translations, masks, logs) -> None:
        """Discriminators on real vs detached fake (and blurred) images of each target domain."""
        self.D_optim.zero_grad(set_to_none=True)
        self.D.requires_grad_(True)
        total = 0.0
        for d in DIRECTIONS:
            src, tgt = d.source, d.target
            images = [batch[tgt], translations[d.name].fake.image.detach()]
            image_masks = [self._seg_face(masks, tgt), self._seg_face(masks, src)]
            if f'blur_{tgt}' in batch:
                images.append(batch[f'blur_{tgt}'])
                image_masks.append(None if masks is None else torch.ones_like(image_masks[0]))
            with self.autocast():
                outs = self.critic(tgt, images, self._critic_masks(image_masks, images), update_sn=True)
            real, fake, *blurred = outs
            loss = (self.gan_loss(real, 1.0, self._patch_mask(masks, tgt))
                    + self.gan_loss(fake, 0.0, self._patch_mask(masks, src))
                    + sum(self.gan_loss(b, 0.0) for b in blurred))
            loss = self.adv_weight[d.name] * loss
            if real[0].group_logit is not None:
                group = self.cfg.adv_weight * L.group_classification_loss(real, batch[f'group_{tgt}'])
                logs[f'D/group_{tgt}'] = group.detach()
                loss = loss + group
            logs[f'D/adv_{tgt}'] = loss.detach()
            logs[f'D/real_acc_{tgt}'] = (real[0].logit.detach() > 0.5).float().mean()  # global D, LSGAN 0/1
            if self.ada is not None:
                self.ada[tgt].observe(real[0].logit.detach())
            total = total + loss
        logs['D/total'] = total.detach()
        self.scaler.scale(total).backward()
        self.scaler.step(self.D_optim)

    def g_step(self, batch, translations, masks, logs, step: int) -> None:
        """Generators: adversarial, cycle, identity and CAM terms plus the active optional terms."""
        cfg = self.cfg
        self.G_optim.zero_grad(set_to_none=True)
        self.D.requires_grad_(False)
        total = 0.0
        for d in DIRECTIONS:
            src, tgt = d.source, d.target
            out = translations[d.name]
            fake = out.fake.image
            source_face = self._seg_face(masks, src)
            if cfg.seg_G_detach and source_face is not None:
                fake = fake * source_face + fake.detach() * (1 - source_face)
            with self.autocast():
                critic = self.critic(tgt, [fake], self._critic_masks([source_face], [fake]),
                                     distributed=False)[0]
            terms = {
                'adv': self.adv_weight[d.name] * self.gan_loss(critic, 1.0, self._patch_mask(masks, src)),
                'cycle': cfg.cycle_weight * L.l1(out.cycle, batch[src]),
                'identity': cfg.identity_weight * L.l1(out.identity.image, batch[tgt]),
                'cam': cfg.cam_weight * L.generator_cam_loss(out.fake.cam_logit, out.identity.cam_logit),
            }
            ctx = L.DirectionContext(d.name, batch[src], batch[tgt], out.fake, critic,
                                     masks[src] if masks is not None else None, batch.get(f'group_{src}'))
            for term in self.g_terms:
                terms[term.name] = term.weight * term(ctx)
            for name, value in terms.items():
                logs[f'G/{name}_{d.name}'] = value.detach()
            total = total + sum(terms.values())
        logs['G/total'] = total.detach()
        self.scaler.scale(total).backward()
        if self.frozen_on_other_groups and not self._is_base_group_step(batch):
            for p in self.frozen_on_other_groups:
                p.grad = None   # Adam skips params without grad: no moment or weight-decay update
        self.scaler.step(self.G_optim)
        self.scaler.update()

    def _is_base_group_step(self, batch) -> bool:
        # Selective backprop needs whole-batch groups; validation enforces round-robin sampling.
        return int(batch['group_A'][0]) == self.cfg.base_group

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """ρ clipping, EMA and ADA's strength update."""
        self.G.apply(self.rho_clipper)
        if self.ema is not None:
            for name, ema in self.ema.items():
                ema.update(self.G[name], step)
        if self.ada is not None:
            for controller in self.ada.values():
                controller.step()
        self.step = step

    # -- inference ---------------------------------------------------------------------------------

    def generator(self, direction: str, use_ema: bool = True) -> nn.Module:
        """The network used for translation: the EMA copy when there is one and it is wanted."""
        if use_ema and self.ema is not None:
            return self.ema[direction].model
        return self.G[direction]

    @torch.no_grad()
    def translate(self, images: torch.Tensor, direction: str, use_ema: bool = True) -> GeneratorOutput:
        """Translate a batch in [-1, 1] (eval mode, no autograd)."""
        net = self.generator(direction, use_ema)
        was_training = net.training
        net.eval()
        with self.autocast():
            out = net(images.to(self.device))
        net.train(was_training)
        return GeneratorOutput(*(t.float() if t is not None else None for t in out))

    @torch.no_grad()
    def visual_columns(self, real: torch.Tensor, direction: Direction, use_ema: bool = True) -> list:
        """PT's 7 rows per image (real, identity heatmap, identity, translation heatmap,
        translation, cycle heatmap, cycle) plus face-mask and attention rows when those are on."""
        size = self.cfg.img_size
        fwd = self.translate(real, direction.name, use_ema)
        idt = self.translate(real, direction.backward, use_ema)
        cyc = self.translate(fwd.image, direction.backward, use_ema)
        masks = self.segmenter(real.to(self.device)) if self.segmenter is not None else None
        columns = []
        for i in range(len(real)):
            col = [utils.tensor_to_uint8(real[i]),
                   utils.heatmap_to_uint8(idt.heatmap[i], size), utils.tensor_to_uint8(idt.image[i]),
                   utils.heatmap_to_uint8(fwd.heatmap[i], size), utils.tensor_to_uint8(fwd.image[i]),
                   utils.heatmap_to_uint8(cyc.heatmap[i], size), utils.tensor_to_uint8(cyc.image[i])]
            if masks is not None:
                col.append(utils.tensor_to_uint8(masks.eroded[i].expand(3, -1, -1) * 2 - 1))
            if fwd.attention is not None:
                col += [utils.heatmap_to_uint8(a[None], size) for a in fwd.attention[i]]
            columns.append(col)
        return columns

    # -- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The whole training state; PT's six keys first, so PT tools can read it."""
        state = {key: self._pt_module(key).state_dict() for key in PT_KEYS}
        if self.ema is not None:
            state.update({f'gen{name}_ema': ema.model.state_dict() for name, ema in self.ema.items()})
        state.update({
            'G_optim': self.G_optim.state_dict(), 'D_optim': self.D_optim.state_dict(),
            'scaler': self.scaler.state_dict(), 'step': self.step, 'lr': self.lr_at(self.step),
            'best_metric': self.best_metric, 'rng': utils.rng_state(),
            'config': utils.config_to_dict(self.cfg), 'format': 'ugatit-pytorch/1',
        })
        if self.ada is not None:
            state['ada'] = {dom: ada.state_dict() for dom, ada in self.ada.items()}
        return state

    def _pt_module(self, key: str) -> nn.Module:
        kind, *path = PT_KEYS[key]
        module = self.G if kind == 'G' else self.D
        for part in path:
            module = module[part]
        return module

    def load_state_dict(self, state: dict, *, weights_only: bool = False) -> list[str]:
        """Restore a checkpoint (ours or PT's six-key format); returns notes for the user."""
        notes = []
        for key in PT_KEYS:
            if key not in state:
                raise utils.UserError(f'checkpoint has no {key!r}: not a U-GAT-IT checkpoint')
            notes += self._load_module(self._pt_module(key), state[key], key)
        if self.ema is not None:
            for name, ema in self.ema.items():
                ema.model.load_state_dict(state.get(f'gen{name}_ema', state[f'gen{name}']))
        if weights_only:
            return notes
        if 'G_optim' in state:
            self.G_optim.load_state_dict(state['G_optim'])
            self.D_optim.load_state_dict(state['D_optim'])
            self.scaler.load_state_dict(state.get('scaler', {}))
            utils.set_rng_state(state['rng'])
        else:
            notes.append('PT-format checkpoint: optimizer moments start fresh')
        if self.ada is not None and 'ada' in state:
            for dom, ada in self.ada.items():
                ada.load_state_dict(state['ada'][dom])
        self.best_metric = state.get('best_metric', math.inf)
        self.step = int(state.get('step', 0))
        return notes

    def _load_module(self, module: nn.Module, weights: dict, key: str) -> list[str]:
        result = module.load_state_dict(weights, strict=False)
        # A baseline checkpoint has no few-shot group head: it is trained from scratch (as F2W does).
        missing = [k for k in result.missing_keys if not k.startswith('group_fc.')]
        if missing or result.unexpected_keys:
            raise utils.UserError(
                f'checkpoint {key} does not fit the model built from your flags (missing {missing[:3]}, '
                f'unexpected {result.unexpected_keys[:3]}): pass the same --light/--ch/--n_res/--img_size/'
                f'--n_global_dis/--n_local_dis and options it was trained with')
        return [f'{key}: new group head initialised'] if result.missing_keys else []


    # -- checkpoints -------------------------------------------------------------------------------

    def checkpoint_path(self, step: int) -> Path:
        return self.model_dir / f'{self.cfg.dataset_name}_params_{step:07d}.pt'

    @property
    def latest_path(self) -> Path:
        return Path(self.cfg.result_dir) / f'{self.cfg.dataset_name}_params_latest.pt'

    @property
    def best_path(self) -> Path:
        return self.model_dir / f'{self.cfg.dataset_name}_params_best_fid.pt'

    def save(self, path: Path) -> None:
        """Atomically write the whole training state (rank 0 only)."""
        if self.dist.is_main:
            utils.atomic_save(self.state_dict(), path)

    def checkpoint_candidates(self) -> list[Path]:
        """Periodic checkpoints newest first, with PT's ``_params_latest.pt`` considered too."""
        periodic = sorted(self.model_dir.glob(f'{self.cfg.dataset_name}_params_[0-9]*.pt'), reverse=True)
        latest = [self.latest_path] if self.latest_path.exists() else []
        return latest + periodic

    def load_newest(self, weights_only: bool = False) -> Path | None:
        """Load the newest loadable checkpoint (a corrupt one is skipped with a warning)."""
        best: tuple[int, Path, dict] | None = None
        for path in self.checkpoint_candidates():
            if best is not None and path != self.latest_path and _step_of(path) <= best[0]:
                break
            try:
                state = utils.load_checkpoint(path, self.device)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, not fatal
                self.log(f'warning: skipping unreadable checkpoint {path} ({type(exc).__name__}: {exc})')
                continue
            step = int(state.get('step', _step_of(path)))
            if best is None or step > best[0]:
                best = (step, path, state)
        if best is None:
            return None
        step, path, state = best
        for note in self.load_state_dict(state, weights_only=weights_only):
            self.log(f'note: {note}')
        self.step = step
        return path

    def load_file(self, path: Path, weights_only: bool = True) -> None:
        try:
            state = utils.load_checkpoint(path, self.device)
        except Exception as exc:  # noqa: BLE001 - reported to the user on one line
            raise utils.UserError(f'cannot load checkpoint {path}: {type(exc).__name__}: {exc}') from None
        for note in self.load_state_dict(state, weights_only=weights_only):
            self.log(f'note: {note}')

    def log(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message, file=sys.stderr)

    # -- training loop -----------------------------------------------------------------------------

    def train(self) -> None:
        """Train from scratch or resume; periodic logs, previews, metrics and checkpoints."""
        cfg = self.cfg
        start = 1
        if cfg.resume:
            path = self.load_newest()
            if path is None:
                self.log(f'no checkpoint in {self.model_dir}: starting from scratch')
            else:
                start = self.step + 1
                self.log(f'resumed from {path} at step {self.step}')
        if start > cfg.iteration:
            self.log(f'already trained for {cfg.iteration} iterations; nothing to do')
            return
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / 'config.json').write_text(json.dumps(utils.config_to_dict(cfg), indent=2))
        stream = self._train_stream(start)
        monitor = TrainingMonitor(self) if self.dist.is_main else None
        stop = GracefulStop()
        bar = tqdm(range(start, cfg.iteration + 1), initial=start - 1, total=cfg.iteration,
                   disable=not self.dist.is_main, dynamic_ncols=True, desc='train')
        meter = utils.LossMeter()
        for step in bar:
            meter.add(self.train_step(next(stream), step))
            if step % cfg.log_freq == 0 or step == cfg.iteration or stop.requested:
                self._flush(meter, monitor, bar, step)
            if monitor is not None and step % cfg.print_freq == 0:
                monitor.previews(step)
            if cfg.metric_freq and step % cfg.metric_freq == 0:
                self.evaluate_and_keep_best(monitor, step)
            self._periodic_saves(step, meter, monitor, bar)
            if stop.requested:
                self._flush(meter, monitor, bar, step)
                self.save(self.checkpoint_path(step))
                self.log(f'stopped by signal at step {step}; checkpoint saved, resume with --resume True')
                break
        stop.restore()
        if monitor is not None:
            monitor.close()

    def _train_stream(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        cfg = self.cfg
        return data.build_train_stream(
            self.dataset_root, cfg.img_size, cfg.batch_size, cfg.seed, start_step=start,
            rank=self.dist.rank, world_size=self.dist.world_size, num_workers=cfg.num_workers,
            pin_memory=self.device.type == 'cuda', aug_prob=cfg.aug_prob,
            match_histograms=cfg.match_histograms, match_mode=cfg.match_mode, match_prob=cfg.match_prob,
            match_ratio=cfg.match_ratio, blur_root=self._blur_root(),
            groups=cfg.groups, group_sampling=cfg.group_sampling)

    def _blur_root(self) -> Path | None:
        """EN's --has_blur: edge-blurred copies of the training images, generated once and cached."""
        if not self.cfg.has_blur:
            return None
        if self.dist.is_main:
            for dom in 'AB':
                written = data.make_blur_images(self.dataset_root / f'train{dom}', self.dataset_root / f'blur{dom}')
                if written:
                    self.log(f'wrote {written} blurred images to {self.dataset_root / f"blur{dom}"}')
        self.dist.barrier()
        return self.dataset_root

    def _flush(self, meter: utils.LossMeter, monitor, bar, step: int) -> None:
        means = meter.flush()
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        if bad:
            raise TrainingDiverged(
                f'{bad[0]} became {means[bad[0]]} by step {step}; training stopped and the last good checkpoint '
                f'kept ({self._last_saved or "none yet"}). Try a lower --lr or --amp off')
        if monitor is not None and means:
            monitor.scalars(step, means)
            bar.set_postfix({'D': f"{means.get('D/total', 0):.3f}", 'G': f"{means.get('G/total', 0):.3f}"})

    _last_saved: Path | None = None

    def _periodic_saves(self, step: int, meter: utils.LossMeter, monitor, bar) -> None:
        cfg = self.cfg
        targets = []
        if step % cfg.save_freq == 0 or step == cfg.iteration:
            targets.append(self.checkpoint_path(step))
        if cfg.latest_freq and step % cfg.latest_freq == 0:
            targets.append(self.latest_path)
        if not targets:
            return
        self._flush(meter, monitor, bar, step)   # never write weights after a NaN
        for path in targets:
            self.save(path)
            self._last_saved = path

    # -- evaluation --------------------------------------------------------------------------------

    def evaluate(self, use_ema_options: tuple[bool, ...] | None = None) -> dict[str, float]:
        """FID and KID of test-set translations against the target domain's training images."""
        from metrics import Evaluator, kernel_inception_distance
        cfg = self.cfg
        if getattr(self, '_evaluator', None) is None:
            self._evaluator = Evaluator(cfg.inception_weights, self.device, batch_size=cfg.fid_batch,
                                        cache_dir=str(self.run_dir / 'metric_cache'))
        if use_ema_options is None:
            use_ema_options = (False, True) if self.ema is not None else (False,)
        results = {}
        for d in DIRECTIONS:
            for use_ema in use_ema_options:
                suffix = '_ema' if use_ema else ''
                scores = self._evaluator.score(*self._features(d, '', use_ema))
                results.update({f'{name}/{d.name}{suffix}': value for name, value in scores.items()})
                for g in cfg.groups or ():   # few-shot runs: KID per group present on both sides
                    if self._has_group(d, g):
                        kid, _ = kernel_inception_distance(*self._features(d, str(g), use_ema))
                        results[f'KID/{d.name}_group{g}{suffix}'] = kid
        return results

    def _has_group(self, d: Direction, group: int) -> bool:
        return all((self.dataset_root / split / str(group)).is_dir()
                   for split in (f'test{d.source}', f'train{d.target}'))

    def _features(self, d: Direction, subfolder: str, use_ema: bool) -> tuple[np.ndarray, np.ndarray]:
        """Inception features of train<target>/<subfolder> (cached on disk) and of the translations
        of test<source>/<subfolder>."""
        cfg = self.cfg
        real = self._evaluator.real_features(self.dataset_root / f'train{d.target}' / subfolder,
                                             img_size=cfg.img_size)
        loader = data.build_test_loader(self.dataset_root / f'test{d.source}' / subfolder, cfg.img_size,
                                        batch_size=cfg.fid_batch, num_workers=cfg.num_workers)
        fakes = self._evaluator.fake_features(self.translate(x, d.name, use_ema).image for x, _ in loader)
        return real, fakes

    def evaluate_and_keep_best(self, monitor, step: int) -> None:
        """Metrics on rank 0; the best checkpoint (mean FID of the deployed generators) is kept."""
        if self.dist.is_main:
            results = self.evaluate()
            monitor.metrics(step, results)
            suffix = '_ema' if self.ema is not None else ''
            score = sum(results[f'FID/{d.name}{suffix}'] for d in DIRECTIONS) / len(DIRECTIONS)
            if score < self.best_metric:
                self.best_metric = score
                self.save(self.best_path)
                self.log(f'step {step}: new best mean FID {score:.3f} -> {self.best_path}')
        self.dist.barrier()


def _step_of(path: Path) -> int:
    """The step in a periodic checkpoint's name (PT's naming); -1 for other files."""
    tail = path.stem.rsplit('_', 1)[-1]
    return int(tail) if tail.isdigit() else -1


class TrainingDiverged(utils.UserError):
    """A loss became NaN or infinite."""


class GracefulStop:
    """Turns SIGINT/SIGTERM into a flag so the loop can save a checkpoint before exiting."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under some test runners)
                pass

    def _handle(self, signum, frame) -> None:
        if self.requested:     # a second Ctrl-C exits at once
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# FN's TensorBoard names for its face-distance curves, written too so its dashboards keep working.
# FN (a TF fork) names generators by the domain they produce: G_A is B→A.
FN_TAG_ALIASES = {'G/face_distance_B2A': 'G_A_face_distance', 'G/face_distance_A2B': 'G_B_face_distance'}


class TrainingMonitor:
    """Rank 0's outputs: TensorBoard scalars and images, PNG previews, metrics.jsonl."""

    def __init__(self, trainer: UGATIT, n_preview: int = 5) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.trainer = trainer
        self.writer = SummaryWriter(str(trainer.run_dir / 'logs'))
        self.img_dir = trainer.run_dir / 'img'
        self.samples = self._preview_samples(n_preview)

    def _preview_samples(self, n: int) -> dict[str, torch.Tensor]:
        """The first n train and test images of each domain: the same columns in every preview."""
        trainer = self.trainer
        samples = {}
        for dom in 'AB':
            parts = []
            for split in (f'train{dom}', f'test{dom}'):
                loader = data.build_test_loader(trainer.dataset_root / split, trainer.cfg.img_size, batch_size=n)
                parts.append(next(iter(loader))[0])
            samples[dom] = torch.cat(parts)
        return samples

    def scalars(self, step: int, means: dict[str, float]) -> None:
        for key, value in means.items():
            self.writer.add_scalar(key, value, step)
            if key in FN_TAG_ALIASES:
                self.writer.add_scalar(FN_TAG_ALIASES[key], value, step)
        trainer = self.trainer
        self.writer.add_scalar('lr', trainer.lr_at(step), step)
        for name, g in trainer.G.items():
            rhos = torch.cat([m.rho.detach().flatten() for m in g.modules() if hasattr(m, 'rho')])
            self.writer.add_scalar(f'rho/{name}_mean', rhos.mean().item(), step)
            self.writer.add_scalar(f'rho/{name}_min', rhos.min().item(), step)
            self.writer.add_scalar(f'rho/{name}_max', rhos.max().item(), step)
        if trainer.ada is not None:
            for dom, ada in trainer.ada.items():
                self.writer.add_scalar(f'ADA/p_{dom}', ada.p, step)
                self.writer.add_scalar(f'ADA/rt_{dom}', ada.rt, step)

    def previews(self, step: int) -> None:
        """PT's A2B/B2A grids (plus _ema ones) as PNG under img/ and in TensorBoard."""
        trainer = self.trainer
        variants = [(False, '')] + ([(True, '_ema')] if trainer.ema is not None else [])
        for d in DIRECTIONS:
            for use_ema, suffix in variants:
                image = utils.grid(trainer.visual_columns(self.samples[d.source], d, use_ema))
                utils.save_rgb(self.img_dir / f'{d.name}{suffix}_{step:07d}.png', image)
                self.writer.add_image(f'preview/{d.name}{suffix}', image, step, dataformats='HWC')

    def metrics(self, step: int, results: dict[str, float]) -> None:
        for key, value in results.items():
            self.writer.add_scalar(key, value, step)
        with open(self.trainer.run_dir / 'metrics.jsonl', 'a') as f:
            f.write(json.dumps({'step': step, **results}) + '\n')
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
