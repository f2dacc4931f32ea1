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


# issue 15 item 2: kv_only with several cuts kept the intersection of the cuts (31 of 64).
def test_kv_only_with_two_cuts_keeps_the_scheduled_count(embedded):
    sample = ShapesDataset(split="test", size=1)[0]
    req, state = prefill(embedded, sample, ["policy=schedule", "policy.layers=[1,3]", "policy.keep=[0.5,0.25]",
                                            "policy.reference_count=null", "pruner=kv_only"])
    n_visual = int(req.visual_index.shape[1])                                  # 256
    first, second = (set(e.kept_index[0].tolist()) for e in state.events)
    assert len(first) == n_visual // 2 and len(second) == n_visual // 4
    assert second <= first                     # the second cut only ranks tokens the first kept
    L = int(req.input_ids.shape[1])                            # the decode cache holds 64 visual, not 31
    assert all(layer.keys.shape[2] == L - 3 * n_visual // 4 for layer in state.cache.layers)
    assert state.layer_counts == [256, 128, 128, 64, 64, 64]   # alive for decoding after each layer


def two_image_sample() -> Sample:
    a, b = ShapesDataset(split="test", size=2)
    return Sample(id="two", question=a.question, images=[a.images[0], b.images[0]], answers=a.answers)


# issue 15 item 3: a float keep is "the fraction of each image's visual tokens"; before
# policy.allocation the code ranked all images together (v2 kept [0, 128] of two 256-token
# images, v15 [7, 121], fastv [47, 81]).
@pytest.mark.parametrize("scorer", ["v2", "v15", "fastv"])
def test_float_keep_is_per_image(embedded, scorer):
    sample = two_image_sample()
    req, state = prefill(embedded, sample, [f"scorer={scorer}", "keep=0.25", "layer=2"])
    image_of = dict(zip(req.visual_index[0].tolist(), req.visual_coords[0][:, 0].tolist()))
    per_image = Counter(image_of[i] for i in state.events[0].kept_index[0].tolist())
    assert [per_image[0], per_image[1]] == [64, 64]          # 0.25 of each image's 256 tokens


def test_global_allocation_ranks_all_images_together(embedded):
    sample = two_image_sample()
    req, state = prefill(embedded, sample, ["scorer=v2", "keep=0.25", "layer=2", "policy.allocation=global"])
    image_of = dict(zip(req.visual_index[0].tolist(), req.visual_coords[0][:, 0].tolist()))
    per_image = Counter(image_of[i] for i in state.events[0].kept_index[0].tolist())
    assert per_image[0] + per_image[1] == 128 and per_image[0] != 64     # the old, global behaviour


def test_split_by_share_by_hand():
    from sparsevlm_exp.contracts import split_by_share
    assert split_by_share([256, 256], 128) == [64, 64]
    assert split_by_share([256, 64], 80) == [64, 16]
    assert split_by_share([4, 2, 6], 6) == [2, 1, 3]
    assert split_by_share([3, 3, 3], 4) == [2, 1, 1]        # remainder ties go to the earlier image
    assert split_by_share([1, 1, 10], 5) == [1, 0, 4]       # quotas 5/12, 5/12, 50/12: floors 0, 0, 4; the tie -> image 0
    assert sum(split_by_share([7, 5, 3], 11)) == 11


def test_per_image_top_k_by_hand():
    from sparsevlm_exp.contracts import per_image_top_k
    # three images of 4, 2 and 6 tokens; n = 6 -> shares 2, 1, 3
    image = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2])
    scores = torch.tensor([[9., 8., 7., 6., 1., 2., 5., 4., 3., 0.5, 0.4, 0.3]])
    # global top-6 would be indices 0, 1, 2, 3, 6, 7 (image 1 gets nothing)
    assert per_image_top_k(scores, image, 6).tolist() == [[0, 1, 5, 6, 7, 8]]
    # one image: exactly the plain top-k
    assert per_image_top_k(scores[:, :4], image[:4], 2).tolist() == [[0, 1]]
