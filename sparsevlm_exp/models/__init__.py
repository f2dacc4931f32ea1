"""Model adapters, one per VLM family. A new family is one adapter module and its
model_type entries here (and yaml files in conf/model/)."""
from .llava import LlavaAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_5 import Qwen3_5Adapter
from .qwen3_vl import Qwen3VLAdapter

# transformers `config.model_type` -> adapter class
ADAPTERS = {
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen2VLAdapter,
    "qwen3_vl": Qwen3VLAdapter,
    "qwen3_vl_moe": Qwen3VLAdapter,
    "qwen3_5": Qwen3_5Adapter,
    "llava": LlavaAdapter,
}


def position_dims(config) -> int | None:
    """Rows of the rotary position ids of a checkpoint's family, from its config alone
    (no weights): 1 for 1-D RoPE (LLaVA), 3 for M-RoPE (Qwen); None for a model_type
    without an adapter (the adapter then refuses it when it loads)."""
    adapter = ADAPTERS.get(getattr(config, "model_type", None))
    return None if adapter is None else adapter.position_dims


def adapter_for(model, processor=None):
    """Wrap an already loaded transformers model (the library path)."""
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise ValueError(f"no adapter for model_type={model_type!r}; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[model_type](model, processor)


__all__ = ["ADAPTERS", "adapter_for", "position_dims", "Qwen2VLAdapter", "Qwen3VLAdapter", "Qwen3_5Adapter"]
