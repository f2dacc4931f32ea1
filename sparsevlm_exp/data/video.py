"""Video clips for the datasets: decode a file (PyAV) or read a directory of frames,
then sample frames by rate and count.

    load_video(path, fps=2.0, max_frames=32, min_frames=4, frames_fps=1.0) -> contracts.Video

The sampling rule is Qwen3-VL's video processor's (transformers
models/qwen3_vl/video_processing_qwen3_vl.py, `sample_frames`): n = int(total / source_fps
* fps), clamped to [min_frames, max_frames] and to the frame count, then n indices evenly
spread over 0..total-1 (numpy linspace, rounded). A frame's timestamp is its index /
source fps, as that processor's `_calculate_timestamps` computes it. The same rule serves
Qwen2.5-VL here (its processor would take every frame it is given; qwen-vl-utils samples
beforehand at 2 fps), so both families see the same frames of a clip.

PyAV (`pip install -e ".[video]"`) is imported only when a video FILE is read; a
directory of frames needs only Pillow.
"""
from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image

from sparsevlm_exp.contracts import Video
from sparsevlm_exp.errors import ConfigError

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def sample_indices(total: int, source_fps: float, fps: float | None, max_frames: int,
                   min_frames: int = 4) -> np.ndarray:
    """[n] frame indices (ascending, int) of a clip of `total` frames at `source_fps`:
    n = int(total / source_fps * fps) clamped to [min_frames, max_frames] and to total
    (fps=None: every frame up to max_frames), spread evenly over 0..total-1 (rounded).
    Qwen3-VL's sample_frames rule (module docstring). Raises ValueError for total < 1."""
    if total < 1:
        raise ValueError(f"a clip needs at least one frame, got {total}")
    n = total if fps is None else int(total / source_fps * fps)
    n = min(max(n, min_frames), max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(int)


def _natural_key(name: str):
    # frame_2.png before frame_10.png
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def frame_files(directory: str) -> list[str]:
    """The image files of a frame directory in natural name order (frame_2 before frame_10)."""
    names = [n for n in os.listdir(directory) if n.lower().endswith(FRAME_SUFFIXES)]
    return [os.path.join(directory, n) for n in sorted(names, key=_natural_key)]


def _count_frames(path: str) -> tuple[int, float]:
    """(frame count, average fps) of the first video stream: the demuxed packets are
    counted (no decoding), since containers often leave `stream.frames` at 0."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        count = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    return int(count), float(rate) if rate else 24.0


def _decode(path: str, wanted: np.ndarray) -> np.ndarray:
    """uint8 [n, H, W, 3] RGB frames at the indices `wanted` (ascending), decoded in one
    pass; a short stream (fewer frames than counted) repeats its last frame."""
    import av

    want = set(int(i) for i in wanted)
    got = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        for index, frame in enumerate(container.decode(stream)):
            if index in want:
                got[index] = frame.to_ndarray(format="rgb24")
            if index >= wanted[-1]:
                break
    if not got:
        raise ValueError(f"no frame could be decoded from {path}")
    frames, previous = [], None
    for i in wanted.tolist():
        previous = got.get(i, previous if previous is not None else next(iter(got.values())))
        frames.append(previous)
    return np.stack(frames)


def load_video(path: str, fps: float | None = 2.0, max_frames: int = 32, min_frames: int = 4,
               frames_fps: float = 1.0) -> Video:
    """A sampled clip from a video file (any container FFmpeg reads: mp4, avi, webm, gif,
    ...) or a directory of frame images (taken as recorded at `frames_fps` frames per
    second). Raises ConfigError for a missing path or an empty frame directory,
    ValueError for a file that holds no decodable video stream."""
    if os.path.isdir(path):
        files = frame_files(path)
        if not files:
            raise ConfigError(f"the frame directory {path!r} holds no images ({', '.join(FRAME_SUFFIXES)})")
        index = sample_indices(len(files), frames_fps, fps, max_frames, min_frames)
        frames = []
        for i in index.tolist():
            with Image.open(files[i]) as image:
                frames.append(np.asarray(image.convert("RGB")))
        if len({f.shape for f in frames}) != 1:
            raise ConfigError(f"the frames of {path!r} differ in size: every frame of a clip must have one size")
        total, source_fps = len(files), frames_fps
        array = np.stack(frames)
    elif os.path.isfile(path):
        total, source_fps = _count_frames(path)
        index = sample_indices(total, source_fps, fps, max_frames, min_frames)
        array = _decode(path, index)
    else:
        raise ConfigError(f"the video {path!r} does not exist: expected a video file or a directory of frames")
    return Video(frames=array, timestamps=[i / source_fps for i in index.tolist()],
                 fps=len(index) / total * source_fps, source=str(path))


def write_video(path: str, frames: np.ndarray, fps: int = 4) -> str:
    """Write uint8 frames [T, H, W, 3] to an mp4 (mpeg4 codec, which every FFmpeg build
    has) with PyAV - for tests and examples. H and W must be even. Returns path."""
    import av

    with av.open(path, mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
