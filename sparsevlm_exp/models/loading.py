"""Loading checkpoints (hub id, local dir, or the embedded asset) and random-init builds.

Kept apart from the adapters so that every family loads the same way and the
runner can read a checkpoint's config (layer count) cheaply before any weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from ..errors import ConfigError
from . import word_processor  # registers our image+text processors with AutoProcessor

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_path(pretrained: str) -> str:
    """`asset:NAME` -> the packaged checkpoint; anything else is a hub id or a path."""
    if pretrained.startswith("asset:"):
        return str(ASSETS / pretrained.removeprefix("asset:"))
    return pretrained


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} is not allowed: no CUDA device is visible (use device=cpu or auto)")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not allowed: one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _offline_error(pretrained: str, err: Exception) -> ConfigError:
    return ConfigError(
        f"model.pretrained={pretrained!r} could not be loaded ({type(err).__name__}): without network access, "
        f"download the checkpoint elsewhere and point at the local copy with model.pretrained=/path/to/dir"
    )


def _architecture(architecture) -> dict:
    if architecture is None:
        raise ConfigError("model.random_init=true needs model.architecture (the checkpoint's hyperparameters)")
    return OmegaConf.to_container(architecture, resolve=True) if isinstance(architecture, DictConfig) else dict(architecture)


def model_config(pretrained: str, *, random_init: bool = False, architecture=None, trust_remote_code: bool = False):
    """The transformers config, read cheaply (no weights)."""
    if random_init:
        arch = _architecture(architecture)
        return AutoConfig.for_model(**arch)
    path = resolve_path(pretrained)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _offline_error(pretrained, err) from None


def attention_layers(config) -> list[int] | None:
    """The decoder layers with attention rows when only some have them (hybrid models
    such as Qwen3.5: `layer_types` "full_attention" vs "linear_attention"), else None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None)
    if not types or "linear_attention" not in types:
        return None
    return [i for i, t in enumerate(types) if t == "full_attention"]


def num_layers(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


def load_pretrained(pretrained: str, *, dtype: str = "auto", device: str = "auto",
                    attn_implementation: str = "sdpa", random_init: bool = False, architecture=None,
                    processor: str | None = None, trust_remote_code: bool = False, seed: int = 0):
    """Returns (model in eval mode on its device, processor or None)."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    config = model_config(pretrained, random_init=random_init, architecture=architecture,
                          trust_remote_code=trust_remote_code)
    if random_init:
        # Weights do not change speed or memory, so big architectures can be
        # measured without downloading them.
        config._attn_implementation = attn_implementation
        torch.manual_seed(seed)
        with torch.device(dev):
            model = AutoModelForImageTextToText.from_config(config, dtype=torch_dtype,
                                                            attn_implementation=attn_implementation)
    else:
        path = resolve_path(pretrained)
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                path, dtype=torch_dtype, attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code, use_safetensors=True,
            ).to(dev)
        except (OSError, ValueError) as err:
            raise _offline_error(pretrained, err) from None
    model.eval()

    proc_path = processor if processor is not None else (None if random_init else pretrained)
    proc = load_processor(proc_path, config, trust_remote_code) if proc_path is not None else None
    return model, proc


def load_processor(path: str, config, trust_remote_code: bool = False):
    try:
        return AutoProcessor.from_pretrained(resolve_path(path), trust_remote_code=trust_remote_code)
    except ImportError:
        # transformers 5.x Qwen processors insist on a video processor, which needs
        # torchvision; images alone do not, so fall back to our image+text subclass.
        fallback = {"qwen2_vl": word_processor.Qwen2VLImageTextProcessor,
                    "qwen2_5_vl": word_processor.Qwen2_5_VLImageTextProcessor,
                    "qwen3_vl": word_processor.Qwen3VLImageTextProcessor,
                    "qwen3_vl_moe": word_processor.Qwen3VLImageTextProcessor,
                    "qwen3_5": word_processor.Qwen3VLImageTextProcessor}.get(config.model_type)
        if fallback is None:
            raise
        return fallback.from_pretrained(resolve_path(path))
    except (OSError, ValueError) as err:
        raise _offline_error(path, err) from None
