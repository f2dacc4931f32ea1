import pytest

from sparsevlm_exp.models.qwen2_vl import Qwen2VLAdapter
from tiny_models import save_tiny_qwen, tiny_adapter_loader


@pytest.fixture(scope="session")
def tiny_qwen_dirs(tmp_path_factory):
    """{family: checkpoint dir} of tiny random models saved with save_pretrained."""
    root = tmp_path_factory.mktemp("tiny")
    return {fam: save_tiny_qwen(fam, root / fam) for fam in ("qwen2_vl", "qwen2_5_vl")}


@pytest.fixture(scope="session")
def load_tiny(tiny_qwen_dirs):
    """load_tiny(family, attn="sdpa") -> Qwen2VLAdapter, each pair loaded once."""
    return tiny_adapter_loader(tiny_qwen_dirs, Qwen2VLAdapter)
