"""Published training recipes as ``--preset NAME``: a preset fills in flag values, flags given on the
command line override them.

Each preset is the command line its source publishes, translated to this project's flag names
(EN's store_false ``--cam_D_attention`` becomes ``--cam_D_attention False``, F2W's ``--useADA``
becomes ``--ada``), plus the defaults of that code where they differ from ours and define the
method (the paper code has no EMA). Paths, devices and worker counts are the user's own and are
never part of a preset.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    """One recipe: the flag values it sets (argparse destinations), what it is and where it comes from."""

    summary: str
    source: str
    values: dict = field(default_factory=dict)

    def command(self) -> str:
        """The preset as command-line flags (the form the README table shows)."""
        return ' '.join(f'{flag_of(key)} {_text(value)}' for key, value in self.values.items())


# The paper's setup as the official TF code runs it (`python main.py --dataset selfie2anime`, TF
# defaults: 100 epochs x 10k iterations, batch 1, Adam 1e-4 with decay over the second half, loss
# weights 1/10/10/1000, ch 64, 4 residual blocks, 6-layer discriminators with SN, 256 px, no EMA).
_PAPER = {'dataset': 'selfie2anime', 'light': False, 'img_size': 256, 'ch': 64, 'n_res': 4, 'n_dis': 6,
          'sn': True, 'iteration': 1000000, 'batch_size': 1, 'lr': 0.0001, 'weight_decay': 0.0001,
          'decay_flag': True, 'adv_weight': 1.0, 'cycle_weight': 10.0, 'identity_weight': 10.0,
          'cam_weight': 1000.0, 'ema': False}

PRESETS: dict[str, Preset] = {
    'paper_full': Preset(
        'U-GAT-IT paper, full model, selfie2anime (the released checkpoints\' setup)',
        'official TF README "Train" (`python main.py --dataset selfie2anime`) and its main.py defaults',
        dict(_PAPER)),
    'paper_light': Preset(
        'U-GAT-IT paper, light model (pooled MLP input: fits an 11 GB GPU)',
        'official TF/PT README: "If the memory of gpu is not sufficient, set --light to True"',
        {**_PAPER, 'light': True}),
    'enhanced': Preset(
        'enhanced-U-GAT-IT: 32x32-pooled light MLP at 384 px, EMA, FID, background kept by face '
        'parsing (needs --faceseg_weights), blur loss, scSE, 2-mask attention with the input',
        'enhanced-UGATIT README "Usage" (EN\'s store_false --cam_D_attention written as False)',
        {'light': 32, 'img_size': 384, 'aug_prob': 0.2, 'print_freq': 1000, 'metric_freq': 10000,
         'save_freq': 100000, 'adv_weight': 1.0, 'forward_adv_weight': 1.0, 'cycle_weight': 10.0,
         'identity_weight': 10.0, 'ema': True, 'ema_start': 0.5, 'ema_beta': 0.9999, 'cam_D_weight': -1.0,
         'cam_D_attention': False, 'seg_fix_weight': 100.0, 'seg_D_mask': True, 'seg_G_detach': True,
         'n_global_dis': 7, 'n_local_dis': 5, 'has_blur': True, 'use_se': True, 'attention_gan': 2,
         'attention_input': True}),
    'face2webtoon': Preset(
        'Face2Webtoon: few-shot groups trainA/0..3 and trainB/0..3, group loss, ADA, bottleneck '
        'updated on group-0 steps only',
        'Face2Webtoon README "Start training" (`--useADA True --group 0,1,2,3 --use_grouploss True`) '
        'and its selective backprop; no EMA as in its code',
        {'ada': True, 'groups': [0, 1, 2, 3], 'use_grouploss': True, 'selective_backprop': True,
         'base_group': 0, 'ema': False}),
    'facenet': Preset(
        'Face-distance fork: the paper setup at 128 px plus the FaceNet identity loss (needs '
        '--facenet_checkpoint_dir or --facenet_weights)',
        'TakaoNarikawa/UGATIT README example (`--facenet_checkpoint_dir ... --img_size 128`, '
        '--face_distance_weight default 1000)',
        {**_PAPER, 'img_size': 128, 'face_distance_weight': 1000.0}),
    'demo': Preset(
        'This project\'s demo: a 64 px light model with ch 16 on the bundled dataset/demo (minutes on a CPU)',
        'this README "Quick start"',
        {'dataset': 'demo', 'light': True, 'ch': 16, 'img_size': 64, 'n_global_dis': 5, 'n_local_dis': 4,
         'iteration': 1000, 'print_freq': 250, 'save_freq': 1000}),
}

# Destinations whose flag is spelled differently.
_FLAGS = {'groups': '--group'}


def flag_of(key: str) -> str:
    return _FLAGS.get(key, f'--{key}')


def _text(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ','.join(str(v) for v in value)
    return str(value)


def help_text() -> str:
    """The presets section of ``--help``."""
    lines = ['presets (--preset NAME; flags you give override its values; README lists the flags each sets):']
    for name, preset in PRESETS.items():
        lines += textwrap.wrap(preset.summary, width=100, initial_indent=f'  {name:<14}', subsequent_indent=' ' * 16)
    return '\n'.join(lines)


def markdown_table() -> str:
    """The README table: one row per preset with the flags it sets and its source."""
    rows = ['| preset | what it is | flags it sets | source |', '|---|---|---|---|']
    for name, preset in PRESETS.items():
        rows.append(f'| `{name}` | {preset.summary} | `{preset.command()}` | {preset.source} |')
    return '\n'.join(rows)
