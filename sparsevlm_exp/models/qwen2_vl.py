"""Qwen2-VL and Qwen2.5-VL: one adapter for both (same LLM, same M-RoPE).

The only place that knows Qwen's token layout (system prefix, <|vision_start|>,
image pads, <|vision_end|>), its M-RoPE position ids (3, B, L) and its rope_deltas,
and its vision tower's internals for the pre-LLM stage (`vision_attention`).
"""
from __future__ import annotations

import inspect
import re

import torch
from transformers.vision_utils import get_vision_window_index

from ..contracts import EncodedRequest, RopeSpec, Sample
from ..errors import ConfigError
from .base import (FamilyAdapter, attention_received, grid_coords, request_attention_mask, row_slices,
                   splice_image_features)
from .loading import load_pretrained
from .prompting import chat_messages
from .qwen_video import QWEN2_VIDEO_PIXELS, VideoSpec, qwen2_placeholder, video_pixels


class Qwen2VLAdapter(FamilyAdapter):
    position_dims = 3  # M-RoPE: temporal, height, width

    FAMILIES = ("qwen2_vl", "qwen2_5_vl")

    def __init__(self, model, processor=None):
        model_type = model.config.model_type
        if type(self) is Qwen2VLAdapter and model_type not in self.FAMILIES:
            # e.g. a Qwen3-VL dir given to a Qwen2.5-VL yaml: it would run without its
            # DeepStack injections and q_norm, i.e. silently wrong
            raise ConfigError(f"model.pretrained holds a {model_type!r} checkpoint, which the Qwen2-VL adapter "
                              f"does not run (it runs {', '.join(self.FAMILIES)}): pick that family's model yaml, "
                              f"e.g. model=qwen3_vl_8b model.pretrained=/path/to/dir")
        self.model = model
        self.processor = processor
        self.config = model.config

    @classmethod
    def load(cls, **model_cfg) -> "Qwen2VLAdapter":
        """Hydra's entry (conf/model/*.yaml): the yaml keys are load_pretrained's arguments."""
        return cls(*load_pretrained(**model_cfg))

    # ---- encoding -------------------------------------------------------------------
    def encode(self, sample: Sample) -> EncodedRequest:
        if self.processor is None:
            raise RuntimeError("this model was built without a processor (model.processor is unset); "
                               "it can run synthetic requests (bench) but cannot encode samples")
        if sample.videos:
            inputs, clip_text = self._video_inputs(sample)
            return self.request_from_inputs(inputs, clip_text=clip_text)
        inputs = self.processor.apply_chat_template(
            chat_messages(sample.images, sample.question),
            tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt",
        )
        return self.request_from_inputs(dict(inputs))

    # ---- video ------------------------------------------------------------------------
    # Qwen2-VL/2.5-VL: per-frame pixel budget; Qwen3-VL overrides both
    VIDEO_PIXELS = QWEN2_VIDEO_PIXELS
    CLIP_BUDGET = False

    def video_spec(self) -> VideoSpec:
        """Patch sizes from the model's vision config, mean/std from the image processor
        (the video processors use the same ones), pixel budgets from the processor's video
        processor when it has one, else transformers' video processor defaults."""
        vision = self.config.vision_config
        image_processor = self.processor.image_processor
        low, high = self.VIDEO_PIXELS
        size = getattr(getattr(self.processor, "video_processor", None), "size", None)
        if size is not None and getattr(size, "shortest_edge", None) and getattr(size, "longest_edge", None):
            low, high = size.shortest_edge, size.longest_edge
        return VideoSpec(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                         temporal_patch_size=vision.temporal_patch_size,
                         image_mean=tuple(image_processor.image_mean), image_std=tuple(image_processor.image_std),
                         min_pixels=low, max_pixels=high, clip_budget=self.CLIP_BUDGET)

    def video_placeholder(self, video, grid: list[int], tokens: dict[str, str]) -> str:
        """The text that stands for one clip in the prompt (Qwen2-VL/2.5-VL: one run)."""
        return qwen2_placeholder(grid, self.config.vision_config.spatial_merge_size, tokens["start"],
                                 tokens["video"], tokens["end"])

    def video_inputs(self, sample: Sample) -> dict:
        """The processor's output for a sample with videos (see _video_inputs)."""
        return self._video_inputs(sample)[0]

    def _video_inputs(self, sample: Sample) -> tuple[dict, torch.BoolTensor]:
        """The processor's output for a sample with videos, built without a video
        processor (qwen_video.py): the chat text with each video part expanded to its
        placeholder and each image part to its image pads, tokenized; pixel values of the
        images from the image processor, of the clips from video_pixels; mm_token_type_ids
        1 on image pads, 2 on video pads; second_per_grid_ts = temporal patch / fps per
        clip (Qwen2.5-VL's temporal position step, ignored where get_rope_index lacks it).
        Also returns [L] True on the text the clip placeholders wrote (Qwen3-VL's
        timestamps), found through the tokenizer's character offsets: never raters."""
        tokenizer = self.processor.tokenizer
        cfg = self.config
        tokens = {"start": tokenizer.convert_ids_to_tokens(cfg.vision_start_token_id),
                  "end": tokenizer.convert_ids_to_tokens(cfg.vision_end_token_id),
                  "image": tokenizer.convert_ids_to_tokens(cfg.image_token_id),
                  "video": tokenizer.convert_ids_to_tokens(cfg.video_token_id)}
        text = self.processor.apply_chat_template(chat_messages(sample.images, sample.question, len(sample.videos)),
                                                  tokenize=False, add_generation_prompt=True)
        spec = self.video_spec()
        merge = spec.merge_size
        inputs: dict = {}
        pixels, grids = [], []
        for video in sample.videos:
            values, grid = video_pixels(video, spec)
            pixels.append(values)
            grids.append(grid)
            marked = tokens["start"] + tokens["video"] + tokens["end"]
            if marked not in text:
                raise ValueError("the chat template wrote no <vision_start><video_pad><vision_end> for a video part")
            text = text.replace(marked, self.video_placeholder(video, grid, tokens), 1)
        # character spans of the placeholders' own text (after the image pads are expanded below)
        pad_or_marker = "|".join(re.escape(tokens[k]) for k in ("start", "end", "video"))
        if sample.images:
            image_inputs = self.processor.image_processor(images=sample.images, return_tensors="pt")
            inputs.update(pixel_values=image_inputs["pixel_values"], image_grid_thw=image_inputs["image_grid_thw"])
            # expand every image pad to its token count (the processor's replace_image_token)
            parts = text.split(tokens["image"])
            if len(parts) != len(sample.images) + 1:
                raise ValueError(f"{len(parts) - 1} image pads in the prompt for {len(sample.images)} images")
            counts = [int(g.prod()) // merge ** 2 for g in image_inputs["image_grid_thw"]]
            text = parts[0] + "".join(tokens["image"] * n + rest for n, rest in zip(counts, parts[1:]))
        encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False, return_offsets_mapping=True)
        input_ids = encoded["input_ids"]
        spans = [m.span() for m in re.finditer(rf"<\d+\.\d seconds>(?=(?:{pad_or_marker}))", text)]
        clip_text = torch.tensor([any(a < end and start < b for start, end in spans)
                                  for a, b in encoded["offset_mapping"][0].tolist()], dtype=torch.bool)
        inputs.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                      pixel_values_videos=torch.cat(pixels), video_grid_thw=torch.tensor(grids),
                      mm_token_type_ids=((input_ids == cfg.image_token_id).long()
                                         + 2 * (input_ids == cfg.video_token_id).long()))
        if self.takes_second_per_grid_ts:
            inputs["second_per_grid_ts"] = torch.tensor([spec.temporal_patch_size / v.fps for v in sample.videos])
        return inputs, clip_text

    @property
    def takes_second_per_grid_ts(self) -> bool:
        """Qwen2.5-VL's get_rope_index spaces a clip's temporal positions by
        tokens_per_second * second_per_grid_ts; Qwen2-VL and Qwen3-VL take no such input
        (Qwen3-VL writes timestamps into the text instead)."""
        return "second_per_grid_ts" in inspect.signature(self.model.model.get_rope_index).parameters

    def request_from_inputs(self, inputs: dict, clip_text: torch.BoolTensor | None = None) -> EncodedRequest:
        """Build the request from what the processor returned (also the library path).

        Visual tokens are the image AND video pads. Their coordinates are (image number,
        row, column, frame) with images and clips numbered together in prompt order (a
        clip is one "image"; its frame is the temporal token index). Tokens between the
        first and last pad of one clip (Qwen3-VL's timestamps and per-frame markers) are
        not instruction tokens, nor `clip_text` [L] (the timestamp before a clip's first
        run, which encode() locates; the library path cannot, and may rate it)."""
        input_ids = inputs["input_ids"]
        if input_ids.shape[0] != 1:
            raise ValueError(f"the pruned pipeline runs one request at a time; got a batch of {input_ids.shape[0]}")
        cfg = self.config
        ids = input_ids[0]
        is_image = ids == cfg.image_token_id
        is_video = ids == cfg.video_token_id
        is_visual = is_image | is_video
        visual_index = is_visual.nonzero().view(-1)                                   # [N]

        merge = cfg.vision_config.spatial_merge_size
        queues = {True: list(inputs["video_grid_thw"].tolist()) if inputs.get("video_grid_thw") is not None else [],
                  False: list(inputs["image_grid_thw"].tolist()) if inputs.get("image_grid_thw") is not None else []}
        grids, coords, skip = [], [], torch.zeros_like(is_visual)
        at = 0                                                                        # next visual token
        while at < visual_index.numel():
            video = bool(is_video[visual_index[at]])
            if not queues[video]:
                raise ValueError(f"more {'video' if video else 'image'} pads in the prompt than "
                                 f"{'video' if video else 'image'} grids")
            t, h, w = queues[video].pop(0)
            rows, cols = h // merge, w // merge
            n = t * rows * cols
            span = visual_index[at:at + n]
            if span.numel() != n or not bool((is_video[span] if video else is_image[span]).all()):
                raise ValueError(f"the {'video' if video else 'image'} grid {[t, h, w]} describes {n} tokens, "
                                 f"which the prompt does not hold in one piece")
            coords.append(grid_coords([(rows, cols)], [t])[0] + torch.tensor([len(grids), 0, 0, 0]))
            if video:
                skip[int(span[0]):int(span[-1]) + 1] = True
            grids.append((rows, cols))
            at += n
        if queues[True] or queues[False]:
            raise ValueError(f"{len(queues[True])} video and {len(queues[False])} image grids have no pads in the prompt")
        visual_coords = (torch.cat(coords) if coords else torch.zeros(0, 4, dtype=torch.long)).unsqueeze(0)
        attention_mask = request_attention_mask(inputs, input_ids)
        markers = (ids == cfg.vision_start_token_id) | (ids == cfg.vision_end_token_id)
        # a clip's timestamp text and per-frame markers (skip) are no instruction either
        if clip_text is not None:
            skip |= clip_text
        text_index, after_image_index = self.instruction_indices(inputs, is_visual, markers | skip)

        if "mm_token_type_ids" not in inputs or inputs["mm_token_type_ids"] is None:
            inputs["mm_token_type_ids"] = (is_image.long() + 2 * is_video.long()).unsqueeze(0)
        return EncodedRequest(
            input_ids=input_ids,
            model_inputs=inputs,
            visual_index=visual_index.view(1, -1),
            visual_coords=visual_coords,
            image_grids=grids,
            text_index=text_index,
            attention_mask=attention_mask,
            after_image_index=after_image_index,
        )

    def split_inputs(self, inputs: dict) -> list[dict]:
        """Batch -> rows (FamilyAdapter.split_inputs). A processor batches the media of all
        rows end to end, in row order: image_grid_thw [n_images, 3] with pixel_values
        [sum t*h*w, C*T*P*P], and for clips video_grid_thw [n_clips, 3] with
        pixel_values_videos [sum t*h*w, ...] and (Qwen2.5-VL) second_per_grid_ts [n_clips].
        Row b takes the next image grids until their t*h*w/merge^2 tokens add up to its
        image pads, and the next clip grids until they add up to its video pads (a
        Qwen3-VL clip's pads stand in per-frame runs, but still t*h*w/merge^2 in all),
        with the matching pixel rows. Raises ValueError (one line) when a row's pads and
        the grids do not match, grids or pixel rows are left over or missing, or a grid
        comes without its pixels: a row must never be handed another row's pixels, nor
        fail later inside the vision tower with a bare IndexError."""
        unit = self.config.vision_config.spatial_merge_size ** 2
        kinds = [("image", self.config.image_token_id, "image_grid_thw", "pixel_values", None),
                 ("video", self.config.video_token_id, "video_grid_thw", "pixel_values_videos",
                  "second_per_grid_ts")]
        for _, _, grid_key, pixel_key, _ in kinds:
            if inputs.get(grid_key) is not None and inputs.get(pixel_key) is None:
                raise ValueError(f"{grid_key} is given but {pixel_key} is not: each grid needs its pixel rows")
        taken = {grid_key: (0, 0) for _, _, grid_key, _, _ in kinds}           # (next grid, next pixel row)
        out = []
        for b in range(inputs["input_ids"].shape[0]):
            _, row = row_slices(inputs, b)
            for name, token_id, grid_key, pixel_key, per_clip_key in kinds:
                need = int((row["input_ids"] == token_id).sum())
                if need == 0:
                    continue
                grids = inputs.get(grid_key)
                if grids is None:
                    raise ValueError(f"row {b} has {need} {name} pads but no {grid_key} was given")
                g0, p0 = taken[grid_key]
                g, p = g0, p0
                while need > 0 and g < len(grids):
                    t, h, w = (int(x) for x in grids[g])
                    need -= t * h * w // unit
                    p += t * h * w
                    g += 1
                if need != 0:
                    raise ValueError(f"row {b}: its {name} pads do not match {grid_key} (it would take grids "
                                     f"{g0}..{g - 1} of {len(grids)})")
                row[pixel_key], row[grid_key] = inputs[pixel_key][p0:p], grids[g0:g]
                if per_clip_key is not None and inputs.get(per_clip_key) is not None:
                    # one value per clip, like the grids (a processor may give a list: a tensor here)
                    row[per_clip_key] = torch.as_tensor(inputs[per_clip_key])[g0:g]
                taken[grid_key] = (g, p)
            out.append(row)
        for _, _, grid_key, pixel_key, _ in kinds:
            grids = inputs.get(grid_key)
            if grids is not None and taken[grid_key][0] != len(grids):
                raise ValueError(f"{grid_key} has {len(grids)} grids but the rows' pads use {taken[grid_key][0]}")
            pixels = inputs.get(pixel_key)
            if pixels is not None and taken[grid_key][1] != len(pixels):
                raise ValueError(f"{pixel_key} has {len(pixels)} rows but {grid_key} describes {taken[grid_key][1]} "
                                 f"(t*h*w per grid): they must match")
        return out

    # ---- embedding and positions ----------------------------------------------------
    def visual_features(self, req: EncodedRequest) -> dict[int, object]:
        """{token id: the vision tower's output} for the images and the clips of a request
        (get_image_features / get_video_features, each run once)."""
        inputs, dev, out = req.model_inputs, self.device, {}
        if inputs.get("pixel_values") is not None:
            out[self.config.image_token_id] = self.model.model.get_image_features(
                inputs["pixel_values"].to(dev), inputs["image_grid_thw"].to(dev))
        if inputs.get("pixel_values_videos") is not None:
            out[self.config.video_token_id] = self.model.model.get_video_features(
                inputs["pixel_values_videos"].to(dev), inputs["video_grid_thw"].to(dev))
        return out

    def embed(self, req: EncodedRequest) -> torch.Tensor:
        embeds = self.embed_tokens(req.input_ids)                                     # [B, L, D]
        for token_id, out in self.visual_features(req).items():
            embeds = splice_image_features(embeds, req.input_ids.to(self.device), token_id,
                                           torch.cat(out.pooler_output))
        return embeds

    def positions(self, req: EncodedRequest) -> torch.LongTensor:
        """M-RoPE ids [3, B, L] from the model's get_rope_index: images and clips, with
        Qwen2.5-VL's second_per_grid_ts temporal step for clips where it takes one, and the
        attention_mask as HF generate gives it: positions count only the real tokens (a
        left-padded row gets the positions of its unpadded self), pads get 0."""
        dev = self.device
        inputs = req.model_inputs

        def on_device(name):
            value = inputs.get(name)
            return value.to(dev) if value is not None else None

        extra = {}
        if inputs.get("second_per_grid_ts") is not None and self.takes_second_per_grid_ts:
            extra["second_per_grid_ts"] = on_device("second_per_grid_ts")
        positions, _ = self.model.model.get_rope_index(
            req.input_ids.to(dev),
            mm_token_type_ids=inputs["mm_token_type_ids"].to(dev),
            image_grid_thw=on_device("image_grid_thw"),
            video_grid_thw=on_device("video_grid_thw"),
            attention_mask=req.attention_mask.to(dev) if req.attention_mask is not None else None,
            **extra,
        )                                                                             # [3, B, L]
        return positions

    # ---- the pre-LLM stage: vision-tower attention ------------------------------------
    def vision_attention_block(self):
        """The last full-attention block of the ViT: Qwen2.5-VL's blocks attend inside
        windows except those in `fullatt_block_indexes`; Qwen2-VL's all attend fully."""
        visual = self.model.model.visual
        full = getattr(visual, "fullatt_block_indexes", None)
        index = max(full) if full else len(visual.blocks) - 1
        return visual.blocks[index].attn

    def embed_and_vision_attention(self, req: EncodedRequest):
        """As the base, but a request with both images and clips runs the ViT twice (one
        call each); the named block's attention is read from one call only, so refuse."""
        inputs = req.model_inputs
        if inputs.get("pixel_values") is not None and inputs.get("pixel_values_videos") is not None \
                and self.vision_attention_block() is not None:
            raise ValueError("the vision-tower attention (pre-LLM scorers such as vision_attn, visionzip, "
                             "vispruner) is read for images or for clips, not both in one request: give the "
                             "sample only images or only videos")
        return super().embed_and_vision_attention(req)

    def vision_attention(self, req: EncodedRequest, args: tuple, kwargs: dict) -> torch.Tensor:
        """[1, N] mean attention each merged visual token receives in the last
        full-attention ViT block: per image, softmax(q k^T / sqrt(d)) averaged over heads
        and over all of that image's patches as queries (Qwen's ViT has no [CLS]; this is
        the "attention received" that VisionZip ports to Qwen use), then averaged over
        the 2x2 patches merged into one LLM token. Rows are processed in chunks, never
        as a full attention map over every block."""
        attn = self.vision_attention_block()
        x = args[0] if args else kwargs["hidden_states"]                             # [S, C] after norm1
        cu_seqlens = kwargs["cu_seqlens"]
        cos, sin = kwargs["position_embeddings"]
        S = x.shape[0]
        q, k, _ = attn.qkv(x).reshape(S, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)   # [S, H, d]
        q, k = rotate_vision(q, cos, sin), rotate_vision(k, cos, sin)
        received = torch.cat([
            attention_received(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1))
            for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())
        ])                                                                            # [S] in the blocks' order
        visual = self.model.model.visual
        unit = visual.spatial_merge_size ** 2
        merged = received.view(-1, unit).mean(dim=1)                                  # [N] in the blocks' order
        if hasattr(visual, "window_size"):
            # Qwen2.5-VL runs its blocks in window order; undo it as its forward does
            grid = req.model_inputs.get("image_grid_thw")
            grid = grid if grid is not None else req.model_inputs["video_grid_thw"]
            window_index, _ = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size,
                                                      visual.patch_size)
            merged = merged[torch.argsort(window_index.to(merged.device))]
        return merged.unsqueeze(0)

    def rotary(self, hidden, positions):
        return self.language_model.rotary_emb(hidden, positions)

    def rope_spec(self) -> RopeSpec:
        rot = self.language_model.rotary_emb
        return RopeSpec(inv_freq=rot.inv_freq, mrope_section=list(rot.mrope_section),
                        head_dim=self.layers[0].self_attn.head_dim)


def rotate_vision(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Qwen's ViT rotary embedding on x [S, H, d] with cos/sin [S, d], in float32."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    x = x.float()
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
