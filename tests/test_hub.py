"""hf://OWNER/NAME[@REVISION] checkpoints and scripts/export.py --push_to_hub, with the Hub's download
and upload calls replaced (no network): what is asked of the library, and one line per failure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset, tiny_flags
from PIL import Image

import checkpoints
import main
from errors import UserError
from scripts import export as export_cli

hf = pytest.importorskip('huggingface_hub', reason='needs huggingface_hub: pip install -r requirements-extras.txt')
from huggingface_hub import errors  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, export folder) of a 1-step tiny light model."""
    root = tmp_path_factory.mktemp('hub')
    data = make_dataset(root / 'tiny')
    assert main.main(tiny_flags(data, root / 'run', '--iteration', '1', '--save_freq', '1')) == 0
    checkpoint = next((root / 'run' / 'tiny' / 'model').glob('tiny_params_*.pt'))
    assert export_cli.main(['--checkpoint', str(checkpoint), '--out', str(root / 'exp')]) == 0
    return data, root / 'exp'


class FakeDownload:
    """Stands in for huggingface_hub.snapshot_download: records the call, returns a local folder."""

    def __init__(self, folder: Path | None = None, error: Exception | None = None) -> None:
        self.folder, self.error, self.calls = folder, error, []

    def __call__(self, repo_id: str, **kwargs) -> str:
        self.calls.append({'repo_id': repo_id, **kwargs})
        if self.error is not None:
            raise self.error
        return str(self.folder)


def hub_error(cls: type[Exception], message: str) -> Exception:
    """An error of the library's class without building the HTTP response its constructor wants."""
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    return exc


def img_dir(data: Path, tmp_path: Path, checkpoint: str, out: str) -> int:
    return main.main(tiny_flags(data, tmp_path / 'r', '--phase', 'img_dir', '--img_dir', str(data / 'testA'),
                                '--checkpoint', checkpoint, '--out_dir', str(tmp_path / out)))


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob('*.png'))}


def test_hf_checkpoint_fetches_only_config_and_safetensors_and_translates_as_the_folder(exported, tmp_path,
                                                                                       monkeypatch):
    data, folder = exported
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    fake = FakeDownload(folder)
    monkeypatch.setattr(hf, 'snapshot_download', fake)
    assert img_dir(data, tmp_path, 'hf://someone/tiny-model@v1.0', 'hub') == 0
    assert fake.calls == [{'repo_id': 'someone/tiny-model', 'revision': 'v1.0',
                           'allow_patterns': ['config.json', '*.safetensors'], 'local_files_only': False}]
    assert img_dir(data, tmp_path, str(folder), 'local') == 0
    hub_out, local_out = pixels(tmp_path / 'hub'), pixels(tmp_path / 'local')
    assert hub_out.keys() == local_out.keys() and all(np.array_equal(hub_out[k], local_out[k]) for k in hub_out)
    # the ONNX graphs only when asked; no revision: the library's default branch
    checkpoints.resolve_location('hf://someone/tiny-model', onnx=True)
    assert fake.calls[-1]['revision'] is None and fake.calls[-1]['allow_patterns'][2:] == ['*.onnx', '*.onnx.data']


def test_demo_loads_an_hf_checkpoint(exported, monkeypatch):
    import demo
    _, folder = exported
    monkeypatch.setattr(hf, 'snapshot_download', FakeDownload(folder))
    translator = demo.load_model('hf://someone/tiny-model', 'cpu', use_ema=True)
    assert translator.arch.img_size == 32 and demo.title('hf://someone/tiny-model') == 'someone/tiny-model'


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error')]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize('error,message', [
    (hub_error(errors.RepositoryNotFoundError, '404 Repository Not Found'), 'no such model repository'),
    (hub_error(errors.RevisionNotFoundError, '404 Revision Not Found'), "no revision 'v1.0'"),
    (errors.LocalEntryNotFoundError('An error happened while trying to locate the files on the Hub'),
     'cannot reach the Hugging Face Hub (no network?)'),
])
def test_missing_repository_revision_or_network_is_one_line(exported, tmp_path, monkeypatch, capsys, error, message):
    data, _ = exported
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.setattr(hf, 'snapshot_download', FakeDownload(error=error))
    assert img_dir(data, tmp_path, 'hf://someone/tiny-model@v1.0', 'out') == 2
    line = _one_error_line(capsys)
    assert line.startswith('error: hf://someone/tiny-model@v1.0') and message in line


def test_a_repository_that_is_not_an_export_is_one_line(exported, tmp_path, monkeypatch, capsys):
    data, _ = exported
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'config.json').write_text(json.dumps({'model_type': 'bert'}))
    empty = tmp_path / 'empty'   # a repository without config.json: nothing matched the patterns
    empty.mkdir()
    for folder in (other, empty):
        monkeypatch.setattr(hf, 'snapshot_download', FakeDownload(folder))
        assert img_dir(data, tmp_path, 'hf://someone/bert', 'out') == 2
        assert 'hf://someone/bert is not a U-GAT-IT export' in _one_error_line(capsys)


def test_bad_names_and_a_missing_library_are_one_line(monkeypatch):
    with pytest.raises(UserError, match='expected hf://OWNER/NAME'):
        checkpoints.resolve_location('hf://just-a-name')
    monkeypatch.setitem(sys.modules, 'huggingface_hub', None)   # import fails as when not installed
    with pytest.raises(UserError, match='pip install -r requirements-extras.txt'):
        checkpoints.resolve_location('hf://someone/tiny-model')


def test_offline_with_an_empty_cache_is_one_line(exported, tmp_path):
    """The real library, HF_HUB_OFFLINE=1 and a fresh HF_HOME: local_files_only finds nothing."""
    data, _ = exported
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf'), 'OMP_NUM_THREADS': '1'}
    result = subprocess.run([sys.executable, str(REPO / 'main.py'), *tiny_flags(
        data, tmp_path / 'r', '--phase', 'img_dir', '--img_dir', str(data / 'testA'), '--checkpoint',
        'hf://someone/tiny-model')], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ('error: hf://someone/tiny-model is not in the local Hugging Face cache and '
                                     'HF_HUB_OFFLINE is set: fetch it once online')


def test_offline_once_cached(exported, tmp_path, monkeypatch):
    """A snapshot in the library's cache layout loads with HF_HUB_OFFLINE=1 (local_files_only)."""
    data, folder = exported
    cache = tmp_path / 'hub'
    snapshot = cache / 'models--someone--tiny-model' / 'snapshots' / ('0' * 40)
    snapshot.mkdir(parents=True)
    (cache / 'models--someone--tiny-model' / 'refs').mkdir()
    (cache / 'models--someone--tiny-model' / 'refs' / 'main').write_text('0' * 40)
    for name in ('config.json', 'A2B.safetensors', 'B2A.safetensors'):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    monkeypatch.setattr(hf.constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    assert checkpoints.resolve_location('hf://someone/tiny-model') == snapshot.resolve()
    assert img_dir(data, tmp_path, 'hf://someone/tiny-model', 'cached') == 0
    assert pixels(tmp_path / 'cached')


# ----------------------------------------------------------------------------------------------
# scripts/export.py --push_to_hub


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records create_repo and upload_folder."""

    calls: list = []
    error: Exception | None = None

    def create_repo(self, repo_id: str, **kwargs) -> None:
        if self.error is not None:
            raise self.error
        self.calls.append(('create_repo', repo_id, kwargs))

    def upload_folder(self, **kwargs) -> None:
        self.calls.append(('upload_folder', kwargs['repo_id'], kwargs))


def test_push_uploads_the_export_folder_with_its_card(exported, tmp_path, monkeypatch, capsys):
    _, folder = exported
    monkeypatch.setattr(FakeApi, 'calls', [])
    monkeypatch.setattr(hf, 'HfApi', FakeApi)
    out = tmp_path / 'exp'
    assert export_cli.main(['--checkpoint', str(folder), '--out', str(out), '--push_to_hub', 'someone/tiny-model',
                            '--private']) == 0
    (create, repo, options), (upload, repo2, kwargs) = FakeApi.calls
    assert (create, repo, options['private'], options['exist_ok']) == ('create_repo', 'someone/tiny-model', True, True)
    assert (upload, repo2, Path(kwargs['folder_path'])) == ('upload_folder', 'someone/tiny-model', out)
    assert 'pushed to https://huggingface.co/someone/tiny-model' in capsys.readouterr().out
    card = (out / 'README.md').read_text()
    assert 'python demo.py --checkpoint hf://someone/tiny-model' in card   # usage names the repository


def test_push_without_login_is_one_line(exported, tmp_path, monkeypatch, capsys):
    _, folder = exported
    monkeypatch.setattr(FakeApi, 'error', errors.LocalTokenNotFoundError('Token is required'))
    monkeypatch.setattr(hf, 'HfApi', FakeApi)
    assert export_cli.main(['--checkpoint', str(folder), '--out', str(tmp_path / 'exp'),
                            '--push_to_hub', 'someone/tiny-model']) == 2
    assert 'not logged in' in _one_error_line(capsys)
    assert export_cli.main(['--checkpoint', str(folder), '--out', str(tmp_path / 'exp2'), '--private']) == 2
    assert '--push_to_hub' in _one_error_line(capsys)


BAD_IDS = ['a..b/c', 'someone/a--b', 'someone/-name', 'someone/' + 'x' * 97]   # all match the old [\w.-]+ regex


@pytest.mark.parametrize('repo_id', BAD_IDS)
def test_push_to_an_id_the_hub_rejects_is_one_line_before_anything_is_written(exported, tmp_path, monkeypatch,
                                                                              capsys, repo_id):
    _, folder = exported
    monkeypatch.setattr(FakeApi, 'calls', [])
    monkeypatch.setattr(hf, 'HfApi', FakeApi)
    out = tmp_path / 'exp'
    assert export_cli.main(['--checkpoint', str(folder), '--out', str(out), '--push_to_hub', repo_id]) == 2
    assert f'error: --push_to_hub {repo_id}: not a valid Hugging Face Hub repository id' in _one_error_line(capsys)
    assert FakeApi.calls == [] and not out.exists()


@pytest.mark.parametrize('repo_id', BAD_IDS)
def test_hf_uri_the_hub_rejects_is_one_line_without_a_download(exported, tmp_path, monkeypatch, capsys, repo_id):
    data, folder = exported
    fake = FakeDownload(folder)
    monkeypatch.setattr(hf, 'snapshot_download', fake)
    assert img_dir(data, tmp_path, f'hf://{repo_id}@v1', 'out') == 2
    assert f'error: hf://{repo_id}@v1: not a valid Hugging Face Hub repository id' in _one_error_line(capsys)
    assert fake.calls == []


def test_push_prints_the_url_of_the_configured_endpoint(exported, tmp_path, monkeypatch, capsys):
    _, folder = exported
    monkeypatch.setattr(FakeApi, 'calls', [])
    monkeypatch.setattr(hf, 'HfApi', FakeApi)
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'ENDPOINT', 'https://hub.example.org')
    assert export_cli.main(['--checkpoint', str(folder), '--out', str(tmp_path / 'exp'),
                            '--push_to_hub', 'someone/tiny-model']) == 0
    assert 'pushed to https://hub.example.org/someone/tiny-model\n' in capsys.readouterr().out


def test_push_url_follows_the_hf_endpoint_variable(tmp_path):
    """HF_ENDPOINT as a user sets it, read by the real library at import (the upload itself replaced)."""
    code = ('import huggingface_hub as hf, hub\n'
            'class Api:\n'
            '    def create_repo(self, *a, **k): pass\n'
            '    def upload_folder(self, **k): pass\n'
            'hf.HfApi = Api\n'
            "print(hub.push('.', 'someone/tiny-model'))\n")
    env = {**os.environ, 'HF_ENDPOINT': 'https://mirror.example.org/', 'PYTHONPATH': str(REPO)}
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'https://mirror.example.org/someone/tiny-model'
