"""How the files beside this script were written (once, by the release before the restructuring of
issue 18); tests/test_release_compat.py checks that every later release reads them the same.

    python tests/data/release_v1/make.py     # from the repository root; rewrites the folder

- tiny_params_0000003.pt: a training checkpoint (EMA, ADA, Adam moments, RNG states), 32 px light
  model with scSE blocks (a non-default architecture flag the loader must read from the file);
- pt_format.pt: its six PT state dicts only, as the official PyTorch code writes them;
- export/: scripts/export.py's folder (config.json + safetensors) of the same checkpoint;
- expected.pt: the probe image and what each of them translates it to.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'tests'))

FLAGS = ['--light', 'True', '--ch', '4', '--n_res', '1', '--img_size', '32', '--n_global_dis', '4',
         '--n_local_dis', '3', '--use_se', 'True', '--ada', 'True', '--iteration', '3', '--save_freq', '3',
         '--num_workers', '0', '--device', 'cpu', '--latest_freq', '0', '--print_freq', '1000', '--seed', '5']


def probe() -> torch.Tensor:
    """A fixed smooth test image in [-1, 1]."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing='ij')
    return torch.stack([x, y, x * y])[None]


def main() -> None:
    from conftest import make_dataset

    import checkpoints
    import main as cli
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / 'tiny')
        assert cli.main(['--dataset', str(data), '--result_dir', str(Path(tmp) / 'out'), *FLAGS]) == 0
        source = Path(tmp) / 'out' / 'tiny' / 'model' / 'tiny_params_0000003.pt'
        shutil.copy(source, HERE / source.name)
    state = torch.load(HERE / 'tiny_params_0000003.pt', weights_only=True)
    torch.save({k: state[k] for k in ('genA2B', 'genB2A', 'disGA', 'disGB', 'disLA', 'disLB')}, HERE / 'pt_format.pt')
    shutil.rmtree(HERE / 'export', ignore_errors=True)
    subprocess.run([sys.executable, str(ROOT / 'scripts' / 'export.py'), '--checkpoint',
                    str(HERE / 'tiny_params_0000003.pt'), '--out', str(HERE / 'export')], check=True)
    expected = {'probe': probe()}
    for name, use_ema in (('ema', True), ('raw', False)):
        translator, _ = checkpoints.load_translator(HERE / 'tiny_params_0000003.pt', 'cpu', use_ema=use_ema)
        for d in ('A2B', 'B2A'):
            out = translator.translate(probe(), d)
            expected[f'{name}_{d}'] = out.image
            expected[f'{name}_{d}_heatmap'] = out.heatmap
    torch.save(expected, HERE / 'expected.pt')


if __name__ == '__main__':
    main()
