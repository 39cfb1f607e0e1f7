"""demo.py: the page's translate call, and the page itself in headless Chromium, against
``main.py --phase img_dir`` on the same file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_flags
from PIL import Image

import main
from scripts import browser


def _needs(*modules: str) -> None:
    for name in modules:
        pytest.importorskip(name, reason=f'{name} is not installed: pip install -r requirements-extras.txt '
                            f'(.ci/run does)')


@pytest.fixture
def tiny_checkpoint(tiny_dataset, tmp_path) -> Path:
    """A 1-step tiny light model (32 px, ch 4)."""
    assert main.main(tiny_flags(tiny_dataset, tmp_path / 'run', '--iteration', '1', '--save_freq', '1')) == 0
    return next((tmp_path / 'run' / 'tiny' / 'model').glob('tiny_params_*.pt'))


def _photo(path: Path, width: int, height: int, seed: int = 0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _img_dir(tiny_dataset, tmp_path, checkpoint, folder: Path, direction: str, *extra: str) -> Path:
    """``main.py --phase img_dir`` on ``folder``; returns the output folder."""
    out = tmp_path / f'img_dir_{direction}'
    assert main.main(tiny_flags(tiny_dataset, tmp_path / 'run', '--phase', 'img_dir', '--img_dir', str(folder),
                                '--checkpoint', str(checkpoint), '--direction', direction, '--out_dir', str(out),
                                *extra)) == 0
    return out


def test_translate_call_equals_img_dir(tiny_dataset, tmp_path, tiny_checkpoint):
    _needs('gradio')
    import demo
    photos = tmp_path / 'photos'
    photos.mkdir()
    source = _photo(photos / 'odd.png', 38, 26)
    model = demo.DemoModel(demo.load_model(str(tiny_checkpoint), 'cpu', use_ema=True), max_size=512)
    translation, heatmap = model(str(source), 'B2A', False)
    expected = _img_dir(tiny_dataset, tmp_path, tiny_checkpoint, photos, 'B2A', '--keep_size', 'True',
                        '--max_size', '512')
    assert translation.shape == heatmap.shape == (26, 38, 3)
    assert np.array_equal(translation, np.asarray(Image.open(expected / 'odd.png').convert('RGB')))


def test_translate_call_without_an_image_is_a_page_error(tiny_checkpoint):
    _needs('gradio')
    import gradio as gr

    import demo
    model = demo.DemoModel(demo.load_model(str(tiny_checkpoint), 'cpu', use_ema=True), max_size=512)
    with pytest.raises(gr.Error, match='Upload a photo'):
        model(None, 'A2B', False)


def test_page_in_headless_chromium_shows_the_img_dir_translation(tiny_dataset, tmp_path, tiny_checkpoint):
    """Start the demo, upload a photo in a real browser, press Translate: the page shows exactly what
    ``main.py --phase img_dir`` writes for that file; the same call works as the HTTP API."""
    _needs('gradio', 'selenium')
    if browser.find_chromium() is None:
        pytest.skip('no chromium/chromedriver on this machine: apt-get install chromium chromium-driver '
                    '(.ci/run installs them where it can)')
    photos = tmp_path / 'photos'
    photos.mkdir()
    source = _photo(photos / 'upload.png', 38, 26, seed=3)
    expected = np.asarray(Image.open(_img_dir(tiny_dataset, tmp_path, tiny_checkpoint, photos, 'B2A',
                                              '--keep_size', 'True', '--max_size', '512') / 'upload.png'))
    with browser.running_demo(tiny_checkpoint, '--amp', 'off') as url:   # auto might pick bf16: not img_dir's pixels
        with browser.headless_chromium() as driver:
            shown = browser.translate_in_page(driver, url, source, 'B2A')
        from gradio_client import Client, handle_file
        api_translation, _ = Client(url, verbose=False).predict(handle_file(str(source)), 'B2A', False,
                                                                api_name='/translate')
    assert shown.shape == (26, 38, 3)
    assert np.array_equal(shown, expected)
    assert np.array_equal(np.asarray(Image.open(api_translation).convert('RGB')), expected)


# ----------------------------------------------------------------------------------------------
# --amp auto: the precision the start-up timing finds fastest


@pytest.mark.parametrize('times,chosen', [({'off': 2.0, 'bf16': 1.0}, 'bf16'), ({'off': 1.0, 'bf16': 1.5}, 'off')])
def test_auto_precision_keeps_the_faster_and_says_so(tiny_checkpoint, monkeypatch, capsys, times, chosen):
    _needs('gradio')
    import demo
    timed = []
    monkeypatch.setattr(demo, 'time_translation', lambda translator, amp: timed.append(amp) or times[amp])
    served = {}
    monkeypatch.setattr(demo, 'build_page', lambda model, examples, title: served.setdefault('page', _Page(model)))
    assert demo.main(['--checkpoint', str(tiny_checkpoint)]) == 0
    assert timed == ['off', 'bf16']
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith('loaded ') and lines[1].startswith(f'precision: {chosen} (the fastest at start-up')
    assert _autocast_dtype(served['page'].model) == {'off': None, 'bf16': torch.bfloat16}[chosen]


def test_explicit_amp_wins_without_timing(tiny_checkpoint, monkeypatch, capsys):
    _needs('gradio')
    import demo
    monkeypatch.setattr(demo, 'time_translation', lambda *args: pytest.fail('--amp was given: nothing to time'))
    served = {}
    monkeypatch.setattr(demo, 'build_page', lambda model, examples, title: served.setdefault('page', _Page(model)))
    assert demo.main(['--checkpoint', str(tiny_checkpoint), '--amp', 'bf16']) == 0
    assert capsys.readouterr().err.splitlines()[1] == 'precision: bf16 (--amp)'
    assert _autocast_dtype(served['page'].model) == torch.bfloat16


def test_time_translation_runs_under_the_mode_it_times(tiny_checkpoint):
    import demo
    translator = demo.load_model(str(tiny_checkpoint), 'cpu', use_ema=True)
    assert demo.time_translation(translator, 'bf16') > 0
    assert _autocast_dtype(demo.DemoModel(translator, 512)) == torch.bfloat16


class _Page:
    """build_page's stand-in: keeps the model, launches nothing."""

    def __init__(self, model) -> None:
        self.model = model

    def launch(self, **kwargs) -> None:
        pass


def _autocast_dtype(model) -> torch.dtype | None:
    """The dtype the model's translations run under (None: float32, no autocast)."""
    with model.translator.autocast():
        return torch.get_autocast_dtype('cpu') if torch.is_autocast_enabled('cpu') else None
