"""The chat messages every Qwen-style adapter builds from a Sample.

Training (scripts/train_shapes_vlm.py) and evaluation must format prompts the same
way, so both call `chat_messages` and then
`processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
return_dict=True, return_tensors="pt")`.
"""
from __future__ import annotations

from PIL import Image


def chat_messages(images: list[Image.Image], question: str, n_videos: int = 0) -> list[dict]:
    # Videos, then images, then the question: the layout of the Qwen2-VL model cards.
    # The chat template adds the system prefix, so visual tokens never start at 0.
    # A video part carries no frames: the adapter expands its placeholder itself.
    content = [{"type": "video"} for _ in range(n_videos)]
    content += [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]
