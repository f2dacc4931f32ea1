import pytest

from sparsevlm_exp.models.qwen2_vl import Qwen2VLAdapter
from tiny_models import save_tiny_qwen


@pytest.fixture(scope="session")
def tiny_qwen_dirs(tmp_path_factory):
    """{family: checkpoint dir} of tiny random models saved with save_pretrained."""
    root = tmp_path_factory.mktemp("tiny")
    return {fam: save_tiny_qwen(fam, root / fam) for fam in ("qwen2_vl", "qwen2_5_vl")}


@pytest.fixture(scope="session")
def load_tiny(tiny_qwen_dirs):
    cache = {}

    def load(family: str, attn: str = "sdpa") -> Qwen2VLAdapter:
        key = (family, attn)
        if key not in cache:
            cache[key] = Qwen2VLAdapter.load(pretrained=tiny_qwen_dirs[family], dtype="float32", device="cpu",
                                             attn_implementation=attn)
        return cache[key]

    return load
