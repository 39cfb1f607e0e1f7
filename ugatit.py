"""The U-GAT-IT trainer: builds the networks once, runs the training step, and the training loop.

The step (SPEC A3) computes every generator output once, updates the discriminators on detached
fakes, then the generators on the same outputs. A→B and B→A share one code path: each direction is
a small record, networks live in ``nn.ModuleDict``s, and losses are logged as ``'G/adv_A2B'``.
Optional features (EMA, ADA, face segmentation, extra loss terms, metrics) are objects that are
``None`` or absent when off, so the step itself has no per-feature branches.

Device rule (CUDA is where every user trains): everything read from disk lands on the CPU
(memory-mapped where possible) and only what a phase needs is copied to the device
(``load_state_dict`` copies; RNG states are restored as the CPU tensors ``torch.set_rng_state`` and
``torch.cuda.set_rng_state_all`` take, recorded per device); nothing in the step builds device
tensors from Python data or reads a device value back (``.item()``, ``float()``, ``int()``): losses
stay tensors until the logging step's single copy. Under fp16 one ``GradScaler.update()`` follows
each iteration's optimizer steps, and the gradient penalty differentiates the scaled output.

Building the networks from a config and inference live in ``model.py``, a run's files in
``checkpoints.py``, TensorBoard/PNG output in ``monitor.py`` and FID/KID in ``metrics/``.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import augment
import checkpoints
import dataset as data
import losses as L
import options
import utils
from checkpoints import PT_KEYS, TRAINING_FORMAT, RunFiles
from faceseg.masking import NO_MASKS, FaceMasks, build_face_masking
from model import DIRECTIONS, ArchConfig, Direction, Translator, build_critic, build_generator
from networks import DiscriminatorOutput, GeneratorOutput, RhoClipper


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
    """U-GAT-IT training and resumption (inference: ``model.load_translator``)."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.dist = utils.DistributedContext(cfg.device)
        self.device = self.dist.device
        self.dataset_root = data.resolve_dataset_root(cfg.dataset)
        self.files = RunFiles(cfg.result_dir, cfg.dataset_name)
        self.run_dir = self.files.run_dir
        self.step = 0
        self.best_metric = math.inf
        self.data_files: dict | None = None   # the training file lists (see dataset.build_train_stream)
        self.last_saved: Path | None = None
        if self.device.type == 'cuda':
            torch.backends.cudnn.benchmark = cfg.benchmark_flag
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        utils.seed_everything(cfg.seed)
        self.arch = ArchConfig.from_flags(cfg)
        self.G = nn.ModuleDict({d.name: build_generator(self.arch) for d in DIRECTIONS}).to(self.device)
        self.D = nn.ModuleDict({dom: build_critic(self.arch, dom) for dom in 'AB'}).to(self.device)
        torch.manual_seed(cfg.seed + self.dist.rank)   # same weights everywhere, own augmentation draws
        if cfg.channels_last:
            self.G.to(memory_format=torch.channels_last)
            self.D.to(memory_format=torch.channels_last)
        self.G_optim = self._adam(self.G.parameters())
        self.D_optim = self._adam(self.D.parameters())
        self.regularisers = self._build_regularisers()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == 'fp16')
        self.rho_clipper = RhoClipper(0, 1)
        objective, penalty = L.gan_objective(cfg.gan_type, cfg.GP_ld)
        self.gan_loss = L.GANLoss(cam_weight=cfg.cam_D_weight, objective=objective, penalty=penalty)
        self.adv_weight = {'A2B': cfg.adv_weight * cfg.forward_adv_weight,
                           'B2A': cfg.adv_weight * cfg.backward_adv_weight}
        self.ema = self._build_ema()
        self.ada = augment.build_controllers(options.ada_options(cfg, self.dist.world_size), self.device,
                                             threshold=self.gan_loss.threshold) if cfg.ada else None
        # ADA's and the gradient penalty's draws come from their own generators, reseeded from (seed, rank,
        # step) every step, so a resumed run draws exactly as an unbroken one (DataLoader start-up also
        # draws globally).
        self.step_rngs = {name: torch.Generator(device=self.device) for name, wanted in
                          (('ada', self.ada is not None), ('penalty', penalty is not None)) if wanted}
        self.ada_rng = self.step_rngs.get('ada')
        self.face_masking = build_face_masking(options.face_mask_options(cfg), self.device) \
            if cfg.use_faceseg else None
        self.g_terms = L.build_generator_terms(options.generator_term_options(cfg), self.device)
        self.frozen_on_other_groups = self._selective_backprop_params()
        self.G_run, self.D_run, self.D_local = utils.wrap_for_speed(
            self.G, self.D, self.dist, cfg.compile,
            untrained=utils.untrainable_parameters(self.D, cfg.cam_D_weight, self.regularisers['D']))

    # -- construction helpers --------------------------------------------------------------------

    def _adam(self, params) -> torch.optim.Adam:
        fast = {'fused': True} if self.device.type == 'cuda' else {'foreach': True}
        weight_decay = 0.0 if uses_kernel_l2(self.cfg) else self.cfg.weight_decay
        return torch.optim.Adam(params, lr=self.cfg.lr, betas=(0.5, 0.999), weight_decay=weight_decay, **fast)

    def _build_regularisers(self) -> dict[str, list[L.KernelL2]]:
        """TF's L2 loss term on each network's kernels (--arch tf), in place of Adam's weight decay."""
        if not uses_kernel_l2(self.cfg):
            return {'G': [], 'D': []}
        return {'G': [L.KernelL2(self.G, self.cfg.weight_decay)], 'D': [L.KernelL2(self.D, self.cfg.weight_decay)]}

    def _build_ema(self) -> dict[str, utils.EMA] | None:
        if not self.cfg.ema:
            return None
        start = int(self.cfg.ema_start * self.cfg.iteration)
        return {d.name: utils.EMA(self.G[d.name], self.cfg.ema_beta, start, self.cfg.ema_rampup) for d in DIRECTIONS}

    def _selective_backprop_params(self) -> list[nn.Parameter]:
        """F2W's bottleneck: the encoder residual blocks of both generators."""
        if not self.cfg.selective_backprop:
            return []
        from networks import ResnetBlock
        return [p for g in self.G.values() for block in g.DownBlock if isinstance(block, ResnetBlock)
                for p in block.parameters()]

    # -- schedule ----------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step``, a pure function of it (so a resumed run matches)."""
        cfg = self.cfg
        if not cfg.decay_flag:
            return cfg.lr
        if cfg.epoch is None:
            return pt_lr(step, cfg.lr, cfg.iteration)
        return tf_epoch_lr(step, cfg.lr, cfg.epoch, cfg.steps_per_epoch, cfg.decay_epoch)

    def is_generator_step(self, step: int) -> bool:
        """TF's --n_critic rule: G is updated on steps 1, 1 + n_critic, 1 + 2·n_critic, ..."""
        return (step - 1) % self.cfg.n_critic == 0

    def _set_lr(self, lr: float) -> None:
        for optim in (self.G_optim, self.D_optim):
            for group in optim.param_groups:
                group['lr'] = lr

    # -- the training step -----------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        return utils.autocast(self.cfg.amp, self.device.type)

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
        if self.cfg.stack_batches:
            images = [torch.cat(images)]
            extras = [{k: torch.cat([e[k] for e in extras]) for k in extras[0]}]
        if self.ada is not None:
            images = [self.ada[domain].pipe(x, generator=self.ada_rng) for x in images]
        per_input = [[] for _ in images]
        for scale in ('G', 'L'):
            for i, (x, extra) in enumerate(zip(images, extras)):
                nets[scale].train(update_sn and i == 0)
                per_input[i].append(nets[scale](x, **extra))
        if not self.cfg.stack_batches:
            return per_input
        by_scale = [_split(out, sizes) for out in per_input[0]]
        return [list(outs) for outs in zip(*by_scale)]

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """One full iteration; returns detached loss tensors (no host sync)."""
        batch = self._prepare(batch)
        self._set_lr(self.lr_at(step))
        for name, rng in self.step_rngs.items():
            rng.manual_seed(data.derive_seed(self.cfg.seed, name, self.dist.rank, step))
        masks = self.face_masking(batch) if self.face_masking is not None else NO_MASKS
        self.G.train()
        generator_step = self.is_generator_step(step)
        with self.autocast():
            translations = self.generate(batch) if generator_step else None
            fakes = self.fakes(batch, translations)
        logs: dict[str, torch.Tensor] = {}
        self.d_step(batch, fakes, masks, logs)
        if generator_step:
            self.g_step(batch, translations, masks, logs, step)
        self.scaler.update()   # once per iteration, after every optimizer step (AMP's multi-optimizer recipe)
        self.after_step(step, generator_step)
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
                group = self.cfg.adv_weight * L.group_classification_loss(real, batch[f'group_{tgt}'])
                logs[f'D/group_{tgt}'] = group.detach()
                loss = loss + group
            logs[f'D/adv_{tgt}'] = loss.detach()
            logs[f'D/real_acc_{tgt}'] = (real[0].logit.detach() > self.gan_loss.threshold).float().mean()  # global D
            if self.ada is not None:
                self.ada[tgt].observe(real[0].logit.detach())
            total = total + loss
        total = total + self._regularisation('D', logs)
        logs['D/total'] = total.detach()
        self.scaler.scale(total).backward()
        self.scaler.step(self.D_optim)

    def g_step(self, batch, translations, masks: FaceMasks, logs, step: int) -> None:
        """Generators: adversarial, cycle, identity and CAM terms plus the active optional terms."""
        cfg = self.cfg
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
                'cycle': cfg.cycle_weight * L.l1(out.cycle, batch[src]),
                'identity': cfg.identity_weight * L.l1(out.identity.image, batch[tgt]),
                'cam': cfg.cam_weight * L.generator_cam_loss(out.fake.cam_logit, out.identity.cam_logit),
            }
            ctx = L.DirectionContext(d.name, batch[src], batch[tgt], out.fake, critic,
                                     masks.of(src), batch.get(f'group_{src}'))
            for term in self.g_terms:
                terms[term.name] = term.weight * term(ctx)
            for name, value in terms.items():
                logs[f'G/{name}_{d.name}'] = value.detach()
            total = total + sum(terms.values())
        total = total + self._regularisation('G', logs)
        logs['G/total'] = total.detach()
        self.scaler.scale(total).backward()
        if self.frozen_on_other_groups and not self._is_base_group_step(step):
            for p in self.frozen_on_other_groups:
                p.grad = None   # Adam skips params without grad: no moment or weight-decay update
        self.scaler.step(self.G_optim)

    def _gradient_penalty(self, domain: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """--gan_type wgan-gp/wgan-lp/dragan: the penalty of both critics of ``domain``. The raw
        networks run without a power iteration (once per step is the D step's), ADA or masks
        (validation rules the D masks out; ADA's warps have no double backward)."""
        critics = [self.D[domain][scale].train(False) for scale in ('G', 'L')]
        # The scaler's scale as a device tensor (1 when it is off): no host sync.
        scale = self.scaler.scale(torch.ones((), device=real.device))
        with self.autocast():
            return self.gan_loss.gradient_penalty(critics, real, fake, self.step_rngs['penalty'], scale)

    def _regularisation(self, network: str, logs: dict) -> torch.Tensor | float:
        """The active L2 loss terms of 'G' or 'D' (TF's, under --arch tf), logged as '<network>/l2'."""
        total = 0.0
        for term in self.regularisers[network]:
            value = term()
            logs[f'{network}/{term.name}'] = value.detach()
            total = total + value
        return total

    def _is_base_group_step(self, step: int) -> bool:
        # Selective backprop needs whole-batch groups; validation enforces round-robin sampling, whose
        # group is a function of the step (read from the batch, it would cost a host sync per step).
        return data.round_robin_group(self.cfg.groups, step) == self.cfg.base_group

    @torch.no_grad()
    def after_step(self, step: int, generator_updated: bool = True) -> None:
        """ρ clipping and EMA (after a G update only), and ADA's strength update."""
        if generator_updated:
            self.G.apply(self.rho_clipper)
        if self.ema is not None and generator_updated:
            for name, ema in self.ema.items():
                ema.update(self.G[name], step)
        if self.ada is not None:
            for controller in self.ada.values():
                controller.step()
        self.step = step

    # -- inference views ---------------------------------------------------------------------------

    def translator(self, use_ema: bool = True) -> Translator:
        """The generators as a Translator (EMA copies when there are some and they are wanted)."""
        nets = {d.name: self.ema[d.name].model if use_ema and self.ema is not None else self.G[d.name]
                for d in DIRECTIONS}
        return Translator(nets, self.arch, self.device, self.autocast)

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
                col.insert(7, utils.tensor_to_uint8(mask.expand(3, -1, -1) * 2 - 1))
        return columns

    # -- state (the format and the run's files: checkpoints.py) ---------------------------------------

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
            'G_optim': self.G_optim.state_dict(), 'D_optim': self.D_optim.state_dict(),
            'scaler': self.scaler.state_dict(), 'step': self.step, 'lr': self.lr_at(self.step),
            'best_metric': self.best_metric, 'rng': utils.rng_state(), 'architecture': self.arch.to_dict(),
            'data_files': self.data_files,
            'config': {**utils.config_to_dict(self.cfg), 'dataset_root': str(self.dataset_root)},
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
                raise utils.UserError(f'checkpoint has no {key!r}: not a U-GAT-IT training checkpoint')
            notes += checkpoints.load_module(self.pt_module(key), state[key], key)
        if self.ema is not None:
            for name, ema in self.ema.items():
                ema.model.load_state_dict(state.get(f'gen{name}_ema', state[f'gen{name}']))
        if weights_only:
            return notes
        if 'G_optim' in state:
            self.G_optim.load_state_dict(state['G_optim'])
            if notes:   # a new group head changed D's parameter list: its moments cannot be matched
                notes.append('discriminator optimizer moments start fresh (new group head)')
            else:
                self.D_optim.load_state_dict(state['D_optim'])
            if state.get('scaler'):   # an --amp off/bf16 run stores an empty (disabled) scaler: fp16 starts fresh
                self.scaler.load_state_dict(state['scaler'])
            utils.set_rng_state(state['rng'])
        else:
            notes.append('checkpoint without optimizer state (PT format or converted): optimizer moments start fresh')
        if self.ada is not None and 'ada' in state:
            for dom, ada in self.ada.items():
                ada.load_state_dict(state['ada'][dom])
        self.best_metric = state.get('best_metric', float('inf'))
        self.step = int(state.get('step', 0))
        self.data_files = state.get('data_files')
        return notes

    def save(self, path: Path) -> None:
        """Atomically write the whole training state (rank 0 only)."""
        if self.dist.is_main:
            utils.atomic_save(self.state_dict(), path)
            self.last_saved = path

    def log(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message, file=sys.stderr)

    # -- training loop -----------------------------------------------------------------------------

    def train(self) -> None:
        """Train from scratch or resume; periodic logs, previews, metrics and checkpoints.

        The run folder is locked for the run's lifetime (one training process per folder).
        Everything the run will need (metric network, preview images, disk space for a checkpoint) is
        checked before the first step, and an error after it first writes a checkpoint (a NaN stop
        keeps the last good one; a full disk is not written to again).
        """
        with self.files.lock() if self.dist.is_main else contextlib.nullcontext():
            self._train()

    def _train(self) -> None:
        cfg = self.cfg
        for path in self.files.remove_leftovers() if self.dist.is_main else []:
            self.log(f'removed {path}, a partial checkpoint of a process that died while writing it')
        start = self._start_step()
        if start > cfg.iteration:
            self.log(f'already trained for {cfg.iteration} iterations; nothing to do')
            return
        self._check_disk_space()
        evaluation = self._build_evaluation()
        monitor = self._build_monitor()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            config = {**utils.config_to_dict(cfg), 'dataset_root': str(self.dataset_root)}
            self.files.config_path.write_text(json.dumps(config, indent=2))
        stream = self._train_stream(start)
        stop = utils.GracefulStop()
        try:
            self._loop(start, stream, monitor, evaluation, stop)
        except (TrainingDiverged, KeyboardInterrupt, utils.Stopped, utils.DiskFull):
            raise
        except Exception:
            if self.step >= start:
                self._save_after_error()
            raise
        finally:
            stop.restore()
            if monitor is not None:
                monitor.close()
        if self.last_saved is not None:
            self.log(f'final checkpoint: {self.last_saved}')

    def _start_step(self) -> int:
        """1 for a fresh run (never mixed with an old one), step + 1 after resuming."""
        if self.cfg.resume:
            found = checkpoints.checkpoint_to_resume(self.files, self.dataset_root, self.arch)
            if found is None:
                self.log(f'no checkpoint in {self.files.model_dir}: starting from scratch')
                return 1
            for note in self.load_state_dict(found.state):
                self.log(f'note: {note}')
            self.step = found.step
            self.log(f'resumed from {found.path} at step {self.step}')
            return self.step + 1
        if self.dist.is_main:
            archive = checkpoints.clear_for_fresh_run(self.files, self.cfg.overwrite)
            if archive is not None:
                self.log(f'--overwrite: moved the earlier run to {archive}')
        self.dist.barrier()
        return 1

    def _save_after_error(self) -> None:
        try:
            self.save(self.files.checkpoint_path(self.step))
        except utils.DiskFull as full:
            self.log(f'could not save after the error: {full}')
            return
        self.log(f'error at step {self.step + 1}; saved {self.last_saved}: fix the cause and resume with '
                 f'--resume True')

    def _check_disk_space(self) -> None:
        """Refuse to start when not even one checkpoint fits on the disk; warn when two do not."""
        if not self.dist.is_main:
            return
        needed = utils.state_nbytes(self.state_dict())
        free = utils.free_bytes(self.files.model_dir)
        where = f'{self.files.model_dir}: {utils.human_size(free)} free, a checkpoint needs {utils.human_size(needed)}'
        if free < needed:
            raise utils.DiskFull(f'no room for a single checkpoint in {where}; free some space or use another '
                                 f'--result_dir')
        if free < 2 * needed:
            self.log(f'warning: room for only one more checkpoint in {where}')

    def _build_monitor(self):
        if not self.dist.is_main:
            return None
        from monitor import TrainingMonitor
        return TrainingMonitor(self.run_dir, self.dataset_root, self.cfg.img_size)

    def _build_evaluation(self):
        """The FID/KID evaluator when --metric_freq is set (built now: start-up fails, not step 10k)."""
        cfg = self.cfg
        if not cfg.metric_freq or not self.dist.is_main:
            return None
        from metrics.training import TranslationMetrics
        return TranslationMetrics(self.dataset_root, cfg.img_size, cfg.inception_weights, self.device,
                                  batch_size=cfg.fid_batch, cache_dir=self.run_dir / 'metric_cache',
                                  groups=cfg.groups, num_workers=cfg.num_workers)

    def _loop(self, start: int, stream, monitor, evaluation, stop: utils.GracefulStop) -> None:
        cfg = self.cfg
        bar = tqdm(range(start, cfg.iteration + 1), initial=start - 1, total=cfg.iteration,
                   disable=not self.dist.is_main, dynamic_ncols=True, desc='train')
        meter = utils.LossMeter(skip_nonfinite=self.scaler.is_enabled())
        for step in bar:
            meter.add(self.train_step(next(stream), step))
            log_step = step % cfg.log_freq == 0 or step == cfg.iteration
            signum = self._agreed_stop(stop, log_step)
            if log_step or signum:
                self._flush(meter, monitor, bar, step)
            if monitor is not None and step % cfg.print_freq == 0:
                monitor.previews(step, self.visual_columns, ema=self.ema is not None)
            if cfg.metric_freq and step % cfg.metric_freq == 0:
                self._evaluate(evaluation, monitor, step)
            self._periodic_saves(step, meter, monitor, bar)
            if signum:
                self.save(self.files.checkpoint_path(step))
                raise utils.Stopped(f'stopped by signal at step {step}; {signal.Signals(signum).name}: saved '
                                    f'{self.last_saved}, resume with --resume True', utils.stop_exit_code(signum))

    def _agreed_stop(self, stop: utils.GracefulStop, log_step: bool) -> int:
        """The stop signal (0: go on). One process stops on the step after the signal. Under torchrun
        the ranks must stop at the same step (a rank that trains on alone waits forever in its
        all-reduce), so they agree at logging steps, which already sync with the host."""
        if not self.dist.enabled:
            return stop.signum or 0
        if not log_step:
            return 0
        flag = torch.tensor([float(stop.signum or 0)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

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

    def _evaluate(self, evaluation, monitor, step: int) -> None:
        """FID/KID of the raw and EMA generators (rank 0), logged; the checkpoint with the best mean FID
        of the generators inference uses is kept as the best one."""
        if self.dist.is_main:
            variants = (False, True) if self.ema is not None else (False,)
            results, record = evaluation.evaluate({'_ema' if e else '': self.translator(e) for e in variants})
            monitor.metrics(step, results, record)
            suffix = '_ema' if self.ema is not None else ''
            score = sum(results[f'FID/{d.name}{suffix}'] for d in DIRECTIONS) / len(DIRECTIONS)
            if score < self.best_metric:
                self.best_metric = score
                self.save(self.files.best_path)
                self.log(f'step {step}: new best mean FID {score:.3f} -> {self.files.best_path}')
        self.dist.barrier()

    def _train_stream(self, start: int) -> data.TrainStream:
        """The batches from step ``start`` on; a resumed run keeps the file lists it started with
        (a file deleted since is then replaced like an unreadable one, and the draws stay exact)."""
        listing = {'groups': self.cfg.groups, 'paired': self.cfg.paired}
        started = self.data_files
        same_listing = started is not None and all(started.get(k) == v for k, v in listing.items())
        stream = data.train_stream(self.dataset_root, options.stream_options(self.cfg), start, self.dist,
                                   pin_memory=self.device.type == 'cuda',
                                   files=started['files'] if same_listing else None)
        self.data_files = {**listing, 'files': stream.files}
        return stream

    def _flush(self, meter: utils.LossMeter, monitor, bar, step: int) -> None:
        means = meter.flush()
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        kept = f'training stopped and the last good checkpoint kept ({self.last_saved or "none yet"})'
        if bad:
            raise TrainingDiverged(f'{bad[0]} became {means[bad[0]]} by step {step}; {kept}. Try a lower --lr or '
                                   f'--amp off')
        if meter.nonfinite_streak > MAX_SKIPPED_STEPS:
            raise TrainingDiverged(f'the losses were not finite for the last {meter.nonfinite_streak} steps (fp16: the '
                                   f'GradScaler skipped them all) by step {step}; {kept}. Try a lower --lr or --amp '
                                   f'bf16')
        if monitor is not None and means:
            monitor.scalars(step, {**means, **self.scalars(step)})
            bar.set_postfix({'D': f"{means.get('D/total', 0):.3f}", 'G': f"{means.get('G/total', 0):.3f}"})

    def _periodic_saves(self, step: int, meter: utils.LossMeter, monitor, bar) -> None:
        cfg = self.cfg
        targets = []
        if step % cfg.save_freq == 0 or step == cfg.iteration:
            targets.append(self.files.checkpoint_path(step))
        if cfg.latest_freq and step % cfg.latest_freq == 0:
            targets.append(self.files.latest_path)
        if not targets:
            return
        self._flush(meter, monitor, bar, step)   # never write weights after a NaN
        for path in reversed(targets):   # the periodic checkpoint last: it is the one named at the end
            self.save(path)
        if self.dist.is_main:
            for path in self.files.prune(cfg.keep_checkpoints):
                self.log(f'deleted {path.name} (--keep_checkpoints {cfg.keep_checkpoints})')

def uses_kernel_l2(cfg) -> bool:
    """--arch tf regularises as TF does: an L2 loss term on kernels instead of Adam's weight decay."""
    return cfg.arch == 'tf'


def pt_lr(step: int, lr: float, iterations: int) -> float:
    """PT's decay: constant for the first half, then linear to 0 at the last step."""
    half = iterations // 2
    if step <= half:
        return lr
    return lr * max(0.0, 1.0 - (step - half) / (iterations - half))


def tf_epoch_lr(step: int, lr: float, epochs: int, steps_per_epoch: int, decay_epoch: int) -> float:
    """TF's decay (--epoch): in epoch e = (step − 1) // steps_per_epoch (from 0), lr for
    e < decay_epoch, then lr·(epochs − e)/(epochs − decay_epoch), constant within the epoch."""
    epoch = (step - 1) // steps_per_epoch
    if epoch < decay_epoch:
        return lr
    return lr * max(0.0, (epochs - epoch) / (epochs - decay_epoch))


# fp16: steps in a row whose scaled gradients may overflow (the GradScaler skips them and halves its
# scale) before the run counts as diverged; 2^16 → 2^-16 takes 32 halvings.
MAX_SKIPPED_STEPS = 64


class TrainingDiverged(utils.UserError):
    """A loss became NaN or infinite."""

