"""LLaVA-1.5 (transformers `LlavaForConditionalGeneration`, the llava-hf checkpoints).

The only place that knows LLaVA's token layout: a BOS and the "USER:" prefix, then
one `<image>` placeholder expanded to 576 tokens (the 24x24 patch grid of CLIP
ViT-L/14 at 336 px, CLS dropped), then the question and "ASSISTANT:". The language
model is a plain Llama with 1-D RoPE, so the rotary positions are simply
0..L-1 (stored as [1, B, L]; the engine keeps the ORIGINAL positions of kept
tokens, gaps preserved, and decodes on from L).

SparseVLM's official code evaluates LLaVA-1.5 with the `vicuna_v1` conversation:
a system sentence, then "USER: <image>\\n{question} ASSISTANT:". The llava-hf chat
template renders a system message the same way (its text, a space, then the user
turn), so `system_prompt` (conf/model/llava15_*.yaml) reproduces that prompt.

LLaVA-1.5's evaluation also pads every image to a square with the processor's mean
colour before resizing (`image_aspect_ratio: pad`), where llava-hf's CLIP processor
resizes the short side and center-crops (cutting off the long side's edges).
`pad_images: true` (conf/model/llava15_*.yaml) does the former.
"""
from __future__ import annotations

import torch
from PIL import Image

from ..contracts import EncodedRequest, RopeSpec, Sample
from .base import (FamilyAdapter, attention_received, grid_coords, request_attention_mask, row_slices,
                   splice_image_features)
from .loading import load_pretrained
from .prompting import chat_messages

IMAGE_PLACEHOLDER = "<image>"


def llava_prompt(n_images: int, question: str, system_prompt: str | None = None) -> str:
    """The LLaVA-1.5 conversation as a string, for processors without a chat template:
    "[system ]USER: <image>\\n{question} ASSISTANT:"."""
    system = f"{system_prompt} " if system_prompt else ""
    return f"{system}USER: {(IMAGE_PLACEHOLDER + chr(10)) * n_images}{question} ASSISTANT:"


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """The image centred on a square canvas of its longer side, filled with `fill`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image.convert("RGB"), ((side - width) // 2, (side - height) // 2))
    return canvas


class LlavaAdapter(FamilyAdapter):
    position_dims = 1  # plain 1-D RoPE

    def __init__(self, model, processor=None, system_prompt: str | None = None, pad_images: bool = False):
        self.model = model
        self.processor = processor
        self.config = model.config
        self.system_prompt = system_prompt
        self.pad_images = pad_images

    @classmethod
    def load(cls, system_prompt: str | None = None, pad_images: bool = False, **model_cfg) -> "LlavaAdapter":
        """Hydra's entry (conf/model/llava15_*.yaml): `system_prompt` and `pad_images` are
        ours, the other yaml keys are load_pretrained's arguments."""
        return cls(*load_pretrained(**model_cfg), system_prompt=system_prompt, pad_images=pad_images)

    def _images(self, sample: Sample) -> list[Image.Image]:
        if not self.pad_images:
            return list(sample.images)
        # LLaVA's expand2square fill: the processor's mean colour in 0..255
        fill = tuple(int(x * 255) for x in self.processor.image_processor.image_mean)
        return [pad_to_square(image, fill) for image in sample.images]

    # ---- encoding -------------------------------------------------------------------
    def encode(self, sample: Sample) -> EncodedRequest:
        if self.processor is None:
            raise RuntimeError("this model was built without a processor (model.processor is unset); "
                               "it can run synthetic requests (bench) but cannot encode samples")
        if getattr(sample, "videos", None):
            raise ValueError(f"sample {sample.id}: LLaVA-1.5 takes images only, not video clips "
                             f"(use a Qwen2.5-VL, Qwen3-VL or Qwen3.5 model)")
        return self.request_from_inputs(dict(self._prompt_inputs(self._images(sample), sample.question)))

    def _prompt_inputs(self, images: list, question: str):
        """The processor's output for one user turn: the chat template where the
        processor has one, else the LLaVA-1.5 conversation string (llava_prompt)."""
        if getattr(self.processor, "chat_template", None):
            messages = chat_messages(images, question)
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
            return self.processor.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt",
            )
        text = llava_prompt(len(images), question, self.system_prompt)
        return self.processor(text=text, images=images or None, return_tensors="pt")

    def probe_prompt(self, question: str) -> list[int]:
        return self._prompt_inputs([], question)["input_ids"][0].tolist()

    def probe_system_prompt(self, system: str, question: str) -> list[int]:
        own, self.system_prompt = self.system_prompt, system
        try:
            return self.probe_prompt(question)
        finally:
            self.system_prompt = own

    def request_from_inputs(self, inputs: dict) -> EncodedRequest:
        """Build the request from what the processor returned (also the library path)."""
        input_ids = inputs["input_ids"]
        if input_ids.shape[0] != 1:
            raise ValueError(f"the pruned pipeline runs one request at a time; got a batch of {input_ids.shape[0]}")
        cfg = self.config
        is_image = input_ids[0] == cfg.image_token_id
        visual_index = is_image.nonzero().view(1, -1)                               # [1, N]

        grids = []
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None:
            if cfg.vision_feature_select_strategy != "default":
                # "full" keeps CLIP's CLS token in front of each image's patches: it has
                # no place in the patch grid, so coordinates would be wrong.
                raise ValueError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} is not "
                                 "supported (LLaVA-1.5 uses 'default': patch tokens only, CLS dropped)")
            patch = cfg.vision_config.patch_size
            height, width = pixel_values.shape[-2:]                                 # [n_images, 3, H, W]
            rows, cols = height // patch, width // patch
            grids = [(rows, cols)] * pixel_values.shape[0]
        visual_coords = grid_coords(grids)                                           # [1, N, 4]
        if visual_coords.shape[1] != visual_index.shape[1]:
            raise ValueError(f"{visual_index.shape[1]} image tokens in the prompt but the images give "
                             f"{visual_coords.shape[1]} patch tokens")

        attention_mask = request_attention_mask(inputs, input_ids)
        # Rater candidates (LLaVA has no vision start/end markers): the user's instruction
        # tokens, or every token after the first image (SparseVLM's official H_t).
        text_index, after_image_index = self.instruction_indices(inputs, is_image)
        return EncodedRequest(
            input_ids=input_ids,
            model_inputs=inputs,
            visual_index=visual_index,
            visual_coords=visual_coords,
            image_grids=grids,
            text_index=text_index,
            attention_mask=attention_mask,
            after_image_index=after_image_index,
        )

    def split_inputs(self, inputs: dict) -> list[dict]:
        """Batch -> rows (FamilyAdapter.split_inputs): each row takes as many of the next
        images (pixel_values [n_images, 3, H, W]) as it has image tokens / patches per image.
        Raises ValueError (one line) when a row's image tokens are not a whole number of
        images, the images run out, or images are left over: a row must never be handed
        another row's image."""
        pixels = inputs.get("pixel_values")
        out, i = [], 0
        for b in range(inputs["input_ids"].shape[0]):
            _, row = row_slices(inputs, b)
            n_tokens = int((row["input_ids"] == self.config.image_token_id).sum())
            if n_tokens:
                if pixels is None:
                    raise ValueError(f"row {b} has {n_tokens} image tokens but no pixel_values were given")
                patch = self.config.vision_config.patch_size
                per_image = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
                n = n_tokens // per_image
                if n * per_image != n_tokens or i + n > len(pixels):
                    raise ValueError(f"row {b}: its {n_tokens} image tokens are not {per_image} per image of the "
                                     f"{len(pixels) - i} images of pixel_values left for it")
                row["pixel_values"] = pixels[i:i + n]
                if inputs.get("image_sizes") is not None:
                    row["image_sizes"] = inputs["image_sizes"][i:i + n]
                i += n
            out.append(row)
        if pixels is not None and i != len(pixels):
            raise ValueError(f"pixel_values has {len(pixels)} images but the rows' image tokens use {i}")
        return out

    # ---- embedding and positions ----------------------------------------------------
    def embed(self, req: EncodedRequest) -> torch.Tensor:
        embeds = self.embed_tokens(req.input_ids)                                     # [B, L, D]
        inputs = req.model_inputs
        if inputs.get("pixel_values") is not None:
            pixels = inputs["pixel_values"].to(self.device, self.model.model.vision_tower.dtype)
            extra = {"image_sizes": inputs["image_sizes"]} if inputs.get("image_sizes") is not None else {}
            # vision_feature_layer / select strategy default to the checkpoint's config
            feats = self.model.model.get_image_features(pixel_values=pixels, **extra).pooler_output
            embeds = splice_image_features(embeds, req.input_ids.to(self.device), self.config.image_token_id,
                                           torch.cat(list(feats)))
        return embeds

    def positions(self, req: EncodedRequest) -> torch.LongTensor:
        """[1, B, L] 0..L-1; with an attention_mask, what HF generate derives from it
        (generation/utils.py `_prepare_position_ids_for_generation`, 5.24): cumsum(mask) - 1
        with the pads set to 0, so a left-padded row counts from its first real token."""
        B, L = req.input_ids.shape
        if req.attention_mask is not None:
            mask = req.attention_mask.to(self.device).long()
            return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0).unsqueeze(0)          # [1, B, L]
        return torch.arange(L, device=self.device).view(1, 1, L).expand(1, B, L)     # [1, B, L]

    # ---- the pre-LLM stage: vision-tower attention ------------------------------------
    def vision_attention_block(self):
        """The self-attention of the CLIP layer whose output LLaVA feeds to the projector
        (`vision_feature_layer`, -2 for LLaVA-1.5: the penultimate layer; hidden_states[k]
        is the output of encoder layer k - 1, so a negative k names layers[k])."""
        feature_layer = self.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            raise NotImplementedError(f"vision_feature_layer={feature_layer!r}: one layer is needed for "
                                      "the pre-LLM vision attention")
        tower = self.model.model.vision_tower
        # transformers 5.x's CLIPVisionModel holds the encoder itself; 4.x wrapped it in .vision_model
        layers = getattr(tower, "vision_model", tower).encoder.layers
        return layers[feature_layer if feature_layer < 0 else feature_layer - 1].self_attn

    def vision_attention(self, req: EncodedRequest, args: tuple, kwargs: dict) -> torch.Tensor:
        """[1, N] attention the [CLS] query pays each patch in that layer, averaged over
        heads (VisionZip's / FasterVLM's signal): one query row per image, never the
        full map. Images in prompt order, patches in raster order (CLS dropped)."""
        attn = self.vision_attention_block()
        x = args[0] if args else kwargs["hidden_states"]                             # [n_images, 1 + P, C]
        n, S, _ = x.shape
        q = attn.q_proj(x[:, :1]).view(n, 1, attn.num_heads, -1).transpose(1, 2)     # [n, H, 1, d]
        k = attn.k_proj(x).view(n, S, attn.num_heads, -1).transpose(1, 2)            # [n, H, S, d]
        received = [attention_received(q[i], k[i])[1:] for i in range(n)]           # [P] each, CLS column dropped
        return torch.cat(received).unsqueeze(0)

    def rotary(self, hidden, positions):
        # LlamaRotaryEmbedding takes position ids [B, L]; ours carry a leading axis of 1
        return self.language_model.rotary_emb(hidden, positions[0])

    def rope_spec(self) -> RopeSpec:
        rot = self.language_model.rotary_emb
        return RopeSpec(inv_freq=rot.inv_freq, mrope_section=None, head_dim=self.layers[0].self_attn.head_dim)
