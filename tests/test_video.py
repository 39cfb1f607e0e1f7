"""The video phases' files: H.264 MP4 with the source's sound (PyAV), every frame whatever the header
claims, rotation metadata honoured, and OpenCV's mp4v writer as the noted fallback without PyAV."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import trained_checkpoint

import main
from inference import video

av = pytest.importorskip('av', reason='the video tests need PyAV: pip install -r requirements-extras.txt')

FRAMES, FPS, SIZE, SECONDS = 12, 10, (64, 48), 1.2


def make_clip(path: Path, audio: str | None = 'aac', rotation: int = 0, container: str | None = None,
              video_codec: str = 'libx264') -> Path:
    """12 frames of 64x48 at 10 fps (a white block top-left, brightening), with 1.2 s of a 440 Hz
    sine in ``audio``'s codec; ``rotation``: the display matrix phones write (degrees CCW)."""
    width, height = SIZE
    with av.open(str(path), 'w', format=container) as out:
        stream = out.add_stream(video_codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
        if rotation:
            stream.set_display_rotation(rotation)
        sound = out.add_stream(audio, rate=44100, layout='mono') if audio else None
        for i in range(FRAMES):
            pixels = np.full((height, width, 3), 15 * i, np.uint8)
            pixels[:8, :16] = 255
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format='rgb24')))
        out.mux(stream.encode(None))
        if sound is not None:
            t = np.arange(int(44100 * SECONDS)) / 44100
            wave = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None],
                                              format='flt', layout='mono')
            wave.sample_rate, wave.pts = 44100, 0
            out.mux(sound.encode(wave))
            out.mux(sound.encode(None))
    return path


def streams_of(path: Path) -> dict[str, dict]:
    """Per stream type: codec, duration in seconds, frame/packet count after decoding everything."""
    found = {}
    with av.open(str(path)) as container:
        for stream in container.streams:
            found[stream.type] = {'codec': stream.codec_context.codec.canonical_name, 'decoded': 0,
                                  'duration': float(stream.duration * stream.time_base) if stream.duration else None,
                                  'packets': [],
                                  'pix_fmt': getattr(stream.codec_context, 'pix_fmt', None)}
        for packet in container.demux():
            info = found[packet.stream.type]
            if packet.dts is not None:
                info['packets'].append(bytes(packet))
            info['decoded'] += sum(frame.samples if packet.stream.type == 'audio' else 1
                                   for frame in packet.decode())
    return found


def video_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format='rgb24') for frame in container.decode(video=0)]


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> Path:
    return trained_checkpoint(tmp_path_factory, 'video')


def run_video_phase(checkpoint: Path, clip: Path, out: Path, phase: str = 'video') -> int:
    return main.main(['--phase', phase, '--checkpoint', str(checkpoint), '--video_path', str(clip),
                      '--out_dir', str(out), '--device', 'cpu'])


@pytest.fixture
def without_pyav(monkeypatch):
    """As if PyAV were not installed (the module's optional import gave None)."""
    monkeypatch.setattr(video, 'av', None)
    video._note_opencv_fallback.cache_clear()
    yield
    video._note_opencv_fallback.cache_clear()


def test_video_phase_writes_h264_with_the_source_sound(checkpoint, tmp_path):
    clip = make_clip(tmp_path / 'clip.mp4')
    assert run_video_phase(checkpoint, clip, tmp_path / 'out') == 0
    source, result = streams_of(clip), streams_of(tmp_path / 'out' / 'clip_A2B.mp4')
    assert result['video']['codec'] == 'h264' and result['video']['pix_fmt'] == 'yuv420p'
    assert result['video']['decoded'] == FRAMES
    assert abs(result['video']['duration'] - source['video']['duration']) <= 1 / FPS
    # AAC fits MP4: the packets are copied, not re-encoded.
    assert result['audio']['codec'] == 'aac'
    assert result['audio']['packets'] == source['audio']['packets']
    assert result['audio']['decoded'] == source['audio']['decoded']
    assert video_frames(tmp_path / 'out' / 'clip_A2B.mp4')[0].shape == (48, 128, 3)   # side by side


def test_audio_mp4_players_do_not_take_is_encoded_to_aac(tmp_path):
    clip = make_clip(tmp_path / 'clip.mkv', audio='pcm_s16le', container='matroska')
    assert video.convert(clip, tmp_path / 'out.mp4', lambda rgb: rgb) == FRAMES
    result = streams_of(tmp_path / 'out.mp4')
    assert result['audio']['codec'] == 'aac'
    assert abs(result['audio']['decoded'] / 44100 - SECONDS) < 0.05   # all of the sound, give or take a frame
    assert result['video']['decoded'] == FRAMES


def under_reporting_avi(path: Path, claimed: int) -> Path:
    """An AVI of 12 frames whose headers (avih, strh, dmlh) claim ``claimed``."""
    make_clip(path, audio=None, container='avi', video_codec='mpeg4')
    data = bytearray(path.read_bytes())
    for chunk, offset in ((b'avih', 16), (b'strh', 32), (b'dmlh', 0)):
        at = data.find(chunk) + 8 + offset
        data[at:at + 4] = claimed.to_bytes(4, 'little')
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize('writer', ['pyav', 'opencv'])
def test_every_frame_is_written_when_the_header_under_reports(checkpoint, tmp_path, request, writer):
    if writer == 'opencv':
        request.getfixturevalue('without_pyav')
    clip = under_reporting_avi(tmp_path / 'clip.avi', claimed=3)
    assert cv2.VideoCapture(str(clip)).get(cv2.CAP_PROP_FRAME_COUNT) == 3
    assert run_video_phase(checkpoint, clip, tmp_path / 'out') == 0
    assert len(video_frames(tmp_path / 'out' / 'clip_A2B.mp4')) == FRAMES


@pytest.mark.parametrize('writer', ['pyav', 'opencv'])
def test_rotation_metadata_turns_frames_upright(checkpoint, tmp_path, request, writer):
    """A portrait phone video: 64x48 stored, shown 48x64; OpenCV's own upright reading is the reference."""
    if writer == 'opencv':
        request.getfixturevalue('without_pyav')
    clip = make_clip(tmp_path / 'clip.mp4', rotation=90)
    reader = cv2.VideoCapture(str(clip))
    shown = [cv2.cvtColor(reader.read()[1], cv2.COLOR_BGR2RGB) for _ in range(FRAMES)]
    assert shown[0].shape == (64, 48, 3)
    assert run_video_phase(checkpoint, clip, tmp_path / 'out') == 0
    frames = video_frames(tmp_path / 'out' / 'clip_A2B.mp4')
    assert len(frames) == FRAMES and frames[0].shape == (64, 96, 3)
    originals = np.stack([frame[:, :48] for frame in frames]).astype(int)
    assert np.abs(originals - np.stack(shown)).mean() < 6   # codec noise; turned the other way: ~100


def test_odd_sizes_are_padded_to_even(tmp_path):
    """yuv420p needs even sides: a 63x47 result is padded (not scaled) to 64x48."""
    stripes = np.zeros((47, 63, 3), np.uint8)
    stripes[:, ::2] = 255   # one-pixel columns: any rescaling blurs them away
    clip = make_clip(tmp_path / 'clip.mp4', audio=None)
    assert video.convert(clip, tmp_path / 'out.mp4', lambda rgb: stripes) == FRAMES
    first = video_frames(tmp_path / 'out.mp4')[0].astype(int)
    assert first.shape == (48, 64, 3)
    assert np.abs(first[:47, :63] - stripes).mean() < 20
    assert np.abs(first[47] - first[46]).mean() < 20 and np.abs(first[:, 63] - first[:, 62]).mean() < 20


def test_opencv_fallback_writes_mp4v_and_says_once_what_it_lacks(checkpoint, tmp_path, without_pyav, capsys):
    (tmp_path / 'clips').mkdir()
    for name in ('a.mp4', 'b.mp4'):
        make_clip(tmp_path / 'clips' / name)
    assert run_video_phase(checkpoint, tmp_path / 'clips', tmp_path / 'out', phase='video_dir') == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith('note:')]
    assert len(notes) == 1 and 'pip install av' in notes[0] and 'mp4v' in notes[0] and 'sound' in notes[0]
    for name in ('a_A2B.mp4', 'b_A2B.mp4'):
        written = streams_of(tmp_path / 'out' / name)
        assert written['video']['codec'] == 'mpeg4' and written['video']['decoded'] == FRAMES
        assert 'audio' not in written


def test_a_file_that_is_not_a_video_is_a_one_line_error(checkpoint, tmp_path, capsys):
    (tmp_path / 'clip.mp4').write_bytes(b'not a video')
    assert run_video_phase(checkpoint, tmp_path / 'clip.mp4', tmp_path / 'out') == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('error: cannot open video') and 'Traceback' not in '\n'.join(err)
    assert not (tmp_path / 'out' / 'clip_A2B.mp4').exists()
