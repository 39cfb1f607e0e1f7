"""The typed, frozen run configuration: what ``options.validate`` returns and every phase reads.

The flags (``options.py``) are what the user typed; a :class:`Config` is what they mean once every
cross-flag rule has run: TF's ``--epoch E --iteration N`` is ``schedule.iterations == E·N`` with
``schedule.steps_per_epoch == N``, ``--n_dis`` has become the two discriminator depths, a face loss
has switched face masking on. Each component takes its own part (the architecture, the schedule,
the loss weights, EMA, ADA, the data stream, the optional generator terms, face masking, the run's
files, speed options, the inference phases), as ``model.ArchConfig`` already was, so no component
reads a raw flag. ``values`` keeps the resolved flags as plain values: checkpoints record them
(``'config'``) and model cards and PT-format loading read them back.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import utils
from augment import AdaOptions
from dataset import StreamOptions
from faceseg.masking import FaceMaskOptions
from losses import GeneratorTermOptions
from model import DIRECTIONS, ArchConfig


@dataclass(frozen=True)
class Schedule:
    """How long the run is and the learning rate of each step (PT's per-step or TF's per-epoch decay)."""

    iterations: int                     # total steps (TF: epoch · steps_per_epoch)
    lr: float = 1e-4
    decay: bool = True
    epoch: int | None = None            # TF's schedule when set
    steps_per_epoch: int | None = None
    decay_epoch: int | None = None
    n_critic: int = 1
    batch_size: int = 1                 # images per domain per step and process

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step``, a pure function of it (so a resumed run matches)."""
        if not self.decay:
            return self.lr
        if self.epoch is None:
            return pt_lr(step, self.lr, self.iterations)
        return tf_epoch_lr(step, self.lr, self.epoch, self.steps_per_epoch, self.decay_epoch)

    def is_generator_step(self, step: int) -> bool:
        """TF's --n_critic rule: G is updated on steps 1, 1 + n_critic, 1 + 2·n_critic, ..."""
        return (step - 1) % self.n_critic == 0


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


@dataclass(frozen=True)
class LossWeights:
    """The adversarial objective and the weights of U-GAT-IT's own loss terms."""

    gan_type: str = 'lsgan'
    GP_ld: float = 10.0
    adv_weight: float = 1.0
    forward_adv_weight: float = 1.0     # A→B: G_AB and the B critics
    backward_adv_weight: float = 1.0    # B→A: G_BA and the A critics
    cycle_weight: float = 10.0
    identity_weight: float = 10.0
    cam_weight: float = 1000.0
    cam_D_weight: float = 1.0
    weight_decay: float = 1e-4
    kernel_l2: bool = False             # --arch tf: TF's L2 loss term on kernels instead of Adam's decay

    def adversarial(self) -> dict[str, float]:
        """The adversarial weight of each direction."""
        factor = {'A2B': self.forward_adv_weight, 'B2A': self.backward_adv_weight}
        return {d.name: self.adv_weight * factor[d.name] for d in DIRECTIONS}


@dataclass(frozen=True)
class EmaOptions:
    """EMA copies of the generators (``utils.EMA``)."""

    beta: float = 0.9999
    start: float = 0.5                  # fraction of the run before which the copy follows the weights
    rampup: float = 0.05


@dataclass(frozen=True)
class MemoryOptions:
    """Lower-precision training state for small GPUs (``low_memory.py``). Not exact; the defaults are."""

    optim_state: str = 'fp32'           # Adam moments of tensors >= 4096 values: fp32, 8bit or 4bit (torchao)
    ema_dtype: str = 'fp32'             # EMA copies: fp32, or bf16 with stochastically rounded updates

    @property
    def exact(self) -> bool:
        return self.optim_state == 'fp32' and self.ema_dtype == 'fp32'


@dataclass(frozen=True)
class FewShot:
    """F2W's groups: the few-shot sub-folders and selective backprop of the generator bottleneck."""

    groups: tuple[int, ...] | None = None
    selective_backprop: bool = False
    base_group: int = 0


@dataclass(frozen=True)
class Performance:
    """Where and how fast the step runs; none of it changes what is computed (beyond precision)."""

    device: str = 'cpu'
    amp: str = 'off'
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = 'default'       # torch.compile's mode ('reduce-overhead': CUDA graphs)
    benchmark_flag: bool = False
    stack_batches: bool = True
    early_updates: bool = True          # exact: see step_memory.EarlyUpdates
    recompute: bool | str = False       # exact, slower: see step_memory.Recomputed; 'auto' until start-up
    memory_check: bool = True           # CUDA: the estimated peak against the card at start-up
    cuda_graph: bool = False            # the whole step captured as a CUDA graph: see step_capture.py


@dataclass(frozen=True)
class RunOptions:
    """The run's folder and what it writes there, and when."""

    phase: str = 'train'
    dataset: str = 'selfie2anime'
    dataset_name: str = 'selfie2anime'
    result_dir: str = 'results'
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    print_freq: int = 1000
    log_freq: int = 100
    save_freq: int = 100000
    latest_freq: int = 1000
    keep_checkpoints: int = 0
    metric_freq: int = 0
    fid_batch: int = 50
    inception_weights: str | None = None
    num_workers: int = 0


@dataclass(frozen=True)
class InferenceOptions:
    """The translating phases' own flags (test, val, img_dir, generate, video, video_dir, camera)."""

    checkpoint: str | None = None
    no_ema: bool = False
    img_dir: str | None = None
    direction: str = 'A2B'
    out_dir: str | None = None
    video_path: str | None = None
    camera_id: int = 0
    crop: str = 'none'
    align_faces: bool = False
    keep_size: bool = False
    max_size: int = 0


@dataclass(frozen=True)
class Config:
    """One run, validated: a typed part per component, plus the resolved flags as plain values."""

    run: RunOptions
    arch: ArchConfig
    schedule: Schedule
    losses: LossWeights
    ema: EmaOptions | None               # None: no EMA copies
    ada: AdaOptions | None               # None: no ADA; batch_size is per process
    data: StreamOptions
    generator_terms: GeneratorTermOptions
    face_masks: FaceMaskOptions | None   # None: no face parsing in the step
    few_shot: FewShot
    performance: Performance
    inference: InferenceOptions
    memory: MemoryOptions
    values: Mapping = dataclasses.field(default_factory=dict, compare=False)   # resolved flags (read-only)
    explicit: frozenset[str] = frozenset()                                     # flags given on the command line

    @classmethod
    def from_values(cls, values: Mapping, explicit: frozenset[str] = frozenset()) -> Config:
        """From resolved flag values (``options.validate``'s, or a checkpoint's ``'config'``)."""
        v = dict(values)
        groups = tuple(v['groups']) if v.get('groups') else None
        return cls(
            run=_part(RunOptions, v),
            arch=ArchConfig.from_dict(v),
            schedule=Schedule(iterations=v['iteration'], lr=v['lr'], decay=v['decay_flag'], epoch=v.get('epoch'),
                              steps_per_epoch=v.get('steps_per_epoch'), decay_epoch=v.get('decay_epoch'),
                              n_critic=v['n_critic'], batch_size=v['batch_size']),
            losses=_part(LossWeights, v, kernel_l2=v['arch'] == 'tf'),
            ema=EmaOptions(v['ema_beta'], v['ema_start'], v['ema_rampup']) if v['ema'] else None,
            ada=AdaOptions(pipeline=v['ada_pipeline'], p=v['ada_p'], target=v['ada_target'],
                           interval=v['ada_interval'], kimg=v['ada_kimg'], batch_size=v['batch_size'])
            if v['ada'] else None,
            data=_part(StreamOptions, v, groups=list(groups) if groups else None, blur=v['has_blur']),
            generator_terms=_part(GeneratorTermOptions, v, group_loss=v['use_grouploss']),
            face_masks=FaceMaskOptions(
                weights=v['faceseg_weights'], hard_edge=v['hard_seg_edge'], fix_glass_mouth=v['seg_fix_glass_mouth'],
                patch_mask=v['seg_D_mask'], cam_feature_mask=v['seg_D_cam_fea_mask'],
                cam_input_mask=v['seg_D_cam_inp_mask'], detach_background=v['seg_G_detach'])
            if v.get('use_faceseg') else None,
            few_shot=FewShot(groups=groups, selective_backprop=v['selective_backprop'], base_group=v['base_group']),
            performance=_part(Performance, v),
            inference=_part(InferenceOptions, v),
            memory=_part(MemoryOptions, v),   # a checkpoint from before these flags: the fp32 defaults
            values=MappingProxyType(v),
            explicit=frozenset(explicit),
        )

    def to_dict(self) -> dict:
        """The resolved flags as plain JSON values (what a checkpoint records as ``'config'``)."""
        return utils.config_to_dict(self.values)

    @property
    def iterations(self) -> int:
        return self.schedule.iterations


def _part(cls: type, values: Mapping, **overrides):
    """One typed part from the resolved values sharing its field names (``overrides`` for the rest)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: values[k] for k in names if k in values}, **overrides})
