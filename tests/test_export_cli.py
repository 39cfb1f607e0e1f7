"""scripts/export.py end to end: the folder it writes, its report, and every inference phase run from
the export giving what the training checkpoint gives; --keep_size through main.py."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import make_domain, tiny_flags
from PIL import Image

import checkpoints
import errors
import main
import model
from inference import model_card
from scripts import export as export_cli


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, checkpoint) of a 2-step tiny light model with EMA copies."""
    root = tmp_path_factory.mktemp('export')
    data = root / 'tiny'
    for split, colour in (('trainA', (200, 80, 60)), ('trainB', (60, 90, 200)), ('testA', (200, 80, 60)),
                          ('testB', (60, 90, 200))):
        make_domain(data / split, 3, 40, colour, len(split))
    assert main.main(tiny_flags(data, root / 'run', '--iteration', '2', '--save_freq', '2', '--ema_start', '0')) == 0
    return data, next((root / 'run' / 'tiny' / 'model').glob('tiny_params_*.pt'))


def export(checkpoint: Path, out: Path, *flags: str, capsys=None) -> str:
    assert export_cli.main(['--checkpoint', str(checkpoint), '--out', str(out), *flags]) == 0
    return capsys.readouterr().out if capsys else ''


def run_phase(data: Path, tmp_path: Path, checkpoint: Path, *flags: str) -> int:
    return main.main(tiny_flags(data, tmp_path / 'results', '--checkpoint', str(checkpoint), *flags))


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.asarray(Image.open(p)) for p in sorted(folder.rglob('*.png'))}


def test_export_writes_config_and_generators_and_reports_size_and_sha256(trained, tmp_path, capsys):
    _, checkpoint = trained
    printed = export(checkpoint, tmp_path / 'exp', capsys=capsys)
    files = {line.split()[0]: line for line in printed.splitlines()[1:]}
    assert sorted(files) == ['A2B.safetensors', 'B2A.safetensors', 'README.md', 'config.json', 'samples.png']
    for name, line in files.items():
        data = (tmp_path / 'exp' / name).read_bytes()
        assert line.endswith(hashlib.sha256(data).hexdigest())
    config = json.loads((tmp_path / 'exp' / 'config.json').read_text())
    stored = torch.load(checkpoint, weights_only=True)
    assert model.ArchConfig.from_dict(config) == checkpoints.stored_arch(stored)
    assert (config['ema'], config['step'], config['dataset_name'], config['dtype']) == (True, 2, 'tiny', 'float32')
    from safetensors.torch import load_file
    weights = load_file(str(tmp_path / 'exp' / 'A2B.safetensors'))
    assert weights.keys() == stored['genA2B_ema'].keys()   # the EMA generator, as the test phase uses
    assert all(torch.equal(weights[k], stored['genA2B_ema'][k].float()) for k in weights)


def test_every_inference_phase_runs_from_an_export_as_from_the_checkpoint(trained, tmp_path, capsys):
    data, checkpoint = trained
    export(checkpoint, tmp_path / 'exp')
    outputs = {}
    for source in (checkpoint, tmp_path / 'exp'):
        name = source.suffix or 'export'
        for phase, flags in (('test', ()), ('img_dir', ('--img_dir', str(data / 'testB'), '--direction', 'B2A')),
                             ('generate', ('--img_dir', str(data / 'testA')))):
            out = tmp_path / name / phase
            assert run_phase(data, tmp_path, source, '--phase', phase, '--out_dir', str(out), *flags) == 0
            outputs[name, phase] = pixels(out)
    for phase in ('test', 'img_dir', 'generate'):
        assert outputs['.pt', phase].keys() == outputs['export', phase].keys() and outputs['.pt', phase]
        assert all(np.array_equal(outputs['.pt', phase][k], outputs['export', phase][k]) for k in outputs['.pt', phase])

    clip = tmp_path / 'clips' / 'clip.mp4'
    clip.parent.mkdir()
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*'mp4v'), 5, (40, 32))
    for i in range(3):
        writer.write(np.full((32, 40, 3), 60 * i, np.uint8))
    writer.release()
    assert run_phase(data, tmp_path, tmp_path / 'exp', '--phase', 'video', '--video_path', str(clip),
                     '--out_dir', str(tmp_path / 'video')) == 0
    assert cv2.VideoCapture(str(tmp_path / 'video' / 'clip_A2B.mp4')).get(cv2.CAP_PROP_FRAME_COUNT) == 3
    assert run_phase(data, tmp_path, tmp_path / 'exp', '--phase', 'video_dir', '--video_path', str(clip.parent),
                     '--out_dir', str(tmp_path / 'video_dir')) == 0
    assert (tmp_path / 'video_dir' / 'clip_A2B.mp4').is_file()
    capsys.readouterr()
    # camera: the export loads; then the missing webcam is the (one-line) error
    assert run_phase(data, tmp_path, tmp_path / 'exp', '--phase', 'camera', '--camera_id', '99') == 2
    err = capsys.readouterr().err
    assert 'loaded' in err and 'error: no camera at index 99' in err


def test_val_evaluates_an_exports_generators_as_the_checkpoints_ema(trained, tmp_path, monkeypatch):
    """--phase val from an export scores the exported (EMA) generators under the _ema names; the
    Inception network is not under test here, so the metrics object only records what it gets."""
    import metrics.training
    data, checkpoint = trained
    export(checkpoint, tmp_path / 'exp')
    evaluated: dict[str, dict] = {}

    class RecordingMetrics:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def evaluate(self, translators):
            evaluated[source.name] = translators
            return {f'FID/A2B{suffix}': 1.0 for suffix in translators}, None

    monkeypatch.setattr(metrics.training, 'TranslationMetrics', RecordingMetrics)
    for source in (checkpoint, tmp_path / 'exp'):
        assert run_phase(data, tmp_path, source, '--phase', 'val') == 0
    from_checkpoint, from_export = evaluated[checkpoint.name], evaluated['exp']
    assert set(from_checkpoint) == {'', '_ema'} and set(from_export) == {'_ema'}
    for direction in ('A2B', 'B2A'):
        ema = from_checkpoint['_ema'].generators[direction].state_dict()
        exported = from_export['_ema'].generators[direction].state_dict()
        assert all(torch.equal(ema[k], exported[k]) for k in ema)


def test_no_ema_on_an_ema_export_is_a_one_line_error(trained, tmp_path, capsys):
    data, checkpoint = trained
    export(checkpoint, tmp_path / 'exp')
    capsys.readouterr()
    assert run_phase(data, tmp_path, tmp_path / 'exp', '--phase', 'test', '--no_ema', 'True') == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error')]
    assert len(err) == 1 and 'export' in err[0] and '--no_ema' in err[0]
    export(checkpoint, tmp_path / 'raw', '--no_ema')
    assert json.loads((tmp_path / 'raw' / 'config.json').read_text())['ema'] is False


def test_fp16_export_is_half_the_size_and_translates_within_a_few_levels(trained, tmp_path):
    data, checkpoint = trained
    export(checkpoint, tmp_path / 'f32')
    export(checkpoint, tmp_path / 'f16', '--fp16')
    for name in ('A2B.safetensors', 'B2A.safetensors'):
        ratio = (tmp_path / 'f16' / name).stat().st_size / (tmp_path / 'f32' / name).stat().st_size
        assert 0.45 < ratio < 0.55
    for source in ('f32', 'f16'):
        assert run_phase(data, tmp_path, tmp_path / source, '--phase', 'img_dir', '--img_dir', str(data / 'testA'),
                         '--out_dir', str(tmp_path / f'out_{source}')) == 0
    f32, f16 = pixels(tmp_path / 'out_f32'), pixels(tmp_path / 'out_f16')
    assert f32.keys() == f16.keys()
    assert max(np.abs(f32[k].astype(int) - f16[k]).max() for k in f32) <= 4


def test_onnx_export_through_the_cli(trained, tmp_path, capsys):
    ort = pytest.importorskip('onnxruntime', reason='needs onnxruntime: pip install -r requirements-extras.txt')
    pytest.importorskip('onnxscript', reason='needs onnxscript: pip install -r requirements-extras.txt')
    _, checkpoint = trained
    printed = export(checkpoint, tmp_path / 'exp', '--onnx', capsys=capsys)
    assert {'A2B.onnx', 'B2A.onnx'} <= {line.split()[0] for line in printed.splitlines()[1:]}
    translator, _ = checkpoints.load_translator(checkpoint)
    session = ort.InferenceSession(str(tmp_path / 'exp' / 'B2A.onnx'), providers=['CPUExecutionProvider'])
    x = torch.rand(2, 3, 44, 36, generator=torch.Generator().manual_seed(0)) * 2 - 1   # light: any multiple of 4
    translation, heatmap = session.run(None, {'image': x.numpy()})
    expected = translator.translate(x, 'B2A')
    assert np.abs(translation - expected.image.numpy()).max() <= 1e-4
    assert np.abs(heatmap - expected.heatmap.numpy()).max() <= 1e-4 * max(1.0, float(expected.heatmap.abs().max()))


def test_pt_format_checkpoint_needs_its_architecture_flags(trained, tmp_path, capsys):
    _, checkpoint = trained
    state = torch.load(checkpoint, weights_only=True)
    pt_file = tmp_path / 'pt_params_0000002.pt'
    torch.save({k: state[k] for k in ('genA2B', 'genB2A', 'disGA', 'disGB', 'disLA', 'disLB')}, pt_file)
    assert export_cli.main(['--checkpoint', str(pt_file), '--out', str(tmp_path / 'x')]) == 2
    assert 'records no architecture' in capsys.readouterr().err
    export(pt_file, tmp_path / 'pt', '--light', 'True', '--ch', '4', '--n_res', '1', '--img_size', '32')
    config = json.loads((tmp_path / 'pt' / 'config.json').read_text())
    assert (config['light'], config['ch'], config['ema']) == (True, 4, False)
    assert '- training flags: not recorded in the checkpoint' in (tmp_path / 'pt' / 'README.md').read_text()


def test_export_refuses_to_write_into_an_unrelated_folder(trained, tmp_path, capsys):
    _, checkpoint = trained
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'docs' / 'notes.txt').write_text('keep me')
    assert export_cli.main(['--checkpoint', str(checkpoint), '--out', str(tmp_path / 'docs')]) == 2
    assert 'not an export folder' in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The model card


def front_matter(card: str) -> dict:
    """The card's YAML front matter with a parser of the subset the Hub's cards use (``key: value``,
    ``- item`` lists, JSON-quoted strings), checked against PyYAML where it is installed."""
    lines = card.split('\n')
    assert lines[0] == '---'
    block = lines[1:lines.index('---', 1)]
    parsed: dict = {}
    key = ''
    for line in block:
        if line.startswith('- '):
            parsed[key].append(_scalar(line[2:]))
        else:
            key, _, value = line.partition(': ') if ': ' in line else (line.rstrip(':'), '', '')
            parsed[key] = _scalar(value) if value else []
    try:
        import yaml
    except ImportError:
        return parsed
    assert yaml.safe_load('\n'.join(block)) == parsed
    return parsed


def _scalar(text: str) -> str:
    return json.loads(text) if text.startswith('"') else text


def run_copy(checkpoint: Path, tmp_path: Path) -> Path:
    """The checkpoint in a run folder of its own (<run>/model/<file>), to put a metrics.jsonl beside."""
    model_dir = tmp_path / 'run' / 'tiny' / 'model'
    model_dir.mkdir(parents=True)
    copy = model_dir / checkpoint.name
    copy.write_bytes(checkpoint.read_bytes())
    return copy


def metrics_line(step: int, fid: float, hashes: dict[str, str], suffix: str) -> str:
    scores = {f'{metric}/{d}{suffix}': value for d in hashes for metric, value in
              (('FID', fid), ('KID', 0.0123), ('KID_std', 0.0045))}
    return json.dumps({'step': step, **scores, 'generators': {f'{d}{suffix}': h for d, h in hashes.items()}})


def test_card_front_matter_parses_and_names_the_model(trained, tmp_path):
    _, checkpoint = trained
    export(checkpoint, tmp_path / 'exp', '--license', 'apache-2.0')
    card = (tmp_path / 'exp' / 'README.md').read_text()
    meta = front_matter(card)
    assert meta == {'library_name': 'pytorch', 'pipeline_tag': 'image-to-image',
                    'tags': ['image-to-image', 'u-gat-it', 'gan'], 'license': 'apache-2.0', 'datasets': ['tiny']}
    assert '| image size | 32 px |' in card and '| base channels (`ch`) | 4 |' in card
    assert '- training step: 2' in card and '- seed: 0' in card
    assert '`--light True --ch 4 --n_res 1 --n_global_dis 4 --n_local_dis 3 --img_size 32 --iteration 2 ' \
           '--ema_start 0.0`' in card   # what differs from main.py's defaults, nothing else
    for command in ('python main.py --phase img_dir --checkpoint', 'python demo.py --checkpoint',
                    'ort.InferenceSession('):
        assert command in card
    export(checkpoint, tmp_path / 'unlicensed')
    assert 'license' not in front_matter((tmp_path / 'unlicensed' / 'README.md').read_text())


def test_card_usage_has_no_local_path_and_says_where_main_py_comes_from(trained, tmp_path, monkeypatch):
    _, checkpoint = trained
    export(checkpoint, tmp_path / 'selfie2anime')
    card = (tmp_path / 'selfie2anime' / 'README.md').read_text()
    assert str(tmp_path) not in card and 'selfie2anime' not in card
    assert 'python main.py --phase img_dir --checkpoint path/to/this/folder --img_dir' in card
    assert 'python demo.py --checkpoint path/to/this/folder\n' in card
    assert "ort.InferenceSession('path/to/this/folder/A2B.onnx')" in card
    assert '`path/to/this/folder` stands for the folder that holds this README' in card
    assert '`main.py` and `demo.py` are the scripts of the U-GAT-IT (PyTorch) project' in card
    monkeypatch.chdir(tmp_path / 'selfie2anime')   # a relative --out is no more a path on the card
    monkeypatch.setattr(model_card, 'PROJECT_URL', 'https://example.org/ugatit.git')
    export(checkpoint, Path('.'))
    card = Path('README.md').read_text()
    assert '--checkpoint path/to/this/folder ' in card and '--checkpoint . ' not in card
    assert '[U-GAT-IT (PyTorch)](https://example.org/ugatit.git) project (`git clone ' \
           'https://example.org/ugatit.git`)' in card


class _RecordingSession:
    """onnxruntime.InferenceSession's stand-in: keeps the input and returns it as the translation."""

    inputs: list = []

    def __init__(self, path: str) -> None:
        self.path = path

    def run(self, outputs, feeds: dict) -> tuple[np.ndarray, np.ndarray]:
        self.inputs.append(feeds['image'])
        return feeds['image'], feeds['image'][:, :1]


@pytest.mark.parametrize('mode', ['RGB', 'RGBA'])
def test_card_onnx_snippet_prepares_images_as_img_dir(trained, tmp_path, monkeypatch, mode):
    """The card's Python block, run as written (onnxruntime replaced), feeds the graph what
    ``--phase img_dir`` feeds the generator for the same 512×600 photo."""
    import types

    import dataset
    import images
    _, checkpoint = trained
    export(checkpoint, tmp_path / 'exp')
    card = (tmp_path / 'exp' / 'README.md').read_text()
    snippet = card.split('```python\n')[1].split('```')[0]
    channels = len(mode)
    pixels = np.random.default_rng(0).integers(0, 256, (600, 512, channels), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / 'photo.png')   # 3 channels: RGB, 4: RGBA
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, 'onnxruntime', types.SimpleNamespace(InferenceSession=_RecordingSession))
    monkeypatch.setattr(_RecordingSession, 'inputs', [])
    exec(snippet, {})
    (fed,) = _RecordingSession.inputs
    expected = dataset.test_transform(32)(images.load_rgb(tmp_path / 'photo.png')).unsqueeze(0).numpy()
    assert fed.shape == expected.shape == (1, 3, 32, 32) and fed.dtype == np.float32
    assert np.abs(fed - expected).max() <= 1 / 255


def test_card_shows_fid_only_for_a_matching_generator_hash(trained, tmp_path):
    from metrics.training import module_sha256
    _, checkpoint = trained
    copy = run_copy(checkpoint, tmp_path)
    ema, _ = checkpoints.load_translator(checkpoint)                   # what the export holds
    raw, _ = checkpoints.load_translator(checkpoint, use_ema=False)
    hashes = {d: module_sha256(ema.generators[d]) for d in ('A2B', 'B2A')}
    raw_hashes = {d: module_sha256(raw.generators[d]) for d in ('A2B', 'B2A')}
    assert hashes != raw_hashes
    metrics = copy.parents[1] / 'metrics.jsonl'
    metrics.write_text(metrics_line(1, 111.1, raw_hashes, '') + '\n' +
                       metrics_line(2, 42.5, {'A2B': hashes['A2B'], 'B2A': 'f' * 64}, '_ema') + '\n')
    export(copy, tmp_path / 'none')
    card = (tmp_path / 'none' / 'README.md').read_text()
    assert 'No FID/KID on record' in card and '111.1' not in card and '42.5' not in card

    with metrics.open('a') as f:
        f.write(metrics_line(2, 42.5, hashes, '_ema') + '\n')
    export(copy, tmp_path / 'scored')
    card = (tmp_path / 'scored' / 'README.md').read_text()
    assert 'step 2 (EMA generators' in card and '| A → B | 42.50 | 0.0123 ± 0.0045 |' in card
    assert '111.1' not in card
    export(copy, tmp_path / 'raw', '--no_ema')   # the raw generators get the raw score
    assert '| B → A | 111.10 |' in (tmp_path / 'raw' / 'README.md').read_text()
    export(copy, tmp_path / 'half', '--fp16')    # rounded weights are other weights
    assert 'No FID/KID on record' in (tmp_path / 'half' / 'README.md').read_text()


def test_samples_grid_from_the_dataset_or_samples_flag(trained, tmp_path, capsys):
    data, checkpoint = trained
    export(checkpoint, tmp_path / 'exp')
    # three test images per domain: rows A, A→B, B, B→A of 32-px tiles
    assert Image.open(tmp_path / 'exp' / 'samples.png').size == (3 * 32, 4 * 32)
    assert '![samples](samples.png)' in (tmp_path / 'exp' / 'README.md').read_text()
    other = tmp_path / 'other'
    make_domain(other / 'testA', 6, 50, (10, 200, 10), 1)
    make_domain(other / 'testB', 5, 30, (10, 10, 200), 2)
    export(checkpoint, tmp_path / 'exp', '--samples', str(other))   # at most 4 per domain
    grid = np.asarray(Image.open(tmp_path / 'exp' / 'samples.png'))
    assert grid.shape == (4 * 32, 4 * 32, 3)
    assert grid[:32, :32, 1].mean() > grid[:32, :32, 0].mean()   # the first row is --samples' testA
    assert export_cli.main(['--checkpoint', str(checkpoint), '--out', str(tmp_path / 'x'), '--samples',
                            str(data / 'testA')]) == 2
    assert 'needs testA/ and testB/' in capsys.readouterr().err
    # an export re-exported elsewhere has no dataset: no samples, and no stale grid left behind
    export(tmp_path / 'exp', tmp_path / 'exp')
    assert not (tmp_path / 'exp' / 'samples.png').exists()
    assert 'samples.png' not in (tmp_path / 'exp' / 'README.md').read_text()


# ----------------------------------------------------------------------------------------------
# --keep_size through main.py


def test_keep_size_img_dir_from_a_light_export_writes_each_image_at_its_own_size(trained, tmp_path):
    data, checkpoint = trained
    export(checkpoint, tmp_path / 'exp')
    photos = tmp_path / 'photos'
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in {'wide': (300, 200), 'odd': (38, 26)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / f'{name}.png')
    for flags in ((), ('--max_size', '100')):
        out = tmp_path / f'out{len(flags)}'
        assert run_phase(data, tmp_path, tmp_path / 'exp', '--phase', 'img_dir', '--img_dir', str(photos),
                         '--out_dir', str(out), '--keep_size', 'True', *flags) == 0
        assert {p.name: Image.open(p).size for p in out.glob('*.png')} == {'wide.png': (300, 200),
                                                                           'odd.png': (38, 26)}


def test_keep_size_with_a_full_model_is_a_one_line_error(trained, tmp_path, capsys):
    data, _ = trained
    assert main.main(tiny_flags(data, tmp_path / 'full', '--light', 'False', '--iteration', '1',
                                '--save_freq', '1')) == 0
    capsys.readouterr()
    assert main.main(tiny_flags(data, tmp_path / 'full', '--light', 'False', '--phase', 'img_dir',
                                '--img_dir', str(data / 'testA'), '--keep_size', 'True')) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error')]
    assert len(err) == 1 and 'full model' in err[0] and '32x32' in err[0]


@pytest.mark.parametrize('flags,message', [
    (('--phase', 'val', '--keep_size', 'True'), 'not to --phase val'),
    (('--phase', 'img_dir', '--img_dir', '.', '--keep_size', 'True', '--align_faces', 'True'), '--align_faces'),
    (('--phase', 'img_dir', '--img_dir', '.', '--max_size', '100'), '--keep_size True'),
])
def test_keep_size_flag_combinations_are_checked(trained, tmp_path, flags, message):
    data, _ = trained
    with pytest.raises(errors.UserError, match=message):
        main.parse_args(tiny_flags(data, tmp_path, *flags))
