"""Checkpoint files as users meet them: one-line errors for what is not a checkpoint, saves that survive
a power loss, and --overwrite moving every output a run folder can hold."""
from __future__ import annotations

import os
import stat

import pytest
import torch
from conftest import tiny_flags

import checkpoints
import main
import run_folder


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny run with one checkpoint (trained once for the module)."""
    from conftest import make_dataset
    root = tmp_path_factory.mktemp('trained')
    dataset = make_dataset(root / 'tiny')
    out = root / 'out'
    assert main.main(tiny_flags(dataset, out, '--iteration', '1', '--save_freq', '1')) == 0
    return dataset, out, out / 'tiny' / 'model' / 'tiny_params_0000001.pt'


def _test_phase(trained, checkpoint, capsys) -> tuple[int, str]:
    dataset, out, _ = trained
    code = main.main(tiny_flags(dataset, out, '--phase', 'test', '--checkpoint', str(checkpoint)))
    return code, capsys.readouterr().err


def test_a_text_file_as_checkpoint_is_named_as_such(trained, tmp_path, capsys):
    """Issue 24 7a: it said 'cannot load checkpoint notes.txt: 101' (PyTorch's KeyError)."""
    notes = tmp_path / 'notes.txt'
    notes.write_text('learning rate 1e-4 worked best\n')
    code, err = _test_phase(trained, notes, capsys)
    assert code == 2 and f'error: {notes} is not a PyTorch checkpoint' in err and '101' not in err
    assert len(err.strip().splitlines()) == 1


def test_a_truncated_checkpoint_says_so_in_whole_words(trained, tmp_path, capsys):
    """It stopped mid-sentence ('...there is a high likelihood that your checkpoint file is')."""
    cut = tmp_path / 'cut.pt'
    data = trained[2].read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    code, err = _test_phase(trained, cut, capsys)
    assert code == 2 and 'is cut short or damaged' in err and err.strip().endswith('use an earlier checkpoint')


def test_a_missing_checkpoint_is_not_found(trained, tmp_path, capsys):
    code, err = _test_phase(trained, tmp_path / 'nowhere.pt', capsys)
    assert code == 2 and err.strip() == f'error: --checkpoint: {tmp_path / "nowhere.pt"} not found'


def test_first_sentence_keeps_whole_words():
    exc = RuntimeError('Reading failed: bad archive. This is an internal error. ' + 'x ' * 400)
    assert checkpoints.first_sentence(exc) == 'Reading failed: bad archive'
    long = checkpoints.first_sentence(RuntimeError('word ' * 200), limit=50)
    assert long.endswith(' …') and len(long) <= 52 and 'wor …' not in long


def test_atomic_save_syncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    """Issue 24 6d: without a folder fsync a power loss can undo a rename reported as written (this
    test failed before: only the file was synced)."""
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real_fsync(fd)
    monkeypatch.setattr(os, 'fsync', fsync)
    checkpoints.atomic_save({'w': torch.zeros(3)}, tmp_path / 'model.pt')
    assert synced == [False, True]   # the file's data, then the folder holding its new name


def test_overwrite_moves_every_output_of_every_phase_aside(trained, tmp_path, capsys):
    """Issue 22: the archive missed video/, img_dir/ and generate/ (they stayed beside the new run)."""
    dataset, _, _ = trained
    out = tmp_path / 'out'
    assert main.main(tiny_flags(dataset, out, '--iteration', '1', '--save_freq', '1')) == 0
    for phase in ('test', 'img_dir', 'generate'):
        extra = () if phase == 'test' else ('--img_dir', str(dataset / 'testA'))
        assert main.main(tiny_flags(dataset, out, '--phase', phase, *extra)) == 0
    files = run_folder.RunFiles(out, 'tiny')
    files.phase_output('video').mkdir()   # what --phase video writes (its own tests make real clips)
    written = {entry for entry in run_folder.RUN_ENTRIES if (files.run_dir / entry).exists()}
    assert {'model', 'logs', 'config.json', 'test', 'img_dir', 'generate', 'video'} <= written
    assert main.main(tiny_flags(dataset, out, '--iteration', '1', '--overwrite', 'True')) == 0
    archive = next(out.glob('tiny.old-*'))
    assert {p.name for p in archive.iterdir()} >= written
    assert not any((files.run_dir / phase).exists() for phase in ('test', 'img_dir', 'generate', 'video'))
