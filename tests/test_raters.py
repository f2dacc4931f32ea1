"""Rater candidates wherever the question stands (issue 15, item 4).

Candidate sets are hand-computed token positions, read off the chat templates:

Tiny Qwen2-VL (word processor, tests/tiny_models.py), one 56x56 image = 4x4 patches =
4 merged tokens between <|vision_start|> and <|vision_end|>:
    0 <|im_start|> 1 system 2-7 "you are a helpful assistant ." 8 <|im_end|>
    9 <|im_start|> 10 user  11.. the user's content  then <|im_end|> <|im_start|> assistant
Tiny LLaVA (tests/test_llava.py), one 56x56 image = 16 <image> tokens:
    0 <s> 1-8 "a chat between a user and an assistant" 9 user 10 ":"  11.. content
    then "assistant" ":" (the word tokenizer drops the template's spaces and newlines)
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from sparsevlm_exp.errors import ConfigError
from sparsevlm_exp.models.base import user_turn_index
from sparsevlm_exp.models.llava import LlavaAdapter
from sparsevlm_exp.models.qwen2_vl import Qwen2VLAdapter
from sparsevlm_exp.models.qwen3_5 import Qwen3_5Adapter
from sparsevlm_exp.models.qwen3_vl import Qwen3VLAdapter
from sparsevlm_exp.policies import FixedPolicy
from sparsevlm_exp.pruners import DropPruner
from sparsevlm_exp.models.word_processor import build_word_processor
from sparsevlm_exp.scorers import CDPrunerScorer, V2Scorer, V15Scorer
from test_llava import SYSTEM, save_tiny_llava
from tiny_models import WORDS, noise_image, sample, save_tiny_qwen

CONF = Path(__file__).resolve().parent.parent / "conf"
QUESTION = "what colour is the circle"


QWEN_FAMILIES = {"qwen2_vl": Qwen2VLAdapter, "qwen2_5_vl": Qwen2VLAdapter, "qwen3_vl": Qwen3VLAdapter,
                 "qwen3_5": Qwen3_5Adapter}


def load_qwen(tmp_path_factory, family):
    path = save_tiny_qwen(family, tmp_path_factory.mktemp("raters") / family, n_layers=4 if family == "qwen3_5" else 2)
    adapter = QWEN_FAMILIES[family].load(pretrained=path, dtype="float32", device="cpu")
    if family == "qwen3_5":
        # the saved word tokenizer loads back as transformers' Qwen3_5Tokenizer, which
        # re-splits our words into byte pieces; the in-memory one has the same special ids
        adapter.processor = build_word_processor(WORDS, family="qwen3_vl")
    return adapter


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return load_qwen(tmp_path_factory, "qwen2_vl")


@pytest.fixture(scope="module", params=list(QWEN_FAMILIES))
def any_qwen(request, tmp_path_factory):
    """Every Qwen family's adapter on a tiny model (the 56x56 image gives 4 merged tokens
    with patch 14 and, resized to 64x64, with Qwen3's patch 16)."""
    return load_qwen(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = save_tiny_llava(tmp_path_factory.mktemp("raters") / "llava", n_layers=2)
    return LlavaAdapter.load(pretrained=path, dtype="float32", device="cpu", system_prompt=SYSTEM)


def qwen_request(adapter, content, pads: int = 0):
    parts = [{"type": "image", "image": noise_image(56, 56, seed=i)} if c == "<image>" else {"type": "text", "text": c}
             for i, c in enumerate(content)]
    inputs = dict(adapter.processor.apply_chat_template([{"role": "user", "content": parts}], tokenize=True,
                                                        add_generation_prompt=True, return_dict=True,
                                                        return_tensors="pt"))
    if pads:      # one row of a left-padded batch: pads with attention_mask 0
        pad = torch.full((1, pads), adapter.processor.tokenizer.pad_token_id)
        inputs["input_ids"] = torch.cat([pad, inputs["input_ids"]], 1)
        inputs["attention_mask"] = torch.cat([torch.zeros(1, pads, dtype=torch.long), inputs["attention_mask"]], 1)
        inputs["mm_token_type_ids"] = torch.cat([torch.zeros(1, pads, dtype=torch.long),
                                                 inputs["mm_token_type_ids"]], 1)
    return adapter.request_from_inputs(inputs)


def llava_request(adapter, prompt: str):
    inputs = adapter.processor(text=f"{SYSTEM} USER: {prompt} ASSISTANT:",
                               images=[noise_image(56, 56, seed=i) for i in range(prompt.count("<image>"))],
                               return_tensors="pt")
    return adapter.request_from_inputs(dict(inputs))


def rng(a, b):
    return list(range(a, b + 1))


# (content, user_turn candidates, after_first_image candidates = today's rule)
QWEN_LAYOUTS = {
    # 11-15 question, 16 vs, 17-20 pads, 21 ve, 22 im_end, 23 im_start, 24 assistant
    "question_first": ([QUESTION, "<image>"], rng(11, 15), [22, 23, 24]),
    # 11 vs 12-15 16 ve, 17 what 18 colour, 19 vs 20-23 24 ve, 25-27 "is the circle", 28-30 template
    "between_images": (["<image>", "what colour", "<image>", "is the circle"], [17, 18, 25, 26, 27],
                       [17, 18, 25, 26, 27, 28, 29, 30]),
    # 11 vs 12-15 16 ve, 17-21 question, 22-24 template
    "question_last": (["<image>", QUESTION], rng(17, 21), rng(17, 24)),
}

LLAVA_LAYOUTS = {
    # 11-15 question, 16-31 image, 32 assistant 33 ":"
    "question_first": (f"{QUESTION} <image>\n", rng(11, 15), [32, 33]),
    # 11-26 image, 27 what 28 colour, 29-44 image, 45-47 "is the circle", 48-49 "assistant :"
    "between_images": ("<image>\nwhat colour <image>\nis the circle", [27, 28, 45, 46, 47],
                       [27, 28, 45, 46, 47, 48, 49]),
    # the official SparseVLM layout: 11-26 image, 27-31 question, 32-33 "assistant :"
    "question_last": (f"<image>\n{QUESTION}", rng(27, 31), rng(27, 33)),
}


@pytest.mark.parametrize("layout", list(QWEN_LAYOUTS))
def test_qwen_candidates_are_the_users_words_wherever_they_stand(any_qwen, layout):
    content, user, after = QWEN_LAYOUTS[layout]
    req = qwen_request(any_qwen, content)
    assert req.visual_index.shape[1] == 4 * content.count("<image>")
    assert req.text_index[0].tolist() == user
    assert req.instruction("user_turn")[0].tolist() == user
    # the official rule: exactly today's candidates (tokens after the first image, markers skipped)
    assert req.instruction("after_first_image")[0].tolist() == after


def test_qwen_left_pads_shift_the_candidates_and_never_join_them(qwen):
    content, user, after = QWEN_LAYOUTS["question_first"]
    req = qwen_request(qwen, content, pads=3)
    assert req.text_index[0].tolist() == [i + 3 for i in user]


@pytest.mark.parametrize("layout", list(LLAVA_LAYOUTS))
def test_llava_candidates_are_the_users_words_wherever_they_stand(llava, layout):
    prompt, user, after = LLAVA_LAYOUTS[layout]
    req = llava_request(llava, prompt)
    assert req.text_index[0].tolist() == user
    assert req.instruction("after_first_image")[0].tolist() == after


def test_llava_chat_template_prompt_official_rule_is_todays(llava):
    """The official prompt (image first): after_first_image = every token after the image,
    " ASSISTANT:" included, as the official code's hidden_states[:, text_token_start:];
    user_turn leaves the assistant prefix out - the two sets differ by exactly it."""
    req = llava.encode(sample(n_images=1))
    assert req.instruction("after_first_image")[0].tolist() == rng(27, 33)
    assert req.text_index[0].tolist() == rng(27, 31)


def test_whitespace_at_the_edges_of_a_text_run_is_layout_not_instruction():
    # prefix [1, 2], suffix [3]; 9 = image token, 0 = a whitespace-only token
    ids = [1, 2, 0, 9, 0, 5, 0, 6, 0, 9, 7, 3]
    is_vision = torch.tensor([i == 9 for i in ids])
    got = user_turn_index(ids, ([1, 2], [3]), is_vision, lambda t: t == 0)
    assert got[0].tolist() == [5, 6, 7, 10]          # the inner space (6) stays
    assert user_turn_index(ids, ([1, 4], [3]), is_vision, lambda t: t == 0) is None   # not this template


def test_a_multi_turn_prompt_is_refused_not_rated_with_its_markers():
    # prefix [1, 2], suffix [3, 4] (end of turn, assistant header); 9 = image token.
    # [.. 5 3 4 8 ..]: an earlier assistant turn (answer 8) inside the user's content, whose
    # markers and answer would otherwise all be raters.
    ids = [1, 2, 9, 5, 3, 4, 8, 6, 3, 4]
    is_vision = torch.tensor([i == 9 for i in ids])
    with pytest.raises(ValueError, match="multi-turn prompts are not supported"):
        user_turn_index(ids, ([1, 2], [3, 4]), is_vision, lambda t: False)
    # one turn: the suffix only at the end
    assert user_turn_index([1, 2, 9, 5, 6, 3, 4], ([1, 2], [3, 4]), is_vision[:7], lambda t: False)[0].tolist() == [3, 4]


def test_multi_turn_chat_prompts_are_refused_on_qwen_and_llava(qwen, llava):
    image = {"type": "image", "image": noise_image(56, 56)}
    turns = [{"role": "user", "content": [image, {"type": "text", "text": QUESTION}]},
             {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
             {"role": "user", "content": [{"type": "text", "text": "what of the square"}]}]
    inputs = qwen.processor.apply_chat_template(turns, tokenize=True, add_generation_prompt=True,
                                                return_dict=True, return_tensors="pt")
    with pytest.raises(ValueError, match="multi-turn"):
        qwen.request_from_inputs(dict(inputs))
    with pytest.raises(ValueError, match="multi-turn"):
        llava_request(llava, f"<image>\n{QUESTION} ASSISTANT: red USER: what of the square")


class _Spy(V15Scorer):
    def query_rows(self, embeds, visual_index, text_index):
        self.seen = text_index[0].tolist()
        return super().query_rows(embeds, visual_index, text_index)


@pytest.mark.parametrize("rule, expected", [("user_turn", rng(11, 15)), ("after_first_image", [22, 23, 24])])
def test_engine_hands_the_chosen_candidates_to_the_rater_scorer(qwen, rule, expected):
    req = qwen_request(qwen, QWEN_LAYOUTS["question_first"][0])
    spy = _Spy(instruction_tokens=rule)
    qwen.prefill(req, scorer=spy, policy=FixedPolicy(keep=0.5, layer=0), pruner=DropPruner())
    assert spy.seen == expected


class _CDSpy(CDPrunerScorer):
    def __call__(self, view):
        self.text_embeds = view.text_embeds
        return super().__call__(view)


def test_pre_llm_peer_reads_the_same_instruction_tokens(qwen):
    """CDPruner's relevance reads the instruction's embeddings: the user's words, not the
    template tokens after the image."""
    req = qwen_request(qwen, QWEN_LAYOUTS["question_first"][0])
    spy = _CDSpy()
    qwen.prefill(req, scorer=spy, policy=FixedPolicy(keep=0.5, layer=-1), pruner=DropPruner())
    embeds = qwen.embed(req)
    assert torch.equal(spy.text_embeds[0], embeds[0, rng(11, 15)])


def test_bad_rule_is_refused():
    with pytest.raises(ConfigError, match="scorer.instruction_tokens"):
        V15Scorer(instruction_tokens="after_image")
    with pytest.raises(ConfigError, match="scorer.instruction_tokens"):
        V2Scorer(instruction_tokens="everything")


def _compose(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("overrides, rule", [
    ([], "user_turn"),
    (["scorer=v2"], "user_turn"),
    (["+experiment=sparsevlm_v1"], "after_first_image"),
    (["+experiment=sparsevlm_v15"], "after_first_image"),
    (["+experiment=sparsevlm_v2"], "after_first_image"),
    (["+experiment=paper_table1", "row=sparsevlm_128"], "after_first_image"),
])
def test_presets_pin_the_official_rule(overrides, rule):
    assert _compose(overrides).scorer.instruction_tokens == rule


# ---- a byte-level BPE tokenizer and Qwen2-VL's own template (newline tokens) -------------
QWEN2_VL_TEMPLATE = (   # the structure of Qwen2-VL's published chat template (add_vision_id off)
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def bpe_qwen_processor():
    """A Qwen2-VL processor whose tokenizer is byte-level BPE like Qwen's (newlines are
    their own tokens, spaces join the next word), special tokens at the word
    processor's ids so the tiny model's config applies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from sparsevlm_exp.models.word_processor import SPECIAL_TOKENS, Qwen2VLImageTextProcessor

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["You are a helpful assistant.", "user\nassistant\nsystem\n", "What colour is the circle?\n",
              "Answer with one word.\n\nA. red\nB. blue"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>")
    return Qwen2VLImageTextProcessor(image_processor=Qwen2VLImageProcessorPil(min_pixels=56 * 56, patch_size=14),
                                     tokenizer=tokenizer, chat_template=QWEN2_VL_TEMPLATE)


@pytest.mark.parametrize("content, words", [
    (["What colour is the circle?\n", "<image>"], ["What colour is the circle?"]),
    (["<image>", "Answer with one word.\n\nA. red\nB. blue"], ["Answer with one word.\n\nA. red\nB. blue"]),
    (["<image>", "What colour", "<image>", " is the circle?"], ["What colour", " is the circle?"]),
])
def test_bpe_tokenizer_with_newline_tokens_gives_exactly_the_users_text(qwen, content, words):
    """With Qwen-style byte-level BPE the template's newlines ("user\\n", "<|im_end|>\\n",
    "assistant\\n") are tokens of their own: none is a candidate; the user's own newlines
    between options stay, the one before the image (an edge of its text run) does not."""
    adapter = Qwen2VLAdapter(qwen.model, bpe_qwen_processor())
    req = qwen_request(adapter, content)
    tok = adapter.processor.tokenizer
    ids = req.input_ids[0]
    runs, run = [], []
    for i in req.text_index[0].tolist():          # consecutive candidates = one text run
        if run and i != run[-1] + 1:
            runs.append(run)
            run = []
        run.append(i)
    runs.append(run)
    assert [tok.decode(ids[r]).strip() for r in runs] == [w.strip() for w in words]   # decode drops a leading space
    # the template's newlines are tokens of their own here, and none is a candidate
    tokens = tok.convert_ids_to_tokens(ids.tolist())
    template_newlines = [i + 1 for i in range(len(tokens) - 1)
                         if tokens[i] in ("user", "assistant", "<|im_end|>") and tokens[i + 1] == "Ċ"]
    assert len(template_newlines) >= 3 and not set(template_newlines) & set(req.text_index[0].tolist())


def test_the_users_own_system_prompt_is_never_a_rater_and_the_question_still_is(qwen, llava):
    """A library call whose processor output carries another system prompt than the
    adapter's: the user turn is found through the template's user-turn header, so the
    question before the image is rated (before: a warning and the after-first-image
    fallback, i.e. only <|im_end|> <|im_start|> assistant - item 4's fault again).
    Qwen: 0 <|im_start|> 1 system 2-4 "red green blue" 5 <|im_end|> 6 <|im_start|> 7 user
    8-12 question 13 vs .. ; LLaVA: 0 <s> 1-3 "red green blue" 4 user 5 ":" 6-10 question."""
    import warnings

    image = noise_image(56, 56)
    turns = [{"role": "system", "content": [{"type": "text", "text": "red green blue"}]},
             {"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image", "image": image}]}]
    inputs = qwen.processor.apply_chat_template(turns, tokenize=True, add_generation_prompt=True,
                                                return_dict=True, return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        req = qwen.request_from_inputs(dict(inputs))
        assert req.text_index[0].tolist() == rng(8, 12)
        inputs = llava.processor(text=f"red green blue USER: {QUESTION} <image>\n ASSISTANT:", images=[image],
                                 return_tensors="pt")
        assert llava.request_from_inputs(dict(inputs)).text_index[0].tolist() == rng(6, 10)
        # no system prompt at all
        inputs = llava.processor(text=f"USER: {QUESTION} <image>\n ASSISTANT:", images=[image], return_tensors="pt")
        assert llava.request_from_inputs(dict(inputs)).text_index[0].tolist() == rng(3, 7)
