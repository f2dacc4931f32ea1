"""Answer metrics against hand-computed numbers."""
import pytest

from sparsevlm_exp.contracts import Sample
from sparsevlm_exp.metrics import (
    ExactMatch,
    GQAAccuracy,
    MMEMetric,
    MultipleChoice,
    PopeMetric,
    VQAAccuracy,
    exact_match,
    extract_choice,
    gqa_exact_match,
    mme_score,
    mme_yes_no,
    normalize_answer,
    pope_metrics,
    pope_yes_no,
    vqa_accuracy,
)


def sample(answers, **meta):
    return Sample(id="s", question="q", images=[], answers=list(answers), meta=meta)


# --------------------------------------------------------------------------- #
# normalisation
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),                       # number words -> digits
    ("two dogs", "2 dogs"),
    ("none", "0"),
    ("The cat", "cat"),                 # articles dropped
    ("a dog", "dog"),
    ("an apple", "apple"),
    ("dont", "don't"),                  # contractions restored
    ("isnt", "isn't"),
    ("Yes.", "yes"),                    # trailing period
    ("Yes!", "yes"),
    ("1,000", "1000"),                  # digit-comma-digit: the comma goes, no split
    ("1.5", "1.5"),                     # a period before a digit stays
    ("3.", "3"),
    ("black-white", "black white"),     # a mark inside a word becomes a space
    ("yes, it is", "yes it is"),        # a mark touching a space is deleted
    ("  Stop\tSign\n", "stop sign"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


# The official EvalAI processor (TextVQA's scorer in LLaVA's evaluation), worked by hand:
# 1 word_tokenize: lower; delete every "," and "?"; "'s" -> " 's"; strip
# 2 newline/tab -> space; strip
# 3 punctuation: a mark with a space beside it anywhere in the text is deleted, else it
#   becomes a space (all deleted if the text has digit,digit - impossible after step 1);
#   periods not before a digit deleted (the first 32)
# 4 per word: number word -> digit, articles dropped, official contraction table
@pytest.mark.parametrize("raw, expected", [
    ("a,b", "ab"),                        # 1: the comma is deleted, not a space
    ("A, B", "b"),                        # 1: "a b" -> 4: "a" is an article
    ("an apple, a pear", "apple pear"),
    ("it's", "it 's"),                    # 1: "'s" split off
    ("it 's", "it 's"),
    ("Let's go", "let 's go"),
    ("what's", "what 's"),
    ("whats", "what's"),                  # 4: the table maps whats -> what's (no re-split)
    ("1,000", "1000"),
    ("1,000-2", "1000 2"),                # 1 removes the comma, so 3 turns "-" into a space
    ("why?", "why"),
    ("a?b", "ab"),                        # 1: "?" deleted inside a word too
    ("hello!world", "hello world"),       # 3: "!" touches no space -> a space
    ("black - white", "black white"),     # 3: " -" present -> deleted
    ("e.g.", "eg"),                       # 3: both periods precede no digit
    ("3.5 m.", "3.5 m"),
    ("x" + "." * 40, "x" + "." * 8),      # 3: the official code removes at most 32 periods
    ("ten\tpast", "10 past"),
    ("im", "im"),                         # 4: the official key is "Im", never matches lower case
    ("ive", "ive"),
    ("lets", "lets"),                     # 4: the official key is "let's" (-> itself)
    ("shes", "shes"),
    ("somebody'd", "somebodyd"),          # 4: the official entry maps this way round
    ("dont", "don't"),
    ("$5", "$5"),                         # "$" is not in the punctuation list
])
def test_normalize_answer_matches_the_official_evalai_processor(raw, expected):
    assert normalize_answer(raw) == expected


def test_strip_punctuation_digit_comma_rule_alone():
    from sparsevlm_exp.metrics.answers import strip_punctuation
    # digit,digit present -> every mark deleted: "1,000-2" -> "10002"; without it "-" -> " "
    assert strip_punctuation("1,000-2") == "10002"
    assert strip_punctuation("a,000-2") == "a 000 2"


def test_vqa_accuracy_after_word_tokenising():
    # "a,b" and "ab" are one answer for the official scorer: 10 of 10 humans -> 1.0
    assert vqa_accuracy("a,b", ["ab"] * 10) == 1.0
    # "it 's" == "it's": 3 of 10 match; leaving out a match -> 2/3, another -> 1: (3*2/3 + 7)/10
    assert vqa_accuracy("it 's", ["it's"] * 3 + ["no"] * 7) == pytest.approx(0.9)


# --------------------------------------------------------------------------- #
# VQA accuracy
# --------------------------------------------------------------------------- #

def test_vqa_accuracy_two_of_ten_humans():
    answers = ["2", "2"] + ["3"] * 8
    # 10 leave-one-out subsets of 9 answers:
    #   2 subsets drop a "2"  -> 1 match left  -> min(1/3, 1) = 1/3
    #   8 subsets drop a "3"  -> 2 matches     -> min(2/3, 1) = 2/3
    #   mean = (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10 = 0.6
    assert vqa_accuracy("two", answers) == pytest.approx(0.6)


def test_vqa_accuracy_other_counts():
    # 1 human: 1 subset without it -> 0, 9 subsets with it -> 1/3: 9 * 1/3 / 10 = 0.3
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    # 3 humans: 3 subsets drop one -> 2/3, 7 keep all three -> 1: (3 * 2/3 + 7) / 10 = 0.9
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    # 4 humans: every subset keeps at least 3 -> 1.0
    assert vqa_accuracy("cat", ["cat"] * 4 + ["dog"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("bird", ["cat"] * 10) == 0.0
    assert vqa_accuracy("cat", []) == 0.0


def test_vqa_accuracy_normalises_both_sides():
    # "The Two." -> "2"; references "2", "two" -> "2", "2" ; 3 of 10 -> 0.9 as above
    answers = ["2", "two", "Two."] + ["3"] * 7
    assert vqa_accuracy("The Two.", answers) == pytest.approx(0.9)
    assert vqa_accuracy("1,000", ["1000"] * 10) == pytest.approx(1.0)


def test_vqa_metric_class():
    metric = VQAAccuracy()
    assert metric.score("two", sample(["2", "2"] + ["3"] * 8)) == pytest.approx(0.6)
    summary = metric.summarize([{"prediction": "", "answers": [], "score": 0.6, "meta": {}},
                                {"prediction": "", "answers": [], "score": 1.0, "meta": {}}])
    assert summary["accuracy"] == pytest.approx(0.8)


# --------------------------------------------------------------------------- #
# exact match, GQA
# --------------------------------------------------------------------------- #

def test_exact_match():
    assert exact_match("Two.", ["2"]) == 1.0
    assert exact_match("A red circle", ["red circle"]) == 1.0
    assert exact_match("red\nbecause it is red", ["red"]) == 1.0      # first line only
    assert exact_match("blue", ["red", "green"]) == 0.0
    assert ExactMatch().score("The cat", sample(["dog", "cat"])) == 1.0
    summary = ExactMatch().summarize([{"score": 1.0}, {"score": 0.0}, {"score": 1.0}, {"score": 0.0}])
    assert summary["accuracy"] == 0.5


def test_gqa_exact_match():
    # LLaVA's GQA evaluation: strip, rstrip("."), lower, then == the answer
    assert gqa_exact_match("Yes.", "yes") == 1.0
    assert gqa_exact_match(" Table.. ", "table") == 1.0
    assert gqa_exact_match("table\nIt is a table.", "table") == 0.0     # no first-line forgiveness
    assert gqa_exact_match("the table", "table") == 0.0
    assert gqa_exact_match("t shirt", "t-shirt") == 0.0
    assert gqa_exact_match("tshirt", "t-shirt") == 0.0
    assert gqa_exact_match("T-shirt", "t-shirt") == 1.0
    assert gqa_exact_match("chair", "table") == 0.0
    for metric in (ExactMatch(normalizer="gqa"), GQAAccuracy()):
        assert metric.score("Left.", sample(["left"])) == 1.0
        assert metric.score("the left", sample(["left"])) == 0.0
    with pytest.raises(ValueError):
        ExactMatch(normalizer="nope")


# --------------------------------------------------------------------------- #
# POPE
# --------------------------------------------------------------------------- #

def test_pope_yes_no_extraction():
    assert pope_yes_no("Yes") == "yes"
    assert pope_yes_no("Yes, there is a dog in the image.") == "yes"
    assert pope_yes_no("No.") == "no"
    assert pope_yes_no("There is not a dog.") == "no"
    assert pope_yes_no("Yes. No dog would be there otherwise.") == "yes"   # first sentence only
    assert pope_yes_no("NO") == "no"


POPE_PREDICTIONS = ["Yes", "Yes, there is a dog.", "No.", "No, there is not.", "Yes", "There is no dog.", "yes"]
POPE_LABELS = ["yes", "yes", "yes", "no", "no", "no", "no"]
# extracted:       yes    yes    no     no     yes    no     yes
# outcome:         TP     TP     FN     TN     FP     TN     FP   -> TP=2 FP=2 TN=2 FN=1, n=7


def test_pope_metrics_confusion_matrix():
    m = pope_metrics(POPE_PREDICTIONS, POPE_LABELS)
    assert m["accuracy"] == pytest.approx(4 / 7)            # (TP + TN) / n
    assert m["precision"] == pytest.approx(2 / 4)           # TP / (TP + FP)
    assert m["recall"] == pytest.approx(2 / 3)              # TP / (TP + FN)
    # 2PR / (P + R) = 2 * 1/2 * 2/3 / (1/2 + 2/3) = (2/3) / (7/6) = 4/7
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["yes_ratio"] == pytest.approx(4 / 7)           # predicted yes: TP + FP = 4 of 7


def test_pope_metric_class_per_category():
    categories = ["random"] * 3 + ["adversarial"] * 4
    records = []
    metric = PopeMetric()
    for pred, label, cat in zip(POPE_PREDICTIONS, POPE_LABELS, categories):
        s = sample([label], category=cat)
        records.append({"prediction": pred, "answers": s.answers, "score": metric.score(pred, s), "meta": s.meta})
    assert [r["score"] for r in records] == [1, 1, 0, 1, 0, 1, 0]
    out = metric.summarize(records)
    assert out["accuracy"] == pytest.approx(4 / 7)
    assert out["f1"] == pytest.approx(4 / 7)
    # random: TP=2, FN=1 -> P=1, R=2/3, F1 = 2 * 2/3 / (5/3) = 0.8
    assert out["random/f1"] == pytest.approx(0.8)
    # adversarial: TN=2, FP=2, no positives -> P=0, R=0, F1=0; accuracy 2/4
    assert out["adversarial/f1"] == 0.0
    assert out["adversarial/accuracy"] == pytest.approx(0.5)
    assert out["f1_mean"] == pytest.approx(0.4)


# --------------------------------------------------------------------------- #
# MME
# --------------------------------------------------------------------------- #

def test_mme_yes_no():
    assert mme_yes_no("Yes") == "yes"
    assert mme_yes_no("No.") == "no"
    assert mme_yes_no("y") == "yes"
    assert mme_yes_no("Yes, it is.") == "yes"
    assert mme_yes_no("Maybe") == "other"


def test_mme_score_acc_plus_pairs():
    def rec(category, image, score):
        return {"prediction": "", "answers": [], "score": score,
                "meta": {"category": category, "question_id": image}}
    records = [
        # existence: image a both right, image b one of two right
        rec("existence", "a.jpg", 1.0), rec("existence", "a.jpg", 1.0),
        rec("existence", "b.jpg", 1.0), rec("existence", "b.jpg", 0.0),
        # code_reasoning (cognition): image c both right
        rec("code_reasoning", "c.png", 1.0), rec("code_reasoning", "c.png", 1.0),
    ]
    out = mme_score(records)
    # existence: acc = 3/4, acc+ = 1/2 (only image a) -> (0.75 + 0.5) * 100 = 125
    assert out["existence/acc"] == pytest.approx(0.75)
    assert out["existence/acc_plus"] == pytest.approx(0.5)
    assert out["existence/score"] == pytest.approx(125.0)
    assert out["code_reasoning/score"] == pytest.approx(200.0)
    assert out["perception"] == pytest.approx(125.0)
    assert out["cognition"] == pytest.approx(200.0)
    assert out["total"] == pytest.approx(325.0)
    summary = MMEMetric().summarize(records)
    assert summary["accuracy"] == pytest.approx(5 / 6)
    assert summary["perception"] == pytest.approx(125.0)


def test_mme_metric_score():
    metric = MMEMetric()
    assert metric.score("Yes, there is.", sample(["yes"], category="existence", question_id="a")) == 1.0
    assert metric.score("No", sample(["yes"], category="existence", question_id="a")) == 0.0


# --------------------------------------------------------------------------- #
# multiple choice
# --------------------------------------------------------------------------- #

OPTIONS = ["dog", "cat", "bird", "fish"]


@pytest.mark.parametrize("text, expected", [
    ("B", "B"),
    ("(B)", "B"),
    ("B.", "B"),
    ("b", "B"),
    ("B. cat", "B"),
    ("The answer is B", "B"),
    ("The answer is B.", "B"),
    ("Answer: (C)", "C"),
    ("I think (D) is right", "D"),
    ("cat", "B"),                        # option text
    ("It is a bird.", "C"),              # option text inside the answer
    ("E", None),                         # out of range for 4 options
    ("A or B", None),                    # ambiguous
    ("", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text, 4, OPTIONS) == expected


def test_extract_choice_without_options():
    assert extract_choice("C", 3) == "C"
    assert extract_choice("D", 3) is None
    assert extract_choice("cat", 4) is None


def test_multiple_choice_metric():
    metric = MultipleChoice()
    s1 = sample(["B"], options=OPTIONS, category="animals")
    s2 = sample(["A"], options=OPTIONS, category="plants")
    predictions = ["The answer is B", "no idea"]
    records = [{"prediction": p, "answers": s.answers, "score": metric.score(p, s), "meta": s.meta}
               for p, s in zip(predictions, [s1, s2])]
    assert [r["score"] for r in records] == [1.0, 0.0]
    out = metric.summarize(records)
    assert out["accuracy"] == 0.5
    assert out["unparsed"] == 0.5
    assert out["category/animals"] == 1.0 and out["category/plants"] == 0.0
