"""Video files: frames read upright to the end, written as MP4 that browsers and phones play, with the sound.

With PyAV (the optional extra in requirements-extras.txt) the output is H.264 (libx264, yuv420p,
even width and height) in MP4 with the source's first audio stream: its packets copied when MP4
players take the codec as it is (AAC, MP3), otherwise re-encoded to AAC. Frames keep the source's
timestamps, so the sound stays in sync. Without PyAV, OpenCV writes MPEG-4 Part 2 ('mp4v', which
browsers and many phones do not play) without sound, and says so once.

Either way frames are read until the decoder ends, whatever frame count the file claims (some
files under-report it), and turned upright by the video's rotation metadata (the display matrix
that phones write for portrait videos).
"""
from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

import errors

try:
    import av
except ImportError:   # the optional extra: OpenCV's writer is the fallback
    av = None

FrameFunction = Callable[[np.ndarray], np.ndarray]   # RGB uint8 H×W×3 -> RGB uint8 H'×W'×3
# Audio codecs MP4 players (browsers, phones) take as they are; anything else becomes AAC.
MP4_AUDIO = ('aac', 'mp3')
X264_OPTIONS = {'crf': '18', 'preset': 'medium'}   # close to visually lossless: the comparison is the point
DEFAULT_FPS = 25


def convert(source: Path, target: Path, process: FrameFunction) -> int:
    """Write ``target`` (.mp4): every frame of ``source``, upright and in RGB, passed through
    ``process``, at the source's frame rate (and timing and sound, with PyAV). Returns the number of
    frames written; 0 (and no file) when the source has no readable frame. UserError if it cannot be
    opened or decoded."""
    if _pyav_usable():
        return _convert_pyav(source, target, process)
    _note_opencv_fallback()
    return _convert_opencv(source, target, process)


def _pyav_usable() -> bool:
    return av is not None and 'libx264' in av.codecs_available


@functools.cache
def _note_opencv_fallback() -> None:
    """Once per process: what the OpenCV writer lacks, and how to get it."""
    print('note: without PyAV (pip install av, see requirements-extras.txt) videos are written by OpenCV as '
          'MPEG-4 Part 2 (mp4v), which browsers and many phones do not play, and without sound',
          file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# PyAV: H.264 + the source's audio


def _convert_pyav(source: Path, target: Path, process: FrameFunction) -> int:
    try:
        container = av.open(str(source))
    except (av.FFmpegError, OSError) as exc:
        raise errors.UserError(f'cannot open video {source} ({exc})') from None
    with container:
        if not container.streams.video:
            raise errors.UserError(f'{source} has no video stream')
        video_in = container.streams.video[0]
        video_in.thread_type = 'AUTO'
        audio_in = container.streams.audio[0] if container.streams.audio else None
        with Mp4Sink(target, video_in, audio_in) as sink, \
                tqdm(total=video_in.frames or None, desc=source.name, file=sys.stderr) as progress:
            for item in _demuxed(container, video_in, audio_in, decode_audio=not sink.copies_audio):
                if isinstance(item, av.VideoFrame):
                    sink.add_frame(process(upright(item)), item)
                    progress.update()
                else:
                    sink.add_audio(item)
        return sink.frames


def _demuxed(container: av.container.InputContainer, video_in: av.video.stream.VideoStream,
             audio_in: av.audio.stream.AudioStream | None, decode_audio: bool
             ) -> Iterator[av.VideoFrame | av.AudioFrame | av.Packet]:
    """Decoded video frames and audio (packets, or frames with ``decode_audio``) in file order, until
    the file ends; UserError for a file FFmpeg cannot decode."""
    streams = [video_in] if audio_in is None else [video_in, audio_in]
    try:
        for packet in container.demux(*streams):
            if packet.stream is audio_in and not decode_audio:
                if packet.dts is not None:   # not the demuxer's empty end-of-stream packet
                    yield packet
            else:
                yield from packet.decode()
    except av.FFmpegError as exc:
        raise errors.UserError(f'cannot decode {container.name} ({exc})') from None


def upright(frame: av.VideoFrame) -> np.ndarray:
    """The frame as RGB uint8, turned as its display matrix says (``frame.rotation``: degrees
    counter-clockwise, the way ffmpeg and OpenCV show it)."""
    turns = round(frame.rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(frame.to_ndarray(format='rgb24'), turns))


class Mp4Sink:
    """The output file: an H.264 stream sized by the first frame written, and the source's audio.

    The container is opened at the first frame (streams must all exist before the first packet is
    written, and the video's size is the processed frame's), so audio packets that come before it
    wait; a source without a readable frame leaves no file.
    """

    def __init__(self, target: Path, video_in: av.video.stream.VideoStream,
                 audio_in: av.audio.stream.AudioStream | None) -> None:
        self.target, self.video_in, self.audio_in = target, video_in, audio_in
        self.container = self.video = self.audio = None
        self.waiting: list[av.Packet | av.AudioFrame] = []
        self.frames, self.last_pts, self.ticks_per_frame = 0, None, 1

    @property
    def copies_audio(self) -> bool:
        return self.audio_in is not None and self.audio_in.codec_context.codec.canonical_name in MP4_AUDIO

    def add_frame(self, rgb: np.ndarray, source: av.VideoFrame) -> None:
        """Encode ``rgb`` at the source frame's presentation time."""
        if self.container is None:
            self._open(rgb.shape[1], rgb.shape[0])
        frame = av.VideoFrame.from_ndarray(_even_sized(rgb), format='rgb24')
        frame.pts, frame.time_base = self._next_pts(source), self.video_in.time_base
        self._mux(self.video.encode(frame))
        self.frames += 1

    def add_audio(self, audio: av.Packet | av.AudioFrame) -> None:
        """Copy a packet, or encode a decoded frame to AAC; kept back until the container is open."""
        if self.container is None:
            self.waiting.append(audio)
        elif isinstance(audio, av.Packet):
            audio.stream = self.audio
            self.container.mux(audio)
        else:
            self._mux(self.audio.encode(audio))

    def __enter__(self) -> Mp4Sink:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """Flush the encoders and finish the file; after an error, remove the unfinished file."""
        if self.container is None:
            return
        if kind is not None:
            with contextlib.suppress(av.FFmpegError):
                self.container.close()
            self.target.unlink(missing_ok=True)
            return
        self._mux(self.video.encode(None))
        if self.audio is not None and not self.copies_audio:
            self._mux(self.audio.encode(None))
        self.container.close()

    def _open(self, width: int, height: int) -> None:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        # faststart: the index goes first, so a browser starts playing before the whole file is loaded
        self.container = av.open(str(self.target), 'w', format='mp4', options={'movflags': '+faststart'})
        rate = self.video_in.average_rate or self.video_in.guessed_rate or DEFAULT_FPS
        self.video = self.container.add_stream('libx264', rate=Fraction(rate), options=X264_OPTIONS)
        self.video.width, self.video.height = width + width % 2, height + height % 2   # yuv420p needs even sides
        self.video.pix_fmt = 'yuv420p'
        self.video.codec_context.time_base = self.video_in.time_base   # source timestamps, unrounded
        self.ticks_per_frame = max(1, round(1 / (Fraction(rate) * self.video_in.time_base)))
        if self.audio_in is not None:
            self.audio = self._add_audio_stream(self.audio_in)
        waiting, self.waiting = self.waiting, []
        for audio in waiting:
            self.add_audio(audio)

    def _add_audio_stream(self, audio_in: av.audio.stream.AudioStream) -> av.audio.stream.AudioStream:
        if self.copies_audio:
            return self.container.add_stream_from_template(audio_in)
        # Phones record mono or stereo; more channels (or an unnamed layout) become stereo, which AAC takes.
        layout = 'mono' if audio_in.layout.nb_channels == 1 else 'stereo'
        return self.container.add_stream('aac', rate=audio_in.rate, layout=layout)

    def _next_pts(self, source: av.VideoFrame) -> int:
        """The source frame's timestamp, made strictly increasing (the encoder refuses repeats); one
        frame after the last when the source has none."""
        if source.pts is not None and (self.last_pts is None or source.pts > self.last_pts):
            pts = source.pts
        else:
            pts = 0 if self.last_pts is None else self.last_pts + self.ticks_per_frame
        self.last_pts = pts
        return pts

    def _mux(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            self.container.mux(packet)


def _even_sized(rgb: np.ndarray) -> np.ndarray:
    """Repeat the last row/column when a side is odd (H.264 in yuv420p halves both sides)."""
    height, width = rgb.shape[:2]
    if height % 2 == 0 and width % 2 == 0:
        return rgb
    return np.pad(rgb, ((0, height % 2), (0, width % 2), (0, 0)), mode='edge')


# ----------------------------------------------------------------------------------------------
# OpenCV: mp4v, no sound


def _convert_opencv(source: Path, target: Path, process: FrameFunction) -> int:
    reader = cv2.VideoCapture(str(source))   # turns frames upright itself (CAP_PROP_ORIENTATION_AUTO)
    if not reader.isOpened():
        raise errors.UserError(f'cannot open video {source} (unsupported format or codec?)')
    fps = reader.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS
    claimed = int(reader.get(cv2.CAP_PROP_FRAME_COUNT)) or None   # for the progress bar only
    writer, frames = None, 0
    try:
        for rgb in tqdm(_opencv_frames(reader), total=claimed, desc=source.name, file=sys.stderr):
            out = process(rgb)
            if writer is None:
                target.parent.mkdir(parents=True, exist_ok=True)
                writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*'mp4v'), fps,
                                         (out.shape[1], out.shape[0]))
            writer.write(cv2.cvtColor(out, cv2.COLOR_RGB2BGR))
            frames += 1
    finally:
        reader.release()
        if writer is not None:
            writer.release()
    return frames


def _opencv_frames(reader: cv2.VideoCapture) -> Iterator[np.ndarray]:
    """RGB frames until the reader has no more."""
    while True:
        ok, bgr = reader.read()
        if not ok:
            return
        yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
