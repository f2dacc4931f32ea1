"""Our pruning as an lmms-eval model: `python -m lmms_eval --model sparsevlm_exp ...`.

    python -m lmms_eval --model sparsevlm_exp \
        --model_args pretrained=asset:shapes_vlm,scorer=v2,keep=0.25,layer=2 \
        --tasks textvqa_val [--include_path DIR] [--output_path OUT]

lmms-eval 0.7 finds plugin models through the Python entry-point group
`lmms_eval.models`; pyproject declares
    [project.entry-points."lmms_eval.models"]
    sparsevlm_exp = "sparsevlm_exp.lmms_eval_model:manifest"
and `manifest()` returns the ModelManifest naming the class below (a "simple" model:
lmms-eval hands it the text context and the visuals, it returns the answer text).

Components are composed from the same yaml tree as our CLI (conf/, Hydra compose), so
`--model_args scorer=v2,keep=0.25` means exactly what `python -m sparsevlm_exp scorer=v2
keep=0.25` means. model_args keys:
  pretrained=PATH      -> model.pretrained (hub id, local dir or asset:shapes_vlm)
  model/scorer/policy/pruner/decoder=NAME   the config group choices
  keep, layer, seed, dtype, device, threads, or any dotted key (scorer.head_fraction=0.25)
  log_path=FILE        per-sample efficiency records (jsonl); default: a new
                       sparsevlm_exp_efficiency_<UTC time>.jsonl per run under lmms-eval's
                       --output_path when one is given
The task's max_new_tokens and `until` are honoured per request; decoding is greedy.
`--batch_size B` (a whole number >= 1) answers B requests together (batching.answer_batch,
requests of similar visual token counts grouped, each answer and efficiency record what
batch 1 gives; the record's timings are batch shares, batch_size says so).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import mean

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from tqdm import tqdm

from sparsevlm_exp.contracts import Sample
from sparsevlm_exp.data.lmms_eval import cut_at_stop, question_text, stop_strings, to_images
from sparsevlm_exp.errors import ConfigError, bad_value, build

MODEL_NAME = "sparsevlm_exp"
EFFICIENCY_STEM = "sparsevlm_exp_efficiency"   # + _<UTC time>.jsonl per run
# model_args that name a config group choice (everything else is a key=value override)
GROUPS = ("model", "scorer", "policy", "pruner", "decoder")


def manifest():
    """The entry-point payload lmms-eval's model registry loads (a callable returning a manifest)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.SparseVLMExpLMM")


def compose_config(model_args: dict):
    """The run config our CLI would compose for these model_args (Hydra compose over conf/).

    Raises ConfigError (one line) for a group choice that has no yaml (listing the
    choices), a key the config does not have (listing close keys), or any other
    override Hydra refuses. Hydra's own messages put what is allowed on later lines,
    which a one-line error would cut, so the first two are checked here."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from sparsevlm_exp.paths import CONF_DIR

    overrides = ["logger=none"]
    for key, value in model_args.items():
        if key == "pretrained":
            key = "model.pretrained"
        overrides.append(f"{key}={_override_value(value)}")
    _check_choices(model_args, Path(CONF_DIR))
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="lmms_eval"):
            # the chosen groups and appended configs (+experiment=...) alone: the tree every
            # other key must name a node of (an experiment yaml adds keys such as `row`)
            base = compose(config_name="config", overrides=[
                o for o in overrides if o.split("=", 1)[0] in GROUPS or o.startswith("+")])
            _check_keys(model_args, base)
            return compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"model_args: {str(err).splitlines()[0]}") from None


def _check_choices(model_args: dict, conf_dir: Path) -> None:
    """A group choice (scorer=v3) must name a yaml of that group under conf/.
    Raises ConfigError listing the group's choices."""
    for group in GROUPS:
        if group in model_args:
            choices = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
            if str(model_args[group]) not in choices:
                raise bad_value(group, model_args[group], f"one of {', '.join(choices)}")


def _check_keys(model_args: dict, base) -> None:
    """Every other key (keep, scorer.head_fraction) must be a key of the composed config;
    '+key' / '~key' (Hydra's append and delete, e.g. +experiment=...) are left to Hydra.
    Raises ConfigError listing close keys."""
    import difflib

    from omegaconf import OmegaConf

    known = _flat_keys(OmegaConf.to_container(base, resolve=False))
    for key, value in model_args.items():
        if key in GROUPS or key == "pretrained" or key.startswith(("+", "~")) or key in known:
            continue
        close = difflib.get_close_matches(key, known, n=5, cutoff=0.6)
        raise ConfigError(f"model_args {key}={_override_value(value)} is not allowed: not a key of our config; "
                          f"close keys: {', '.join(close) or 'none'} (all: python -m sparsevlm_exp --cfg job)")


def _flat_keys(node: dict, prefix: str = "") -> list[str]:
    """'a', 'a.b', ... for every key of a nested dict (the keys a dotted override may name)."""
    keys = []
    for key, value in node.items():
        name = f"{prefix}{key}"
        keys.append(name)
        if isinstance(value, dict):
            keys.extend(_flat_keys(value, name + "."))
    return keys


def _override_value(value) -> str:
    """The override text for a model_args value as lmms-eval parsed it.

    lmms-eval (utils.handle_arg_string) already turned "0.25" into 0.25, "True" into True
    and, since "-1".isnumeric() is False, "-1" into the float -1.0. Hydra wants text back,
    and the text must keep the user's type: a negative whole number goes back as an int
    (layer=-1, seed=-3; no key of ours takes a negative whole float), while a positive
    float stays a float (keep=1.0 is a fraction, keep=1 a count)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value < 0 and value.is_integer():
        return str(int(value))
    return str(value)


def efficiency_path(out_dir: Path) -> Path:
    """A new file under lmms-eval's --output_path for this run's efficiency records:
    sparsevlm_exp_efficiency_<UTC time>.jsonl. lmms-eval keeps every run's results in
    that folder (one timestamped file each), so a second run there, e.g. the next keep
    of a sweep, must not overwrite the first run's records."""
    from datetime import datetime, timezone

    stem = f"{EFFICIENCY_STEM}_{datetime.now(timezone.utc):%Y%m%d_%H%M%S}"
    path, n = out_dir / f"{stem}.jsonl", 1
    while path.exists():                     # two runs started in the same second
        path, n = out_dir / f"{stem}_{n}.jsonl", n + 1
    return path


def _under_lmms_cli() -> bool:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name.startswith("lmms_eval")


def _lmms_output_dir() -> Path | None:
    """lmms-eval's --output_path, read from its command line (the model is not told it)."""
    if not _under_lmms_cli():
        return None
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--output_path=") else (
            argv[i + 1] if arg == "--output_path" and i + 1 < len(argv) else None)
        if value:
            path = Path(value)
            return path.parent if path.suffix in (".json", ".jsonl") else path
    return None


class SparseVLMExpLMM(lmms):
    """lmms-eval "simple" model running our adapter + scorer/policy/pruner/decoder.

    batch_size=1: one request at a time (engine.prefill). batch_size=B > 1: requests are
    read in windows of 8 B, grouped by (visual tokens, prompt tokens) into batches of at
    most B (runner.length_grouped, as our CLI does) and answered together by
    batching.answer_batch; each request keeps its own kept counts, max_new_tokens and
    `until`, and its answer is its batch-1 answer. A batch_size that is not a whole number
    >= 1 ("auto", 0) is refused with one line before any weights load.
    """

    is_simple = True

    def __init__(self, batch_size=1, max_batch_size=None, log_path: str | None = None, **model_args):
        super().__init__()
        try:
            self._setup(batch_size, log_path, model_args)
        except ConfigError as err:
            if _under_lmms_cli():
                # lmms-eval would print a traceback and exit 0; our CLI's rule is one line, exit 2
                print(f"error: {err}", file=sys.stderr)
                raise SystemExit(2) from None
            raise

    def _setup(self, batch_size, log_path, model_args) -> None:
        self._batch_size = batch_size_of(batch_size)
        if model_args.get("device") is None:
            model_args.pop("device", None)         # lmms-eval passes --device (default None): ours is `auto`
        from sparsevlm_exp.checks import check_policy_reads_raters, check_top_level, resolve_or_explain
        from sparsevlm_exp.engine import check_parts
        from sparsevlm_exp.models.loading import attention_layers, model_config, num_layers

        # the runner's checks, in the runner's order: a bad value is one line before any weights
        cfg = compose_config(model_args)
        self.cfg = cfg
        resolve_or_explain(cfg)
        check_top_level(cfg)
        self.scorer = build(cfg.scorer, "scorer")
        self.policy = build(cfg.policy, "policy")
        self.pruner = build(cfg.pruner, "pruner")
        self.decoder = build(cfg.decoder, "decoder")
        self._decoders = {int(cfg.decoder.max_new_tokens): self.decoder}
        check_policy_reads_raters(self.policy, self.scorer)
        m = cfg.model
        self.model_config = model_config(m.pretrained, random_init=m.random_init, architecture=m.architecture,
                                         trust_remote_code=m.trust_remote_code)
        # the runner's check_parts: a bad layer, a stage the scorer cannot score at (v15 at
        # layer=-1, divprune inside the LLM), a policy need the scorer does not provide, an
        # attention scorer at a linear-attention layer - refused before the weights load
        check_parts(self.scorer, self.policy, num_layers(self.model_config), attention_layers(self.model_config),
                    self.pruner)
        if hasattr(self.scorer, "check_heads"):               # v2's head_count must fit the model's heads
            self.scorer.check_heads(self.model_config.get_text_config().num_attention_heads)
        from sparsevlm_exp.models import position_dims
        dims = position_dims(self.model_config)
        if dims is not None:                                  # renumbered positions: 1-D RoPE only
            self.pruner.check_positions(dims)
        if cfg.threads is not None:
            torch.set_num_threads(int(cfg.threads))
        self.adapter = build(cfg.model, "model")
        # what the user asked, in every record: which run of a sweep a record belongs to
        self.model_args = {k: _override_value(v) for k, v in model_args.items()}
        out_dir = _lmms_output_dir()
        self.log_path = Path(log_path) if log_path else (efficiency_path(out_dir) if out_dir else None)
        if self.log_path is not None:       # one file per run (all its tasks), not appended across runs
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.write_text("")
        self.records: list[dict] = []

    # ---- lmms-eval interface ---------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self.adapter.device

    def decoder_for(self, max_new_tokens) -> object:
        """Our greedy decoder with the task's max_new_tokens (built from the same yaml)."""
        from omegaconf import OmegaConf

        n = int(max_new_tokens) if max_new_tokens is not None else int(self.cfg.decoder.max_new_tokens)
        if n not in self._decoders:
            self._decoders[n] = build(OmegaConf.merge(self.cfg.decoder, {"max_new_tokens": n}), "decoder")
        return self._decoders[n]

    def generate_until(self, requests) -> list:
        """Answers in request order. Instance.args = (context, generation_kwargs,
        doc_to_visual, doc_id, task, split), as lmms-eval builds them for simple models.
        Each request's own generation_kwargs hold (max_new_tokens, `until`), batched or not."""
        from sparsevlm_exp.runner import GROUPING_WINDOW, length_grouped

        B = self._batch_size
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="sparsevlm_exp", disable=self.rank != 0)
        # a window of GROUPING_WINDOW batches is read and sorted at a time (as the runner): similar lengths
        # together without decoding every image of the task up front
        window = GROUPING_WINDOW * B if B > 1 else 1
        for start in range(0, len(requests), window):
            items = [self._item(request) for request in requests[start:start + window]]
            if B == 1:
                groups = [[0]]
            else:
                groups = length_grouped([(int(item["req"].visual_index.shape[1]), int(item["req"].input_ids.shape[1]))
                                         for item in items], B)
            for group in groups:
                answered = self._answer_group([items[j] for j in group])
                for j, (text, record) in zip(group, answered):
                    item = items[j]
                    record.update(task=item["task"], doc_id=item["doc_id"], model_args=self.model_args)
                    self._log(record)
                    results[start + j] = GenerationResult(text=text, token_counts=TokenCounts(
                        input_tokens=record["input_tokens"], output_tokens=record["new_tokens"]))
                bar.update(len(group))
        bar.close()
        self._log_summary()
        return results

    def _item(self, request) -> dict:
        """One lmms-eval Instance as our Sample, its gen_kwargs, its seed and its encoding."""
        from sparsevlm_exp.runner import sample_seed

        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        sample = Sample(id=f"{task}/{doc_id}", question=question_text(context),
                        images=to_images(doc_to_visual(doc)), answers=[])
        return {"sample": sample, "gen_kwargs": dict(gen_kwargs or {}), "task": task, "doc_id": doc_id,
                "seed": sample_seed(int(self.cfg.seed), sample.id), "req": self.adapter.encode(sample)}

    def _answer_group(self, items: list[dict]) -> list[tuple[str, dict]]:
        """(text, record) per item: alone at batch_size=1; else together (answer_batch,
        one decoder for the longest max_new_tokens asked, each row cut to its own). A batch
        that fails (e.g. out of memory) is answered one request at a time, as the runner
        does, so that an error is a request's own."""
        if self._batch_size == 1:
            return [self.answer(item["sample"], item["gen_kwargs"], item["seed"], req=item["req"]) for item in items]
        from loguru import logger

        from sparsevlm_exp.batching import answer_batch

        lengths = [int(self.decoder_for(item["gen_kwargs"].get("max_new_tokens")).max_new_tokens) for item in items]
        try:
            answer = answer_batch(self.adapter, [item["req"] for item in items], scorer=self.scorer,
                                  policy=self.policy, pruner=self.pruner, decoder=self.decoder_for(max(lengths)),
                                  generators=[torch.Generator().manual_seed(item["seed"]) for item in items],
                                  lengths=lengths)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:         # noqa: BLE001 - retried one by one
            logger.warning(f"sparsevlm_exp: a batch of {len(items)} failed ({type(err).__name__}: {err}); "
                           "answering its requests one at a time")
            return [self.answer(item["sample"], item["gen_kwargs"], item["seed"], req=item["req"]) for item in items]
        return [self._text_and_record(item["req"], row, row.tokens, item["gen_kwargs"], batch_size=len(items))
                for item, row in zip(items, answer.rows)]

    def answer(self, sample: Sample, gen_kwargs: dict, seed: int, req=None) -> tuple[str, dict]:
        """(answer text, efficiency record) for one sample alone: the runner's sequence of
        calls. req: the sample's encoding when already made (adapter.encode(sample))."""
        adapter = self.adapter
        req = req if req is not None else adapter.encode(sample)
        state = adapter.prefill(req, scorer=self.scorer, policy=self.policy, pruner=self.pruner,
                                generator=torch.Generator().manual_seed(seed))
        tokens = self.decoder_for(gen_kwargs.get("max_new_tokens")).generate(adapter, state)
        return self._text_and_record(req, state, tokens[0], gen_kwargs, batch_size=1)

    def _text_and_record(self, req, state, tokens: torch.LongTensor, gen_kwargs: dict,
                         batch_size: int) -> tuple[str, dict]:
        """The answer text (cut at the request's `until`) and its efficiency record.
        state: a PrefillState, or a batch's batching.RowView (timings then its share of the
        batch's: batch ms / batch_size); tokens [n] this request's own."""
        from sparsevlm_exp.metrics.efficiency import prefill_flops_of, prefill_flops_paper

        text = self.adapter.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        text = cut_at_stop(text, stop_strings(gen_kwargs)).strip()
        text_cfg = self.model_config.get_text_config()
        n_steps = max(1, tokens.shape[0] - 1)
        record = {
            "n_visual": state.n_visual,
            "prune_layers": [e.layer for e in state.events],
            "kept": [int(e.kept_index.shape[1]) for e in state.events],
            "equivalent_tokens": mean(state.layer_counts) if state.layer_counts else 0,
            # the runner's two FLOP counts: exact for GQA, and the paper's formula
            "prefill_flops": prefill_flops_of(state.seq_lens, text_cfg),
            "prefill_flops_paper": prefill_flops_paper(state.seq_lens, text_cfg.hidden_size,
                                                       text_cfg.intermediate_size),
            "vision_ms": state.timings.get("vision"),
            "prefill_ms": state.timings.get("prefill"),
            "decode_ms_per_token": state.timings.get("decode", 0.0) / n_steps,
            # > 1: the three timings above are this request's share of its batch's
            "batch_size": batch_size,
            "input_tokens": int(req.input_ids.shape[1]),
            "new_tokens": int(tokens.shape[0]),
            "prediction": text,
        }
        return text, record

    def loglikelihood(self, requests):
        raise NotImplementedError("sparsevlm_exp scores generate_until tasks only (pruning acts on generation)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("sparsevlm_exp: multi-round generation is not supported")

    # ---- efficiency log --------------------------------------------------------------
    def _log(self, record: dict) -> None:
        self.records.append(record)
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _log_summary(self) -> None:
        if not self.records:
            return
        from loguru import logger

        def avg(key):
            values = [r[key] for r in self.records if r.get(key) is not None]
            return mean(values) if values else float("nan")

        kept = [r["kept"][-1] for r in self.records if r["kept"]]
        logger.info(
            f"sparsevlm_exp: {len(self.records)} samples, visual tokens {avg('n_visual'):.0f} -> "
            f"{(mean(kept) if kept else avg('n_visual')):.0f} kept, {avg('equivalent_tokens'):.0f} per layer on "
            f"average; prefill {avg('prefill_ms'):.1f} ms, {avg('prefill_flops') / 1e12:.4f} TFLOPs per sample"
            + (f"; per-sample records in {self.log_path}" if self.log_path else ""))


def batch_size_of(value) -> int:
    """lmms-eval's --batch_size (text from its command line, or an int) as a whole number
    >= 1. Raises ConfigError (one line) for anything else: "auto" (we do not probe memory
    for a size), 0, -1, 2.5, True."""
    if isinstance(value, bool):
        raise bad_value("batch_size", value, "a whole number >= 1 (requests answered together)")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip()
        number = int(text) if text.isdigit() else 0
    if number < 1:
        raise bad_value("batch_size", value, "a whole number >= 1 (requests answered together; \"auto\" is not "
                        "supported)")
    return number
