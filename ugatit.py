"""The U-GAT-IT trainer: the networks, the training step and the training state.

The step (SPEC A3) computes every generator output once, updates the discriminators on detached
fakes, then the generators on the same outputs. A→B and B→A share one code path: each direction is
a small record, networks live in ``nn.ModuleDict``s, and losses are logged as ``'G/adv_A2B'``.
Optional features (EMA, ADA, face segmentation, extra loss terms) are objects that are ``None`` or
absent when off, so the step itself has no per-feature branches. Each reads its own typed part of
the run's :class:`config.Config`.

Device rule (CUDA is where every user trains): everything read from disk lands on the CPU
(memory-mapped where possible) and only what a phase needs is copied to the device
(``load_state_dict`` copies; RNG states are restored as the CPU tensors ``torch.set_rng_state`` and
``torch.cuda.set_rng_state_all`` take, recorded per device); nothing in the step builds device
tensors from Python data or reads a device value back (``.item()``, ``float()``, ``int()``): losses
stay tensors until the logging step's single copy. Under fp16 one ``GradScaler.update()`` follows
each iteration's optimizer steps, and the gradient penalty differentiates the scaled output.

The run around the step (lock, resume, data, logs, evaluation, saves, signals) is
``training_loop.py``'s; building the networks and inference ``model.py``'s; the stored forms
``checkpoints.py``'s.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import augment
import dataset as data
import images
import losses as L
import low_memory
import memory
import step_capture
import utils
from checkpoints import PT_KEYS, TRAINING_FORMAT, load_module, state_nbytes
from config import Config, FewShot, LossWeights
from distributed import DistributedContext, untrainable_parameters, wrap_for_speed
from errors import UserError
from faceseg.masking import NO_MASKS, FaceMasks, build_face_masking
from model import DIRECTIONS, Direction, Translator, build_critic, build_generator
from networks import DiscriminatorOutput, GeneratorOutput, ResnetBlock, RhoClipper
from step_memory import Recomputed, build_early_updates


@dataclass
class Translation:
    """The generator outputs of one direction: G(source), G(target) (identity), cycle image."""

    fake: GeneratorOutput
    identity: GeneratorOutput
    cycle: torch.Tensor


def _split(output: tuple, sizes: list[int]) -> list[tuple]:
    """Split a batched network output (a NamedTuple of tensors/None) back into per-input chunks."""
    chunks = [t.split(sizes) if t is not None else [None] * len(sizes) for t in output]
    return [type(output)(*parts) for parts in zip(*chunks)]


# ----------------------------------------------------------------------------------------------
# The trainer


class UGATIT:
    """U-GAT-IT's networks, training step and state (the run: ``training_loop.train``; inference:
    ``checkpoints.load_translator``)."""

    def __init__(self, config: Config, dist: DistributedContext | None = None) -> None:
        self.config = config
        perf = config.performance
        self.dist = dist or DistributedContext(perf.device)
        self.device = self.dist.device
        self.arch = config.arch
        self.schedule = config.schedule
        self.weights = config.losses
        self.step = 0
        self._undo = StepUndo()
        if self.device.type == 'cuda':
            torch.backends.cudnn.benchmark = perf.benchmark_flag
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        seed = config.run.seed
        utils.seed_everything(seed)
        self.G = nn.ModuleDict({d.name: build_generator(self.arch) for d in DIRECTIONS}).to(self.device)
        self.D = nn.ModuleDict({dom: build_critic(self.arch, dom) for dom in 'AB'}).to(self.device)
        torch.manual_seed(seed + self.dist.rank)   # same weights everywhere, own augmentation draws
        if perf.channels_last:
            self.G.to(memory_format=torch.channels_last)
            self.D.to(memory_format=torch.channels_last)
        self.G_optim = build_adam(self.G.parameters(), config, self.device)
        self.D_optim = build_adam(self.D.parameters(), config, self.device)
        self.regularisers = build_regularisers({'G': self.G, 'D': self.D}, self.weights)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=perf.amp == 'fp16')
        self.rho_clipper = RhoClipper(0, 1)
        self.rhos = [m.rho for m in self.G.modules() if hasattr(m, 'rho')]   # AdaLIN/ILN's ρ, clipped after G steps
        objective, penalty = L.gan_objective(self.weights.gan_type, self.weights.GP_ld)
        self.gan_loss = L.GANLoss(cam_weight=self.weights.cam_D_weight, objective=objective, penalty=penalty)
        self.adv_weight = self.weights.adversarial()
        self.ema = build_ema(self.G, config)
        self.ada = build_ada(config, self.device, self.dist.world_size, self.gan_loss.threshold)
        # ADA's and the gradient penalty's draws come from their own generators, reseeded from (seed, rank,
        # step) every step, so a resumed run draws exactly as an unbroken one (DataLoader start-up also
        # draws globally).
        self.step_rngs = {name: torch.Generator(device=self.device) for name, wanted in
                          (('ada', self.ada is not None), ('penalty', penalty is not None)) if wanted}
        self.face_masking = build_face_masking(config.face_masks, self.device) if config.face_masks else None
        self.g_terms = L.build_generator_terms(config.generator_terms, self.device)
        self.frozen_on_other_groups = selective_backprop_params(self.G) if config.few_shot.selective_backprop else []
        self.early_updates = build_early_updates(self.G, self.G_optim, config, self.dist)
        self._frozen_this_step: list[nn.Parameter] = []
        # 'auto' is settled before a run builds its trainer (training_loop.settle_recompute); unsettled, it is off
        recompute = perf.recompute is True
        generators = nn.ModuleDict({name: Recomputed(g) for name, g in self.G.items()}) if recompute else self.G
        self.G_run, self.D_run, self.D_local = wrap_for_speed(
            generators, self.D, self.dist, perf.compile, mode=perf.compile_mode,
            untrained=untrainable_parameters(self.D, self.weights.cam_D_weight, self.regularisers['D']))
        self.run_device_step = build_step_runner(perf.cuda_graph, self.dist, self._device_step, self._prepare)

    # -- schedule ----------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step`` (``config.Schedule``)."""
        return self.schedule.lr_at(step)

    def _set_lr(self, lr: float) -> None:
        for optim in (self.G_optim, self.D_optim):
            low_memory.set_lr(optim, lr)

    @property
    def has_ema(self) -> bool:
        return self.ema is not None

    @property
    def skips_nonfinite_steps(self) -> bool:
        """fp16: the GradScaler skips a step whose scaled gradients overflowed (its losses may be inf)."""
        return self.scaler.is_enabled()

    # -- the training step -----------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        return utils.autocast(self.config.performance.amp, self.device.type)

    def _prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        fmt = torch.channels_last if self.config.performance.channels_last else torch.contiguous_format
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
            if self.config.performance.stack_batches:
                stage1[d.name] = _split(self.G_run[d.name](torch.cat([src, tgt])), [len(src), len(tgt)])
            else:
                stage1[d.name] = [self.G_run[d.name](src), self.G_run[d.name](tgt)]
        return {d.name: Translation(fake=stage1[d.name][0], identity=stage1[d.name][1],
                                    cycle=self.G_run[d.backward](stage1[d.name][0].image).image)
                for d in DIRECTIONS}

    def critic(self, domain: str, images: list[torch.Tensor], extras: list[dict] | None = None,
               update_sn: bool = False, distributed: bool = True) -> list[list[DiscriminatorOutput]]:
        """Run both discriminators of ``domain`` on each image batch: result[i] = [global, local];
        ``extras[i]``: D's keyword arguments for image i (face masks).

        Spectral norm's power iteration runs on the first call of the D step only (exactly once
        per step, however the inputs are batched). ADA, when on, augments every input here, once
        for both scales.
        """
        nets = self.D_run[domain] if distributed else self.D_local[domain]
        extras = extras or [{} for _ in images]
        sizes = [len(x) for x in images]
        if self.config.performance.stack_batches:
            images = [torch.cat(images)]
            extras = [{k: torch.cat([e[k] for e in extras]) for k in extras[0]}]
        if self.ada is not None:
            images = [self.ada[domain].pipe(x, generator=self.step_rngs['ada']) for x in images]
        per_input = [[] for _ in images]
        for scale in ('G', 'L'):
            for i, (x, extra) in enumerate(zip(images, extras)):
                nets[scale].train(update_sn and i == 0)
                per_input[i].append(nets[scale](x, **extra))
        if not self.config.performance.stack_batches:
            return per_input
        by_scale = [_split(out, sizes) for out in per_input[0]]
        return [list(outs) for outs in zip(*by_scale)]

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """One full iteration; returns detached loss tensors (no host sync). Until its first
        optimizer update the step can be undone (:meth:`restore_last_completed_step`)."""
        self._undo.begin(volatile_tensors([self.G, self.D], self.ada))
        generator_step = self.schedule.is_generator_step(step)
        self._set_step_inputs(step)
        logs = self.run_device_step(batch, generator_step)
        self._finish_step(step)
        return logs

    def _set_step_inputs(self, step: int) -> None:
        """What the device step reads that changes from step to step, set on the host: the learning rate
        and the EMA decay (written into device scalars under --cuda_graph), the random generators' seeds
        and which parameters selective backprop leaves alone."""
        self._set_lr(self.lr_at(step))
        for name, rng in self.step_rngs.items():
            rng.manual_seed(data.derive_seed(self.config.run.seed, name, self.dist.rank, step))
        for ema in (self.ema or {}).values():
            ema.set_step(step)
        base_group = not self.frozen_on_other_groups or is_base_group_step(self.config.few_shot, step)
        self._frozen_this_step = [] if base_group else self.frozen_on_other_groups

    def _device_step(self, batch: dict[str, torch.Tensor], generator_step: bool) -> dict[str, torch.Tensor]:
        """The step's device work on a batch already on the device: only tensors are read, no Python state
        that changes between steps, so that --cuda_graph can capture it (step_capture.py)."""
        masks = self.face_masking(batch) if self.face_masking is not None else NO_MASKS
        self.G.train()
        with self.autocast():
            translations = self.generate(batch) if generator_step else None
            fakes = self.fakes(batch, translations)
        logs: dict[str, torch.Tensor] = {}
        self.d_step(batch, fakes, masks, logs)
        if generator_step:
            self.g_step(batch, translations, masks, logs)
        self.scaler.update()   # once per iteration, after every optimizer step (AMP's multi-optimizer recipe)
        if generator_step:
            self._after_generator_update()
        return logs

    def fakes(self, batch: dict[str, torch.Tensor], translations: dict[str, Translation] | None
              ) -> dict[str, torch.Tensor]:
        """Detached G(source) per direction for the D step: taken from the step's translations, or,
        on critic-only steps (--n_critic), computed alone without autograd."""
        if translations is not None:
            return {name: t.fake.image.detach() for name, t in translations.items()}
        with torch.no_grad():
            return {d.name: self.G_run[d.name](batch[d.source]).image for d in DIRECTIONS}

    def d_step(self, batch, fakes, masks: FaceMasks, logs) -> None:
        """Discriminators on real vs detached fake (and blurred) images of each target domain."""
        self.D_optim.zero_grad(set_to_none=True)
        self.D.requires_grad_(True)
        total = 0.0
        for d in DIRECTIONS:
            src, tgt = d.source, d.target
            images, faces = [batch[tgt], fakes[d.name]], [tgt, src]   # whose face each image shows
            if f'blur_{tgt}' in batch:
                images.append(batch[f'blur_{tgt}'])
                faces.append(None)
            extras = masks.critic_kwargs(images, faces)
            with self.autocast():
                outs = self.critic(tgt, images, extras, update_sn=True)
            real, fake, *blurred = outs
            loss = (self.gan_loss.d_real(real, masks.patch(tgt))
                    + self.gan_loss.d_fake(fake, masks.patch(src))
                    + sum(self.gan_loss.d_fake(b) for b in blurred))
            if self.gan_loss.penalty is not None:   # inside the adversarial weight, as in TF
                penalty = self._gradient_penalty(tgt, batch[tgt], fakes[d.name])
                logs[f'D/gp_{tgt}'] = penalty.detach()
                loss = loss + penalty
            loss = self.adv_weight[d.name] * loss
            if real[0].group_logit is not None:
                group = self.weights.adv_weight * L.group_classification_loss(real, batch[f'group_{tgt}'])
                logs[f'D/group_{tgt}'] = group.detach()
                loss = loss + group
            logs[f'D/adv_{tgt}'] = loss.detach()
            logs[f'D/real_acc_{tgt}'] = (real[0].logit.detach() > self.gan_loss.threshold).float().mean()  # global D
            if self.ada is not None:
                self.ada[tgt].observe(real[0].logit.detach())
            total = total + loss
        total = total + regularisation(self.regularisers['D'], 'D', logs)
        logs['D/total'] = total.detach()
        self.scaler.scale(total).backward()
        self._undo.commit()   # the critics' update cannot be undone
        self.scaler.step(self.D_optim)
        self.D_optim.zero_grad(set_to_none=True)   # not kept through the G step

    def g_step(self, batch, translations, masks: FaceMasks, logs) -> None:
        """Generators: adversarial, cycle, identity and CAM terms plus the active optional terms."""
        weights = self.weights
        self.G_optim.zero_grad(set_to_none=True)
        self.D.requires_grad_(False)
        total = 0.0
        for d in DIRECTIONS:
            src, tgt = d.source, d.target
            out = translations[d.name]
            fake = masks.generator_view(out.fake.image, src)
            with self.autocast():
                critic = self.critic(tgt, [fake], masks.critic_kwargs([fake], [src]), distributed=False)[0]
            terms = {
                'adv': self.adv_weight[d.name] * self.gan_loss.g(critic, masks.patch(src)),
                'cycle': weights.cycle_weight * L.l1(out.cycle, batch[src]),
                'identity': weights.identity_weight * L.l1(out.identity.image, batch[tgt]),
                'cam': weights.cam_weight * L.generator_cam_loss(out.fake.cam_logit, out.identity.cam_logit),
            }
            ctx = L.DirectionContext(d.name, batch[src], batch[tgt], out.fake, critic,
                                     masks.of(src), batch.get(f'group_{src}'))
            for term in (t for t in self.g_terms if d.name in t.directions):
                terms[term.name] = term.weight * term(ctx)
            for name, value in terms.items():
                logs[f'G/{name}_{d.name}'] = value.detach()
            total = total + sum(terms.values())
        total = total + regularisation(self.regularisers['G'], 'G', logs)
        logs['G/total'] = total.detach()
        with self.early_updates.during_backward():   # the big MLP layers step as soon as their gradient is whole
            self.scaler.scale(total).backward()
        for p in self._frozen_this_step:
            p.grad = None   # Adam skips params without grad: no moment or weight-decay update
        self.scaler.step(self.G_optim)
        self.G_optim.zero_grad(set_to_none=True)   # not kept through the next D step

    def _gradient_penalty(self, domain: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """--gan_type wgan-gp/wgan-lp/dragan: the penalty of both critics of ``domain``. The raw
        networks run without a power iteration (once per step is the D step's), ADA or masks
        (validation rules the D masks out; ADA's warps have no double backward)."""
        critics = [self.D[domain][scale].train(False) for scale in ('G', 'L')]
        # The scaler's scale as a device tensor (1 when it is off): no host sync.
        scale = self.scaler.scale(torch.ones((), device=real.device))
        with self.autocast():
            return self.gan_loss.gradient_penalty(critics, real, fake, self.step_rngs['penalty'], scale)

    @torch.no_grad()
    def _after_generator_update(self) -> None:
        """ρ clipping and the EMA update (at the decay :meth:`_set_step_inputs` set)."""
        self.rho_clipper.clip(self.rhos)
        for name, ema in (self.ema or {}).items():
            ema.update(self.G[name])

    def _finish_step(self, step: int) -> None:
        """Host work after the device step: ADA's strength update and the step count."""
        for controller in (self.ada or {}).values():
            controller.step()
        self.step = step
        self._undo.end()

    def after_step(self, step: int, generator_updated: bool = True) -> None:
        """What follows a hand-written step's optimizer updates (scripts/reference_step.py): ρ clipping and
        EMA after a G update, ADA's strength update."""
        for ema in (self.ema or {}).values():
            ema.set_step(step)
        if generator_updated:
            self._after_generator_update()
        self._finish_step(step)

    def restore_last_completed_step(self) -> bool:
        """After an error inside a step: put back what it changed, so the state (RNG included) is
        exactly that of the last completed step, ``self.step``. False when the error came after an
        optimizer had updated weights, which cannot be undone exactly."""
        if not self._undo.restore():
            return False
        self._set_lr(self.lr_at(self.step))
        return True

    def memory_training(self) -> memory.Training:
        """The trainer as memory.py measures it: the networks, optimizers, EMA copies and the step."""
        parts = memory.TrainingParts([self.G, self.D], [self.G_optim, self.D_optim],
                                     [average.model for average in (self.ema or {}).values()])
        return memory.Training(parts, self.train_step)

    def checkpoint_nbytes(self) -> int:
        """About the size of a checkpoint once Adam's moments exist (a fresh run has none yet)."""
        missing = sum(2 * p.nelement() * p.element_size() for optim in (self.G_optim, self.D_optim)
                      for group in optim.param_groups for p in group['params'] if p not in optim.state)
        return state_nbytes(self.state_dict()) + missing

    # -- inference views ---------------------------------------------------------------------------

    def translator(self, use_ema: bool = True) -> Translator:
        """The generators as a Translator (EMA copies when there are some and they are wanted)."""
        ema = use_ema and self.ema is not None
        nets = {d.name: self.ema[d.name].model if ema else self.G[d.name] for d in DIRECTIONS}
        autocast = self.autocast
        if ema and self.config.memory.ema_dtype == 'bf16' and self.config.performance.amp == 'off':
            autocast = lambda: utils.autocast('bf16', self.device.type)  # noqa: E731 - bf16 weights, fp32 inputs
        return Translator(nets, self.arch, self.device, autocast)

    def translate(self, images: torch.Tensor, direction: str, use_ema: bool = True) -> GeneratorOutput:
        """Translate a batch in [-1, 1] (eval mode, no autograd)."""
        return self.translator(use_ema).translate(images, direction)

    @torch.no_grad()
    def visual_columns(self, real: torch.Tensor, direction: Direction, use_ema: bool = True) -> list:
        """PT's 7 preview rows per image, plus the eroded face mask when segmentation is on."""
        columns = self.translator(use_ema).visual_columns(real, direction.name)
        if self.face_masking is not None:
            masks = self.face_masking.segmenter(real.to(self.device))
            for col, mask in zip(columns, masks.eroded):
                col.insert(7, images.tensor_to_uint8(mask.expand(3, -1, -1) * 2 - 1))
        return columns

    def scalars(self, step: int) -> dict[str, float]:
        """Learning rate, ρ statistics and ADA state, logged with the losses (a logging step: the
        host reads of these values are the interval's only ones)."""
        values = {'lr': self.lr_at(step)}
        for name, g in self.G.items():
            rhos = torch.cat([m.rho.detach().flatten() for m in g.modules() if hasattr(m, 'rho')])
            low, mean, high = torch.stack([rhos.min(), rhos.mean(), rhos.max()]).tolist()
            values.update({f'rho/{name}_mean': mean, f'rho/{name}_min': low, f'rho/{name}_max': high})
        for dom, ada in (self.ada or {}).items():
            values.update({f'ADA/p_{dom}': ada.p, f'ADA/rt_{dom}': ada.rt})
        return values

    # -- state (its format: checkpoints.py; the run's own keys: training_loop.py) ----------------------

    def pt_module(self, key: str) -> nn.Module:
        """The network stored under one of PT's checkpoint keys ('genA2B', 'disGA', ...)."""
        kind, *path = PT_KEYS[key]
        module = self.G if kind == 'G' else self.D
        for part in path:
            module = module[part]
        return module

    def state_dict(self) -> dict:
        """The whole training state as one ``weights_only``-loadable dict; PT's six keys first, so
        PT tools can read it."""
        state = {key: self.pt_module(key).state_dict() for key in PT_KEYS}
        if self.ema is not None:
            state.update({f'gen{name}_ema': ema.model.state_dict() for name, ema in self.ema.items()})
        state.update({
            'G_optim': low_memory.encode_optimizer_state(self.G_optim.state_dict()),
            'D_optim': low_memory.encode_optimizer_state(self.D_optim.state_dict()),
            'scaler': self.scaler.state_dict(), 'step': self.step, 'lr': self.lr_at(self.step),
            'rng': utils.rng_state(), 'architecture': self.arch.to_dict(), 'config': self.config.to_dict(),
            'format': TRAINING_FORMAT,
        })
        if self.ada is not None:
            state['ada'] = {dom: ada.state_dict() for dom, ada in self.ada.items()}
        return state

    def load_state_dict(self, state: dict, *, weights_only: bool = False) -> list[str]:
        """Restore a checkpoint (ours or PT's six-key format); returns notes for the user."""
        notes = []
        for key in PT_KEYS:
            if key not in state:
                raise UserError(f'checkpoint has no {key!r}: not a U-GAT-IT training checkpoint')
            notes += load_module(self.pt_module(key), state[key], key)
        if self.ema is not None:
            for name, ema in self.ema.items():
                ema.model.load_state_dict(state.get(f'gen{name}_ema', state[f'gen{name}']))
        if weights_only:
            return notes
        if 'G_optim' in state:
            low_memory.check_resume(state.get('config', {}), self.config.memory.optim_state)
            low_memory.load_optimizer_state(self.G_optim, low_memory.decode_optimizer_state(state['G_optim']))
            if notes:   # a new group head changed D's parameter list: its moments cannot be matched
                notes.append('discriminator optimizer moments start fresh (new group head)')
            else:
                low_memory.load_optimizer_state(self.D_optim, low_memory.decode_optimizer_state(state['D_optim']))
            if state.get('scaler'):   # an --amp off/bf16 run stores an empty (disabled) scaler: fp16 starts fresh
                self.scaler.load_state_dict(state['scaler'])
            utils.set_rng_state(state['rng'])
        else:
            notes.append('checkpoint without optimizer state (PT format or converted): optimizer moments start fresh')
        if self.ada is not None and 'ada' in state:
            for dom, ada in self.ada.items():
                ada.load_state_dict(state['ada'][dom])
        self.step = int(state.get('step', 0))
        if isinstance(self.run_device_step, step_capture.CapturedStep):
            self.run_device_step.reset()   # the optimizers' state tensors were replaced: capture again
        return notes


# ----------------------------------------------------------------------------------------------
# What the trainer builds besides the networks, each from its part of the config


def build_adam(params, config: Config, device: torch.device) -> torch.optim.Optimizer:
    """PT's Adam (β = 0.5, 0.999), fused on CUDA; --arch tf regularises with an L2 loss term instead of
    the coupled weight decay. --optim_state 8bit/4bit: torchao's Adam with low-bit moments (not exact).
    --cuda_graph: fused (on the CPU too, for the emulated graphs of the tests), capturable, the LR a tensor."""
    weights = config.losses
    weight_decay = 0.0 if weights.kernel_l2 else weights.weight_decay
    if config.memory.optim_state != 'fp32':
        return low_memory.low_bit_adam(params, config.memory.optim_state, config.schedule.lr, (0.5, 0.999),
                                       weight_decay)
    lr: float | torch.Tensor = config.schedule.lr
    fast = {'fused': True} if device.type == 'cuda' else {'foreach': True}
    if config.performance.cuda_graph:   # the LR schedule writes a device scalar the captured step reads
        lr = torch.tensor(lr, device=device)
        fast = {'fused': True, 'capturable': device.type == 'cuda'}
    return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999), weight_decay=weight_decay, **fast)


def build_regularisers(networks: dict[str, nn.Module], weights: LossWeights) -> dict[str, list[L.KernelL2]]:
    """TF's L2 loss term on each network's kernels (--arch tf), in place of Adam's weight decay."""
    return {name: [L.KernelL2(net, weights.weight_decay)] if weights.kernel_l2 else []
            for name, net in networks.items()}


def build_ema(G: nn.ModuleDict, config: Config) -> dict[str, utils.EMA] | None:
    options = config.ema
    if options is None:
        return None
    start = int(options.start * config.schedule.iterations)
    if config.memory.ema_dtype == 'bf16':   # not exact (low_memory.BF16EMA)
        return {d.name: low_memory.BF16EMA(G[d.name], options.beta, start, options.rampup,
                                           seed=data.derive_seed(config.run.seed, 'ema', d.name))
                for d in DIRECTIONS}
    decay_on_device = config.performance.cuda_graph   # the captured step reads the decay from a device scalar
    return {d.name: utils.EMA(G[d.name], options.beta, start, options.rampup, decay_on_device=decay_on_device)
            for d in DIRECTIONS}


def build_ada(config: Config, device: torch.device, world_size: int, threshold: float
              ) -> dict[str, augment.AdaController] | None:
    """One controller per domain; its kimg counts the images of every rank."""
    options = config.ada
    if options is None:
        return None
    everyone = dataclasses.replace(options, batch_size=options.batch_size * world_size)
    return augment.build_controllers(everyone, device, threshold=threshold)


def build_step_runner(cuda_graph: bool, dist: DistributedContext, device_step: step_capture.DeviceStep,
                      prepare: Callable[[dict], dict]) -> Callable[[dict, bool], dict[str, torch.Tensor]]:
    """How a loader batch reaches the device step: prepared and run eagerly, or (--cuda_graph) copied into
    static inputs of a step captured once per kind of step (step_capture.py)."""
    if not cuda_graph:
        return lambda batch, generator_step: device_step(prepare(batch), generator_step)
    backend = step_capture.backend_for(dist.device)
    if backend is None or dist.enabled:
        raise UserError('--cuda_graph needs one CUDA device per process and no torchrun (DDP)')
    return step_capture.CapturedStep(backend, device_step, prepare)


def volatile_tensors(networks: list[nn.Module], ada: dict[str, augment.AdaController] | None) -> list[torch.Tensor]:
    """What a step changes in place before its first optimizer update: spectral norm's u, v (the D step's
    power iteration) and ADA's running r_t sums."""
    return [*(b for net in networks for b in net.buffers()),
            *(t for controller in (ada or {}).values() for t in controller.running_tensors())]


def regularisation(terms: list[L.KernelL2], network: str, logs: dict) -> torch.Tensor | float:
    """The active L2 loss terms of 'G' or 'D' (TF's, under --arch tf), logged as '<network>/l2'."""
    total = 0.0
    for term in terms:
        value = term()
        logs[f'{network}/{term.name}'] = value.detach()
        total = total + value
    return total


def is_base_group_step(few_shot: FewShot, step: int) -> bool:
    """Selective backprop needs whole-batch groups; validation enforces round-robin sampling, whose group is
    a function of the step (read from the batch, it would cost a host sync per step)."""
    return data.round_robin_group(few_shot.groups, step) == few_shot.base_group


def selective_backprop_params(G: nn.ModuleDict) -> list[nn.Parameter]:
    """F2W's bottleneck: the encoder residual blocks of both generators."""
    return [p for g in G.values() for block in g.DownBlock if isinstance(block, ResnetBlock)
            for p in block.parameters()]



class StepUndo:
    """What a training step changes before its first optimizer update, kept so that an error there
    leaves the last completed step's state exactly: the global RNG states and a copy of the
    volatile tensors (one foreach copy into buffers made once, so no allocation per step)."""

    def __init__(self) -> None:
        self._rng: dict | None = None
        self._live: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []
        self.committed = False

    def begin(self, tensors: list[torch.Tensor]) -> None:
        if len(tensors) != len(self._saved) or any(a is not b for a, b in zip(tensors, self._live)):
            self._saved = [torch.empty_like(t) for t in tensors]
        self._live = tensors
        with torch.no_grad():
            if tensors:
                torch._foreach_copy_(self._saved, tensors)
        self._rng = utils.rng_state()
        self.committed = False

    def commit(self) -> None:
        self.committed = True

    def end(self) -> None:
        self._rng = None

    def restore(self) -> bool:
        """Undo the step in progress (True), or say it cannot be undone (False); True between steps."""
        if self._rng is None:
            return True
        if self.committed:
            return False
        with torch.no_grad():
            if self._live:
                torch._foreach_copy_(self._live, self._saved)
        utils.set_rng_state(self._rng)
        self._rng = None
        return True

