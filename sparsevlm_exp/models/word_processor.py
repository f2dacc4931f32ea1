"""A small word-level processor with the Qwen2-VL / Qwen2.5-VL token layout.

The embedded shapes model and the tiny random test models need a processor that
behaves like the real Qwen ones (special tokens, chat template with a system
prefix, `<|image_pad|>` expansion to t*h*w/4 tokens, `mm_token_type_ids`) without
a 150k-token BPE vocabulary. `build_word_processor` makes one from a word list:
every word is one token, punctuation is split off, text is lower-cased.

    processor = build_word_processor(words)                    # or family="qwen2_vl"
    ids = special_token_ids(processor)   # vocab_size + image/video/vision_start/end/eos/pad ids
    # give vocab_size and eos/pad/bos ids to text_config, the image/video/vision ids to the
    # top-level Qwen2(_5)_VLConfig (eos/pad/bos there too, for generate()).

Importing this module registers the processor classes with AutoProcessor, so a saved
processor loads back with `AutoProcessor.from_pretrained(path)`.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (AutoProcessor, PretrainedConfig, ProcessorMixin, Qwen2_5_VLProcessor, Qwen2VLProcessor,
                          Qwen3VLProcessor)


# Why these two subclasses: in transformers 5.x, Qwen2VLProcessor / Qwen2_5_VLProcessor
# require a video processor, and every video processor requires torchvision, which has
# no CPU build on our machines. Constructing or loading (AutoProcessor.from_pretrained)
# the stock processors therefore fails here. These subclasses take only an image
# processor and a tokenizer; everything else (image token expansion, mm_token_type_ids,
# chat templates, saving) is the stock code. They can also load the processor of any
# real Qwen2(.5)-VL checkpoint: `Qwen2_5_VLImageTextProcessor.from_pretrained(path)`.
class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        _init_image_text(self, image_processor, tokenizer, chat_template)


class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        _init_image_text(self, image_processor, tokenizer, chat_template)


class Qwen3VLImageTextProcessor(Qwen3VLProcessor):
    """Qwen3-VL's processor without a video processor (same reason as above); it also
    keeps the vision start/end token attributes the stock one sets."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        _init_image_text(self, image_processor, tokenizer, chat_template)
        self.vision_start_token = getattr(tokenizer, "vision_start_token", None) or "<|vision_start|>"
        self.vision_end_token = getattr(tokenizer, "vision_end_token", None) or "<|vision_end|>"
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)


def _init_image_text(self, image_processor, tokenizer, chat_template):
    self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
    self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
    self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(self.image_token)
    self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(self.video_token)
    ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class _ImageTextProcessorKey(PretrainedConfig):
    # A private key, so that registering our processors (which makes AutoProcessor find
    # them by the `processor_class` name saved in processor_config.json) changes nothing
    # for any real model type.
    model_type = "sparsevlm_image_text_processor"


class _ImageTextProcessorKey2(PretrainedConfig):
    model_type = "sparsevlm_image_text_processor_qwen2_vl"


AutoProcessor.register(_ImageTextProcessorKey, Qwen2_5_VLImageTextProcessor, exist_ok=True)
class _ImageTextProcessorKey3(PretrainedConfig):
    model_type = "sparsevlm_image_text_processor_qwen3_vl"


AutoProcessor.register(_ImageTextProcessorKey2, Qwen2VLImageTextProcessor, exist_ok=True)
AutoProcessor.register(_ImageTextProcessorKey3, Qwen3VLImageTextProcessor, exist_ok=True)

# Qwen's special tokens, in a fixed order so their ids are stable (0..N-1).
UNK = "<unk>"
SPECIAL_TOKENS = [
    "<|endoftext|>",      # pad
    "<|im_start|>",
    "<|im_end|>",         # end of a turn; the EOS of generation
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    UNK,
]

DEFAULT_SYSTEM = "You are a helpful assistant."

# A Qwen-style ChatML template: system turn first (so visual tokens never start at
# position 0), images as <|vision_start|><|image_pad|><|vision_end|> in content order,
# and "<|im_start|>assistant\n" as the generation prompt.
_CHAT_TEMPLATE = (
    "{%- if messages[0].role != 'system' -%}"
    "<|im_start|>system\n__SYSTEM__<|im_end|>\n"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    # "{% if" (not "{%- if"): keep the newline after the role, as Qwen's templates do, so that
    # a question right after the header stays its own token ("user", "what", not "userwhat")
    "<|im_start|>{{ message.role }}\n"
    "{% if message.content is string -%}{{ message.content }}"
    "{%- else -%}"
    "{%- for part in message.content -%}"
    "{%- if part.type == 'image' or 'image' in part -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part.type == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif part.type == 'text' -%}{{ part.text }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)


def chat_template(system: str = DEFAULT_SYSTEM) -> str:
    return _CHAT_TEMPLATE.replace("__SYSTEM__", system)


def _words_of(text: str) -> list[str]:
    """The tokens the pre-tokenizer makes of `text` (lower-cased), to seed a vocabulary."""
    pre = pre_tokenizers.Whitespace()
    return [w for w, _ in pre.pre_tokenize_str(text.lower())]


def build_tokenizer_object(words: list[str], system: str = DEFAULT_SYSTEM) -> Tokenizer:
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + ["system", "user", "assistant"] + _words_of(system) + \
            [w for word in words for w in _words_of(word)]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")   # joins words with single spaces
    # Special tokens are matched before normalisation and pre-tokenisation.
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def build_word_processor(words: list[str], system: str = DEFAULT_SYSTEM, family: str = "qwen2_5_vl",
                         min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280):
    """A Qwen2_5_VLProcessor (family="qwen2_5_vl"), Qwen2VLProcessor (family="qwen2_vl")
    or Qwen3VLProcessor (family="qwen3_vl": patch 16 instead of 14, so one LLM token per
    32x32 pixels) subclass without video support (see above)
    with a word-level tokenizer over `words` (+ the system prompt's words and Qwen's
    special tokens) and the PIL image processor (patch 14, temporal 2, merge 2).

    Image sizes follow Qwen's smart_resize; a 448x448 image gives a 32x32 patch grid,
    i.e. 256 `<|image_pad|>` tokens."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer_object(words, system),
        unk_token=UNK, pad_token="<|endoftext|>", eos_token="<|im_end|>",
        model_max_length=8192, padding_side="left",
    )
    patch = 16 if family == "qwen3_vl" else 14
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch)
    classes = {"qwen2_5_vl": Qwen2_5_VLImageTextProcessor, "qwen2_vl": Qwen2VLImageTextProcessor,
               "qwen3_vl": Qwen3VLImageTextProcessor}
    if family not in classes:
        raise ValueError(f"family={family!r}: expected one of {sorted(classes)}")
    return classes[family](image_processor=image_processor, tokenizer=tokenizer,
                           chat_template=chat_template(system))


def special_token_ids(processor) -> dict[str, int]:
    """Config kwargs a Qwen2(.5)-VL model built for this processor needs."""
    t = processor.tokenizer
    ids = {name: t.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("eos_token_id", "<|im_end|>"), ("pad_token_id", "<|endoftext|>"),
        ("bos_token_id", "<|endoftext|>"),
    ]}
    ids["vocab_size"] = len(t)
    return ids
