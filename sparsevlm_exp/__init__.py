"""sparsevlm_exp: training-free visual token sparsification experiments (SparseVLM and peers)."""
from .api import SparseGenerateOutput, sparse_generate

__all__ = ["sparse_generate", "SparseGenerateOutput"]
__version__ = "0.1.0"
