#!/usr/bin/env bash
# Every GPU measurement that issues #3 and #6 ask for, in few calls of a lent GPU
# machine (no network there). Prepare once, where pip works:
#
#     bash scripts/gpu_wheels.sh                        # fills .whl/ and .whl_pkg/
#
# then, on the GPU machine, from the repo root (the device tool: carry .whl and .whl_pkg):
#
#     bash scripts/gpu_session.sh kernels   # GPU kernel tests, bench_kernels (plain and
#                                           # corrected), bench_kv_gather           ~3 min
#     bash scripts/gpu_session.sh speed     # sparsevlm_exp.bench, Qwen2.5-VL-7B arch, bf16:
#                                           # hf / ours / kv_only at 576 and 16,320 tokens,
#                                           # then hf / ours / sparsevlm_pkg at 2,304 and
#                                           # 16,320; the pre-LLM peers (divprune,
#                                           # visionzip, cdpruner, vispruner) at 576
#                                           # and 2,304; hf / ours on Qwen3-VL-8B's
#                                           # and Qwen3.5-9B's architectures (random
#                                           # init); video rows (8 frames) on
#                                           # Qwen2.5-VL-7B and Qwen3-VL-8B           ~10 min
#     bash scripts/gpu_session.sh throughput  # batched inference (python -m
#                                           # sparsevlm_exp.throughput): Qwen2.5-VL-7B
#                                           # arch (random init), 576 and 2,304 visual
#                                           # tokens, batch 1 vs 8 and 1 vs 32, keep
#                                           # 1.0 and 0.25, 32 questions each          ~8 min
#
# Results go to $OUT (the device tool's return folder; outputs/gpu_session otherwise):
# log.txt (GPU, versions, everything printed) and the JSON files, flat, so they all come
# back. Copy the tables into docs/BENCHMARKS.md with the GPU line from log.txt.
#
# SMOKE=1 runs the same steps on CPU at toy sizes (no wheels needed): it checks this
# script, not the GPU (tests/test_gpu_session.py does this).
set -uo pipefail
cd "$(dirname "$0")/.."

stage="${1:-}"
case "$stage" in kernels | speed | throughput) ;; *)
    echo "usage: bash scripts/gpu_session.sh kernels|speed|throughput (got '${stage}')" >&2
    exit 2 ;;
esac
OUT="${OUT:-outputs/gpu_session}"
mkdir -p "$OUT"
log="$OUT/log.txt"
: >"$log"
export PYTHONUNBUFFERED=1
smoke="${SMOKE:-0}"

say() { echo "$*" | tee -a "$log"; }
run() {  # run a command, its output to the terminal and the log; a failure is logged, not fatal
    say "\$ $*"
    "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || say "exit status $rc: $*"
}

if [ "$smoke" != 1 ]; then
    if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_session: CUDA is not available here (SMOKE=1 runs the steps on CPU at toy sizes)" >&2
        exit 2
    fi
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu_session: .whl/ has no wheels; run 'bash scripts/gpu_wheels.sh' where pip works and carry .whl" >&2
        exit 2
    fi
    python3 -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true) | tee -a "$log"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 - <<'EOF' 2>&1 | tee -a "$log"
import importlib.metadata as m, platform, torch
names = ["torch", "triton", "transformers", "hydra-core", "sparsevlm"]
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "-"
print("python", platform.python_version(), "|", " | ".join(f"{n} {version(n)}" for n in names))
from sparsevlm_exp.metrics.efficiency import device_description
print("device:", device_description("cuda" if torch.cuda.is_available() else "cpu"))
EOF

if [ "$stage" = kernels ]; then
    if [ "$smoke" = 1 ]; then
        run python3 scripts/bench_kernels.py --device cpu --small --lengths 128 --rows 4 --warmup 1 --iters 2 --out "$OUT/bench_kernels.json"
        run python3 scripts/bench_kv_gather.py --device cpu --small --lengths 256 --layers 2 --warmup 1 --iters 2 --out "$OUT/bench_kv_gather.json"
    else
        run python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py
        run python3 scripts/bench_kernels.py --out "$OUT/bench_kernels.json"
        run python3 scripts/bench_kernels.py --correction --out "$OUT/bench_kernels_corr.json"
        run python3 scripts/bench_kv_gather.py --out "$OUT/bench_kv_gather.json"
    fi
fi

if [ "$stage" = speed ]; then
    # hydra writes its run dir (configs, log) under /tmp; only the JSON comes back.
    if [ "$smoke" = 1 ]; then
        common=(model=bench_cpu device=cpu dtype=float32 model.architecture.text_config.num_hidden_layers=3
                bench.max_new_tokens=2 bench.warmup=0 bench.repeats=1 'bench.layer=[1]')
        tokens_main='[16]' tokens_pkg='[16]' keeps='[0.25,1.0]'
    else
        common=(model=qwen2_5_vl_7b device=cuda dtype=bfloat16 bench.max_new_tokens=32 bench.warmup=2
                bench.repeats=5 'bench.layer=[2]')
        tokens_main='[576,16320]' tokens_pkg='[2304,16320]' keeps='[0.25,0.5,1.0]'
    fi
    run python3 -m sparsevlm_exp.bench "${common[@]}" "bench.visual_tokens=$tokens_main" "bench.keep=$keeps" \
        'bench.methods=[hf,ours,kv_only]' hydra.run.dir=/tmp/gpu_session/speed
    cp /tmp/gpu_session/speed/bench.json "$OUT/bench_speed.json" 2>/dev/null
    cp /tmp/gpu_session/speed/bench_env.json "$OUT/bench_speed_env.json" 2>/dev/null

    # The pre-LLM peers (issue 18): `ours` with the cut before the LLM (layer -1), one
    # bench per method; 576 and 2,304 tokens (their N x N similarity / DPP work grows
    # quadratically, 16,320 would dominate the session).
    if [ "$smoke" = 1 ]; then tokens_peers='[16]'; else tokens_peers='[576,2304]'; fi
    for scorer in divprune visionzip cdpruner vispruner; do
        run python3 -m sparsevlm_exp.bench "${common[@]}" 'bench.layer=[-1]' "bench.scorer=$scorer" \
            "bench.visual_tokens=$tokens_peers" "bench.keep=$keeps" 'bench.methods=[ours]' \
            hydra.run.dir=/tmp/gpu_session/peers_$scorer
        cp /tmp/gpu_session/peers_$scorer/bench.json "$OUT/bench_peers_$scorer.json" 2>/dev/null
    done

    # Qwen3-VL-8B's architecture (DeepStack, q_norm, interleaved M-RoPE) and, further down,
    # Qwen3.5-9B's (Gated DeltaNet + full attention 3:1), both at random init. The smoke
    # runs give both one tiny text model and ViT (the sizes of tests/tiny_models.py), so a
    # size changed for one family is changed for the other; each family adds its own keys.
    if [ "$smoke" = 1 ]; then
        t=model.architecture.text_config v=model.architecture.vision_config
        tiny=(model.random_init=true device=cpu dtype=float32 bench.max_new_tokens=2 bench.warmup=0 bench.repeats=1
              "$t.hidden_size=64" "$t.intermediate_size=128" "$t.num_attention_heads=4" "$t.num_key_value_heads=2"
              "$t.head_dim=16" "$v.hidden_size=32" "$v.intermediate_size=64" "$v.num_heads=2" "$v.out_hidden_size=64")
        qwen3=(model=qwen3_vl_8b "${tiny[@]}" 'bench.layer=[1]' "$t.num_hidden_layers=3"
               "$t.rope_parameters.mrope_section=[2,3,3]" "$v.depth=3" "$v.deepstack_visual_indexes=[0,1,2]")
        # v15 scores at a full-attention layer (3), so the cut is there
        qwen35=(model=qwen3_5_9b "${tiny[@]}" 'bench.layer=[3]' "$t.num_hidden_layers=4"
                "$t.linear_key_head_dim=16" "$t.linear_value_head_dim=16" "$t.linear_num_key_heads=2"
                "$t.linear_num_value_heads=4" "$t.rope_parameters.mrope_section=[1,1,0]" "$v.depth=2")
    else
        random=(model.random_init=true device=cuda dtype=bfloat16 bench.max_new_tokens=32 bench.warmup=2
                bench.repeats=5)
        qwen3=(model=qwen3_vl_8b "${random[@]}" 'bench.layer=[2]')
        qwen35=(model=qwen3_5_9b "${random[@]}" 'bench.layer=[3]')
    fi
    run python3 -m sparsevlm_exp.bench "${qwen3[@]}" "bench.visual_tokens=$tokens_main" 'bench.keep=[0.25,1.0]' \
        'bench.methods=[hf,ours]' hydra.run.dir=/tmp/gpu_session/speed_qwen3_vl
    cp /tmp/gpu_session/speed_qwen3_vl/bench.json "$OUT/bench_speed_qwen3_vl.json" 2>/dev/null

    # Video (issue 19): one clip of 8 frames (4 temporal tokens sharing N visual tokens),
    # Qwen2.5-VL-7B (second_per_grid_ts positions) and Qwen3-VL-8B (a marked run per
    # frame after timestamp text); hf / ours.
    if [ "$smoke" = 1 ]; then tokens_video='[16]'; else tokens_video='[2304,16384]'; fi
    run python3 -m sparsevlm_exp.bench "${common[@]}" bench.video_frames=8 "bench.visual_tokens=$tokens_video" \
        'bench.keep=[0.25,1.0]' 'bench.methods=[hf,ours]' hydra.run.dir=/tmp/gpu_session/speed_video
    cp /tmp/gpu_session/speed_video/bench.json "$OUT/bench_speed_video.json" 2>/dev/null
    run python3 -m sparsevlm_exp.bench "${qwen3[@]}" bench.video_frames=8 "bench.visual_tokens=$tokens_video" \
        'bench.keep=[0.25,1.0]' 'bench.methods=[hf,ours]' hydra.run.dir=/tmp/gpu_session/speed_video_qwen3_vl
    cp /tmp/gpu_session/speed_video_qwen3_vl/bench.json "$OUT/bench_speed_video_qwen3_vl.json" 2>/dev/null

    # Qwen3.5-9B's architecture (qwen35 above): v15 scores at full-attention layer 3.
    run python3 -m sparsevlm_exp.bench "${qwen35[@]}" "bench.visual_tokens=$tokens_main" 'bench.keep=[0.25,1.0]' \
        'bench.methods=[hf,ours]' hydra.run.dir=/tmp/gpu_session/speed_qwen3_5
    cp /tmp/gpu_session/speed_qwen3_5/bench.json "$OUT/bench_speed_qwen3_5.json" 2>/dev/null

    # The PyPI package on the path for this run only: its top-level `kernels` package
    # shadows Hugging Face's `kernels`.
    pkg_dir=/tmp/gpu_session/pkg_site
    if ls .whl_pkg/*.whl >/dev/null 2>&1 \
        && python3 -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$pkg_dir" .whl_pkg/*.whl; then
        PYTHONPATH="$pkg_dir:$PYTHONPATH" run python3 -m sparsevlm_exp.bench "${common[@]}" "bench.visual_tokens=$tokens_pkg" \
            'bench.keep=[0.25]' 'bench.methods=[hf,ours,sparsevlm_pkg]' hydra.run.dir=/tmp/gpu_session/pkg
        cp /tmp/gpu_session/pkg/bench.json "$OUT/bench_pkg.json" 2>/dev/null
    else
        say "no .whl_pkg/sparsevlm wheel: the sparsevlm_pkg rows were not run"
    fi
fi
if [ "$stage" = throughput ]; then
    # Batched pruned inference (issue 22): samples/s and tokens/s of batch 1 vs batch B in
    # one process (python -m sparsevlm_exp.throughput), predictions compared request by
    # request. Random weights: the answers are noise, the identity check and the timing are
    # what count. The embedded model's processor tokenizes (the GPU machine has no hub);
    # shapes images of 672 / 1344 px give 576 / 2,304 visual tokens (28 px per token).
    if [ "$smoke" = 1 ]; then
        thr=(model=bench_cpu model.processor=asset:shapes_vlm device=cpu dtype=float32
             model.architecture.text_config.num_hidden_layers=3 dataset.size=4 decoder.max_new_tokens=2 layer=1)
        runs=("224 2")
    else
        thr=(model=qwen2_5_vl_7b model.random_init=true model.processor=asset:shapes_vlm device=cuda
             dtype=bfloat16 dataset.size=32 decoder.max_new_tokens=16)
        runs=("672 8" "672 32" "1344 8")
    fi
    for run_spec in "${runs[@]}"; do
        read -r px B <<<"$run_spec"
        for keep in 1.0 0.25; do
            run python3 -m sparsevlm_exp.throughput --out "$OUT/throughput_${px}px_b${B}_keep${keep}.json" \
                "${thr[@]}" "dataset.image_size=$px" "batch_size=$B" "keep=$keep"
        done
    done
fi
say "gpu_session $stage: done; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
