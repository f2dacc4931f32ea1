"""Experiment: builds the parts from the config, checks them, loops over samples, records.

The runner knows interfaces (adapter, scorer, policy, pruner, decoder, dataset,
metric, logger), never a concrete family or scorer. Order matters:
  1. cheap checks and cheap constructors (bad input fails here, before any weights);
  2. the model;
  3. the sample loop, one flushed record per sample.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
import zlib
from pathlib import Path
from statistics import mean

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from .contracts import MAX_NEW_TOKENS
from .checks import SMALL_INT_KEEP_SHARE, is_int, check_policy_reads_raters, check_top_level, resolve_or_explain
from .engine import check_parts
from .errors import build
from .metrics.efficiency import peak_memory_bytes, prefill_flops_of, prefill_flops_paper, reset_peak_memory
from .metrics.evidence import check_recall_never_rises, evidence_recall, evidence_token_mask
from .models import position_dims
from .models.loading import attention_layers, model_config, num_layers
from .records import LATENCY_FIELDS, SampleRecord
from .rundir import open_run_dir, read_hydra_files, register_resolvers, write_json
from .stats import spread, wilson_interval
from .tracking import SampleLog, environment

# batch_size > 1: samples are loaded, sorted by length and cut into batches this many
# batches at a time (runner, lmms-eval model, throughput's alternation unit)
GROUPING_WINDOW = 8

log = logging.getLogger(__name__)
register_resolvers()      # ${run_suffix:} for anyone composing conf/config.yaml through the runner


class Experiment:
    def __init__(self, cfg: DictConfig, run_dir: str | Path, choices: dict | None = None):
        """choices: Hydra's config-group choices ({"scorer": "v2", ...}), which name the
        run's parts in W&B tags; None outside the CLI. Every check that needs no weights
        runs here: a bad value raises ConfigError before anything is loaded."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.choices = dict(choices or {})
        self.resolved = resolve_or_explain(cfg)
        check_top_level(cfg)
        # Cheap parts first: their constructors validate their own keys.
        self.policy = build(cfg.policy, "policy")
        self.scorer = build(cfg.scorer, "scorer")
        self.pruner = build(cfg.pruner, "pruner")
        self.decoder = build(cfg.decoder, "decoder")
        self._decoders = {int(self.decoder.max_new_tokens): self.decoder}   # by generation length
        self.logger = build(cfg.logger, "logger")
        check_policy_reads_raters(self.policy, self.scorer)
        # The model's config is read without weights, so `layer` is checked before loading.
        m = cfg.model
        self.model_config = model_config(m.pretrained, random_init=m.random_init, architecture=m.architecture,
                                         trust_remote_code=m.trust_remote_code)
        self.n_layers = num_layers(self.model_config)
        # policy.check + stages + needs; on hybrid models (Qwen3.5) attention-reading scorers
        # only at full-attention layers, refused here rather than in every sample
        check_parts(self.scorer, self.policy, self.n_layers, attention_layers(self.model_config), self.pruner)
        if hasattr(self.scorer, "check_heads"):     # v2's head_count must fit the model's heads
            self.scorer.check_heads(self.model_config.get_text_config().num_attention_heads)
        dims = position_dims(self.model_config)
        if dims is not None:       # pruner.positions=renumbered: 1-D RoPE only (pruners.POSITIONS)
            self.pruner.check_positions(dims)
        # the position rule this run uses after a cut (results.json "positions"); auto resolves per family
        self.positions = getattr(self.pruner, "positions", None)
        if self.positions == "auto" and dims is not None:
            self.positions = "renumbered" if dims == 1 else "original"
            log.info("pruner.positions=auto: %s positions after each cut on this model (%s)", self.positions,
                     "1-D RoPE" if dims == 1 else "M-RoPE")
        self.dataset = build(cfg.dataset, "dataset")    # checks its path; images load lazily

    # ---------------------------------------------------------------------------------
    def run(self) -> dict:
        """Run every sample not yet done; returns the results.json summary. Raises
        ConfigError (before the model loads, nothing deleted) when the run dir is in use
        or holds another run (see rundir.open_run_dir)."""
        cfg = self.cfg
        n_total = len(self.dataset) if cfg.limit is None else min(cfg.limit, len(self.dataset))
        # A SLURM job requeued after a timeout or preemption (submitit checkpointing)
        # restarts in the same run dir: it resumes instead of starting over.
        resume = bool(cfg.resume) or int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
        with open_run_dir(self.run_dir, self.resolved, resume, hydra_files=read_hydra_files(self.run_dir)):
            return self._run(n_total, resume)

    def _run(self, n_total: int, resume: bool) -> dict:
        cfg = self.cfg
        book = SampleLog(self.run_dir)
        todo = [i for i in range(n_total) if i not in book.done]
        if resume:
            log.info("resume: %d of %d samples already done", n_total - len(todo), n_total)

        if cfg.threads is not None:
            torch.set_num_threads(int(cfg.threads))
        adapter = build(cfg.model, "model")
        text_cfg = self.model_config.get_text_config()
        self.logger.start(config=self.resolved, run_dir=self.run_dir, name=self.run_dir.name,
                          group=_sweep_group(self.run_dir), tags=self.tags())
        failures = 0
        # running accuracy for the progress bar, resumed samples included
        scored = [r.score for r in book.records if r.ok]
        score_sum, n_scored = sum(scored), len(scored)
        said_kept = False
        reset_peak_memory(adapter.device)
        bar = tqdm(total=len(todo), desc="samples", unit="sample", dynamic_ncols=True, file=sys.stderr)
        for step, (index, record) in enumerate(self._records(adapter, todo, text_cfg)):
            bar.update(1)
            if not record.ok:
                failures += 1
                log.error("sample %s failed: %s", record.id, record.error)
            book.append(record)
            self.logger.log_sample(record, step)
            self.logger.log_images(record.pictures or {})   # after log_sample: the same W&B step
            if record.ok:
                if not said_kept:
                    self.say_kept(record)
                    said_kept = True
                score_sum, n_scored = score_sum + record.score, n_scored + 1
                bar.set_postfix(acc=f"{score_sum / n_scored:.3f}")
        bar.close()
        book.close()

        records = [r for r in book.records if r.index < n_total] if cfg.limit is not None else book.records
        summary = self.summarize(records, failures, adapter)
        write_json(self.run_dir / "results.json", summary)
        self.logger.finish(summary, records, exit_code=1 if failures else 0)
        return summary

    def _records(self, adapter, todo: list[int], text_cfg):
        """(index, SampleRecord) for every index in todo: one at a time (batch_size=1), or
        in batches of similar visual token counts (batch_size > 1, `length_grouped`), in
        which each record is what batch 1 gives and its timings are batch shares."""
        B = int(self.cfg.batch_size)
        n_pictures = int(self.cfg.viz.n)
        if B == 1:
            for step, index in enumerate(todo):
                yield index, self._one(adapter, index, text_cfg, want_pictures=step < n_pictures)
            return
        # the samples batch 1 draws pictures for (the first n to run), whatever batch they land in
        pictured = set(todo[:n_pictures])
        # a window of GROUPING_WINDOW batches is loaded and sorted at a time: grouping without
        # decoding the whole dataset
        window = GROUPING_WINDOW * B
        for start in range(0, len(todo), window):
            loaded = []
            for index in todo[start:start + window]:
                sample = None
                try:
                    sample = self.dataset[index]
                    req = adapter.encode(sample)
                    self._warn_if_too_long(sample, req, text_cfg)
                    loaded.append((index, sample, req))
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as err:      # a corrupt image: that sample fails alone, as at batch 1
                    yield index, self._failed(index, sample, err)
            lengths = [(int(req.visual_index.shape[1]), int(req.input_ids.shape[1])) for _, _, req in loaded]
            for group in length_grouped(lengths, B):
                yield from self._answer_batch(adapter, [loaded[j] for j in group], text_cfg, pictured)

    def _one(self, adapter, index: int, text_cfg, want_pictures: bool) -> SampleRecord:
        sample = None
        try:
            sample = self.dataset[index]      # images decode here: a corrupt one fails this sample only
            # Seeded per sample, not per run: a resumed run draws the same random
            # choices for a sample as an uninterrupted one.
            generator = torch.Generator().manual_seed(sample_seed(int(self.cfg.seed), sample.id))
            return self.answer(adapter, sample, generator, text_cfg, index=index, want_pictures=want_pictures)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:      # a corrupt image, an OOM: record it and go on
            return self._failed(index, sample, err)

    def _failed(self, index: int, sample, err: Exception) -> SampleRecord:
        return SampleRecord(
            index=index, id=getattr(sample, "id", None) or self._sample_id(index),
            question=getattr(sample, "question", None), answers=getattr(sample, "answers", None),
            error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(limit=5))

    def _answer_batch(self, adapter, batch, text_cfg, pictured: set[int]):
        """(index, record) of each (index, sample, req) in batch, answered together by
        batching.answer_batch; if the batch fails (e.g. out of memory), each sample is
        answered alone, so an error stays that sample's. pictured: the indices that get
        kept-token pictures (batch 1's first viz.n samples)."""
        from .batching import answer_batch

        try:
            generators = [torch.Generator().manual_seed(sample_seed(int(self.cfg.seed), s.id)) for _, s, _ in batch]
            # one decoder for the batch, the longest length asked; each row is cut to its own
            lengths = [int(self.decoder_for(s).max_new_tokens) for _, s, _ in batch]
            decoder = self.decoder_for(batch[lengths.index(max(lengths))][1])
            answer = answer_batch(adapter, [req for _, _, req in batch], scorer=self.scorer, policy=self.policy,
                                  pruner=self.pruner, decoder=decoder, generators=generators, lengths=lengths)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:      # noqa: BLE001 - retried one by one below
            log.warning("a batch of %d failed (%s: %s); answering its samples one at a time", len(batch),
                        type(err).__name__, err)
            for index, _, _ in batch:
                yield index, self._one(adapter, index, text_cfg, index in pictured)
            return
        for b, (index, sample, req) in enumerate(batch):
            try:
                row = answer.rows[b]
                yield index, self.record_of(adapter, sample, req, row, row.tokens, text_cfg, index,
                                            index in pictured, batch_size=len(batch))
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as err:
                yield index, self._failed(index, sample, err)

    def _sample_id(self, index: int) -> str:
        """The dataset's own id of a sample whose decoding failed (a corrupt image), so
        its error record names it; "#index" when the dataset cannot say."""
        sample_id = getattr(self.dataset, "sample_id", None)
        try:
            return str(sample_id(index)) if sample_id is not None else f"#{index}"
        except Exception:                 # noqa: BLE001 - the id is only a label here
            return f"#{index}"

    def say_kept(self, record: SampleRecord) -> None:
        """Log the resolved kept count of the first sample, and warn when an int keep is
        a tiny share of the visual tokens (keep=1 is one token, keep=1.0 all of them)."""
        n = record.n_visual or 0
        cuts = ", ".join(f"{k}{f' (+{r} recycled)' if r else ''} after layer {layer}"
                         for layer, k, r in zip(record.prune_layers, record.kept, record.recycled or
                                                [0] * len(record.kept))) or "all (no cut)"
        log.info("keep=%s resolves to %s of %d visual tokens (first sample)", self.cfg.keep, cuts, n)
        keep = self.cfg.keep
        if is_int(keep) and n and keep < SMALL_INT_KEEP_SHARE * n:
            log.warning("keep=%d is a token COUNT: %d of %d visual tokens (%.1f%%) survive; for a fraction "
                        "write a float (keep=1.0 keeps all, keep=0.25 a quarter)", keep, min(keep, n), n,
                        100 * min(keep, n) / n)

    def tags(self) -> list[str]:
        """W&B tags from the config: the group choices and the budget, e.g. scorer=v2, keep=0.25."""
        groups = [f"{g}={self.choices[g]}" for g in ("model", "dataset", "scorer", "policy", "pruner")
                  if self.choices.get(g)]
        return groups + [f"keep={self.cfg.keep}", f"layer={self.cfg.layer}"]

    # ---------------------------------------------------------------------------------
    def answer(self, adapter, sample, generator, text_cfg, index: int = 0,
               want_pictures: bool = False) -> SampleRecord:
        req = adapter.encode(sample)
        self._warn_if_too_long(sample, req, text_cfg)
        state = adapter.prefill(req, scorer=self.scorer, policy=self.policy, pruner=self.pruner,
                                generator=generator)
        tokens = self.decoder_for(sample).generate(adapter, state)
        return self.record_of(adapter, sample, req, state, tokens[0], text_cfg, index, want_pictures)

    def record_of(self, adapter, sample, req, state, tokens, text_cfg, index: int, want_pictures: bool,
                  batch_size: int = 1) -> SampleRecord:
        """The record of one answered sample. state: a PrefillState (batch 1) or, for a row
        of a batch, anything with its n_visual / events / layer_counts / seq_lens and the
        batch's timings already divided by batch_size; tokens [n] the sample's own."""
        prediction = adapter.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        score = float(self.dataset.metric.score(prediction, sample))
        n_steps = max(1, tokens.shape[0] - 1)
        record = SampleRecord(
            index=index, id=sample.id, question=sample.question, answers=sample.answers, prediction=prediction,
            score=score, meta=sample.meta, n_visual=state.n_visual,
            prune_layers=[e.layer for e in state.events],
            kept=[int(e.kept_index.shape[1]) for e in state.events],
            recycled=[e.n_recycled for e in state.events],
            layer_counts=state.layer_counts,
            # the paper's "192": visual tokens alive after each layer, averaged over layers
            equivalent_tokens=mean(state.layer_counts) if state.layer_counts else 0,
            # exact for GQA; the paper's formula beside it, for comparison with its numbers
            prefill_flops=prefill_flops_of(state.seq_lens, text_cfg),
            prefill_flops_paper=prefill_flops_paper(state.seq_lens, text_cfg.hidden_size,
                                                    text_cfg.intermediate_size),
            vision_ms=state.timings.get("vision"), prefill_ms=state.timings.get("prefill"),
            decode_ms_per_token=state.timings.get("decode", 0.0) / n_steps,
            new_tokens=int(tokens.shape[0]),
            batch_size=batch_size,
        )
        if sample.evidence is not None and state.n_visual > 0:
            mask = evidence_token_mask(sample.evidence, [im.size for im in sample.images], req.image_grids,
                                       req.visual_coords[0])
            evidence_index = req.visual_index[0][mask]
            record.evidence_tokens = int(mask.sum())
            record.evidence_recall = [evidence_recall(evidence_index, e.kept_index[0].cpu()) for e in state.events]
            # invariant: every cut keeps a subset of what the cut before kept, so recall
            # can only fall; a rise means a wrong result, and the sample fails here
            check_recall_never_rises(sample.id, record.prune_layers, record.evidence_recall)
        if want_pictures and state.events:
            # drawn after the timers stopped: speed numbers are unaffected
            from .viz import clip_strips, kept_token_pictures

            # a clip is drawn as a strip of its frames, each with its kept cells
            media, grids, coords = clip_strips(sample.videos, sample.images, req.image_grids, req.visual_coords[0])
            pictures = kept_token_pictures(media, grids, req.visual_index[0], coords,
                                           state.events, sample.evidence if not sample.videos else None,
                                           self.run_dir / self.cfg.viz.dir, prefix=str(sample.id))
            record.pictures = {key: str(path) for key, path in pictures.items()}
        return record

    def decoder_for(self, sample):
        """The decoder for one sample: decoder.max_new_tokens, unless the sample names its
        own length in meta[MAX_NEW_TOKENS] (dataset=lmms_eval: the task's
        generation_kwargs.max_new_tokens); then the same decoder config with that length,
        built once per length."""
        from omegaconf import OmegaConf

        n = (sample.meta or {}).get(MAX_NEW_TOKENS)
        if n is None:
            return self.decoder
        n = int(n)
        if n not in self._decoders:
            self._decoders[n] = build(OmegaConf.merge(self.cfg.decoder, {"max_new_tokens": n}), "decoder")
        return self._decoders[n]

    def _warn_if_too_long(self, sample, req, text_cfg) -> None:
        limit = getattr(text_cfg, "max_position_embeddings", None)
        new_tokens = int(self.decoder_for(sample).max_new_tokens)
        length = int(req.input_ids.shape[1]) + new_tokens
        if limit and length > limit:
            log.warning("sample %s: prompt of %d tokens + %d new tokens exceeds the model's context of %d "
                        "positions; its answer is unreliable", sample.id, req.input_ids.shape[1],
                        new_tokens, limit)

    def summarize(self, records: list[SampleRecord], failures: int, adapter) -> dict:
        ok = [r for r in records if r.ok]
        metric = self.dataset.metric
        quality = metric.summarize([r.to_dict() for r in ok]) if ok else {"accuracy": None}
        headline_key, headline_label = getattr(metric, "headline", ("accuracy", "accuracy"))

        def avg(values):
            values = [v for v in values if v is not None]
            return mean(values) if values else None

        def by_layer(pairs) -> dict[str, float]:
            table: dict[str, list] = {}
            for layer, value in pairs:
                if value is not None:
                    table.setdefault(str(layer), []).append(value)
            return {k: mean(v) for k, v in table.items()}

        latency = {}
        for key in LATENCY_FIELDS:
            numbers = spread([getattr(r, key) for r in ok])
            latency[key] = numbers["mean"]                     # the mean keeps its old name
            latency[f"{key}_median"] = numbers["median"]
            latency[f"{key}_p90"] = numbers["p90"]
        return {
            **quality,
            "accuracy_ci95": wilson_interval(quality.get("accuracy"), len(ok)),
            "accuracy_by_type": accuracy_by_type(ok),
            "headline": {"key": headline_key, "label": headline_label, "value": quality.get(headline_key)},
            "n_samples": len(records),
            "n_failed": sum(1 for r in records if not r.ok),
            "failed_this_run": failures,
            # the policy's pruning layers on THIS model (presets map 32-layer ones to its depth)
            "prune_layers": self.policy.layers(self.n_layers),
            "positions": self.positions,          # original | renumbered (pruners.POSITIONS); None: no such rule
            "evidence_recall": by_layer((layer, v) for r in ok
                                        for layer, v in zip(r.prune_layers, r.evidence_recall or [])),
            "n_visual": avg(r.n_visual for r in ok),
            "kept": by_layer((layer, k) for r in ok for layer, k in zip(r.prune_layers, r.kept)),
            "recycled": by_layer((layer, n) for r in ok for layer, n in zip(r.prune_layers, r.recycled)),
            # what is alive after each cut: the kept tokens plus the merged (recycled) ones
            "alive": by_layer((layer, k + n) for r in ok
                              for layer, k, n in zip(r.prune_layers, r.kept, r.recycled or [0] * len(r.kept))),
            "equivalent_tokens": avg(r.equivalent_tokens for r in ok),
            "prefill_tflops": (avg(r.prefill_flops for r in ok) or 0) / 1e12,
            "prefill_tflops_paper": (avg(r.prefill_flops_paper for r in ok) or 0) / 1e12,
            **latency,
            "peak_memory_bytes": peak_memory_bytes(adapter.device),
            "device": str(adapter.device),
            "env": environment(),
            "config": self.resolved,
        }


def length_grouped(lengths: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Batches (lists of positions into `lengths`) of at most batch_size, grouping similar
    (visual tokens, prompt tokens) together so that left padding wastes little: sort by
    length, cut into consecutive runs. Each position appears exactly once; the batches
    come in sorted order (longest last)."""
    order = sorted(range(len(lengths)), key=lambda j: (lengths[j], j))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


# The meta key that names a sample's question type, first one present wins (the
# shapes dataset writes question_type; POPE and MME name a category).
TYPE_KEYS = ("question_type", "category")


def accuracy_by_type(records: list[SampleRecord]) -> dict[str, dict]:
    """{type: {"accuracy", "n", "ci95"}} over the finished records, where the dataset
    gives samples a type (meta question_type or category); {} otherwise."""
    key = next((k for k in TYPE_KEYS if any(k in (r.meta or {}) for r in records)), None)
    if key is None:
        return {}
    groups: dict[str, list[float]] = {}
    for r in records:
        groups.setdefault(str((r.meta or {}).get(key)), []).append(float(r.score))
    return {t: {"accuracy": mean(s), "n": len(s), "ci95": wilson_interval(mean(s), len(s))}
            for t, s in sorted(groups.items())}


def sample_seed(seed: int, sample_id: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(str(sample_id).encode())) % (2**63)


def _sweep_group(run_dir: Path) -> str | None:
    # multirun dirs are .../<date>/<time>/<job num>: the sweep dir names the W&B group
    if not run_dir.name.isdigit():
        return None
    return f"{run_dir.parent.parent.name}_{run_dir.parent.name}"
