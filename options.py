"""The flags of main.py in groups, their validation, and the model flags other entry points share.

Every flag of the official PyTorch code keeps its name, default and meaning, so a PT command line
works unchanged; the extension flags keep the reference forks' names (SPEC A2). Its own module so
that demo.py and scripts/ read the architecture flags without importing the entry point.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import errors
import hub
import low_memory
import presets
from config import Config
from losses import GAN_TYPES, PENALTY_GAN_TYPES
from model import ArchConfig
from networks import min_image_size


def str2bool(value: str | bool) -> bool:
    """PT's boolean flags, without its substring bug: only the usual spellings are accepted."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ('true', '1', 'yes', 'y', 'on'):
        return True
    if lowered in ('false', '0', 'no', 'n', 'off'):
        return False
    raise ValueError(f'expected a boolean (True/False/1/0/yes/no), got {value!r}')


COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
TF_ITERATIONS_PER_EPOCH = 10000   # TF's --iteration default (its --epoch 100 makes PT's 1M steps)
PHASES = ('train', 'test', 'val', 'img_dir', 'generate', 'video', 'video_dir', 'camera')


def _light(value: str) -> int | bool:
    """PT's boolean ``--light`` or EN's integer pool size (-1/0 = full model)."""
    try:
        return str2bool(value)
    except ValueError:
        pass
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected True/False or an integer pool size, got {value!r}') from None


def _bool(value: str) -> bool:
    try:
        return str2bool(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _auto_or_bool(value: str) -> bool | str:
    return 'auto' if value.lower() == 'auto' else _bool(value)


def _groups(value: str) -> list[int]:
    try:
        groups = sorted({int(v) for v in value.split(',') if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated integers such as 0,1,2,3, got {value!r}') from None
    if not groups or min(groups) < 0:
        raise argparse.ArgumentTypeError(f'groups must be non-negative integers, got {value!r}')
    return groups


# The bare form of these flags switched the feature OFF in enhanced-U-GAT-IT (store_false) but
# means on everywhere here; taking either meaning silently would mis-run somebody's command line.
BARE = object()   # not a string: argparse would pass a string const through ``type``


def _flag(group, name: str, default: bool, help: str, *aliases: str, bare: bool = True) -> None:
    """A boolean that accepts ``--name``, ``--name True`` and ``--name False`` (PT style); with
    ``bare=False`` the value is required (validate() says why)."""
    group.add_argument(name, *aliases, type=_bool, nargs='?', const=True if bare else BARE, default=default,
                       metavar='BOOL', help=help)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every flag's help; the epilog (presets, torchrun) keeps its line breaks."""


class _Parser(argparse.ArgumentParser):
    """Bad flags give one line (what is wrong, where to look) and exit code 2, no usage dump."""

    def error(self, message: str) -> None:
        self.exit(2, f'error: {message} (see python main.py --help)\n')


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        description='U-GAT-IT: unpaired image-to-image translation (PyTorch).',
        epilog=presets.help_text() + '\n\nmulti-GPU / multi-node: torchrun --nproc_per_node N main.py ... '
        '(--batch_size is per process)',
        formatter_class=_HelpFormatter)
    run = parser.add_argument_group('run')
    run.add_argument('--phase', default='train', choices=PHASES, help='what to do')
    run.add_argument('--preset', default=None, choices=list(presets.PRESETS), metavar='NAME',
                     help='fill in a published recipe (listed below); flags you give override its values')
    run.add_argument('--dataset', default='selfie2anime',
                     help='dataset/NAME/{trainA,trainB,testA,testB}, or a path to such a folder')
    run.add_argument('--result_dir', default='results', help='outputs go to RESULT_DIR/<dataset>/')
    run.add_argument('--device', default='cuda', help="'cuda', 'cuda:N' or 'cpu' (falls back to cpu "
                     'with a note when CUDA is unavailable)')
    run.add_argument('--seed', type=int, default=0, help='seeds weights, data order and augmentation')
    _flag(run, '--resume', False, 'continue from the newest checkpoint (step + 1, optimizer, RNG, EMA, ADA)')
    _flag(run, '--overwrite', False, 'start a fresh run although the results folder holds one: the old run is '
          'moved to RESULT_DIR/<dataset>.old-<time> (nothing is deleted)')
    run.add_argument('--checkpoint', default=None, help='checkpoint file (anywhere), export folder '
                     '(scripts/export.py) or hf://OWNER/NAME[@REVISION] (an export on the Hugging Face Hub) for the '
                     'inference phases; the architecture is read from it. None: the '
                     'newest one of the run')
    _flag(run, '--no_ema', False, 'translate with the raw generators even when EMA weights exist')
    run.add_argument('--img_dir', default=None, help='folder to translate with --phase img_dir/generate')
    run.add_argument('--direction', default='A2B', choices=('A2B', 'B2A'), help='direction for img_dir/video')
    run.add_argument('--out_dir', default=None, help='output folder for img_dir/generate/video phases')
    run.add_argument('--video_path', default=None, help='video file (--phase video) or folder (video_dir)')
    run.add_argument('--camera_id', type=int, default=0, help='webcam index for --phase camera')
    run.add_argument('--crop', default='none', choices=('none', 'center'),
                     help='video frames: translate whole (resized) or a centre square crop')
    _flag(run, '--align_faces', False, 'video/camera/img_dir: detect and align faces, translate the crops '
          'and paste them back (needs facenet-pytorch MTCNN)')
    _flag(run, '--keep_size', False, 'test/img_dir/generate/video/camera with a light model: translate each image '
          'at its own size (sides reflect-padded to a multiple of 4 and cropped back) instead of img_size x img_size')
    run.add_argument('--max_size', type=int, default=0, help='with --keep_size: translate at most this many pixels '
                     'on the long side (aspect ratio kept; the output is resized back to the input size); 0: no limit')

    model = parser.add_argument_group('model')
    model.add_argument('--arch', default='pt', choices=('pt', 'tf'),
                       help="pt: the official PyTorch graph; tf: the official TensorFlow graph (biases, affine "
                       'encoder norms, TF padding, shared CAM FC, N(0, 0.02) init; needs --n_res 4)')
    model.add_argument('--tf_graph', default=None, choices=('current', '2019'),
                       help="--arch tf: TF's code version, current (HEAD) or 2019 (2019-08-15, separate CAM logit "
                       "FC in G, D's CAM weighted by the raw kernel; the released checkpoints' code). "
                       'None: current')
    _flag(model, '--smoothing', None, "--arch tf: AdaLIN uses clip(rho - 0.1, 0, 1), TF's --smoothing. "
          'None: True (TF\'s default); PT has no smoothing')
    model.add_argument('--light', type=_light, default=False,
                       help='True: light model (pooled MLP input); an integer k>1: k×k pooling (EN); '
                       'False/0/-1: full model')
    model.add_argument('--ch', type=int, default=64, help='base channel number')
    model.add_argument('--n_res', type=int, default=4, help='residual blocks in encoder and decoder')
    model.add_argument('--n_dis', type=int, default=6, help="TF-style discriminator depth: global = n_dis+1 "
                       'and local = n_dis-1 layers in PT counting (6 gives PT\'s 7 and 5)')
    model.add_argument('--n_global_dis', type=int, default=None, help='global discriminator layers (EN)')
    model.add_argument('--n_local_dis', type=int, default=None, help='local discriminator layers (EN)')
    model.add_argument('--img_size', type=int, default=256, help='training and test image size')
    model.add_argument('--img_ch', type=int, default=3, help='image channels (only 3, RGB, is supported)')
    _flag(model, '--sn', True, 'spectral norm in the discriminators (give a value: a bare --sn meant off in EN)',
          bare=False)
    _flag(model, '--use_se', False, 'scSE blocks in the generator residual blocks (EN)')
    model.add_argument('--attention_gan', type=int, default=0, help='k>0: AttentionGAN-style k-mask output fusion (EN)')
    _flag(model, '--attention_input', False, 'use the input image as one of the k candidates (EN)')
    _flag(model, '--use_deconv', False, 'transposed convolutions instead of upsample+conv in the decoder')
    _flag(model, '--cam_D_attention', True, 'weight D features by its CAM weights (give a value: a bare '
          '--cam_D_attention meant off in EN)', bare=False)

    loss = parser.add_argument_group('loss weights')
    loss.add_argument('--adv_weight', type=float, default=1.0, help='adversarial weight (also on the gradient penalty)')
    loss.add_argument('--gan_type', default='lsgan', choices=GAN_TYPES,
                      help="adversarial objective on D's patch and CAM logits (TF): lsgan (PT's), gan (sigmoid "
                      'cross-entropy), wgan-gp, wgan-lp (one-sided penalty), dragan (cross-entropy, penalty '
                      'around perturbed reals), hinge')
    loss.add_argument('--GP_ld', type=float, default=10.0,
                      help='gradient-penalty weight for wgan-gp, wgan-lp and dragan (on logit and CAM logit, TF)')
    loss.add_argument('--cycle_weight', type=float, default=10.0, help='cycle-consistency L1 weight')
    loss.add_argument('--identity_weight', type=float, default=10.0, help='identity L1 weight')
    loss.add_argument('--cam_weight', type=float, default=1000.0, help='generator CAM (BCE) weight')
    loss.add_argument('--forward_adv_weight', type=float, default=1.0,
                      help='extra factor on the A→B adversarial terms (G_AB and the B discriminators)')
    loss.add_argument('--backward_adv_weight', type=float, default=1.0,
                      help='extra factor on the B→A adversarial terms (G_BA and the A discriminators)')
    loss.add_argument('--cam_D_weight', type=float, default=1.0, help='D CAM-logit loss weight; <=0 drops it')
    _flag(loss, '--has_blur', False, 'edge-blurred real images as extra fakes for D (EN; generated once)')
    loss.add_argument('--tv_weight', type=float, default=0.0, help='total-variation weight on translations')
    loss.add_argument('--pair_weight', type=float, default=0.0,
                      help='pair loss (FN): W·(L1(a, G_BA(b)) + L1(b, G_AB(a))) on paired images; needs --paired True')

    optim = parser.add_argument_group('optimisation')
    optim.add_argument('--iteration', type=int, default=1000000,
                       help='training iterations (with --epoch: iterations per epoch, as in TF)')
    optim.add_argument('--epoch', type=int, default=None,
                       help="TF's schedule: EPOCH epochs of --iteration steps (EPOCH·iteration in all), the LR "
                       'constant until --decay_epoch, then lr·(EPOCH−e)/(EPOCH−decay_epoch) in epoch e; '
                       "--iteration not given: TF's 10000; None: PT's per-step schedule over --iteration steps")
    optim.add_argument('--decay_epoch', type=int, default=None,
                       help='with --epoch: the epoch (from 0) where the decay formula starts; None: EPOCH // 2')
    optim.add_argument('--n_critic', type=int, default=1,
                       help='D updates per G update: G is updated on steps 1, 1+N, 1+2N, ... (TF)')
    optim.add_argument('--batch_size', type=int, default=1, help='images per domain per step (per GPU)')
    optim.add_argument('--lr', type=float, default=0.0001, help='Adam learning rate')
    optim.add_argument('--weight_decay', type=float, default=0.0001,
                       help="Adam (coupled L2) weight decay; with --arch tf TF's loss term weight·Σw²/2 on conv "
                       'and dense kernels instead')
    _flag(optim, '--decay_flag', True, "LR decay: linear to 0 over the second half (PT), or TF's per-epoch "
          'decay with --epoch')
    _flag(optim, '--ema', True, 'keep EMA copies of both generators')
    optim.add_argument('--ema_start', type=float, default=0.5, help='EMA starts averaging after this '
                       'fraction of the training steps (a plain copy before)')
    optim.add_argument('--ema_beta', type=float, default=0.9999, help='EMA decay of a long run (EN); early on '
                       'the ramp-up shortens it')
    optim.add_argument('--ema_rampup', type=float, default=0.05,
                       help="EMA half-life at most this fraction of the steps so far (StyleGAN2-ADA's ema_rampup), "
                       'so short runs average recent weights; 0: always --ema_beta')

    memory = parser.add_argument_group(
        'memory (NOT exact: opt-ins for 11 GB and 8 GB GPUs; see README "Lower-precision state")')
    memory.add_argument('--optim_state', default='fp32', choices=low_memory.OPTIM_STATES,
                        help="Adam's two moments of every tensor of >= 4096 values, a multiple of the block (the "
                        "full model's 268 M-weight MLP FC, the convs) in blockwise 8 or 4 bits via torchao's "
                        'Adam8bit/Adam4bit (coupled weight decay, as PT); smaller tensors stay fp32. Not exact: '
                        'changes the training. Saves 3.7 GiB (8bit) or 4.3 GiB (4bit) on the full model '
                        '(pip install torchao)')
    memory.add_argument('--ema_dtype', default='fp32', choices=low_memory.EMA_DTYPES,
                        help='the EMA copies of the generators in bfloat16: each update is computed in float32 '
                        'and stochastically rounded (round-to-nearest would freeze the copy at --ema_beta 0.9999). '
                        'Not exact: the EMA weights carry bf16 rounding noise; saves 1.0 GiB on the full model')

    data = parser.add_argument_group('data')
    data.add_argument('--num_workers', type=int, default=min(4, os.cpu_count() or 1),
                      help='data-loading processes (0: in the main process)')
    data.add_argument('--aug_prob', type=float, default=0.0, help='probability of RandomResizedCrop (EN)')
    data.add_argument('--augment_flag', type=_bool, nargs='?', const=True, default=None, metavar='BOOL',
                      help="TF's pipeline: resize to img_size, then True: per image with probability 0.5 flip "
                      '(p 0.5), resize to img_size+30 (+15 unless img_size is 256) and random crop (TF drew '
                      "this coin once per run); False: nothing more. None: PT's flip, resize +30 and crop")
    _flag(data, '--paired', False, 'trainA and trainB hold pairs: A and B are drawn by the same file stem '
          '(relative path without extension) with the same crop and flip')
    _flag(data, '--match_histograms', False, 'match colour histograms between A and B samples (EN)')
    data.add_argument('--match_mode', default='hsl', choices=('hsv', 'hsl', 'rgb'), help='histogram space')
    data.add_argument('--match_prob', type=float, default=0.5, help='probability of matching B to A (else A to B)')
    data.add_argument('--match_ratio', type=float, default=1.0, help='CDF mix towards the reference')

    logs = parser.add_argument_group('logging and checkpoints')
    logs.add_argument('--print_freq', type=int, default=1000, help='preview grids every N steps')
    logs.add_argument('--log_freq', type=int, default=100, help='TensorBoard scalars and progress every N steps')
    logs.add_argument('--save_freq', type=int, default=100000, help='periodic checkpoint every N steps')
    logs.add_argument('--latest_freq', type=int, default=1000,
                      help="PT's <dataset>_params_latest.pt every N steps (0: never)")
    logs.add_argument('--keep_checkpoints', type=int, default=0,
                      help='keep only the newest N periodic checkpoints (0: all, as PT); the best-FID one is kept')

    ev = parser.add_argument_group('evaluation')
    ev.add_argument('--metric_freq', '--calc_fid_freq', type=int, default=0, dest='metric_freq',
                    help='FID/KID of test translations every N steps (0: off)')
    ev.add_argument('--fid_batch', type=int, default=50, help='batch size for metric feature extraction')
    ev.add_argument('--inception_weights', default=None,
                    help='pt_inception-2015-12-05-6726825d.pth file; None: download when online')

    face = parser.add_argument_group('face-aware losses')
    face.add_argument('--face_distance_weight', type=float, default=0.0, help='FaceNet identity loss weight (FN)')
    face.add_argument('--facenet_weights', default=None, help='InceptionResnetV1 state-dict file')
    face.add_argument('--facenet_pretrained', default=None, choices=('vggface2', 'casia-webface'),
                      help='download these FaceNet weights when online')
    face.add_argument('--facenet_checkpoint_dir', default=None, help='folder holding one FaceNet state-dict file (FN)')
    face.add_argument('--faceseg_weights', default='faceseg/79999_iter.pth', help='BiSeNet face-parsing weights')
    face.add_argument('--seg_fix_weight', type=float, default=-1.0, help='background L1 weight (>0: on)')
    _flag(face, '--seg_D_mask', False, 'discriminators ignore background patches')
    _flag(face, '--seg_G_detach', False, 'no adversarial gradient through the background')
    _flag(face, '--seg_D_cam_inp_mask', False, 'D CAM logits from the masked image')
    _flag(face, '--seg_D_cam_fea_mask', False, 'D CAM logits from masked features')
    _flag(face, '--hard_seg_edge', False, 'binary masks (m >= 0.5) instead of soft edges')
    _flag(face, '--seg_fix_glass_mouth', False, 'treat glasses and mouth interior as background to keep')

    few = parser.add_argument_group('few-shot and ADA')
    few.add_argument('--group', type=_groups, default=None, dest='groups',
                     help='use trainA/<g>, trainB/<g> sub-folders as group labels, e.g. 0,1,2,3')
    few.add_argument('--group_sampling', default='round_robin', choices=('round_robin', 'balanced'),
                     help='round_robin: each step one group (F2W); balanced: groups drawn uniformly per image')
    _flag(few, '--use_grouploss', False, 'group-classification head and loss (F2W)')
    few.add_argument('--group_weight', type=float, default=1.0, help='generator group-loss weight')
    _flag(few, '--selective_backprop', False, 'update the generator bottleneck only on base-group steps')
    few.add_argument('--base_group', type=int, default=0, help='group whose steps update the bottleneck')
    _flag(few, '--ada', False, 'adaptive discriminator augmentation (F2W: --useADA)', '--useADA')
    few.add_argument('--ada_target', type=float, default=0.6, help='target r_t = E[sign(D(real) - 0.5)]')
    few.add_argument('--ada_interval', type=int, default=4, help='D steps between p updates')
    few.add_argument('--ada_kimg', '--kimg', type=float, default=500,
                     help='thousands of images for p to move by 1 (F2W: --kimg)')
    few.add_argument('--ada_p', '--strength', type=float, default=0.0,
                     help='initial augmentation probability (F2W: --strength)')
    few.add_argument('--ada_pipeline', default='bgc', choices=('b', 'g', 'c', 'bg', 'bgc'),
                     help='b: blit, g: geometric, c: colour transforms')

    perf = parser.add_argument_group('performance and distributed')
    perf.add_argument('--amp', default='off', choices=('off', 'bf16', 'fp16'), help='mixed precision')
    _flag(perf, '--channels_last', False, 'channels-last memory layout')
    _flag(perf, '--compile', False, 'torch.compile the networks')
    perf.add_argument('--recompute', type=_auto_or_bool, nargs='?', const=True, default='auto', metavar='auto|BOOL',
                      help="recompute the generators' activations (and each norm's intermediates) in their backward "
                      'pass instead of keeping them through the D step: exact, less memory (full model, 256 px: '
                      'about 3.8 GiB), one more generator forward pass per step. auto: on when the config would not '
                      'fit the CUDA card without it (decided at start-up from the memory estimate; off on the CPU '
                      'and with --memory_check False)')
    _flag(perf, '--memory_check', True, "CUDA: estimate the config's peak memory at start-up (on the CPU, "
          'seconds) and stop in one line naming the flags that fit when the card is too small')
    perf.add_argument('--compile_mode', default='default', choices=COMPILE_MODES,
                      help="torch.compile's mode with --compile: reduce-overhead also captures each compiled "
                      'network (forward and backward) as CUDA graphs, which removes most per-operation launch '
                      'overhead at batch 1; not yet measured on a GPU, so not the default (the optimizer, the '
                      'losses and EMA stay eager)')
    _flag(perf, '--cuda_graph', False, 'capture the whole training step (both networks\' forward and backward, '
          'Adam, EMA) as a CUDA graph after 3 eager warm-up steps and replay it: one launch instead of thousands at '
          'batch 1. Same numbers within float rounding (fused, capturable Adam reading the LR from a device '
          'scalar); batches of one shape. Not with --amp fp16, --compile, torchrun, --ada, the gradient-penalty '
          'GANs, face segmentation or FaceNet losses, --selective_backprop, --optim_state 8bit/4bit or --ema_dtype '
          'bf16 (each changes per step on the host). Not yet measured on a GPU: off by default')
    _flag(perf, '--benchmark_flag', False, 'cudnn.benchmark')
    _flag(perf, '--stack_batches', True, 'run each network once per stage on stacked inputs (exact)')
    _flag(perf, '--early_updates', True, "update the generators' big MLP layer (268 M parameters at 256 px) "
          'at the end of the backward pass from its gradient\'s factors, a slice of rows at a time, so its '
          '1 GiB gradient is never formed (float32; under bf16 and --arch tf in its gradient hook); exact. Not '
          'under fp16, torchrun or --compile, which update after the whole backward pass')
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    """Parse and validate into the typed run config; raises a one-line UserError on bad input."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    flags = parser.parse_args(argv)
    if flags.preset:   # the preset's values become defaults, so the flags given still win
        parser.set_defaults(**presets.PRESETS[flags.preset].values)
        flags = parser.parse_args(argv)
    return validate(flags, explicit_flags(argv))


def explicit_flags(argv: list[str]) -> frozenset[str]:
    """The destinations of the flags given on the command line (not left at their default)."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(probe.parse_args(argv)))


def architecture_flags(argv: list[str]) -> tuple[argparse.Namespace | None, frozenset[str]]:
    """The model flags of tools that load a checkpoint (scripts/export.py, demo.py): needed only for
    PT-format files, which record no architecture. (None, {}) when none are given."""
    if not argv:
        return None, frozenset()
    flags = build_parser().parse_args(argv)   # a bad flag: one line, exit status 2
    _derive_discriminator_depths(flags)
    return flags, explicit_flags(argv)


def _derive_discriminator_depths(flags: argparse.Namespace) -> None:
    """TF's --n_dis N means EN's --n_global_dis N+1 --n_local_dis N-1 (SPEC A2)."""
    flags.n_global_dis = flags.n_dis + 1 if flags.n_global_dis is None else flags.n_global_dis
    flags.n_local_dis = flags.n_dis - 1 if flags.n_local_dis is None else flags.n_local_dis


def validate(flags: argparse.Namespace, explicit: frozenset[str] = frozenset()) -> Config:
    """All cross-flag rules in one place. ``flags`` is left as parsed: the derived values (TF's
    total steps, the discriminator depths, the device, ...) are resolved on a copy, which becomes the
    returned :class:`config.Config`."""
    fail = _fail
    cfg = argparse.Namespace(**vars(flags))
    cfg.explicit = frozenset(explicit)
    cfg.dataset_name = Path(cfg.dataset).name if os.sep in cfg.dataset or Path(cfg.dataset).is_dir() \
        else cfg.dataset
    if cfg.img_ch != 3:
        fail('--img_ch: only 3 (RGB) is supported; images of every mode are converted to RGB')
    for name in ('iteration', 'batch_size', 'img_size', 'ch', 'n_res', 'print_freq', 'log_freq', 'save_freq'):
        if getattr(cfg, name) < 1:
            fail(f'--{name} must be >= 1, got {getattr(cfg, name)}')
    if cfg.keep_checkpoints < 0:
        fail(f'--keep_checkpoints must be >= 0 (0 keeps all), got {cfg.keep_checkpoints}')
    for flag in ('sn', 'cam_D_attention'):
        if getattr(cfg, flag) is BARE:
            fail(f'--{flag} needs a value, --{flag} True or --{flag} False (in enhanced-U-GAT-IT a bare --{flag} '
                 f'turned it OFF; here a bare flag would mean on, so say which you mean)')
    _validate_arch(cfg, fail)
    if cfg.n_dis != 6 and (cfg.n_global_dis is not None or cfg.n_local_dis is not None):
        fail('give either --n_dis (TF style) or --n_global_dis/--n_local_dis, not both')
    _derive_discriminator_depths(cfg)
    arch = ArchConfig.from_flags(cfg).network
    for flag, layers in (('--n_global_dis', cfg.n_global_dis), ('--n_local_dis', cfg.n_local_dis)):
        if layers < 3:
            fail(f'{flag} must be >= 3, got {layers}')
        if cfg.phase == 'train' and cfg.img_size < min_image_size(layers, arch):   # inference builds no D
            fail(f'--img_size {cfg.img_size} is too small for a {layers}-layer discriminator ({flag}); it needs '
                 f'--img_size >= {min_image_size(layers, arch)}, or pass a smaller {flag} '
                 f'(e.g. --n_global_dis 5 --n_local_dis 4 at 64 px)')
    if cfg.img_size % 4:
        fail(f'--img_size must be a multiple of 4 (two stride-2 stages), got {cfg.img_size}')
    if cfg.attention_input and cfg.attention_gan < 2:
        fail('--attention_input needs --attention_gan >= 2 (the input is one of the k candidates)')
    if not 0 <= cfg.ema_beta < 1 or not 0 <= cfg.ema_start <= 1 or cfg.ema_rampup < 0:
        fail('--ema_beta must be in [0, 1), --ema_start in [0, 1] and --ema_rampup >= 0')
    if cfg.inception_weights and not Path(cfg.inception_weights).is_file():
        fail(f'--inception_weights: {cfg.inception_weights} not found (pt_inception-2015-12-05 .pth file)')
    if cfg.phase == 'train':
        _validate_schedule(cfg, fail)
        _validate_gan(cfg, fail)
        _validate_face(cfg, fail)
        _validate_few_shot(cfg, fail)
        _validate_options_of_features_that_are_off(cfg, fail)
    else:
        cfg.use_faceseg = False   # inference builds no training-only network
    _validate_dataset(cfg)
    _validate_phase(cfg, fail)
    cfg.device = _resolve_device(cfg.device, cfg.amp, fail)
    if cfg.recompute == 'auto' and (not cfg.device.startswith('cuda') or not cfg.memory_check or cfg.phase != 'train'):
        cfg.recompute = False   # auto needs the estimate against a card: memory_fit.settle_recompute
    if cfg.phase == 'train':
        _validate_memory(cfg, fail)
        _validate_cuda_graph(cfg, fail)
    values = {key: value for key, value in vars(cfg).items() if key != 'explicit'}
    return Config.from_values(values, cfg.explicit)


def _fail(message: str) -> None:
    raise errors.UserError(message)


def _validate_schedule(cfg, fail) -> None:
    """--epoch switches to TF's schedule: --iteration becomes steps per epoch (cfg.steps_per_epoch)
    and cfg.iteration the total, which every step-based rule (EMA start, last save) reads."""
    if cfg.n_critic < 1:
        fail(f'--n_critic must be >= 1 (D updates per G update), got {cfg.n_critic}')
    cfg.steps_per_epoch = None
    if cfg.epoch is None:
        return
    if cfg.epoch < 1:
        fail(f'--epoch must be >= 1, got {cfg.epoch}')
    if 'iteration' not in cfg.explicit:
        cfg.iteration = TF_ITERATIONS_PER_EPOCH
    if cfg.decay_epoch is None:
        cfg.decay_epoch = cfg.epoch // 2
    if not 0 <= cfg.decay_epoch <= cfg.epoch:
        fail(f'--decay_epoch must be in [0, --epoch {cfg.epoch}], got {cfg.decay_epoch}')
    cfg.steps_per_epoch = cfg.iteration
    cfg.iteration = cfg.epoch * cfg.steps_per_epoch


def _validate_gan(cfg, fail) -> None:
    if cfg.GP_ld < 0:
        fail(f'--GP_ld must be >= 0, got {cfg.GP_ld}')
    if cfg.gan_type in PENALTY_GAN_TYPES and (cfg.seg_D_cam_inp_mask or cfg.seg_D_cam_fea_mask):
        fail(f'--gan_type {cfg.gan_type} cannot be combined with --seg_D_cam_inp_mask/--seg_D_cam_fea_mask '
             '(the penalty points have no single face mask)')
    if cfg.pair_weight < 0:
        fail(f'--pair_weight must be >= 0, got {cfg.pair_weight}')
    if cfg.augment_flag is not None and cfg.aug_prob > 0:
        fail("--aug_prob (EN's RandomResizedCrop) is part of PT's pipeline; leave it out with --augment_flag")


def _validate_arch(cfg, fail) -> None:
    """--tf_graph/--smoothing belong to --arch tf; TF's MLP (ch*n_res wide) only fits --n_res 4."""
    if cfg.arch == 'pt':
        # Inference reads the architecture from the checkpoint, so there the flags are only checked against it.
        if cfg.phase == 'train' and (cfg.tf_graph is not None or cfg.smoothing is not None):
            fail('--tf_graph and --smoothing apply to --arch tf only (the PyTorch graph has neither)')
        cfg.smoothing = bool(cfg.smoothing)
        return
    if cfg.n_res != 4:
        fail(f"--arch tf needs --n_res 4: TF's MLP is ch*n_res wide but feeds the 4*ch AdaLIN channels, so the "
             f'official graph only builds with 4 (got {cfg.n_res})')
    cfg.tf_graph = cfg.tf_graph or 'current'
    cfg.smoothing = True if cfg.smoothing is None else cfg.smoothing


def _validate_face(cfg, fail) -> None:
    seg_flags = cfg.seg_fix_weight > 0 or cfg.seg_D_mask or cfg.seg_G_detach or cfg.seg_D_cam_inp_mask \
        or cfg.seg_D_cam_fea_mask
    cfg.use_faceseg = bool(seg_flags) and cfg.phase == 'train'
    if cfg.use_faceseg and not Path(cfg.faceseg_weights).is_file():
        fail(f'--faceseg_weights: {cfg.faceseg_weights} not found; the segmentation flags need the BiSeNet '
             'face-parsing weights 79999_iter.pth (see README, "Face-aware training")')
    if cfg.facenet_checkpoint_dir and 'face_distance_weight' not in cfg.explicit:
        # In the FaceNet fork, giving the checkpoint is what turns the loss on, at weight 1000.
        cfg.face_distance_weight = 1000.0
        print('note: --facenet_checkpoint_dir turns the face-distance loss on with the FaceNet fork\'s weight '
              '--face_distance_weight 1000 (pass another weight to change it)', file=sys.stderr)
    if cfg.face_distance_weight > 0 and not (cfg.facenet_weights or cfg.facenet_pretrained
                                             or cfg.facenet_checkpoint_dir):
        fail('--face_distance_weight needs FaceNet weights: --facenet_weights FILE, --facenet_checkpoint_dir DIR '
             'or --facenet_pretrained vggface2 (downloads when online)')
    if cfg.facenet_weights and not Path(cfg.facenet_weights).is_file():
        fail(f'--facenet_weights: {cfg.facenet_weights} not found')


def _validate_few_shot(cfg, fail) -> None:
    if (cfg.use_grouploss or cfg.selective_backprop) and not cfg.groups:
        fail('--use_grouploss and --selective_backprop need --group (e.g. --group 0,1,2,3)')
    if cfg.selective_backprop and cfg.group_sampling != 'round_robin':
        fail('--selective_backprop needs --group_sampling round_robin (one group per step)')
    if cfg.selective_backprop and cfg.base_group not in cfg.groups:
        fail(f'--base_group {cfg.base_group} is not one of --group {cfg.groups}')
    if cfg.ada and (cfg.seg_D_mask or cfg.seg_D_cam_inp_mask or cfg.seg_D_cam_fea_mask):
        fail('--ada cannot be combined with the --seg_D_* masks (the masks would not follow the augmentation)')
    if not 0 <= cfg.ada_p <= 1:
        fail('--ada_p must be in [0, 1]')
    if cfg.ada_interval < 1 or cfg.ada_kimg <= 0:
        fail(f'--ada_interval must be >= 1 and --ada_kimg > 0 (got {cfg.ada_interval} and {cfg.ada_kimg})')
    if not -1 <= cfg.ada_target <= 1:
        fail(f'--ada_target must be in [-1, 1] (r_t = E[sign(D(real) - 0.5)] lies there), got {cfg.ada_target}')


def _validate_memory(cfg, fail) -> None:
    """torchao present and importable; on the CPU its step is compiled by inductor, which needs a C++ compiler."""
    if cfg.optim_state == 'fp32':
        return
    flag = f'--optim_state {cfg.optim_state}'
    if low_memory.torchao_missing():
        fail(f'{flag} needs torchao: pip install torchao (see requirements-extras.txt)')
    problem = low_memory.torchao_import_error()
    if problem:
        fail(f'{flag}: torchao does not import with this torch ({problem}): pip install -U torchao')
    if cfg.device == 'cpu' and not low_memory.cpp_compiler():
        fail(f"{flag} on the CPU: torchao's step is compiled by torch.compile, which needs a C++ compiler "
             '(apt-get install g++, or set CXX)')


def _validate_cuda_graph(cfg, fail) -> None:
    """What a captured step cannot hold: host decisions or reads inside the step (step_capture.py)."""
    if not cfg.cuda_graph:
        return
    import torch

    import step_capture
    if torch.device(cfg.device).type not in step_capture.BACKENDS:
        fail(f'--cuda_graph needs a CUDA device (this run is on {cfg.device}); drop --cuda_graph')
    conflicts = {
        '--amp fp16': cfg.amp == 'fp16',   # the GradScaler decides on the host whether to step
        '--compile True': cfg.compile,
        '--ada True': cfg.ada,             # its strength is updated from host reads
        f'--gan_type {cfg.gan_type}': cfg.gan_type in PENALTY_GAN_TYPES,   # reseeded generators, double backward
        'face segmentation (--seg_*)': cfg.use_faceseg,
        '--face_distance_weight': cfg.face_distance_weight > 0,
        '--selective_backprop True': cfg.selective_backprop,
        f'--optim_state {cfg.optim_state}': cfg.optim_state != 'fp32',
        '--ema_dtype bf16': cfg.ema and cfg.ema_dtype == 'bf16',   # stochastic rounding reseeded per step
    }
    named = [flag for flag, on in conflicts.items() if on]
    if named:
        fail(f'--cuda_graph cannot be combined with {", ".join(named)} (not capturable as one graph); '
             'drop --cuda_graph or those flags')


# Options that act only while another feature is on: given without it, they are an error rather
# than a silent no-op. option dest -> (what turns the feature on, is it on?)
_FEATURE_OPTIONS: dict[str, tuple[str, object]] = {
    **{k: ('--ema True', lambda c: c.ema) for k in ('ema_beta', 'ema_start', 'ema_rampup')},
    **{k: ('--group G,...', lambda c: c.groups) for k in ('group_sampling', 'use_grouploss', 'selective_backprop')},
    'group_weight': ('--use_grouploss True', lambda c: c.use_grouploss),
    'base_group': ('--selective_backprop True', lambda c: c.selective_backprop),
    **{k: ('--ada True', lambda c: c.ada) for k in ('ada_target', 'ada_interval', 'ada_kimg', 'ada_p', 'ada_pipeline')},
    **{k: ('--match_histograms True', lambda c: c.match_histograms)
       for k in ('match_mode', 'match_prob', 'match_ratio')},
    **{k: ('--face_distance_weight W > 0', lambda c: c.face_distance_weight > 0)
       for k in ('facenet_weights', 'facenet_pretrained')},
    **{k: ('a face-segmentation loss (--seg_fix_weight W > 0 or a --seg_D_*/--seg_G_detach flag)',
           lambda c: c.use_faceseg) for k in ('hard_seg_edge', 'seg_fix_glass_mouth', 'faceseg_weights')},
    **{k: ('--metric_freq N', lambda c: c.metric_freq) for k in ('fid_batch', 'inception_weights')},
    'compile_mode': ('--compile True', lambda c: c.compile),
    'GP_ld': ('--gan_type wgan-gp, wgan-lp or dragan', lambda c: c.gan_type in PENALTY_GAN_TYPES),
    'decay_epoch': ("--epoch E (TF's schedule)", lambda c: c.epoch is not None),
    'pair_weight': ('--paired True (trainA and trainB paired by file name)', lambda c: c.paired),
    'ema_dtype': ('--ema True', lambda c: c.ema),
}


def _validate_options_of_features_that_are_off(cfg, fail) -> None:
    for dest, (feature, is_on) in _FEATURE_OPTIONS.items():
        if dest in cfg.explicit and not is_on(cfg):
            fail(f'--{dest} has no effect without {feature}: add that, or drop --{dest}')


def _validate_dataset(cfg) -> None:
    """The folders this phase reads must exist and hold readable images (DatasetError otherwise)."""
    import dataset
    splits = {'train': ('trainA', 'trainB', 'testA', 'testB'), 'test': ('testA', 'testB'),
              'val': ('trainA', 'trainB', 'testA', 'testB')}.get(cfg.phase, ())
    if not splits:
        return
    root = dataset.resolve_dataset_root(cfg.dataset)
    found = {split: dataset.domain_images(root, split, cfg.groups if split.startswith('train') else None)[0]
             for split in splits}
    if cfg.paired and cfg.phase == 'train':
        dataset.pair_by_stem(root, found['trainA'], found['trainB'])


def _validate_phase(cfg, fail) -> None:
    if cfg.phase in ('img_dir', 'generate') and not cfg.img_dir:
        fail(f'--phase {cfg.phase} needs --img_dir DIR (the folder of images to translate)')
    if cfg.img_dir and cfg.phase in ('img_dir', 'generate') and not Path(cfg.img_dir).is_dir():
        fail(f'--img_dir: {cfg.img_dir} is not a folder')
    if cfg.phase in ('video', 'video_dir') and not cfg.video_path:
        fail(f'--phase {cfg.phase} needs --video_path')
    if cfg.video_path and cfg.phase == 'video' and not Path(cfg.video_path).is_file():
        fail(f'--video_path: {cfg.video_path} is not a file')
    if cfg.video_path and cfg.phase == 'video_dir' and not Path(cfg.video_path).is_dir():
        fail(f'--video_path: {cfg.video_path} is not a folder')
    local = cfg.checkpoint and not hub.is_hub_uri(cfg.checkpoint)   # hf:// is fetched (and checked) on load
    if local and not Path(cfg.checkpoint).exists():
        fail(f'--checkpoint: {cfg.checkpoint} not found')
    if local and not Path(cfg.checkpoint).is_file() and not Path(cfg.checkpoint, 'config.json').is_file():
        fail(f'--checkpoint: {cfg.checkpoint} is a folder without config.json: pass a checkpoint file or a folder '
             f'written by scripts/export.py')
    if cfg.keep_size and cfg.phase in ('train', 'val'):
        fail(f'--keep_size applies to the translating phases (test, img_dir, generate, video, video_dir, camera), '
             f'not to --phase {cfg.phase}')
    if cfg.keep_size and cfg.align_faces:
        fail('--keep_size with --align_faces: aligned face crops are always translated at img_size; drop one of them')
    if 'max_size' in cfg.explicit and not cfg.keep_size:
        fail('--max_size has no effect without --keep_size True: add that, or drop --max_size')
    if cfg.max_size < 0 or 0 < cfg.max_size < 8:
        fail(f'--max_size must be 0 (no limit) or at least 8 pixels, got {cfg.max_size}')


def _resolve_device(device: str, amp: str, fail) -> str:
    import torch
    if device.startswith('cuda') and not torch.cuda.is_available():
        print('note: CUDA is not available; running on the CPU', file=sys.stderr)
        device = 'cpu'
    if amp == 'fp16' and not device.startswith('cuda'):
        fail('--amp fp16 needs a CUDA device; on the CPU use --amp bf16 or --amp off')
    return device
