"""Kernels against their oracles.

- The torch reference against a brute force written row by row with
  torch.softmax (float64), and against known answers.
- The Triton kernel against the reference on CPU under TRITON_INTERPRET=1. The
  variable must be set before triton is imported, so those cases run in ONE
  subprocess (this file executed as a script, see `__main__` below): nothing
  leaks into the other tests and import order does not matter.
- The Triton kernel against the reference on a GPU in bf16/fp16/fp32 (marked gpu).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when run as a script in the interpreter subprocess
    sys.path.insert(0, str(REPO))

from sparsevlm_exp.errors import ConfigError  # noqa: E402
from sparsevlm_exp.kernels import (  # noqa: E402
    HAS_TRITON,
    text_visual_attention,
    text_visual_attention_ref,
)

# --------------------------------------------------------------------------- cases


def make_case(seed: int, *, B: int, Hq: int, Hkv: int, T: int, L: int, d: int, spans, dtype=torch.float32,
              device="cpu", rows="mixed", index_dtype=torch.int64):
    """Random q/k plus indices. spans: per batch, a list of (start, stop) visual spans.

    rows="mixed": sorted random query positions, some BEFORE the later visual
    spans (so some visual columns are in a row's future); rows="last": T=1 at L-1;
    rows="tail": the last T positions (text after the image, the usual raters).
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, d, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, d, generator=g).to(dtype)
    visual = torch.stack([torch.cat([torch.arange(a, z) for a, z in batch_spans]) for batch_spans in spans])
    if rows == "mixed":
        query = torch.stack([torch.sort(torch.randperm(L, generator=g)[:T]).values for _ in range(B)])
    elif rows == "last":
        query = torch.full((B, T), L - 1)
    else:
        query = torch.arange(L - T, L).repeat(B, 1)
    return (q.to(device), k.to(device), query.to(index_dtype).to(device), visual.to(index_dtype).to(device))


def brute_force(q, k, query_index, visual_index, scale=None, correction_bn=None):
    """Row by row in float64: full causal softmax of one row, then pick columns.

    correction_bn: [B, T, N] values dividing the visible probabilities.
    """
    B, Hq, T, d = q.shape
    group = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(B, Hq, visual_index.shape[1], dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for t in range(T):
                pos = int(query_index[b, t])
                keys = k[b, h // group, : pos + 1].double()  # the causal row: keys 0..pos
                row = torch.softmax((keys @ q[b, h, t].double()) * scale, dim=0)  # [pos + 1]
                for n, col in enumerate(visual_index[b].tolist()):
                    if col <= pos:
                        value = row[col]
                        if correction_bn is not None:
                            value = value / correction_bn[b, t, n].double()
                        out[b, h, n] += value
    return out / T


def gravity_like(query_index, visual_index):
    """A positive, position-only correction [B, T, N] (the shape of v2.0's gravity)."""
    distance = (query_index[:, :, None] - visual_index[:, None, :]).double()
    return (1.5 + torch.cos(0.1 * distance)).float()


TWO_SPANS = [[(3, 14), (25, 35)], [(5, 16), (27, 37)]]  # N = 21, two non-contiguous spans per sample

# Interpreter cases: tiny shapes (the interpreter runs program instances one by
# one), T and N not multiples of the 16-wide interpreter blocks, GQA, batch 2.
INTERPRETER_CASES = {
    "gqa_two_spans": dict(case=dict(seed=1, B=2, Hq=4, Hkv=2, T=19, L=45, d=16, spans=TWO_SPANS)),
    "key_splits": dict(case=dict(seed=2, B=2, Hq=4, Hkv=2, T=19, L=45, d=16, spans=TWO_SPANS), num_splits=3),
    "correction_tensor": dict(case=dict(seed=3, B=2, Hq=4, Hkv=2, T=19, L=45, d=16, spans=TWO_SPANS),
                              correction="tensor", num_splits=2),
    "correction_callable": dict(case=dict(seed=4, B=2, Hq=4, Hkv=2, T=19, L=45, d=16, spans=TWO_SPANS),
                                correction="callable"),
    "last_token": dict(case=dict(seed=5, B=2, Hq=4, Hkv=2, T=1, L=45, d=16, spans=TWO_SPANS, rows="last")),
    "three_spans_odd_dim_int32": dict(case=dict(seed=6, B=1, Hq=3, Hkv=1, T=5, L=40, d=24,
                                                spans=[[(1, 6), (12, 20), (30, 33)]], index_dtype=torch.int32),
                                      scale=0.3, strided=True),
    # Half-precision inputs: 2-byte loads and strides, fp32 accumulation. For bf16 the
    # kernel takes the dot in fp32 under the interpreter (its bf16 tl.dot is broken
    # upstream, see _dot); the GPU's bf16 dot itself is checked by the gpu tests.
    "fp16_inputs": dict(case=dict(seed=7, B=2, Hq=4, Hkv=2, T=19, L=45, d=16, spans=TWO_SPANS, dtype=torch.float16),
                        num_splits=2),
    "bf16_inputs_corrected": dict(case=dict(seed=8, B=2, Hq=4, Hkv=2, T=19, L=45, d=16, spans=TWO_SPANS,
                                            dtype=torch.bfloat16), correction="callable", num_splits=2),
}


def _build(spec):
    q, k, qi, vi = make_case(**spec["case"])
    if spec.get("strided"):  # non-contiguous views, as slices of HF tensors would be
        q = q.transpose(2, 3).contiguous().transpose(2, 3)
        k = torch.cat([k, k], dim=-1)[..., : k.shape[-1]]
    kwargs = {"scale": spec.get("scale")}
    if spec.get("correction") == "tensor":
        g = torch.Generator().manual_seed(99)
        kwargs["correction"] = 0.5 + torch.rand(qi.shape[0], qi.shape[1], k.shape[2], generator=g)
    elif spec.get("correction") == "callable":
        kwargs["correction"] = gravity_like
    return q, k, qi, vi, kwargs


def run_interpreter_cases() -> dict:
    """Runs in the TRITON_INTERPRET=1 subprocess: max |triton - reference| per case."""
    from sparsevlm_exp.kernels.text_visual_attention import INTERPRET, text_visual_attention_triton

    assert INTERPRET, "TRITON_INTERPRET=1 was not seen at import"
    results = {}
    for name, spec in INTERPRETER_CASES.items():
        q, k, qi, vi, kwargs = _build(spec)
        got = text_visual_attention_triton(q, k, qi, vi, num_splits=spec.get("num_splits"), **kwargs)
        want = text_visual_attention_ref(q, k, qi, vi, **kwargs)
        assert got.shape == want.shape and got.dtype == torch.float32, (got.shape, got.dtype)
        results[name] = {"max_abs_err": float((got - want).abs().max()), "max_ref": float(want.abs().max())}
    # The public entry with backend="triton" reaches the kernel on CPU only here.
    q, k, qi, vi, kwargs = _build(INTERPRETER_CASES["gqa_two_spans"])
    got = text_visual_attention(q, k, qi, vi, backend="triton")
    results["public_backend_triton"] = {"max_abs_err": float((got - text_visual_attention_ref(q, k, qi, vi)).abs().max()),
                                        "max_ref": 1.0}
    return results


# ------------------------------------------------------------- reference oracles


@pytest.mark.parametrize("name", ["gqa_two_spans", "correction_tensor", "correction_callable", "last_token",
                                  "three_spans_odd_dim_int32"])
def test_reference_matches_row_by_row_softmax(name):
    q, k, qi, vi, kwargs = _build(INTERPRETER_CASES[name])
    correction = kwargs.get("correction")
    if correction is None:
        corr_bn = None
    elif callable(correction) and not isinstance(correction, torch.Tensor):
        corr_bn = correction(qi, vi)
    else:
        corr_bn = torch.gather(correction, 2, vi.long()[:, None, :].expand(-1, qi.shape[1], -1))
    want = brute_force(q, k, qi, vi, scale=kwargs["scale"], correction_bn=corr_bn)
    got = text_visual_attention_ref(q, k, qi, vi, **kwargs)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_correction_of_ones_changes_nothing():
    q, k, qi, vi = make_case(7, B=2, Hq=4, Hkv=2, T=6, L=45, d=16, spans=TWO_SPANS)
    plain = text_visual_attention_ref(q, k, qi, vi)
    ones = text_visual_attention_ref(q, k, qi, vi, correction=torch.ones(2, 6, 45))
    ones_fn = text_visual_attention_ref(q, k, qi, vi, correction=lambda a, b: torch.ones(2, 6, b.shape[1]))
    torch.testing.assert_close(ones, plain, atol=0, rtol=0)
    torch.testing.assert_close(ones_fn, plain, atol=0, rtol=0)
    halved = text_visual_attention_ref(q, k, qi, vi, correction=torch.full((2, 6, 45), 2.0))
    torch.testing.assert_close(halved, plain / 2)


def test_zero_queries_attend_uniformly():
    # q = 0: every visible key gets 1 / (position + 1); future columns get 0.
    q, k, qi, vi = make_case(8, B=2, Hq=4, Hkv=2, T=5, L=45, d=16, spans=TWO_SPANS)
    q = torch.zeros_like(q)
    got = text_visual_attention_ref(q, k, qi, vi)
    visible = (vi[:, None, :] <= qi[:, :, None]).double()  # [B, T, N]
    want = (visible / (qi[:, :, None].double() + 1)).mean(dim=1)  # [B, N]
    torch.testing.assert_close(got.double(), want[:, None, :].expand_as(got), atol=1e-7, rtol=1e-6)


def test_future_columns_are_zero_even_with_zero_correction_there():
    # Rows all before the visual tokens: every probability is 0, and a
    # correction of 0 on those masked entries must not produce NaN.
    q, k, _, vi = make_case(9, B=1, Hq=2, Hkv=1, T=3, L=30, d=16, spans=[[(20, 30)]])
    qi = torch.tensor([[2, 5, 19]])
    got = text_visual_attention_ref(q, k, qi, vi, correction=torch.zeros(1, 3, 30))
    assert torch.equal(got, torch.zeros(1, 2, 10))


def test_bf16_reference_is_fp32_of_the_rounded_inputs():
    q, k, qi, vi = make_case(10, B=1, Hq=4, Hkv=2, T=4, L=45, d=16, spans=TWO_SPANS[:1])
    qb, kb = q.bfloat16(), k.bfloat16()
    got = text_visual_attention_ref(qb, kb, qi, vi)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, text_visual_attention_ref(qb.float(), kb.float(), qi, vi), atol=0, rtol=0)


def test_auto_on_cpu_is_the_reference():
    q, k, qi, vi = make_case(11, B=2, Hq=4, Hkv=2, T=4, L=45, d=16, spans=TWO_SPANS)
    want = text_visual_attention_ref(q, k, qi, vi, correction=gravity_like)
    for backend in ("auto", "torch"):
        got = text_visual_attention(q, k, qi, vi, correction=gravity_like, backend=backend)
        assert torch.equal(got, want)


def test_bad_inputs_fail_with_a_clear_message():
    q, k, qi, vi = make_case(12, B=1, Hq=4, Hkv=2, T=4, L=45, d=16, spans=TWO_SPANS[:1])
    with pytest.raises(ConfigError, match="backend"):
        text_visual_attention(q, k, qi, vi, backend="cuda")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        text_visual_attention(q[:, :3], k, qi, vi)
    with pytest.raises(ValueError, match="visual_index values"):
        text_visual_attention(q, k, qi, vi + 40)
    with pytest.raises(ValueError, match="query_index values"):
        text_visual_attention(q, k, qi + 100, vi)
    with pytest.raises(ValueError, match="shape"):
        text_visual_attention(q, k, qi, vi, correction=torch.ones(1, 4, 21))
    with pytest.raises(ValueError, match="callable correction"):
        text_visual_attention(q, k, qi, vi, correction=lambda a, b: torch.ones(1, 4, 45))
    with pytest.raises(ValueError, match="dtype"):
        text_visual_attention(q.half(), k, qi, vi)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_backend_on_cpu_without_interpreter_refuses():
    from sparsevlm_exp.kernels.text_visual_attention import INTERPRET

    if INTERPRET:
        pytest.skip("this pytest process itself runs under TRITON_INTERPRET=1")
    q, k, qi, vi = make_case(13, B=1, Hq=2, Hkv=1, T=2, L=20, d=16, spans=[[(2, 9)]])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        text_visual_attention(q, k, qi, vi, backend="triton")


def _subprocess_env(**extra):
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def test_works_without_triton_installed():
    # Hide triton from the import system: the torch path must still work,
    # "auto" must fall back, and "triton" must say what is missing.
    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
from sparsevlm_exp.kernels import HAS_TRITON, text_visual_attention, text_visual_attention_ref
assert not HAS_TRITON
q = torch.randn(1, 2, 3, 16); k = torch.randn(1, 1, 20, 16)
qi = torch.tensor([[10, 15, 19]]); vi = torch.arange(2, 12)[None]
assert torch.equal(text_visual_attention(q, k, qi, vi), text_visual_attention_ref(q, k, qi, vi))
try:
    text_visual_attention(q, k, qi, vi, backend="triton")
except RuntimeError as e:
    assert "needs the triton package" in str(e), e
else:
    raise SystemExit("backend='triton' without triton did not raise")
print("ok")
"""
    env = _subprocess_env()
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# ------------------------------------------- Triton under the interpreter (CPU)


@pytest.fixture(scope="module")
def interpreter_results():
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--interpreter-cases"],
                          env=_subprocess_env(TRITON_INTERPRET="1"), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(INTERPRETER_CASES) + ["public_backend_triton"])
def test_triton_interpreter_matches_reference(interpreter_results, name):
    result = interpreter_results[name]
    assert result["max_ref"] > 0  # a case whose answer is all zeros would prove nothing
    assert result["max_abs_err"] <= 1e-5, result


# ------------------------------------------------------------- benchmark script


def _bench_module():
    # Imported in-process (not a subprocess): a second torch import costs seconds on 2 cores.
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "scripts" / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_script_cpu_small_runs_the_reference(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = _bench_module().main(["--device", "cpu", "--small", "--lengths", "128", "--rows", "4", "--warmup", "1",
                                 "--iters", "2", "--correction", "--out", str(out)])
    assert code == 0
    assert "| 128 | 4 |" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert [(r["L"], r["T"]) for r in record["rows"]] == [(128, 4)] and record["rows"][0]["torch_ms"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bench_script_refuses_without_cuda_in_one_line(tmp_path, capsys):
    assert _bench_module().main(["--out", str(tmp_path / "never.json")]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "CUDA is not available" in err
    assert not (tmp_path / "never.json").exists()


# ------------------------------------ ahead-of-time compilation for real GPUs (CPU)


def _compile_for_gpu(kernel, pointers: dict, constexprs: dict, capability: int):
    """Compile a Triton kernel to a cubin for an NVIDIA GPU of this compute capability,
    on a machine without one (Triton's own ptxas): the GPU path's code must at
    least compile, although CI never runs it."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = kernel.fn  # the autotuner wraps the JITFunction, which wraps the Python function
    signature = {}
    for name in inspect.signature(jit.fn).parameters:
        signature[name] = ("constexpr" if name in constexprs else pointers.get(name)
                           or ("fp32" if name == "qk_scale" else "i32"))
    source = ASTSource(jit, signature, constexprs)
    from sparsevlm_exp.kernels.text_visual_attention import FP_FUSION

    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": 4, "num_stages": 2, "enable_fp_fusion": FP_FUSION})


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreted functions here")
@pytest.mark.parametrize("capability", [80, 90], ids=["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_kernels_compile_for_ampere_and_hopper(dtype, capability):
    import importlib

    module = importlib.import_module("sparsevlm_exp.kernels.text_visual_attention")
    shared = dict(GROUP=7, HEAD_DIM=128, BLOCK_D=128, BLOCK_T=64, EXACT_FP32=dtype == "fp32", UPCAST_DOT=False)
    stats = _compile_for_gpu(
        module._row_stats_kernel,
        {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "qidx_ptr": "*i64", "m_ptr": "*fp32", "l_ptr": "*fp32"},
        dict(shared, BLOCK_L=64), capability)
    mass = _compile_for_gpu(
        module._visual_mass_kernel,
        {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "qidx_ptr": "*i64", "vidx_ptr": "*i64", "m_ptr": "*fp32",
         "l_ptr": "*fp32", "corr_ptr": "*fp32", "out_ptr": "*fp32"},
        dict(shared, BLOCK_N=64, HAS_CORRECTION=True), capability)
    for compiled in (stats, mass):
        assert len(compiled.asm["cubin"]) > 10_000
        # half precision must reach the tensor cores (mma / wgmma), not a scalar fallback
        if dtype != "fp32":
            assert "mma" in compiled.asm["ptx"], "no tensor-core instruction in the PTX"


# ------------------------------------------------------------------ GPU (CUDA)

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton")


def _qwen_like(seed, *, dtype, L, T, B=1, Hq=28, Hkv=4, d=128, rows="tail"):
    # A system prefix, an image in two spans (two images), text after: Qwen2.5-VL-7B head layout.
    spans = [[(15, 15 + (L - T - 40) // 2), (20 + (L - T - 40) // 2, L - T - 10)]] * B
    return make_case(seed, B=B, Hq=Hq, Hkv=Hkv, T=T, L=L, d=d, spans=spans, dtype=dtype, device="cuda", rows=rows)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", ["tail", "mixed"])
def test_gpu_half_precision_matches_reference(dtype, rows):
    q, k, qi, vi = _qwen_like(20, dtype=dtype, L=3001, T=50, B=2, rows=rows)
    for correction in (None, gravity_like):
        got = text_visual_attention(q, k, qi, vi, correction=correction, backend="triton")
        want = text_visual_attention_ref(q, k, qi, vi, correction=correction)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=2e-3)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_gpu_fp32_matches_reference_tightly(num_splits):
    from sparsevlm_exp.kernels import text_visual_attention_triton

    q, k, qi, vi = _qwen_like(21, dtype=torch.float32, L=2500, T=33, B=2, rows="mixed")
    got = text_visual_attention_triton(q, k, qi, vi, correction=gravity_like, num_splits=num_splits)
    want = text_visual_attention_ref(q, k, qi, vi, correction=gravity_like)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@needs_gpu
def test_gpu_last_token_and_auto_dispatch():
    q, k, qi, vi = _qwen_like(22, dtype=torch.bfloat16, L=4096, T=1, rows="last")
    got = text_visual_attention(q, k, qi, vi)  # auto -> triton on CUDA
    torch.testing.assert_close(got, text_visual_attention_ref(q, k, qi, vi), atol=1e-6, rtol=2e-3)


@pytest.mark.gpu
@needs_gpu
def test_gpu_memory_never_holds_t_by_l():
    q, k, qi, vi = _qwen_like(23, dtype=torch.bfloat16, L=32768, T=64)
    text_visual_attention(q, k, qi, vi)  # compile and autotune first
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = text_visual_attention(q, k, qi, vi)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    one_head_t_by_l = q.shape[2] * k.shape[2] * 4
    assert extra <= 2 * out.numel() * 4 + 64 * k.shape[2], (extra, out.numel() * 4)
    assert extra < one_head_t_by_l


if __name__ == "__main__":
    if sys.argv[1:] == ["--interpreter-cases"]:
        print(json.dumps(run_interpreter_cases()))
    else:
        raise SystemExit("usage: TRITON_INTERPRET=1 python tests/test_kernels.py --interpreter-cases")
