"""--preset: published recipes fill in flags, explicit flags win, --help and README list them."""
from __future__ import annotations

from pathlib import Path

import pytest

import errors
import main
import presets

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('name', list(presets.PRESETS))
def test_preset_command_line_parses_back_to_its_values(name):
    """The flags the README shows are real flags and give exactly the preset's typed values."""
    preset = presets.PRESETS[name]
    cfg = main.build_parser().parse_args(preset.command().split())
    assert {key: getattr(cfg, key) for key in preset.values} == preset.values
    via_preset = main.build_parser()
    via_preset.set_defaults(**preset.values)
    assert vars(via_preset.parse_args([])) == {**vars(cfg), 'preset': None}


def test_preset_fills_flags_and_explicit_flags_override(tiny_dataset):
    cfg = main.parse_args(['--preset', 'demo', '--dataset', str(tiny_dataset), '--ch', '8', '--device', 'cpu'])
    assert cfg.values['preset'] == 'demo'
    arch = cfg.arch
    assert (arch.light, arch.img_size, arch.n_global_dis, arch.n_local_dis, cfg.iterations) == \
        (True, 64, 5, 4, 1000)                                   # from the preset
    assert arch.ch == 8 and cfg.run.dataset == str(tiny_dataset)  # given on the command line
    plain = main.parse_args(['--dataset', str(tiny_dataset), '--device', 'cpu']).arch
    assert (plain.light, plain.img_size, plain.ch) == (False, 256, 64)


def test_paper_presets_differ_only_in_light():
    full, light = presets.PRESETS['paper_full'].values, presets.PRESETS['paper_light'].values
    assert {k for k in full if full[k] != light[k]} == {'light'} and full['light'] is False


def test_preset_validation_still_applies(tiny_dataset):
    with pytest.raises(errors.UserError, match='--face_distance_weight needs FaceNet weights'):
        main.parse_args(['--preset', 'facenet', '--dataset', str(tiny_dataset), '--device', 'cpu'])


def test_help_lists_presets_and_readme_shows_the_table():
    text = main.build_parser().format_help()
    for name in presets.PRESETS:
        assert f'\n  {name} ' in text
    readme = (REPO / 'README.md').read_text()
    assert presets.markdown_table() in readme
    # the demo preset is the Quick start's training command
    quick_start = readme.split('## Quick start')[1].split('python main.py ')[1].split(' &&')[0].split()
    cfg = main.build_parser().parse_args(quick_start)
    demo = presets.PRESETS['demo'].values
    assert {key: getattr(cfg, key) for key in demo} == demo
