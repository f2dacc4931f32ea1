"""sparsevlm_exp: training-free visual token sparsification experiments (SparseVLM and peers)."""

__all__ = ["sparse_generate", "SparseGenerateOutput"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import sparsevlm_exp.kernels` (or the CLI's argument parsing) should
    # not pay for importing transformers and Hydra.
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'sparsevlm_exp' has no attribute {name!r}")
