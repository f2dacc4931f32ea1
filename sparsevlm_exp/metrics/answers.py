"""Answer metrics: how a predicted answer string is compared with the references.

Each metric class implements `sparsevlm_exp.contracts.Metric`: `score` gives one
number in [0, 1] per sample (written to samples.jsonl), `summarize` turns the
per-sample records into dataset-level numbers, always including 'accuracy'.

The answer normalisation is the official EvalAI answer processor's (the TextVQA
scorer in LLaVA's evaluation, from MMF/Pythia; its steps in `normalize_answer`):
word tokenising (commas and question marks deleted, "'s" split off), the VQA
punctuation rule, number words to digits, articles dropped, contractions mapped by
the official table - quirks included, so scores equal the official ones.
"""
from __future__ import annotations

import re
from typing import Sequence

from sparsevlm_exp.contracts import Sample

# --------------------------------------------------------------------------- #
# VQA answer normalisation
# --------------------------------------------------------------------------- #

# Punctuation the VQA evaluation removes (the apostrophe and the period are
# handled separately: apostrophes belong to contractions, periods to decimals).
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\",
                "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# One or more commas between two digits ("1,000"): in a text that has one, every
# punctuation mark is deleted instead of becoming a space.
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
# A period not followed by a digit goes ("3." -> "3", "dog." -> "dog"); one
# before a digit stays ("1.5"). The official processor passes re.UNICODE (= 32)
# where re.sub takes `count`, so at most the first 32 such periods go; kept as is.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_OFFICIAL_PERIOD_COUNT = 32

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
                 "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
                 "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}

# Contractions written without (or with a misplaced) apostrophe -> the spelling the
# references use; whole words only, looked up AFTER lower-casing. This is the
# official table as it acts: its entries "Im", "Ive", "Id've", "I'dve" (upper case)
# never match a lower-cased word, "let's" and "she's" map to themselves (and their
# "'s" is split off before the lookup anyway), and "somebody'd" maps to "somebodyd"
# (the reverse of its neighbours). So "im" stays "im" and "lets" stays "lets".
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldnt've": "couldn't've", "couldn'tve": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def word_tokenize(text: str) -> str:
    """The processor's first step: lower case, every comma and question mark deleted
    ("a,b" -> "ab", "1,000" -> "1000"), "'s" split off as its own word ("it's" ->
    "it 's"), outer spaces stripped."""
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def strip_punctuation(text: str) -> str:
    """The VQA punctuation rule.

    A mark that touches a space anywhere in the text ("yes, it is") is deleted
    everywhere; otherwise it becomes a space ("black-white" -> "black white"), so
    the words stay apart. In a text with a digit-comma-digit ("1,000") every mark
    is deleted, so the thousands separator vanishes instead of splitting the number
    (after word_tokenize no comma is left, so in `normalize_answer` this never
    fires; it matters when this step is used alone). Then periods not followed by
    a digit go (the first 32, as the official code).
    """
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if has_digit_comma or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def normalize_words(text: str) -> str:
    """Lower case, number words -> digits, articles dropped, contractions mapped."""
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The official EvalAI normalisation of one answer string (TextVQA's scorer,
    applied to the prediction and to every reference): word_tokenize, newlines and
    tabs to spaces, strip_punctuation, normalize_words."""
    text = word_tokenize(text).replace("\n", " ").replace("\t", " ").strip()
    return normalize_words(strip_punctuation(text))


def first_line(prediction: str) -> str:
    """Models sometimes keep talking after the answer; the answer is the first line."""
    prediction = prediction.strip()
    return prediction.split("\n", 1)[0].strip() if prediction else ""


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _accuracy_summary(records: Sequence[dict]) -> dict[str, float]:
    return {"accuracy": _mean([float(r["score"]) for r in records]), "n": float(len(records))}


def _field(record: dict, key: str, default=None):
    """A record field, looked up at the top level first and then in its 'meta'."""
    if key in record:
        return record[key]
    return (record.get("meta") or {}).get(key, default)


# --------------------------------------------------------------------------- #
# Exact match (shapes, user data) and GQA
# --------------------------------------------------------------------------- #

def gqa_exact_match(prediction: str, answer: str) -> float:
    """GQA's official rule as LLaVA-1.5's evaluation applies it (the setting of the
    paper numbers): the prediction, outer spaces stripped, trailing periods removed
    and lower-cased, must equal the reference answer exactly (GQA's eval.py compares
    strings; LLaVA's converter does the strip / rstrip('.') / lower). Nothing else
    is forgiven: "the table", "t shirt" for "t-shirt", or a second line all count
    as wrong."""
    return float(prediction.strip().rstrip(".").lower() == answer.strip().lower())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised first line of the prediction equals any normalised reference."""
    pred = normalize_answer(first_line(prediction))
    return float(any(pred == normalize_answer(a) for a in answers))


class ExactMatch:
    """Exact match against any of the sample's reference answers.

    normalizer="vqa": the VQA normalisation on both sides (shapes, user data);
    normalizer="gqa": GQA's rule (gqa_exact_match; the same as GQAAccuracy).
    """

    name = "exact_match"

    def __init__(self, normalizer: str = "vqa"):
        if normalizer not in ("vqa", "gqa"):
            raise ValueError(f"ExactMatch normalizer={normalizer!r}: expected 'vqa' or 'gqa'")
        self.normalizer = normalizer

    def score(self, prediction: str, sample: Sample) -> float:
        if self.normalizer == "gqa":
            return max((gqa_exact_match(prediction, a) for a in sample.answers), default=0.0)
        return exact_match(prediction, sample.answers)

    def summarize(self, records: Sequence[dict]) -> dict[str, float]:
        return _accuracy_summary(records)


class GQAAccuracy(ExactMatch):
    """GQA's metric (gqa_exact_match against the one reference answer). The GQA
    dataset's default and conf/dataset/gqa.yaml's metric, so a GQA built in Python
    and `dataset=gqa` score alike."""

    name = "gqa_accuracy"

    def __init__(self):
        super().__init__(normalizer="gqa")


# --------------------------------------------------------------------------- #
# VQA accuracy (TextVQA, VQAv2)
# --------------------------------------------------------------------------- #

def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """min(#humans that gave the answer / 3, 1), averaged over the leave-one-out
    subsets of the human answers (10 subsets of 9 for the usual 10 answers)."""
    if not answers:
        return 0.0
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    per_subset = []
    for left_out in range(len(refs)):
        matches = sum(1 for j, ref in enumerate(refs) if j != left_out and ref == pred)
        per_subset.append(min(1.0, matches / 3.0))
    return _mean(per_subset)


class VQAAccuracy:
    name = "vqa_accuracy"

    def score(self, prediction: str, sample: Sample) -> float:
        return vqa_accuracy(prediction, sample.answers)

    def summarize(self, records: Sequence[dict]) -> dict[str, float]:
        return _accuracy_summary(records)


# --------------------------------------------------------------------------- #
# Yes / no extraction (POPE, MME)
# --------------------------------------------------------------------------- #

def pope_yes_no(text: str) -> str:
    """POPE's rule: only the first sentence counts; a 'no' or 'not' in it means
    'no', anything else means 'yes' (so a rambling answer counts as a yes)."""
    first_sentence = text.split(".", 1)[0].replace(",", " ")
    words = {w.lower() for w in first_sentence.split()}
    return "no" if words & {"no", "not"} else "yes"


def mme_yes_no(text: str) -> str:
    """MME's rule: 'yes' / 'no' (or 'y' / 'n') as the whole answer, else the word
    found in the first four characters; 'other' when neither is there."""
    text = text.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


# --------------------------------------------------------------------------- #
# POPE
# --------------------------------------------------------------------------- #

def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 of 'yes' (the positive class), and the
    share of 'yes' among the model's answers."""
    pred = [pope_yes_no(p) for p in predictions]
    gold = [label.strip().lower() for label in labels]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, gold))
    fp = sum(p == "yes" and g == "no" for p, g in zip(pred, gold))
    tn = sum(p == "no" and g == "no" for p, g in zip(pred, gold))
    fn = sum(p == "no" and g == "yes" for p, g in zip(pred, gold))
    n = len(gold)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
    }


class PopeMetric:
    """POPE: per sample, 1 if the extracted yes/no equals the label. The summary
    has the overall numbers, the same per sampling category ('adversarial/f1', ...)
    and 'f1_mean', the mean F1 over categories (how papers report POPE)."""

    name = "pope"
    headline = ("f1", "POPE F1")      # (summary key, label): what the report shows for this metric

    def score(self, prediction: str, sample: Sample) -> float:
        return float(pope_yes_no(prediction) == sample.answers[0].strip().lower())

    def summarize(self, records: Sequence[dict]) -> dict[str, float]:
        out = pope_metrics([r["prediction"] for r in records], [r["answers"][0] for r in records])
        out["n"] = float(len(records))
        by_category: dict[str, list[dict]] = {}
        for r in records:
            category = _field(r, "category")
            if category:
                by_category.setdefault(str(category), []).append(r)
        for category, group in sorted(by_category.items()):
            numbers = pope_metrics([r["prediction"] for r in group], [r["answers"][0] for r in group])
            out.update({f"{category}/{k}": v for k, v in numbers.items()})
        if by_category:
            out["f1_mean"] = _mean([out[f"{c}/f1"] for c in by_category])
        return out


# --------------------------------------------------------------------------- #
# MME
# --------------------------------------------------------------------------- #

# The MME paper's split of its 14 subtasks.
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity",
                  "scene", "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")


def mme_score(records: Sequence[dict]) -> dict[str, float]:
    """MME's numbers from per-question records.

    Each record needs 'category', 'question_id' (the image: MME asks two questions
    per image) and 'score' (1.0 right, 0.0 wrong), at the top level or in 'meta'.
    acc = share of questions right; acc+ = share of images with every question
    right; a category's score = (acc + acc+) * 100 (at most 200); perception and
    cognition are the sums over their categories.
    """
    questions: dict[str, list[float]] = {}
    images: dict[str, dict[str, list[float]]] = {}
    for r in records:
        category = str(_field(r, "category"))
        score = float(_field(r, "score"))
        questions.setdefault(category, []).append(score)
        images.setdefault(category, {}).setdefault(str(_field(r, "question_id")), []).append(score)
    out: dict[str, float] = {}
    for category in sorted(questions):
        acc = _mean(questions[category])
        acc_plus = _mean([float(all(s == 1.0 for s in scores)) for scores in images[category].values()])
        out[f"{category}/acc"] = acc
        out[f"{category}/acc_plus"] = acc_plus
        out[f"{category}/score"] = (acc + acc_plus) * 100.0
    out["perception"] = sum(out[f"{c}/score"] for c in MME_PERCEPTION if c in questions)
    out["cognition"] = sum(out[f"{c}/score"] for c in MME_COGNITION if c in questions)
    out["total"] = out["perception"] + out["cognition"]
    return out


class MMEMetric:
    name = "mme"
    headline = ("total", "MME total")   # (summary key, label): what the report shows for this metric

    def score(self, prediction: str, sample: Sample) -> float:
        return float(mme_yes_no(prediction) == sample.answers[0].strip().lower())

    def summarize(self, records: Sequence[dict]) -> dict[str, float]:
        out = _accuracy_summary(records)
        out.update(mme_score(records))
        return out


# --------------------------------------------------------------------------- #
# Multiple choice (ScienceQA, MMBench)
# --------------------------------------------------------------------------- #

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _letter_patterns(valid: str) -> list[re.Pattern]:
    cls = f"[{valid}]"
    return [
        # "B", "(B)", "B.", "B)", "B:", "B. cat", "(B) cat"
        re.compile(rf"^\(?({cls})\)?(?:[.):,]|\s*$)"),
        # "The answer is B", "Answer: (B)", "the correct option is B."
        # (the keyword in any case, the letter upper case: "the answer is a dog" names no letter)
        re.compile(rf"(?i:answer|option|choice)\s*(?:is|:)?\s*\(?({cls})\)?(?![A-Za-z])"),
        # "... (B) ..."
        re.compile(rf"\(({cls})\)"),
    ]


def extract_choice(text: str, n_options: int, options: Sequence[str] | None = None) -> str | None:
    """The option letter a free-text answer names, or None.

    Understands "B", "(B)", "B.", "B. cat", "The answer is B", "Answer: (B)",
    and, when the option texts are given, an answer that repeats one option's
    text. Only the first n_options letters count.
    """
    valid = LETTERS[:max(0, n_options)]
    text = text.strip()
    if not text or not valid:
        return None
    bare = text.strip("().:").strip()
    if len(bare) == 1 and bare.upper() in valid:      # "b", "(c)." : a lone letter in any case
        return bare.upper()
    for pattern in _letter_patterns(valid):
        found = {m.group(1) for m in pattern.finditer(text)}
        if len(found) == 1:
            return found.pop()
    if options:
        pred = normalize_answer(text)
        normalized = [normalize_answer(str(o)) for o in options[:len(valid)]]
        exact = [i for i, o in enumerate(normalized) if o and o == pred]
        if len(exact) == 1:
            return valid[exact[0]]
        contained = [i for i, o in enumerate(normalized) if o and re.search(rf"\b{re.escape(o)}\b", pred)]
        if len(contained) == 1:
            return valid[contained[0]]
    return None


class MultipleChoice:
    """Multiple-choice accuracy: the extracted letter against the answer letter.

    The sample carries its option texts in meta['options'] and the right letter
    as answers[0]. The summary adds 'unparsed' (share of answers naming no
    option) and accuracy per meta['category'] where samples have one.
    """

    name = "multiple_choice"

    def score(self, prediction: str, sample: Sample) -> float:
        options = sample.meta.get("options") or []
        letter = extract_choice(prediction, len(options) or len(LETTERS), options)
        return float(letter is not None and letter == sample.answers[0].strip().upper())

    def summarize(self, records: Sequence[dict]) -> dict[str, float]:
        out = _accuracy_summary(records)
        unparsed = []
        by_category: dict[str, list[float]] = {}
        for r in records:
            options = _field(r, "options") or []
            unparsed.append(float(extract_choice(r["prediction"], len(options) or len(LETTERS), options) is None))
            category = _field(r, "category")
            if category:
                by_category.setdefault(str(category), []).append(float(r["score"]))
        out["unparsed"] = _mean(unparsed)
        for category, scores in sorted(by_category.items()):
            out[f"category/{category}"] = _mean(scores)
        return out
