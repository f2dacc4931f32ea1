"""Video inputs (Qwen2.5-VL, Qwen3-VL, Qwen3.5) on tiny random models.

- decoding and sampling: a clip written with PyAV reads back with the frames, times and
  rate asked for; the sampling rule, smart_resize, patchify and the timestamps equal
  transformers' own functions (those that import without torchvision);
- keep=1.0 on a video request (+ an image, text after) == HF generate token for token;
- the temporal M-RoPE positions by hand (Qwen2.5-VL's second_per_grid_ts step, Qwen3-VL's
  per-frame runs after timestamp text);
- pruned runs on a clip == a no-cache reference built from HF's own pieces (Qwen3-VL:
  DeepStack on the kept tokens only);
- a clip is one "image" for the per-image allocation; uniform samples rows, columns and
  frames on one lattice; pictures draw a clip as a strip of frames;
- dataset=folder with a video record and the zero-shot video QA loader; the CLI and
  sparse_generate run a video sample.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsevlm_exp import sparse_generate
from sparsevlm_exp.contracts import PRE_LLM, Sample, Video
from sparsevlm_exp.data import benchmarks
from sparsevlm_exp.data.video import load_video, sample_indices, write_video
from sparsevlm_exp.errors import ConfigError
from sparsevlm_exp.models import qwen_video
from sparsevlm_exp.models.qwen2_vl import Qwen2VLAdapter
from sparsevlm_exp.models.qwen3_5 import Qwen3_5Adapter
from sparsevlm_exp.models.qwen3_vl import Qwen3VLAdapter
from sparsevlm_exp.scorers import FastVScorer, RandomScorer, UniformScorer, V15Scorer
from sparsevlm_exp.viz import clip_strips, kept_token_pictures
from oracles import MAX_NEW, hf_generate, hf_reference_generate, run
from tiny_models import noise_image, save_tiny_qwen, tiny_adapter_loader

ROOT = Path(__file__).resolve().parent.parent
T, FH, FW = 8, 112, 168          # frames of the test clip (4 temporal tokens)
ADAPTERS = {"qwen2_5_vl": Qwen2VLAdapter, "qwen3_vl": Qwen3VLAdapter, "qwen3_5": Qwen3_5Adapter}
# small pixel budgets so the clip stays small: Qwen2.5-VL 4 x 6 merged tokens per frame
# pair (96 in all), Qwen3-VL/3.5 4 x 5 (80 in all)
PIXELS = {"qwen2_5_vl": (28 * 28 * 4, 28 * 28 * 64), "qwen3_vl": (32 * 32 * 4, 32 * 32 * 200),
          "qwen3_5": (32 * 32 * 4, 32 * 32 * 200)}
N_CLIP = {"qwen2_5_vl": 96, "qwen3_vl": 80, "qwen3_5": 80}
N_IMAGE = {"qwen2_5_vl": 30, "qwen3_vl": 20, "qwen3_5": 20}    # the 160 x 128 image


def clip(seed: int = 0, fps: float = 2.0) -> Video:
    frames = np.random.RandomState(seed).randint(0, 255, (T, FH, FW, 3)).astype("uint8")
    return Video(frames=frames, timestamps=[i / fps for i in range(T)], fps=fps)


def video_sample(image: bool = False, fps: float = 2.0) -> Sample:
    return Sample(id="v0", question="what colour is the circle", images=[noise_image(160, 128)] if image else [],
                  answers=["red"], videos=[clip(fps=fps)])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_video")
    return {fam: save_tiny_qwen(fam, root / fam) for fam in ADAPTERS}


@pytest.fixture(scope="module")
def load(dirs):
    def small_clips(family, adapter):
        adapter.VIDEO_PIXELS = PIXELS[family]          # this instance only

    return tiny_adapter_loader(dirs, ADAPTERS, prepare=small_clips)


# ----------------------------------------------------------------------------------------
# Decoding, sampling and the processor's math
# ----------------------------------------------------------------------------------------
def test_mp4_written_with_pyav_reads_back_sampled(tmp_path):
    frames = np.zeros((20, 64, 96, 3), np.uint8)
    frames[..., 0] = (np.arange(20) * 12)[:, None, None]                # red ramps with the frame number
    path = write_video(str(tmp_path / "ramp.mp4"), frames, fps=4)         # 5 seconds
    video = load_video(path, fps=2.0, max_frames=32)
    # Qwen3-VL's rule: int(20 / 4 * 2) = 10 frames spread over 0..19
    index = np.linspace(0, 19, 10).round().astype(int)
    assert video.frames.shape == (10, 64, 96, 3)
    assert video.timestamps == pytest.approx((index / 4).tolist())
    assert video.fps == pytest.approx(10 / 20 * 4)
    assert np.abs(video.frames[:, 32, 48, 0].astype(int) - index * 12).max() <= 6    # lossy codec
    assert load_video(path, fps=2.0, max_frames=4).frames.shape[0] == 4
    assert load_video(path, fps=None, max_frames=64).frames.shape[0] == 20


def test_frame_directory_reads_in_natural_order(tmp_path):
    from PIL import Image

    for i in range(12):
        Image.fromarray(np.full((32, 48, 3), i * 20, np.uint8)).save(tmp_path / f"frame_{i}.png")
    video = load_video(str(tmp_path), fps=1.0, max_frames=6, frames_fps=2.0)   # 6 s at 2 fps -> 6 frames
    index = np.linspace(0, 11, 6).round().astype(int)
    assert video.frames[:, 0, 0, 0].tolist() == (index * 20).tolist()
    assert video.timestamps == pytest.approx((index / 2).tolist())
    with pytest.raises(ConfigError, match="does not exist"):
        load_video(str(tmp_path / "nope.mp4"))


def test_sampling_rule_equals_qwen3_vl_sample_frames():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    processor = Qwen3VLVideoProcessor()
    for total, fps_in, fps in [(300, 30.0, 2.0), (7, 24.0, 2.0), (50, 10.0, 1.0), (1000, 25.0, 2.0)]:
        theirs = processor.sample_frames(VideoMetadata(total_num_frames=total, fps=fps_in), fps=fps)
        ours = sample_indices(total, fps_in, fps, max_frames=processor.max_frames, min_frames=processor.min_frames)
        assert ours.tolist() == np.asarray(theirs).tolist(), (total, fps_in, fps)


def test_resize_patchify_and_timestamps_equal_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as qwen2_resize
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as qwen3_resize

    for t, h, w in [(8, 112, 168), (4, 480, 640), (30, 1080, 1920), (2, 20, 300)]:
        assert qwen_video.smart_resize_clip(t, h, w, 2, 32, 128 * 32 * 32, 32 * 32 * 768) == \
            qwen3_resize(t, h, w, temporal_factor=2, factor=32, min_pixels=128 * 32 * 32, max_pixels=32 * 32 * 768)
        assert qwen_video.smart_resize_frame(h, w, 28, 128 * 28 * 28, 28 * 28 * 768) == \
            qwen2_resize(h, w, factor=28, min_pixels=128 * 28 * 28, max_pixels=28 * 28 * 768)
    x = torch.randn(1, 5, 3, 64, 96)                                     # an odd frame count: padded
    ours = qwen_video.patchify(x, patch=16, merge=2, temporal=2)
    theirs = Qwen3VLVideoProcessor().patchify(x, patch_size=16, merge_size=2, temporal_patch_size=2)
    assert torch.equal(ours[0], theirs[0]) and ours[1:] == tuple(theirs[1:]) == (3, 4, 6)
    video = Video(frames=None, timestamps=[i / 3 for i in [0, 4, 9, 13, 18]], fps=1.0)
    assert qwen_video.temporal_timestamps(video, 2) == pytest.approx(
        Qwen3VLProcessor._calculate_timestamps(None, [0, 4, 9, 13, 18], 3.0, 2))


def test_video_pixels_normalise_each_channel_by_hand():
    """No resize (the frame is already 32 x 32): the first patch row is the two frames'
    top-left 16 x 16 patch, channel-major, then (x / 255 - mean) / std."""
    frames = np.random.RandomState(0).randint(0, 255, (2, 32, 32, 3)).astype("uint8")
    spec = qwen_video.VideoSpec(16, 2, 2, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7), 32 * 32, 32 * 32 * 4, True)
    values, grid = qwen_video.video_pixels(Video(frames=frames, timestamps=[0.0, 0.5], fps=2.0), spec)
    assert grid == [1, 2, 2] and values.shape == (4, 3 * 2 * 16 * 16)
    first = values[0].view(3, 2, 16, 16)
    raw = torch.from_numpy(frames[:, :16, :16]).permute(3, 0, 1, 2).float() / 255        # [C, T, 16, 16]
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1, 1), torch.tensor([0.5, 0.6, 0.7]).view(3, 1, 1, 1)
    torch.testing.assert_close(first, (raw - mean) / std, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# keep=1.0 == HF generate; positions by hand
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_keep_all_on_a_video_equals_hf_generate(load, family, attn):
    adapter = load(family, attn)
    req = adapter.encode(video_sample(image=True))
    coords = req.visual_coords[0]
    # the clip is "image" 0 with its frames, the image is "image" 1 (frame 0)
    assert req.visual_index.shape[1] == N_CLIP[family] + N_IMAGE[family]
    assert coords[:N_CLIP[family], 0].eq(0).all() and coords[N_CLIP[family]:, 0].eq(1).all()
    assert coords[:N_CLIP[family], 3].unique().tolist() == [0, 1, 2, 3] and coords[N_CLIP[family]:, 3].eq(0).all()
    # the question is the instruction; the timestamps between frames are not
    ids = req.input_ids[0]
    assert int(req.text_index[0, 0]) > int(req.visual_index[0, -1])
    state, ours = run(adapter, req, V15Scorer() if family != "qwen3_5" else FastVScorer(),
                      layer=1, keep=1.0)
    assert state.events[0].kept_index.shape[1] == req.visual_index.shape[1]
    assert torch.equal(ours, hf_generate(adapter, req))
    assert ids[req.visual_index[0]].eq(adapter.config.video_token_id).sum() == N_CLIP[family]


def test_qwen2_5_temporal_positions_follow_second_per_grid_ts(load):
    """Temporal token j of a clip at `fps` frames per second sits at start + j *
    tokens_per_second * (2 / fps) (transformers' get_vision_position_ids); h/w as for an
    image. Checked at two rates, so a lost second_per_grid_ts cannot pass."""
    adapter = load("qwen2_5_vl")
    per_second = adapter.config.vision_config.tokens_per_second
    for fps in (2.0, 0.5):
        req = adapter.encode(video_sample(fps=fps))
        assert req.model_inputs["second_per_grid_ts"].tolist() == [2 / fps]
        pos = adapter.positions(req)[:, 0, req.visual_index[0]]                     # [3, N]
        start = int(pos[1, 0])
        frame = req.visual_coords[0, :, 3]
        assert torch.equal(pos[0] - start, (frame * per_second * 2 / fps).long())
        assert torch.equal(pos[1] - start, req.visual_coords[0, :, 1])
        assert torch.equal(pos[2] - start, req.visual_coords[0, :, 2])


def test_qwen3_vl_frames_are_runs_after_timestamp_text(load):
    """Each temporal token is its own <vision_start> run after "<t seconds>" text: the
    runs are 20 tokens each, and each run's positions start after the text before it
    (t = h = w offsets as for one image), so frame j+1 sits above frame j."""
    adapter = load("qwen3_vl")
    req = adapter.encode(video_sample())
    index = req.visual_index[0]
    runs = torch.tensor_split(index, 4)
    assert all(int(r[-1] - r[0]) == 19 for r in runs)
    gaps = [int(b[0] - a[-1]) for a, b in zip(runs, runs[1:])]
    assert min(gaps) > 2                                                             # timestamp text between
    pos = adapter.positions(req)[:, 0]
    for r in runs:
        start = int(pos[0, r[0]])
        assert pos[0, r].eq(start).all() and int(pos[0, r[0] - 1]) == start - 1
    text = adapter.processor.tokenizer.decode(req.input_ids[0])
    assert text.count("<|vision_start|>") == 4


# ----------------------------------------------------------------------------------------
# Pruned runs against a no-cache reference built from HF's pieces (oracles.hf_reference_generate)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, layer, scorer", [
    ("qwen2_5_vl", 1, V15Scorer), ("qwen2_5_vl", PRE_LLM, UniformScorer),
    ("qwen3_vl", 0, V15Scorer), ("qwen3_vl", PRE_LLM, RandomScorer), ("qwen3_vl", 2, FastVScorer)])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pruned_video_equals_no_cache_reference(load, family, layer, scorer, attn):
    adapter = load(family, attn)
    req = adapter.encode(video_sample())
    n = req.visual_index.shape[1]
    state, ours = run(adapter, req, scorer(), layer=layer, keep=0.25)
    kept = state.events[0].kept_index
    assert kept.shape[1] == round(0.25 * n) < n
    assert state.layer_counts[-1] == kept.shape[1]
    assert torch.equal(ours, hf_reference_generate(adapter, req, kept, layer))


def test_reference_sees_which_frames_are_kept(load):
    """Guards the oracle: keeping other tokens of the clip gives other tokens."""
    adapter = load("qwen3_vl")
    req = adapter.encode(video_sample())
    n = req.visual_index.shape[1]
    first, last = req.visual_index[:, : n // 4], req.visual_index[:, -(n // 4):]       # frame 0 vs frame 3
    assert not torch.equal(hf_reference_generate(adapter, req, first, 0), hf_reference_generate(adapter, req, last, 0))


# ----------------------------------------------------------------------------------------
# A clip is one "image": allocation, uniform in space and time, pictures
# ----------------------------------------------------------------------------------------
def test_clip_and_image_keep_their_own_share(load):
    """Per-image allocation: a clip of 80 tokens and an image of 20 at keep 0.5 keep 40
    and 10 (Hamilton shares), whatever the scores."""
    adapter = load("qwen3_vl")
    req = adapter.encode(video_sample(image=True))
    state, _ = run(adapter, req, RandomScorer(), layer=PRE_LLM, keep=0.5)
    image_of = dict(zip(req.visual_index[0].tolist(), req.visual_coords[0, :, 0].tolist()))
    kept = [image_of[i] for i in state.events[0].kept_index[0].tolist()]
    assert (kept.count(0), kept.count(1)) == (40, 10)


def test_uniform_samples_space_and_time(load):
    """Uniform on the 4-frame clip (4 x 5 tokens a frame): 12 tokens sit on the level-1
    lattice (even frame, row and column: frames 0 and 2 x rows 0, 2 x columns 0, 2, 4);
    keeping 12 of 80 takes exactly those, i.e. every other frame and every other cell."""
    adapter = load("qwen3_vl")
    req = adapter.encode(video_sample())
    state, _ = run(adapter, req, UniformScorer(), layer=PRE_LLM, keep=12 / 80)
    coords = {i: c for i, c in zip(req.visual_index[0].tolist(), req.visual_coords[0].tolist())}
    kept = sorted(tuple(coords[i][1:]) for i in state.events[0].kept_index[0].tolist())
    assert kept == sorted((r, c, f) for f in (0, 2) for r in (0, 2) for c in (0, 2, 4))


def test_pictures_draw_a_clip_as_a_strip_of_frames(load, tmp_path):
    adapter = load("qwen3_vl")
    sample = video_sample(image=True)
    req = adapter.encode(sample)
    media, grids, coords = clip_strips(sample.videos, sample.images, req.image_grids, req.visual_coords[0])
    assert [m.size for m in media] == [(4 * FW, FH), (160, 128)]
    assert grids == [(4, 20), (4, 5)]
    # token (frame 2, row 1, column 3) of the clip is cell (1, 2 * 5 + 3) of the strip
    at = [i for i, c in enumerate(req.visual_coords[0].tolist()) if c == [0, 1, 3, 2]][0]
    assert coords[at].tolist() == [0, 1, 13]
    # the strip's frame 2 is the clip's frame 4 (first of the third frame pair)
    assert np.array_equal(np.asarray(media[0])[:, 2 * FW:3 * FW], sample.videos[0].frames[4])
    state, _ = run(adapter, req, RandomScorer(), layer=PRE_LLM, keep=0.5)
    pictures = kept_token_pictures(media, grids, req.visual_index[0], coords, state.events, None, tmp_path, "v0")
    assert all(Path(p).is_file() for p in pictures.values()) and len(pictures) == 1


# ----------------------------------------------------------------------------------------
# Datasets, CLI, sparse_generate
# ----------------------------------------------------------------------------------------
def _write_clip(path, seed=0, n=8):
    frames = np.random.RandomState(seed).randint(0, 255, (n, 64, 96, 3)).astype("uint8")
    return write_video(str(path), frames, fps=4)


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_folder")
    _write_clip(root / "clip0.mp4")
    os.makedirs(root / "frames1")
    from PIL import Image
    for i in range(4):
        Image.fromarray(np.full((64, 96, 3), 40 * i, np.uint8)).save(root / "frames1" / f"{i}.png")
    noise_image(112, 84).save(root / "img.png")
    with open(root / "questions.jsonl", "w") as f:
        f.write(json.dumps({"id": "v0", "video": "clip0.mp4", "question": "what colour", "answers": ["red"]}) + "\n")
        f.write(json.dumps({"id": "v1", "video": "frames1", "image": "img.png", "question": "what colour",
                            "answers": ["blue"]}) + "\n")
    return str(root)


def test_folder_dataset_reads_videos_and_frame_directories(video_folder):
    data = benchmarks.FolderDataset(path=video_folder, video={"fps": 2.0, "max_frames": 8, "min_frames": 4,
                                                              "frames_fps": 1.0})
    first, second = data[0], data[1]
    assert first.videos[0].frames.shape == (4, 64, 96, 3) and first.images == []   # 2 s at 4 fps -> 4 frames
    assert second.videos[0].frames[:, 0, 0, 0].tolist() == [0, 40, 80, 120] and len(second.images) == 1
    with pytest.raises(ConfigError, match=r"dataset.video.fps='fast' is not allowed"):
        benchmarks.FolderDataset(path=video_folder, video={"fps": "fast"})


def test_video_qa_loader_reads_the_zero_shot_layout(tmp_path):
    os.makedirs(tmp_path / "videos")
    _write_clip(tmp_path / "videos" / "vidA.mp4")
    (tmp_path / "test_q.json").write_text(json.dumps([
        {"video_name": "vidA", "question": "what is the man doing", "question_id": "q1"}]))
    (tmp_path / "test_a.json").write_text(json.dumps([{"answer": "Cooking", "question_id": "q1", "answer_type": 3}]))
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(ROOT / "conf" / "dataset" / "msvd_qa.yaml")
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("_target_", "metric")}
    data = benchmarks.VideoQA(**dict(kwargs, path=str(tmp_path)))
    sample = data[0]
    assert sample.answers == ["Cooking"] and sample.videos[0].frames.shape[0] == 4 and sample.meta["video"] == "vidA"
    assert sample.question.startswith("what is the man doing")
    assert data.metric.score("cooking", sample) == 1.0 and data.metric.score("eating", sample) == 0.0
    (tmp_path / "test_a.json").write_text("[]")
    with pytest.raises(ConfigError, match="no answer for question_id 'q1'"):
        benchmarks.VideoQA(path=str(tmp_path))


def test_every_video_yaml_names_every_constructor_kwarg():
    import inspect
    from omegaconf import OmegaConf
    for name, cls in {"msvd_qa": benchmarks.VideoQA, "folder": benchmarks.FolderDataset}.items():
        cfg = OmegaConf.load(ROOT / "conf" / "dataset" / f"{name}.yaml")
        assert cfg._target_ == f"{cls.__module__}.{cls.__qualname__}"
        assert set(inspect.signature(cls.__init__).parameters) - {"self"} == set(cfg.keys()) - {"_target_"}


def test_cli_runs_a_video_folder_with_pictures(dirs, video_folder, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparsevlm_exp", f"model.pretrained={dirs['qwen3_vl']}",
                           "model=qwen3_vl_2b", "dataset=folder", f"dataset.path={video_folder}", "layer=1",
                           "keep=0.5", "scorer=uniform", "viz.n=2", "logger=none", "decoder.max_new_tokens=4",
                           f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["v0", "v1"]
    assert all(not r.get("error") and r["n_visual"] > 0 for r in records)
    assert all(Path(p).is_file() for r in records for p in r["pictures"].values())


def test_sparse_generate_runs_a_video_request(load):
    adapter = load("qwen2_5_vl")
    inputs = adapter.video_inputs(video_sample())
    out = sparse_generate(adapter.model, inputs, scorer="v15", keep=0.25, layer=1, max_new_tokens=MAX_NEW,
                          processor=adapter.processor)
    req = adapter.request_from_inputs(dict(inputs))
    state, ours = run(adapter, req, V15Scorer(), layer=1, keep=0.25)
    assert out.n_visual == 96 and out.layer_counts[-1] == 24
    assert torch.equal(out.sequences, ours)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_bench_video_request_is_one_hf_accepts(load, family):
    """The bench's synthetic clip (8 frames, 80 tokens) has the family's layout: the
    adapter reads 4 frames of 20 tokens, and keep=1.0 equals HF generate on it."""
    from sparsevlm_exp.bench import synthetic_video_inputs

    adapter = load(family)
    inputs = synthetic_video_inputs(adapter.config, 80, 8, prefix_tokens=5, question_tokens=7, seed=0)
    # word ids into the tiny vocabulary (the special tokens are its first ids, untouched)
    inputs["input_ids"] = inputs["input_ids"].clamp(max=len(adapter.processor.tokenizer) - 1)
    req = adapter.request_from_inputs(dict(inputs))
    assert req.visual_coords[0, :, 3].bincount().tolist() == [20, 20, 20, 20]
    _, ours = run(adapter, req)
    assert torch.equal(ours, hf_generate(adapter, req))
