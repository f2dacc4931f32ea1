"""Triton kernels, each beside the plain torch reference that defines it.

`text_visual_attention` dispatches: Triton on CUDA tensors, the torch reference
elsewhere (and always when triton is not installed).
"""

from sparsevlm_exp.kernels.text_visual_attention import (
    HAS_TRITON,
    TRITON_VERSION,
    text_visual_attention,
    text_visual_attention_triton,
)
from sparsevlm_exp.kernels.text_visual_attention_ref import text_visual_attention_ref

__all__ = [
    "HAS_TRITON",
    "TRITON_VERSION",
    "text_visual_attention",
    "text_visual_attention_ref",
    "text_visual_attention_triton",
]
