"""The model card of an export: ``README.md`` in the Hugging Face Hub's convention (YAML front matter,
then Markdown) and a ``samples.png`` grid, written next to the weights by scripts/export.py and
scripts/convert_tf_checkpoint.py --export.

Everything on the card comes from the export itself (config.json, the generators as a reader loads
them) or from files found beside the training run, never from other weights: FID/KID appear only
when the run's ``metrics.jsonl`` scored generators with exactly the exported weights' hash.

    EXPORT/README.md     front matter, samples, architecture, training, scores, usage, origin
    EXPORT/samples.png   rows: test A, A→B, test B, B→A (SAMPLES images each)
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import dataset as data
import errors
import images
import options
import run_folder
from checkpoints import CONFIG_NAME
from model import DIRECTIONS, ArchConfig, Translator

CARD_NAME = 'README.md'
SAMPLES_NAME = 'samples.png'
SAMPLES = 4   # images per domain in samples.png
TAGS = ('image-to-image', 'u-gat-it', 'gan')
TF_REPOSITORY = 'https://github.com/taki0112/UGATIT'
PROJECT_NAME = 'U-GAT-IT (PyTorch)'   # this project, as its README names itself
PROJECT_URL: str | None = None        # its public repository: README names none yet; the card links it when set
THIS_FOLDER = 'path/to/this/folder'   # the card's --checkpoint for an export not on the Hub: it may be copied anywhere
# Flags about this machine, paths and the inference phases: not part of how the weights came to be
# (--recompute and --memory_check decide where memory goes on this card; they change no number).
NOT_TRAINING = frozenset({
    'recompute', 'memory_check',
    'phase', 'dataset', 'result_dir', 'device', 'seed', 'resume', 'overwrite', 'checkpoint', 'no_ema', 'img_dir',
    'direction', 'out_dir', 'video_path', 'camera_id', 'crop', 'align_faces', 'keep_size', 'max_size', 'num_workers',
    'print_freq', 'log_freq', 'save_freq', 'latest_freq', 'keep_checkpoints', 'metric_freq', 'fid_batch',
    'inception_weights', 'facenet_weights', 'facenet_checkpoint_dir', 'faceseg_weights'})


@dataclass(frozen=True)
class CardOptions:
    """What the exporter is told beyond the weights: the license, where test images are, the repo."""

    license: str | None = None
    samples: Path | None = None    # a folder holding testA/ and testB/
    repo_id: str | None = None     # OWNER/NAME when pushed: the usage commands name hf://OWNER/NAME


# ----------------------------------------------------------------------------------------------
# What the export records (stored in config.json by the exporter)


def changed_flags(config: Mapping) -> list[str]:
    """The training flags of a checkpoint's config that differ from main.py's defaults, as
    ``'--key value'`` (architecture keys against ArchConfig's, which resolve the derived ones);
    machine and path flags left out."""
    defaults = {**vars(options.build_parser().parse_args([])), **ArchConfig().to_dict()}
    values = dict(config)
    if values.get('steps_per_epoch'):   # --epoch made --iteration the total; the flag was per epoch
        values['iteration'] = values['steps_per_epoch']
    return [f'{ArchConfig.flag_name(key)} {_value(values[key])}' for key in defaults
            if key in values and key not in NOT_TRAINING and values[key] != defaults[key]]


def provenance(state: Mapping) -> dict:
    """config.json's record of the TF checkpoint a converted model came from (names only, no local
    path): {'converted_from': 'run folder/prefix', 'converted_step': N}, or {}."""
    source = state.get('source')
    if isinstance(source, Mapping) and 'tf_checkpoint' in source:
        prefix = Path(source['tf_checkpoint'])
        return {'converted_from': f'{prefix.parent.name}/{prefix.name}', 'converted_step': source.get('tf_step')}
    config = state.get('config') or {}   # an export of an export keeps it
    return {key: config[key] for key in ('converted_from', 'converted_step') if config.get(key) is not None}


def run_dir_of(checkpoint: str | Path, dataset_name: str | None) -> Path | None:
    """The run folder of a training checkpoint: ``<run>/model/<file>``, or PT's
    ``<result_dir>/<dataset>_params_latest.pt`` beside ``<result_dir>/<dataset>/``."""
    path = Path(checkpoint)
    if not path.is_file():
        return None
    if path.parent.name == run_folder.MODEL_DIR:
        return path.parent.parent
    return path.parent / dataset_name if dataset_name else None


def samples_root(options_samples: Path | None, config: Mapping) -> Path | None:
    """--samples, else the training dataset when its test folders are on this machine."""
    if options_samples is not None:
        if not _has_test_images(Path(options_samples)):
            raise errors.UserError(f'--samples {options_samples}: needs testA/ and testB/ folders of images')
        return Path(options_samples)
    root = config.get('dataset_root')
    return Path(root) if root and _has_test_images(Path(root)) else None


def _has_test_images(root: Path) -> bool:
    return all((root / f'test{d}').is_dir() and images.find_images(root / f'test{d}') for d in 'AB')


# ----------------------------------------------------------------------------------------------
# Scores and samples


def generator_hashes(translator: Translator) -> dict[str, str]:
    # The hash metrics.jsonl records; imported here, as the Inception stack is needed for nothing else.
    from metrics.training import module_sha256
    return {d.name: module_sha256(translator.generators[d.name]) for d in DIRECTIONS}


def matching_scores(metrics_file: Path, hashes: Mapping[str, str]) -> dict | None:
    """The newest metrics.jsonl entry that scored generators with exactly these hashes (both
    directions, raw or EMA): {'step', 'suffix', 'scores': {direction: (FID, KID, KID_std)}}."""
    if not metrics_file.is_file():
        return None
    found = None
    for line in metrics_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue   # a line cut by a crash: the others still count
        scored = record.get('generators') or {}
        for suffix in ('', '_ema'):
            if all(scored.get(f'{name}{suffix}') == digest for name, digest in hashes.items()):
                found = {'step': record.get('step'), 'suffix': suffix,
                         'scores': {name: tuple(record.get(f'{metric}/{name}{suffix}')
                                                for metric in ('FID', 'KID', 'KID_std')) for name in hashes}}
    return found


def samples_grid(translator: Translator, root: Path, n: int = SAMPLES) -> np.ndarray:
    """Rows: the first n test images of A, their A→B translations, the same for B (img_size tiles)."""
    batches = {d.source: next(iter(data.build_test_loader(root / f'test{d.source}', translator.img_size,
                                                          batch_size=n)))[0] for d in DIRECTIONS}
    columns = min(len(b) for b in batches.values())
    rows = []
    for d in DIRECTIONS:
        real = batches[d.source][:columns]
        fake = translator.translate(real, d.name).image
        rows += [[images.tensor_to_uint8(t) for t in real], [images.tensor_to_uint8(t) for t in fake]]
    return np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)


# ----------------------------------------------------------------------------------------------
# The card


def front_matter(config: Mapping, license: str | None) -> str:
    """YAML metadata the Hub reads (strings JSON-quoted: valid YAML, no dependency to write it)."""
    lines = ['---', 'library_name: pytorch', 'pipeline_tag: image-to-image', 'tags:']
    lines += [f'- {tag}' for tag in TAGS]
    if license:
        lines.append(f'license: {json.dumps(license)}')
    elif config.get('converted_from'):   # the original release's terms; the Hub's form for a named license
        lines += ['license: other', 'license_name: ugatit-original', f'license_link: {TF_REPOSITORY}']
    if config.get('dataset_name'):
        lines += ['datasets:', f'- {json.dumps(config["dataset_name"])}']
    return '\n'.join(lines + ['---'])


def architecture_table(arch: ArchConfig, translator: Translator, config: Mapping) -> str:
    light = 'full (flattened MLP input)' if arch.is_full else \
        ('light (pooled MLP input)' if arch.light is True else f'light, {arch.light}x{arch.light} pooled MLP input')
    graph = f'official TensorFlow (graph {arch.tf_graph or "current"}, smoothing {arch.smoothing})' \
        if arch.arch == 'tf' else 'official PyTorch'
    params = sum(p.numel() for p in translator.generators['A2B'].parameters())
    rows = [('model', light), ('graph', graph), ('base channels (`ch`)', arch.ch),
            ('residual blocks (`n_res`)', arch.n_res), ('image size', f'{arch.img_size} px'),
            ('parameters per generator', f'{params / 1e6:.2f} M'),
            ('weights', f'{"EMA" if config.get("ema") else "raw"} generators, {config.get("dtype", "float32")}')]
    extras = [f'`--{key} {_value(getattr(arch, key))}`' for key in ('use_se', 'attention_gan', 'attention_input',
                                                                      'use_deconv')
              if getattr(arch, key) != getattr(ArchConfig(), key)]
    if extras:
        rows.append(('generator options', ' '.join(extras)))
    return '\n'.join(['| | |', '|---|---|'] + [f'| {name} | {value} |' for name, value in rows])


def training_section(config: Mapping) -> str:
    converted = bool(config.get('converted_from'))
    step = config.get('converted_step') if converted else config.get('step')
    lines = [f'- training step: {step}' + (' (TensorFlow)' if converted else '')]
    if config.get('seed') is not None:
        lines.append(f'- seed: {config["seed"]}')
    flags = config.get('training_flags')
    if flags is None:   # PT-format files record no flags
        lines.append('- training flags: not recorded in the checkpoint')
    else:
        lines.append(f'- flags that differ from the defaults: `{" ".join(flags)}`' if flags else
                     '- flags that differ from the defaults: none')
    return '\n'.join(lines)


def scores_section(found: dict | None) -> str:
    if found is None:
        return ('No FID/KID on record for exactly these weights (scores are shown only when the training '
                "run's metrics.jsonl scored generators with the same hash).")
    kind = 'EMA' if found['suffix'] else 'raw'
    lines = [f"Scored during training at step {found['step']} ({kind} generators, the same weights by hash; "
             'FID/KID of the test translations against the target training images):', '',
             '| direction | FID | KID |', '|---|---|---|']
    for name, (fid, kid, std) in found['scores'].items():
        kid_text = f'{kid:.4f} ± {std:.4f}' if kid is not None and std is not None else _number(kid)
        lines.append(f'| {name.replace("2", " → ")} | {_number(fid)} | {kid_text} |')
    return '\n'.join(lines)


def usage_section(location: str, arch: ArchConfig, has_onnx: bool) -> str:
    """How to run the export: ``location`` is hf://OWNER/NAME once pushed, else :data:`THIS_FOLDER` (never
    the exporter's own path, which means nothing to a reader of a copied or downloaded folder)."""
    size = arch.img_size
    pushed = location.startswith('hf://')
    note = '' if has_onnx else ('\nThis export holds no ONNX graphs yet: `python scripts/export.py --checkpoint '
                                f'{location} --out DIR --onnx` adds them.\n')
    if pushed:
        onnx_path = f"hf_hub_download('{location.removeprefix('hf://')}', 'A2B.onnx')"
        fetch = 'from huggingface_hub import hf_hub_download\n'
        where = ''
    else:
        onnx_path, fetch = f"'{location}/A2B.onnx'", ''
        where = f' `{location}` stands for the folder that holds this README.'
    return f"""`main.py` and `demo.py` are the scripts of {project_reference()}, whose `scripts/export.py` wrote
this folder: run them from its checkout (`pip install -r requirements.txt`; the demo and ONNX need
`requirements-extras.txt`). No model flag is needed: the architecture is read from `config.json`.{where}

```bash
python main.py --phase img_dir --checkpoint {location} --img_dir photos/ --direction A2B --out_dir out/
python demo.py --checkpoint {location}
```

With onnxruntime alone (input: float32 N×3×H×W in [-1, 1]; outputs `translation`, `heatmap`), prepared
as `main.py --phase img_dir` prepares images:
{note}
```python
import numpy as np, onnxruntime as ort
from PIL import Image, ImageOps
{fetch}session = ort.InferenceSession({onnx_path})
image = ImageOps.exif_transpose(Image.open('photo.png'))  # as main.py: upright, transparent pixels on white,
image = Image.alpha_composite(Image.new('RGBA', image.size, 'white'), image.convert('RGBA')).convert('RGB')
image = image.resize(({size}, {size}), Image.Resampling.BILINEAR)  # then a bilinear resize
x = np.asarray(image, np.float32).transpose(2, 0, 1)[None] / 127.5 - 1
translation, heatmap = session.run(None, {{'image': x}})
Image.fromarray(((translation[0].transpose(1, 2, 0) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)).save('out.png')
```"""


def project_reference() -> str:
    """Where main.py comes from: a link and the clone command once the project names a public home."""
    if PROJECT_URL is None:
        return f'the {PROJECT_NAME} project'
    return f'the [{PROJECT_NAME}]({PROJECT_URL}) project (`git clone {PROJECT_URL}`)'


def origin_section(config: Mapping, license: str | None) -> str:
    if config.get('converted_from'):
        return (f"Converted from the official TensorFlow U-GAT-IT checkpoint `{config['converted_from']}` "
                f"(step {config.get('converted_step')}) released with [taki0112/UGATIT]({TF_REPOSITORY}), by "
                "`scripts/convert_tf_checkpoint.py`, which changes the weights' layout, not their values. The "
                'license and terms of the original release apply to these weights.')
    if license:
        return f'License: `{license}`.'
    return 'License: not specified (the exporter gave no `--license`).'


def render(config: Mapping, translator: Translator, found: dict | None, has_samples: bool, has_onnx: bool,
           opts: CardOptions, location: str) -> str:
    """The whole README.md."""
    arch = translator.arch
    name = config.get('dataset_name')
    parts = [front_matter(config, opts.license), '',
             f'# U-GAT-IT: {name}' if name else '# U-GAT-IT model', '',
             'Two [U-GAT-IT](https://arxiv.org/abs/1907.10830) generators (unpaired image-to-image translation '
             'with attention and AdaLIN) translating domain A to B and B to A'
             + (f', trained on `{name}`' if config.get('dataset_name') else '')
             + ', stored as safetensors with their architecture in `config.json`.']
    if has_samples:
        parts += ['', f'![samples]({SAMPLES_NAME})', '',
                  'Rows: test images of A, their A → B translations, test images of B, their B → A translations.']
    parts += ['', '## Model', '', architecture_table(arch, translator, config),
              '', '## Training', '', training_section(config),
              '', '## Scores', '', scores_section(found),
              '', '## Use', '', usage_section(location, arch, has_onnx),
              '', '## Origin and license' if config.get('converted_from') else '## License', '',
              origin_section(config, opts.license), '']
    return '\n'.join(parts)


def write_card(folder: str | Path, translator: Translator, opts: CardOptions, run_dir: Path | None = None,
               samples: Path | None = None) -> list[Path]:
    """Write README.md (and samples.png from ``samples``/testA, testB) into the export ``folder``;
    ``translator`` holds the exported generators as a reader gets them. Returns the files written."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    found = matching_scores(run_dir / run_folder.METRICS_FILE, generator_hashes(translator)) if run_dir else None
    written = []
    samples_path = folder / SAMPLES_NAME
    samples_path.unlink(missing_ok=True)   # never a stale grid of earlier weights
    if samples is not None:
        images.save_rgb(samples_path, samples_grid(translator, samples))
        written.append(samples_path)
    location = f'hf://{opts.repo_id}' if opts.repo_id else THIS_FOLDER
    card = folder / CARD_NAME
    card.write_text(render(config, translator, found, samples is not None, any(folder.glob('*.onnx')), opts,
                           location))
    return [card, *written]


def _value(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ','.join(str(v) for v in value)
    return str(value)


def _number(value: float | None) -> str:
    return 'n/a' if value is None else f'{value:.4f}' if abs(value) < 10 else f'{value:.2f}'
