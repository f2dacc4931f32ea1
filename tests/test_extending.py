"""The worked examples of docs/EXTENDING.md, run through the normal config path.

Each part is one class (defined in this module, as a user would in their own
package) + one yaml (written to a config dir of the user's that Hydra searches via
`hydra.searchpath`); nothing in the package is edited. The runs use the embedded
model and compose the same config tree as the CLI.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from sparsevlm_exp import engine
from sparsevlm_exp.contracts import STAGE_PRE_LLM, LayerView, Sample, Scorer
from sparsevlm_exp.errors import ConfigError, build
from sparsevlm_exp.kernels import text_visual_attention
from sparsevlm_exp.policies import FixedPolicy
from sparsevlm_exp.runner import Experiment

CONF = Path(__file__).resolve().parent.parent / "conf"


# ---- 1. an in-LLM scorer ------------------------------------------------------------
class LeastAttendedScorer(Scorer):
    """Keeps the visual tokens the LAST token attends to LEAST (FastV reversed)."""

    def query_rows(self, embeds, visual_index, text_index):
        return torch.full((embeds.shape[0], 1), embeds.shape[1] - 1, dtype=torch.long, device=embeds.device)

    def __call__(self, view: LayerView) -> torch.Tensor:
        attn = text_visual_attention(view.q, view.k, view.query_index, view.visual_index)   # [B, Hq, N]
        return -attn.mean(dim=1)


# ---- 2. a pre-LLM scorer ------------------------------------------------------------
class TextSimilarityScorer(Scorer):
    """Before the LLM: cosine similarity of each visual feature to the mean question embedding."""

    stages = (STAGE_PRE_LLM,)

    def __call__(self, view: LayerView) -> torch.Tensor:
        text = view.text_embeds.float().mean(dim=1, keepdim=True)                 # [B, 1, D]
        return torch.cosine_similarity(view.visual_features.float(), text, dim=-1)   # [B, N]


# ---- 3. a selector that is not top-k ------------------------------------------------
class StridedBestPolicy(FixedPolicy):
    """Splits the alive visual tokens into n_keep equal runs (sequence order) and keeps
    the best-scored token of each run: coverage of the whole image is guaranteed."""

    def select(self, scores: torch.Tensor, view: LayerView) -> torch.LongTensor:
        n = self.n_keep(view.layer, n_visual=view.n_visual, scores=scores, view=view)
        bounds = torch.linspace(0, scores.shape[1], n + 1).round().long().tolist()
        picks = [a + int(scores[:, a:b].argmax(dim=1)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        return torch.tensor([picks], device=scores.device)


# ---- 4. a dataset with its own metric -----------------------------------------------
class FirstWordMetric:
    """1 if the prediction's first word is a reference answer (case-insensitive)."""

    name = "first_word"

    def score(self, prediction: str, sample: Sample) -> float:
        words = prediction.lower().split()
        return float(bool(words) and words[0].strip(".,") in {a.lower() for a in sample.answers})

    def summarize(self, records) -> dict[str, float]:
        return {"accuracy": sum(r["score"] for r in records) / len(records), "first_word_n": len(records)}


class SolidColours:
    """One plain-coloured image per question: "What colour is the picture?"."""

    COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40)}

    def __init__(self, size: int = 8, image_size: int = 224, prompt: str = "Answer with one word."):
        self.size, self.image_size, self.prompt = size, image_size, prompt
        self.metric = FirstWordMetric()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Sample:
        name, rgb = list(self.COLOURS.items())[index % len(self.COLOURS)]
        image = Image.new("RGB", (self.image_size, self.image_size), rgb)
        return Sample(id=f"solid/{index}", question=f"What colour is the picture? {self.prompt}",
                      images=[image], answers=[name])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


YAMLS = {
    "scorer/least_attended.yaml": f"_target_: {__name__}.LeastAttendedScorer\n",
    "scorer/text_similarity.yaml": f"_target_: {__name__}.TextSimilarityScorer\n",
    "policy/strided.yaml": f"_target_: {__name__}.StridedBestPolicy\nlayer: ${{layer}}\nkeep: ${{keep}}\n",
    "dataset/solid.yaml": f"_target_: {__name__}.SolidColours\nsize: 8\nimage_size: 224\n",
}


@pytest.fixture(scope="module")
def user_conf(tmp_path_factory):
    root = tmp_path_factory.mktemp("my_conf")
    for name, text in YAMLS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def compose_cfg(user_conf, overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="config", overrides=[f"hydra.searchpath=[file://{user_conf}]", "logger=none",
                                                        "viz.n=0", "threads=1", *overrides])


@pytest.fixture(scope="module")
def shapes_adapter(user_conf):
    return build(compose_cfg(user_conf, []).model, "model")


def prefill_with(cfg, adapter, sample):
    parts = {g: build(cfg[g], g) for g in ("scorer", "policy", "pruner")}
    engine.check_parts(parts["scorer"], parts["policy"], adapter.n_layers)
    return engine.prefill(adapter, adapter.encode(sample), generator=torch.Generator().manual_seed(0), **parts)


def test_toy_in_llm_scorer_keeps_the_least_attended_tokens(user_conf, shapes_adapter):
    sample = SolidColours()[1]
    ours = prefill_with(compose_cfg(user_conf, ["scorer=least_attended", "keep=0.25", "layer=2"]),
                        shapes_adapter, sample)
    fastv = prefill_with(compose_cfg(user_conf, ["scorer=fastv", "keep=0.25", "layer=2"]), shapes_adapter, sample)
    event, reference = ours.events[0], fastv.events[0]
    assert event.layer == 2
    # same attention, opposite order: the kept ones are FastV's lowest-scored
    torch.testing.assert_close(event.scores, -reference.scores)
    bottom = reference.scores[0].topk(event.kept_index.shape[1], largest=False).indices.sort().values
    assert torch.equal(event.kept_index[0], reference.scored_index[0][bottom])


def test_toy_pre_llm_scorer_cuts_before_layer_0(user_conf, shapes_adapter):
    cfg = compose_cfg(user_conf, ["scorer=text_similarity", "keep=0.25", "layer=-1"])
    state = prefill_with(cfg, shapes_adapter, SolidColours()[0])
    n_kept = round(0.25 * state.n_visual)
    assert [e.layer for e in state.events] == [-1]
    assert state.layer_counts == [n_kept] * shapes_adapter.n_layers
    # the stage is declared: the same scorer inside the LLM is refused before weights load
    with pytest.raises(ConfigError, match=r"layer=2 \(inside the LLM\) is not allowed"):
        Experiment(compose_cfg(user_conf, ["scorer=text_similarity", "layer=2"]), user_conf / "unused")


def test_toy_selector_keeps_one_token_per_run(user_conf, shapes_adapter):
    cfg = compose_cfg(user_conf, ["scorer=v15", "policy=strided", "keep=16", "layer=2"])
    state = prefill_with(cfg, shapes_adapter, SolidColours()[2])
    event = state.events[0]
    scores, scored = event.scores[0], event.scored_index[0]
    bounds = torch.linspace(0, scores.shape[0], 17).round().long().tolist()
    expected = [scored[a + int(scores[a:b].argmax())] for a, b in zip(bounds[:-1], bounds[1:])]
    assert event.kept_index[0].tolist() == [int(x) for x in expected]
    # and it is not the top-k
    top = scored[scores.topk(16).indices.sort().values]
    assert not torch.equal(event.kept_index[0], top)


def test_toy_dataset_with_its_own_metric_runs_end_to_end(user_conf, tmp_path):
    cfg = compose_cfg(user_conf, ["dataset=solid", "scorer=random", "keep=0.5"])
    summary = Experiment(cfg, tmp_path).run()
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(r["error"] is None for r in records)
    metric = FirstWordMetric()
    for r in records:
        words = r["prediction"].lower().split()
        assert r["score"] == float(bool(words) and words[0].strip(".,") == r["answers"][0])
    assert summary["accuracy"] == pytest.approx(sum(r["score"] for r in records) / 8)
    assert summary["first_word_n"] == 8 and metric.name == "first_word"
    assert json.loads((tmp_path / "results.json").read_text())["first_word_n"] == 8
