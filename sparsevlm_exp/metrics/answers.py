"""Answer metrics: how a predicted answer string is compared with the references.

Each metric class implements `sparsevlm_exp.data.base.Metric`: `score` gives one
number in [0, 1] per sample (written to samples.jsonl), `summarize` turns the
per-sample records into dataset-level numbers, always including 'accuracy'.

The answer normalisation follows the rules of the official VQA evaluation
(VQA v2 / TextVQA): punctuation handling with its digit-comma and period rules,
number words to digits, articles dropped, missing apostrophes of contractions
restored. The tables below are the facts those rules rest on.
"""
from __future__ import annotations

import re
from typing import Sequence

from sparsevlm_exp.data.base import Sample

# --------------------------------------------------------------------------- #
# VQA answer normalisation
# --------------------------------------------------------------------------- #

# Punctuation the VQA evaluation removes (the apostrophe and the period are
# handled separately: apostrophes belong to contractions, periods to decimals).
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\",
                "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit goes ("3." -> "3", "dog." -> "dog"); one
# before a digit stays ("1.5"). This is what the official regex effectively does.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
                 "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
                 "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}

# Contractions written without (or with a misplaced) apostrophe -> the spelling
# the references use. Only whole words are looked up.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldnt've": "couldn't've", "couldn'tve": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "id've": "i'd've", "i'dve": "i'd've", "im": "i'm", "ive": "i've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "lets": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebodyd": "somebody'd", "somebodyd've": "somebody'd've",
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


def strip_punctuation(text: str) -> str:
    """The VQA punctuation rule.

    A mark touching a space ("yes, it is") is deleted; a mark inside a word
    ("black-white") becomes a space, so the two words stay apart. Where the
    text holds a digit-comma-digit ("1,000") every mark is deleted, so the
    thousands separator vanishes instead of splitting the number. Then periods
    not followed by a digit go.
    """
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if has_digit_comma or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def normalize_words(text: str) -> str:
    """Lower case, number words -> digits, articles dropped, contractions fixed."""
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The full VQA normalisation of one answer string."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return normalize_words(strip_punctuation(text.lower()))


def first_line(prediction: str) -> str:
    """Models sometimes keep talking after the answer; the answer is the first line."""
    prediction = prediction.strip()
    return prediction.split("\n", 1)[0].strip() if prediction else ""


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _accuracy_summary(records: Sequence[dict]) -> dict[str, float]:
    return {"accuracy": _mean([float(r["score"]) for r in records]), "n": float(len(records))}


# --------------------------------------------------------------------------- #
# Exact match (shapes, GQA)
# --------------------------------------------------------------------------- #

def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised first line of the prediction equals any normalised reference."""
    pred = normalize_answer(first_line(prediction))
    return float(any(pred == normalize_answer(a) for a in answers))


class ExactMatch:
    """Normalised exact match against any of the sample's reference answers."""

    name = "exact_match"

    def score(self, prediction: str, sample: Sample) -> float:
        return exact_match(prediction, sample.answers)

    def summarize(self, records: Sequence[dict]) -> dict[str, float]:
        return _accuracy_summary(records)
