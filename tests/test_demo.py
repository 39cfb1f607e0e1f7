"""demo.py: the page's translate call, and the page itself in headless Chromium, against
``main.py --phase img_dir`` on the same file."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_dataset, tiny_flags
from PIL import Image

import errors
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


# ----------------------------------------------------------------------------------------------
# Uploads that are not images, or decompression bombs: one line on the page, not Gradio's generic error


@pytest.fixture(scope='module')
def shared_checkpoint(tmp_path_factory) -> Path:
    """A 1-step tiny light model shared by the upload tests."""
    root = tmp_path_factory.mktemp('uploads')
    data = make_dataset(root / 'tiny')
    assert main.main(tiny_flags(data, root / 'run', '--iteration', '1', '--save_freq', '1')) == 0
    return next((root / 'run' / 'tiny' / 'model').glob('tiny_params_*.pt'))


@pytest.fixture(scope='module')
def demo_model(shared_checkpoint):
    _needs('gradio')
    import demo
    return demo.DemoModel(demo.load_model(str(shared_checkpoint), 'cpu', use_ema=True), max_size=512)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height over a 1-pixel body: a bomb's header, a few bytes."""
    buf = io.BytesIO()
    Image.new('RGB', (1, 1)).save(buf, 'PNG')
    raw = bytearray(buf.getvalue())
    chunk = b'IHDR' + struct.pack('>II', width, height) + raw[24:29]   # keep depth, colour type, ...
    raw[12:33] = chunk + struct.pack('>I', zlib.crc32(chunk))
    path.write_bytes(bytes(raw))
    return path


def _not_an_image(tmp_path: Path) -> Path:
    path = tmp_path / 'notes.txt'
    path.write_text('shopping list\n')
    return path


def test_a_file_that_is_not_an_image_is_one_line(demo_model, tmp_path):
    import gradio as gr

    path = _not_an_image(tmp_path)
    with pytest.raises(errors.UserError) as caught:
        demo_model.translate(str(path), 'A2B', False)
    assert str(caught.value) == 'not an image: notes.txt (no image format recognises it)'
    with pytest.raises(gr.Error) as shown:   # what the page shows
        demo_model(str(path), 'A2B', False)
    assert shown.value.message == str(caught.value)


def test_a_truncated_image_is_one_line(demo_model, tmp_path):
    whole = _photo(tmp_path / 'whole.png', 40, 30)
    cut = tmp_path / 'cut.png'
    cut.write_bytes(whole.read_bytes()[:200])
    with pytest.raises(errors.UserError, match=r'^not a readable image: cut\.png \('):
        demo_model.translate(str(cut), 'A2B', False)


@pytest.mark.parametrize('width,height,megapixels', [
    (20000, 10000, '200.0'),   # above twice the limit: Pillow raises DecompressionBombError
    (10000, 10000, '100.0'),   # between the limit and twice it: Pillow only warns, then would decode it all
])
def test_a_decompression_bomb_is_one_line(demo_model, tmp_path, width, height, megapixels):
    import gradio as gr

    limit = f'{Image.MAX_IMAGE_PIXELS / 1e6:.1f}'
    bomb = _png_header_only(tmp_path / 'bomb.png', width, height)
    expected = f'bomb.png: {megapixels} megapixels, above the limit of {limit} megapixels; upload a smaller image'
    with pytest.raises(errors.UserError) as caught:
        demo_model.translate(str(bomb), 'A2B', False)
    assert str(caught.value) == expected
    with pytest.raises(gr.Error) as shown:
        demo_model(str(bomb), 'A2B', False)
    assert shown.value.message == expected


def test_the_page_hands_any_upload_to_the_model_unopened(demo_model, tmp_path):
    """gr.Image's own preprocess opens the file with Pillow and fails with 'Could not preprocess input'
    before the model is called; the page's input passes the path on, so the model's message is shown."""
    from gradio.data_classes import ImageData

    import demo
    page = demo.build_page(demo_model, [], 'test')
    (image_input,) = [block for block in page.blocks.values() if getattr(block, 'elem_id', None) == 'input']
    for path in (_not_an_image(tmp_path), _png_header_only(tmp_path / 'bomb.png', 20000, 10000),
                 _photo(tmp_path / 'photo.png', 38, 26)):
        assert image_input.preprocess(ImageData(path=str(path), orig_name=path.name)) == str(path)
    assert image_input.preprocess(None) is None


def test_the_running_page_answers_a_non_image_with_its_one_line_error(shared_checkpoint, tmp_path):
    """Through the server and its HTTP API, where Gradio's preprocess used to fail first."""
    _needs('gradio', 'gradio_client')
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    with browser.running_demo(shared_checkpoint, '--amp', 'off') as url:
        client = Client(url, verbose=False)
        for path, message in [(_not_an_image(tmp_path), 'not an image: notes.txt'),
                              (_png_header_only(tmp_path / 'bomb.png', 20000, 10000), 'bomb.png: 200.0 megapixels')]:
            with pytest.raises(AppError) as shown:
                client.predict(handle_file(str(path)), 'A2B', False, api_name='/translate')
            assert str(shown.value).startswith(message), str(shown.value)


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
