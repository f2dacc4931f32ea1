"""Our benchmark metrics against lmms-eval 0.7.3's own scoring functions (imported from
its task utils), on hand-made answers: equal where docs/LOADERS.md says they agree, and
the documented difference where it says they differ. Skipped without lmms-eval."""
from __future__ import annotations

import copy

import pytest

pytest.importorskip("lmms_eval")

from sparsevlm_exp.contracts import Sample  # noqa: E402
from sparsevlm_exp.metrics.answers import (  # noqa: E402
    MultipleChoice,
    gqa_exact_match,
    mme_score,
    mme_yes_no,
    pope_metrics,
    pope_yes_no,
    vqa_accuracy,
)


def test_textvqa_vqa_accuracy_equals_lmms_eval():
    from lmms_eval.tasks.textvqa.utils import textvqa_process_results

    answers = ["two", "2", "2", "3", "3", "3", "the 3", "3.", "Three", "nike"]
    for prediction in ["2", "Two", "3", "three.", "Nike", "It's 3", "the two", "black-white", "1,000", "no"]:
        doc = {"question_id": 1, "answers": copy.deepcopy(answers)}
        theirs = textvqa_process_results(doc, [prediction])["exact_match"]
        assert vqa_accuracy(prediction, answers) == pytest.approx(theirs), prediction


def test_mme_parse_and_score_equal_lmms_eval():
    from lmms_eval.tasks.mme.utils import mme_aggregate_results, mme_process_results, parse_pred_ans

    for prediction in ["Yes", "no.", "y", "N", "Yes, there is.", "Not at all", "maybe", "The answer is yes", ""]:
        assert mme_yes_no(prediction) == parse_pred_ans(prediction), prediction
    docs = [("existence", "e/1.jpg", "Yes"), ("existence", "e/1.jpg", "No"),
            ("existence", "e/2.jpg", "Yes"), ("existence", "e/2.jpg", "No"),
            ("code_reasoning", "c/1.png", "Yes"), ("code_reasoning", "c/1.png", "No")]
    predictions = ["yes", "no", "yes", "yes", "No", "no"]
    ours, perception, cognition = [], [], []
    for (category, qid, answer), prediction in zip(docs, predictions):
        item = mme_process_results({"question_id": qid, "category": category, "answer": answer}, [prediction])
        (perception if "mme_perception_score" in item else cognition).extend(item.values())
        ours.append({"category": category, "question_id": qid,
                     "score": float(mme_yes_no(prediction) == answer.lower())})
    out = mme_score(ours)
    assert out["perception"] == pytest.approx(mme_aggregate_results(perception)) == 125.0   # (3/4 + 1/2) x 100
    assert out["cognition"] == pytest.approx(mme_aggregate_results(cognition)) == 50.0


def test_pope_agrees_on_clean_answers_and_differs_as_documented():
    from lmms_eval.tasks.pope import utils as pope

    labels = ["yes", "no", "yes", "no", "yes", "no"]
    clean = ["Yes", "no", "No", "No", "yes", "Yes"]

    def theirs(predictions):
        items = [pope.pope_process_results({"question_id": i, "answer": a}, [p])["pope_f1_score"]
                 for i, (a, p) in enumerate(zip(labels, predictions))]
        return {"accuracy": pope.pope_aggregate_accuracy(items), "precision": pope.pope_aggregate_precision(items),
                "recall": pope.pope_aggregate_recall(items), "f1": pope.pope_aggregate_f1_score(items),
                "yes_ratio": pope.pope_aggregate_yes_ratio(items)}

    ours, them = pope_metrics(clean, labels), theirs(clean)
    for key in ("accuracy", "precision", "recall", "f1"):
        assert ours[key] == pytest.approx(them[key]), key
    # yes_ratio: ours is the share of "yes" ANSWERS (POPE's definition), lmms-eval's the
    # share of "yes" LABELS (always 0.5 on the balanced POPE splits)
    assert ours["yes_ratio"] == pytest.approx(3 / 6) and them["yes_ratio"] == pytest.approx(3 / 6)
    assert pope_metrics(["yes"] * 6, labels)["yes_ratio"] == 1.0 and theirs(["yes"] * 6)["yes_ratio"] == 0.5
    # sentences: POPE's official rule (first sentence, "no"/"not" -> no) reads them;
    # lmms-eval's exact comparison counts them wrong, and in neither class for F1
    chatty = ["Yes, there is a dog.", "No, there is not.", "There is no car.", "No.", "Yes.", "Yes"]
    assert [pope_yes_no(p) for p in chatty] == ["yes", "no", "no", "no", "yes", "yes"]
    assert pope_metrics(chatty, labels)["accuracy"] == pytest.approx(4 / 6)
    assert theirs(chatty)["accuracy"] == 0.0


def test_scienceqa_letter_rule_agrees_on_llava_answers_and_is_wider():
    from lmms_eval.tasks.scienceqa.utils import sqa_process_results

    doc = {"choices": ["dog", "cat", "bird"], "answer": 1}
    sample = Sample(id="0", question="", images=[], answers=["B"], meta={"options": ["dog", "cat", "bird"]})
    metric = MultipleChoice()
    for prediction in ["B", "b", "B. cat", "A", "A. dog", "C."]:      # what an LLaVA-style model answers
        assert metric.score(prediction, sample) == sqa_process_results(doc, [prediction])["exact_match"], prediction
    for prediction in ["(B)", "The answer is B", "cat", "B)"]:          # ours reads them, lmms-eval does not
        assert metric.score(prediction, sample) == 1.0
        assert sqa_process_results(doc, [prediction])["exact_match"] == 0.0


def test_gqa_exact_match_agrees_except_inner_punctuation():
    from lmms_eval.api.metrics import exact_match_hf_evaluate

    def theirs(prediction, answer):
        return float(exact_match_hf_evaluate([prediction], [answer], ignore_case=True,
                                             ignore_punctuation=True)["exact_match"])

    for prediction, answer in [("Yes", "yes"), ("yes.", "yes"), ("Table", "table"), ("the table", "table"),
                               ("left", "right"), ("T-shirt", "t-shirt")]:
        assert gqa_exact_match(prediction, answer) == theirs(prediction, answer), prediction
    # lmms-eval deletes every punctuation mark on both sides; GQA's rule (LLaVA's converter)
    # only a trailing period
    for prediction, answer in [("yes,", "yes"), ("tshirt", "t-shirt"), ("no!", "no")]:
        assert gqa_exact_match(prediction, answer) == 0.0 and theirs(prediction, answer) == 1.0
