"""Convert an official TensorFlow U-GAT-IT checkpoint (taki0112/UGATIT) into this project's format.

    python scripts/convert_tf_checkpoint.py CKPT OUT.pt [--smoothing True|False] [--img_size N]
    python scripts/convert_tf_checkpoint.py CKPT --export DIR [--license ...] [--samples DIR] [--onnx]

CKPT is a checkpoint prefix (``.../UGATIT.model-1000000``, the part before ``.index``) or its
folder (the newest one its ``checkpoint`` file names). TensorFlow is not needed. The model is
inferred from the variables: light or full, ``ch``, the image size (full model: from the MLP's
input; a light model does not record it, so ``--img_size``, TF's default 256), the
discriminator depths and spectral norm, and the TF graph version (the 2019-08-15 code, which
the released selfie2anime checkpoints come from, has ``CAM_logit/dense/*`` in the generators).
``--smoothing`` is not recorded in a checkpoint, but TF names the run folder after it (``…_sn_smoothing``,
as the released selfie2anime folder is named): without the flag the folder name decides, and
TF's default True where the folder was renamed. Optimizer slots (``…/Adam``, ``…/Adam_1``,
``beta1_power…``) are ignored. Generators alone are enough; the four discriminators are converted
when present (needed to fine-tune). Unknown or missing variables stop the conversion with one
message listing them.

OUT.pt holds PT's keys genA2B/genB2A (+ disGA/disGB/disLA/disLB), the architecture config
(``arch`` 'tf', ``tf_graph``, ``smoothing``, ``light``, ``ch``, ``img_size``, …) and ``step`` 0,
so ``python main.py --phase test|img_dir|video --checkpoint OUT.pt`` needs no model flag.
``--export DIR`` writes the generators straight into an export folder with its model card (as
scripts/export.py would from OUT.pt), without the training checkpoint in between.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ''):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoints  # noqa: E402
import errors  # noqa: E402
import options  # noqa: E402
import utils  # noqa: E402
from checkpoints import TRAINING_FORMAT  # noqa: E402
from inference import model_card  # noqa: E402
from model import ArchConfig, build_critic, build_generator  # noqa: E402
from scripts import export as export_cli  # noqa: E402
from tf_checkpoint import CheckpointError, TFCheckpoint  # noqa: E402

OPTIMIZER_SLOT = re.compile(r'/Adam(_1)?$|^beta[12]_power(_\d+)?$')
# TF names generators by the domain they produce: generate_a2b runs scope generator_B.
GENERATORS = {'genA2B': 'generator_B', 'genB2A': 'generator_A'}
CRITICS = {'disGA': ('discriminator_A', 'global'), 'disGB': ('discriminator_B', 'global'),
           'disLA': ('discriminator_A', 'local'), 'disLB': ('discriminator_B', 'local')}
FORMAT = TRAINING_FORMAT


# ----------------------------------------------------------------------------------------------
# Layout conversions (TF → PyTorch)


@dataclass(frozen=True)
class Layout:
    """How a TF variable becomes a PyTorch tensor (a view; made contiguous once, multi-threaded),
    and which TF shape lies behind a PyTorch shape."""

    convert: Callable[[torch.Tensor], torch.Tensor]
    tf_shape: Callable[[tuple], tuple]


SAME = Layout(lambda v: v, lambda s: s)
CONV = Layout(lambda k: k.permute(3, 2, 0, 1), lambda s: (s[2], s[3], s[1], s[0]))   # HWIO → OIHW
DENSE = Layout(lambda k: k.t(), lambda s: (s[1], s[0]))            # [in, out] (x·W) → [out, in]; the full
#                                                                   model's MLP input is flattened NHWC as in TF
CHANNEL = Layout(lambda v: v.reshape(1, -1, 1, 1), lambda s: (s[1],))   # [C] → 1×C×1×1 (ρ, ILN γ/β)
SN_U = Layout(lambda v: v.reshape(-1), lambda s: (1, s[0]))             # spectral norm u: [1, out]


@dataclass(frozen=True)
class Rule:
    """One TF variable (relative to its network's scope) → one state-dict key, with its layout change."""

    tf_name: str
    key: str
    layout: Layout = SAME


def _conv(key: str, scope: str) -> list[Rule]:
    return [Rule(f'{scope}/conv2d/kernel', f'{key}.weight', CONV), Rule(f'{scope}/conv2d/bias', f'{key}.bias')]


def _dense(key: str, scope: str, kernel: Layout = DENSE) -> list[Rule]:
    return [Rule(f'{scope}/dense/kernel', f'{key}.weight', kernel), Rule(f'{scope}/dense/bias', f'{key}.bias')]


def _sn_layer(key: str, scope: str, kernel: Layout) -> list[Rule]:
    """A spectral-normalised layer: TF names kernel/bias/u directly in the scope."""
    return [Rule(f'{scope}/kernel', f'{key}.weight_orig', kernel), Rule(f'{scope}/bias', f'{key}.bias'),
            Rule(f'{scope}/u', f'{key}.weight_u', SN_U)]


def _critic_conv(key: str, scope: str, sn: bool) -> list[Rule]:
    return _sn_layer(key, scope, CONV) if sn else _conv(key, scope)


def _cam(graph: str, sn: bool) -> list[Rule]:
    """TF's CAM_logit scope: kernel and bias (and u under spectral norm); without spectral norm the
    2019 graph takes the logits from a dense layer of its own in the same scope."""
    if sn:
        return _sn_layer('cam.fc', 'CAM_logit', DENSE)
    rules = [Rule('CAM_logit/kernel', 'cam.fc.weight', DENSE), Rule('CAM_logit/bias', 'cam.fc.bias')]
    return rules + (_dense('cam.logit_fc', 'CAM_logit') if graph == '2019' else [])


def generator_rules(n_res: int, graph: str) -> list[Rule]:
    """Every variable of one TF generator scope (n_res must be 4 in TF)."""
    rules = _cam(graph, sn=False)
    rules += _conv('conv1x1', 'conv_1x1') + _dense('gamma', 'MLP/gamma') + _dense('beta', 'MLP/beta')
    for i in range(n_res):
        for half, j in (('res1', 1), ('res2', 2)):
            rules += _conv(f'UpBlock1_{i + 1}.conv{j}', f'adaptive_resblock{i}/{half}/conv_0')
            rules.append(Rule(f'adaptive_resblock{i}/{half}/instance_layer_norm/rho', f'UpBlock1_{i + 1}.norm{j}.rho',
                              CHANNEL))
    # DownBlock: [pad, conv, IN, ReLU] × 3 (stem and two down-samplings), then the residual blocks.
    for index, (conv, norm) in zip((1, 5, 9), (('conv', 'ins_norm'), ('conv_0', 'ins_norm_0'),
                                               ('conv_1', 'ins_norm_1'))):
        rules += _conv(f'DownBlock.{index}', conv) + _instance_norm(f'DownBlock.{index + 1}', norm)
    for i in range(n_res):
        for half, index in (('res1', 1), ('res2', 5)):
            rules += _conv(f'DownBlock.{12 + i}.conv_block.{index}', f'resblock_{i}/{half}/conv_0')
            rules += _instance_norm(f'DownBlock.{12 + i}.conv_block.{index + 1}', f'resblock_{i}/{half}/instance_norm')
    rules += _dense('FC.0', 'MLP/linear_0') + _dense('FC.2', 'MLP/linear_1')
    # UpBlock2: [upsample, pad, conv, ILN, ReLU] × 2, then [pad, conv, tanh].
    for index, scope in ((2, '0'), (7, '1')):
        rules += _conv(f'UpBlock2.{index}', f'up_conv_{scope}')
        rules += [Rule(f'layer_ins_norm_{scope}/{name}', f'UpBlock2.{index + 1}.{name}', CHANNEL)
                  for name in ('rho', 'gamma', 'beta')]
    return rules + _conv('UpBlock2.11', 'G_logit')


def _instance_norm(key: str, scope: str) -> list[Rule]:
    return [Rule(f'{scope}/gamma', f'{key}.weight'), Rule(f'{scope}/beta', f'{key}.bias')]


def critic_rules(n_layers: int, sn: bool, graph: str) -> list[Rule]:
    """Every variable of one TF discriminator (global or local) scope; ``n_layers`` in PT counting."""
    rules = []
    for k in range(n_layers - 2):   # stride-2 convs conv_0..conv_{n-3} at model.1, .4, .7, ...
        rules += _critic_conv(f'model.{3 * k + 1}', f'conv_{k}', sn)
    rules += _critic_conv(f'model.{3 * (n_layers - 2) + 1}', 'conv_last', sn)
    return rules + _cam(graph, sn) + _conv('conv1x1', 'conv_1x1') + _critic_conv('conv', 'D_logit', sn)


# ----------------------------------------------------------------------------------------------
# Inferring the model from the variables


def _scope(shapes: dict[str, tuple], scope: str) -> dict[str, tuple]:
    return {name[len(scope) + 1:]: shape for name, shape in shapes.items() if name.startswith(scope + '/')}


def _count(names, pattern: str) -> int:
    return len({m.group(1) for n in names if (m := re.match(pattern, n))})


def infer_arch(shapes: dict[str, tuple[int, ...]], smoothing: bool = True, img_size: int | None = None) -> dict:
    """The architecture config of a TF U-GAT-IT checkpoint from its variable names and shapes."""
    generator = _scope(shapes, GENERATORS['genA2B'])
    if not generator or not _scope(shapes, GENERATORS['genB2A']):
        raise errors.UserError('not a U-GAT-IT checkpoint: it has no generator_A/generator_B variables')
    try:
        _, _, img_ch, ch = generator['conv/conv2d/kernel']
        mlp_in, mlp_width = generator['MLP/linear_0/dense/kernel']
    except KeyError as exc:
        raise errors.UserError(f'generator_B has no {exc.args[0]}: not an official U-GAT-IT checkpoint') from None
    if img_ch != 3:
        raise errors.UserError(f'the checkpoint takes {img_ch}-channel images; only RGB (3) is supported')
    dim = 4 * ch
    n_res = _count(generator, r'resblock_(\d+)/')
    light = mlp_in == dim
    if not light:
        side = int(round((mlp_in / dim) ** 0.5))
        if side * side * dim != mlp_in:
            raise errors.UserError(f'MLP/linear_0 has {mlp_in} inputs, which fits neither a light nor a full model '
                                  f'with ch {ch}')
        if img_size is not None and img_size != 4 * side:
            raise errors.UserError(f'--img_size {img_size}: this full model was trained at {4 * side} px')
        img_size = 4 * side
    arch = {'arch': 'tf', 'tf_graph': '2019' if 'CAM_logit/dense/kernel' in generator else 'current',
            'smoothing': smoothing, 'light': light, 'ch': ch, 'n_res': n_res, 'img_size': img_size or 256,
            'img_ch': 3, 'use_se': False, 'attention_gan': 0, 'attention_input': False, 'use_deconv': False,
            'cam_D_attention': True, 'cam_D_weight': 1.0, 'use_grouploss': False, 'groups': None}
    if mlp_width != ch * n_res or n_res != 4:
        raise errors.UserError(f'the checkpoint has {n_res} residual blocks and an MLP {mlp_width} wide; the official '
                              f'TF graph only builds with 4 (MLP width ch*n_res = 4*ch)')
    arch.update(_infer_critics(shapes))
    return arch


def _infer_critics(shapes: dict[str, tuple]) -> dict:
    """Depths (PT counting) and spectral norm of the discriminators, or their absence."""
    present = [dom for dom in 'AB' if _scope(shapes, f'discriminator_{dom}')]
    if not present:
        return {'sn': True, 'n_global_dis': 7, 'n_local_dis': 5, 'n_dis': 6, 'has_discriminators': False}
    if len(present) == 1:
        raise errors.UserError(f'the checkpoint has discriminator_{present[0]} but not the other one')
    critic = _scope(shapes, 'discriminator_A')
    n_global = _count(critic, r'global/conv_(\d+)/') + 2
    n_local = _count(critic, r'local/conv_(\d+)/') + 2
    return {'sn': 'global/conv_0/u' in critic, 'n_global_dis': n_global, 'n_local_dis': n_local,
            'n_dis': n_global - 1, 'has_discriminators': True}


# ----------------------------------------------------------------------------------------------
# Conversion


def network_rules(arch: dict) -> dict[str, tuple[str, list[Rule]]]:
    """For each network of OUT.pt: its TF scope and the rules converting its variables."""
    nets = {key: (scope, generator_rules(arch['n_res'], arch['tf_graph'])) for key, scope in GENERATORS.items()}
    if arch['has_discriminators']:
        for key, (scope, scale) in CRITICS.items():
            depth = arch['n_global_dis'] if scale == 'global' else arch['n_local_dis']
            nets[key] = (f'{scope}/{scale}', critic_rules(depth, arch['sn'], arch['tf_graph']))
    return nets


def check_variables(names: list[str], nets: dict[str, tuple[str, list[Rule]]]) -> None:
    """One error listing every unknown and every missing variable."""
    expected = {f'{scope}/{rule.tf_name}' for scope, rules in nets.values() for rule in rules}
    present = set(names)
    unknown = sorted(n for n in present - expected if not OPTIMIZER_SLOT.search(n))
    missing = sorted(expected - present)
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f'{len(unknown)} unknown variable(s): {", ".join(unknown)}')
        if missing:
            parts.append(f'{len(missing)} missing variable(s): {", ".join(missing)}')
        raise errors.UserError('not an official U-GAT-IT checkpoint of a known graph version: ' + '; '.join(parts))


def _power_iteration_v(state: dict[str, torch.Tensor]) -> None:
    """PyTorch's spectral norm also keeps v; derive it from u as the next power iteration will."""
    for key in [k for k in state if k.endswith('.weight_u')]:
        base = key[:-len('weight_u')]
        w = state[base + 'weight_orig'].reshape(state[key].numel(), -1)
        state[base + 'weight_v'] = torch.nn.functional.normalize(w.t() @ state[key], dim=0, eps=1e-12)


def convert_network(ckpt: TFCheckpoint, scope: str, rules: list[Rule], expected: dict[str, tuple]) -> dict:
    """Read and convert one network's variables into a state dict with exactly the ``expected`` keys/shapes."""
    state = {}
    for rule in rules:
        value = torch.from_numpy(ckpt.read(f'{scope}/{rule.tf_name}')).float()
        state[rule.key] = rule.layout.convert(value).contiguous()
    _power_iteration_v(state)
    if set(state) != set(expected):
        raise RuntimeError(f'{scope}: conversion rules and network disagree: '
                           f'{sorted(set(state) ^ set(expected))}')   # a bug here, not a user error
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise errors.UserError(f'{scope}: {key} has shape {tuple(state[key].shape)}, the model needs {shape}')
    return {key: state[key] for key in expected}


def expected_shapes(arch: dict) -> dict[str, dict[str, tuple]]:
    """State-dict keys and shapes of the networks this project builds from ``arch`` (on the meta
    device: nothing is allocated)."""
    model_arch = ArchConfig.from_dict(arch)
    with torch.device('meta'):
        nets = {'genA2B': build_generator(model_arch), 'genB2A': build_generator(model_arch)}
        if arch['has_discriminators']:
            for dom in 'AB':
                critic = build_critic(model_arch, dom)
                nets[f'disG{dom}'], nets[f'disL{dom}'] = critic['G'], critic['L']
    return {key: {k: tuple(v.shape) for k, v in net.state_dict().items()} for key, net in nets.items()}


def tf_shapes(arch: dict) -> dict[str, tuple[int, ...]]:
    """The variables (names and shapes) an official TF checkpoint of ``arch`` holds, optimizer slots
    aside: the converter's rules read backwards (for tests, and to make benchmark checkpoints)."""
    shapes = expected_shapes(arch)
    return {f'{scope}/{rule.tf_name}': rule.layout.tf_shape(shapes[key][rule.key])
            for key, (scope, rules) in network_rules(arch).items() for rule in rules}


# TF's run folder: {UGATIT|UGATIT_light}_{dataset}_{gan_type}_{n_res}resblock_{n_dis}dis_{n_critic}_
# {adv}_{cycle}_{identity}_{cam}{_sn}{_smoothing} (UGATIT.model_dir), e.g. the released
# UGATIT_selfie2anime_lsgan_4resblock_6dis_1_1_10_10_1000_sn_smoothing.
TF_RUN_FOLDER = re.compile(r'^UGATIT(_light)?_.+_\d+resblock_\d+dis_\d+_[^_]+_[^_]+_[^_]+_[^_]+(_sn)?(_smoothing)?$')


TF_DATASET = re.compile(r'^UGATIT(?:_light)?_(.+)_[^_]+_\d+resblock_')


def dataset_of(prefix: Path) -> str | None:
    """The dataset in TF's run-folder name (UGATIT_<dataset>_<gan_type>_...; gan types hold no '_')."""
    match = TF_RUN_FOLDER.match(prefix.parent.name) and TF_DATASET.match(prefix.parent.name)
    return match.group(1) if match else None


def smoothing_of(prefix: Path, given: bool | None) -> tuple[bool, str]:
    """--smoothing is not stored in the checkpoint, but TF names its run folder after it."""
    if given is not None:
        return given, 'as given'
    match = TF_RUN_FOLDER.match(prefix.parent.name)
    if match:
        return match.group(3) is not None, f'from the folder name {prefix.parent.name}'
    return True, "TF's default; pass --smoothing False if the model was trained without it"


def convert(path: str | Path, smoothing: bool | None = None, img_size: int | None = None,
            generators_only: bool = False) -> dict:
    """The checkpoint dict of this project for the TF checkpoint at ``path`` (prefix or folder);
    ``smoothing`` None reads it from TF's run-folder name, else TF's default True. Every variable
    is checked either way; ``generators_only`` skips converting the discriminators (an export)."""
    ckpt = TFCheckpoint(path)
    smoothing, smoothing_source = smoothing_of(ckpt.prefix, smoothing)
    arch = infer_arch(ckpt.shapes(), smoothing, img_size)
    nets = network_rules(arch)
    check_variables(list(ckpt), nets)
    if generators_only:
        nets = {key: nets[key] for key in GENERATORS}
    shapes = expected_shapes(arch)
    state = {key: convert_network(ckpt, scope, rules, shapes[key]) for key, (scope, rules) in nets.items()}
    step = re.search(r'-(\d+)$', ckpt.prefix.name)
    config = {k: v for k, v in arch.items() if k != 'has_discriminators'}
    if dataset_of(ckpt.prefix):
        config['dataset_name'] = dataset_of(ckpt.prefix)
    state.update({'config': config, 'architecture': ArchConfig.from_dict(config).to_dict(), 'step': 0, 'format': FORMAT,
                  'source': {'tf_checkpoint': str(ckpt.prefix), 'tf_step': int(step.group(1)) if step else -1,
                             'smoothing': smoothing_source}})
    return state


def describe(state: dict) -> str:
    cfg = state['config']
    parts = [f"{'light' if cfg['light'] else 'full'} model", f"ch {cfg['ch']}", f"{cfg['img_size']} px",
             f"TF graph {cfg['tf_graph']}", f"smoothing {cfg['smoothing']} ({state['source']['smoothing']})"]
    if 'disGA' in state:
        parts.append(f"discriminators {cfg['n_global_dis']}/{cfg['n_local_dis']} layers"
                     f"{'' if cfg['sn'] else ' without spectral norm'}")
    else:
        parts.append('generators only')
    return ', '.join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('checkpoint', help='TF checkpoint prefix (.../UGATIT.model-N) or its folder')
    parser.add_argument('output', type=Path, nargs='?', default=None, help='the .pt file to write (or --export)')
    parser.add_argument('--export', type=Path, default=None, metavar='DIR',
                        help='write an export folder (generators as safetensors, config.json, model card) '
                        'instead of the .pt file')
    parser.add_argument('--smoothing', type=_bool, default=None, metavar='BOOL',
                        help="TF's --smoothing the model was trained with; not stored in the checkpoint. None: "
                        "from TF's run-folder name (…_smoothing), else True (TF's default)")
    parser.add_argument('--img_size', type=int, default=None,
                        help='image size of a light model (not stored in it; default 256, TF\'s default); '
                        'full models record it')
    sharing = parser.add_argument_group('with --export (as scripts/export.py)')
    export_cli.add_sharing_flags(sharing)
    return parser


def _bool(value: str) -> bool:
    try:
        return options.str2bool(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        check_args(args)
        state = convert(args.checkpoint, args.smoothing, args.img_size, generators_only=args.export is not None)
        written = write_export(state, args) if args.export else []
        if args.output:
            checkpoints.atomic_save(state, args.output)
    except (errors.UserError, CheckpointError, OSError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    target = args.export or args.output
    print(f'wrote {target}: {describe(state)} ({time.perf_counter() - start:.1f} s)')
    for line in utils.file_report(written) if written else []:
        print(f'  {line}')
    return 0


def check_args(args: argparse.Namespace) -> None:
    """Exactly one of OUT.pt and --export; the export's own flags only with it."""
    if (args.output is None) == (args.export is None):
        raise errors.UserError('give exactly one of OUT.pt (a checkpoint to fine-tune or translate with) and '
                              '--export DIR (a folder to share)')
    if args.export is None and (args.onnx or args.license or args.samples):
        raise errors.UserError('--onnx, --license and --samples describe an export: add --export DIR')
    if args.img_size is not None and (args.img_size < 4 or args.img_size % 4):
        raise errors.UserError(f'--img_size must be a positive multiple of 4, got {args.img_size}')


def write_export(state: dict, args: argparse.Namespace) -> list[Path]:
    """The converted generators as an export folder with its card, as scripts/export.py writes it
    from the converted .pt file."""
    translator, state = checkpoints.translator_from_state(state)
    card = model_card.CardOptions(args.license, model_card.samples_root(args.samples, {}))
    return export_cli.write_folder(translator, state, args.export, source=Path(args.checkpoint).name,
                                   onnx=args.onnx, card=card)

if __name__ == '__main__':
    sys.exit(main())
