"""Issue 15 items 2 and 3 as failing reproductions, for the engine work to turn green.

Both need the new engine (selection in the policy, cuts that know what each pruner left
alive), so they are marked xfail(strict=True): the day a fix lands they pass, strict
makes that an XPASS failure, and whoever fixed it removes the mark.
Reproductions on the embedded default model, numbers from the issue text.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from sparsevlm_exp.data.base import Sample
from sparsevlm_exp.data.shapes import ShapesDataset
from sparsevlm_exp.errors import build

CONF = Path(__file__).resolve().parent.parent / "conf"


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="config", overrides=["device=cpu", "dtype=float32", *overrides])


@pytest.fixture(scope="module")
def embedded():
    return build(compose_cfg([]).model, "model")


def prefill(adapter, sample, overrides):
    cfg = compose_cfg(overrides)
    parts = {g: build(cfg[g], g) for g in ("scorer", "policy", "pruner")}
    parts["policy"].check(adapter.n_layers)
    req = adapter.encode(sample)
    state = adapter.prefill(req, **parts, generator=torch.Generator().manual_seed(0))
    return req, state


@pytest.mark.xfail(strict=True, reason="issue 15 item 2: kv_only keeps the intersection of several cuts "
                   "(the second cut re-ranks tokens the first already dropped); needs the engine refactor")
def test_kv_only_with_two_cuts_keeps_the_scheduled_count(embedded):
    sample = ShapesDataset(split="test", size=1)[0]
    req, state = prefill(embedded, sample, ["policy=schedule", "policy.layers=[1,3]", "policy.keep=[0.5,0.25]",
                                            "policy.reference_count=null", "pruner=kv_only"])
    n_visual = int(req.visual_index.shape[1])                                  # 256
    first, second = (set(e.kept_index[0].tolist()) for e in state.events)
    assert len(first) == n_visual // 2 and len(second) == n_visual // 4
    assert second <= first                     # the second cut only ranks tokens the first kept
    assert int(state.is_visual[0].sum()) == n_visual // 4      # the decode cache holds 64, not 31


def two_image_sample() -> Sample:
    a, b = ShapesDataset(split="test", size=2)
    return Sample(id="two", question=a.question, images=[a.images[0], b.images[0]], answers=a.answers)


@pytest.mark.xfail(strict=True, reason="issue 15 item 3: a float keep is documented per image, the code "
                   "ranks all images together (v2 keeps [0, 128] of two 256-token images); needs the "
                   "per-image allocation of the engine refactor")
@pytest.mark.parametrize("scorer", ["v2", "v15", "fastv"])
def test_float_keep_is_per_image(embedded, scorer):
    sample = two_image_sample()
    req, state = prefill(embedded, sample, [f"scorer={scorer}", "keep=0.25", "layer=2"])
    image_of = dict(zip(req.visual_index[0].tolist(), req.visual_coords[0][:, 0].tolist()))
    per_image = Counter(image_of[i] for i in state.events[0].kept_index[0].tolist())
    assert [per_image[0], per_image[1]] == [64, 64]          # 0.25 of each image's 256 tokens
