#!/usr/bin/env bash
# Fetch, on a machine with pip access, the wheels that the lent GPU machine lacks, so
# scripts/gpu_session.sh can run there without network. Run from the repo root:
#
#     bash scripts/gpu_wheels.sh            # writes .whl/ and .whl_pkg/ (both in .gitignore)
#
# .whl/      what our package needs beyond the machine's image (it has torch, triton,
#            numpy, pyarrow, matplotlib, tqdm, safetensors, tokenizers, huggingface_hub):
#            hydra-core, omegaconf, antlr4 (sdist only on PyPI: built here into a wheel,
#            pure Python), and transformers - each at the version installed HERE, where
#            the test suite passed (the image's transformers may be older).
# .whl_pkg/  the PyPI `sparsevlm` 0.1.3 package for the `sparsevlm_pkg` rows. Kept apart:
#            its wheel installs a top-level package named `kernels`, which shadows Hugging
#            Face's `kernels`, so gpu_session.sh puts it on the path for that stage only.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

rm -rf .whl .whl_pkg
mkdir -p .whl .whl_pkg
version() { python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
pip download -q --no-deps --only-binary=:all: -d .whl \
    "hydra-core==$(version hydra-core)" "omegaconf==$(version omegaconf)" "transformers==$(version transformers)"
pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
pip download -q --no-deps --only-binary=:all: -d .whl_pkg sparsevlm==0.1.3
ls -l .whl .whl_pkg
du -sh .whl .whl_pkg
