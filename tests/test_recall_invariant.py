"""The runner's invariant (issue 15, item 2): with several cuts a kept set can only
shrink, so evidence recall never rises from one cut to the next; if it does, the sample
fails with an error naming the sample, the two layers and both recalls."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from sparsevlm_exp.metrics.evidence import RecallRoseError, check_recall_never_rises, evidence_token_mask
from sparsevlm_exp.pruners import DropPruner

CONF = Path(__file__).resolve().parent.parent / "conf"


def _compose(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="config", overrides=overrides)


def test_recall_check_names_sample_layers_and_recalls():
    check_recall_never_rises("s1", [1, 3], [0.5, 0.5])
    check_recall_never_rises("s1", [1, 3, 5], [0.5, None, 0.75])   # no evidence in between: nothing to compare
    with pytest.raises(RecallRoseError, match=r"sample s7: evidence recall rose from 0.2430 .* layer 1 to 0.3080 .* "
                                              r"layer 3"):
        check_recall_never_rises("s7", [1, 3], [0.243, 0.308])


class _ResurrectingPruner(DropPruner):
    """Deliberately broken: its second cut reports every visual token the first one dropped
    as kept again."""

    def __init__(self):
        super().__init__()
        self.first = None

    def cut(self, state, keep_local, scores, view):
        event = super().cut(state, keep_local, scores, view)
        if self.first is None:
            self.first = event.scored_index
        else:
            event.kept_index = self.first.clone()
        return event


def test_runner_fails_the_sample_when_a_cut_resurrects_a_dropped_token(tmp_path):
    from sparsevlm_exp.errors import build
    from sparsevlm_exp.runner import Experiment

    cfg = _compose(["policy=schedule", "policy.layers=[1,3]", "policy.keep=[2,1]", "policy.reference_count=null",
                    "logger=none", "viz.n=0"])
    exp = Experiment(cfg, tmp_path)
    adapter = build(cfg.model, "model")
    text_cfg = exp.model_config.get_text_config()
    # a sample with more evidence tokens than the first cut keeps: its recall must be < 1 there
    for i in range(len(exp.dataset)):
        smp = exp.dataset[i]
        if smp.evidence:
            req = adapter.encode(smp)
            mask = evidence_token_mask(smp.evidence, [im.size for im in smp.images], req.image_grids,
                                       req.visual_coords[0])
            if int(mask.sum()) > 2:
                break
    record = exp.answer(adapter, smp, torch.Generator().manual_seed(0), text_cfg)   # a sound pruner: no error
    assert record.evidence_recall[1] <= record.evidence_recall[0] < 1
    exp.pruner = _ResurrectingPruner()
    with pytest.raises(RecallRoseError, match=f"sample {smp.id}: .* layer 1 .* layer 3"):
        exp.answer(adapter, smp, torch.Generator().manual_seed(0), text_cfg)
