"""Experiment: builds the parts from the config, checks them, loops over samples, records.

The runner knows interfaces (adapter, scorer, policy, pruner, decoder, dataset,
metric, logger), never a concrete family or scorer. Order matters:
  1. cheap checks and cheap constructors (bad input fails here, before any weights);
  2. the model;
  3. the sample loop, one flushed record per sample.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import sys
import traceback
import zlib
from pathlib import Path
from statistics import mean

import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .errors import bad_value, build
from .metrics.efficiency import peak_memory_bytes, prefill_flops_of, prefill_flops_paper, reset_peak_memory
from .metrics.evidence import evidence_recall, evidence_token_mask
from .models.loading import model_config, num_layers, resolve_device
from .tracking import SampleLog

log = logging.getLogger(__name__)


def check_top_level(cfg: DictConfig) -> None:
    if cfg.batch_size != 1:
        raise bad_value("batch_size", cfg.batch_size, "1 (the pruned pipeline runs one request at a time; "
                        "per-sample kept counts differ and batching is not implemented yet)")
    if cfg.limit is not None and (not isinstance(cfg.limit, int) or cfg.limit < 1):
        raise bad_value("limit", cfg.limit, "null or an int >= 1")
    if cfg.threads is not None and (not isinstance(cfg.threads, int) or cfg.threads < 1):
        raise bad_value("threads", cfg.threads, "null (torch's default) or an int >= 1")
    if not isinstance(cfg.viz.n, int) or cfg.viz.n < 0:
        raise bad_value("viz.n", cfg.viz.n, "an int >= 0 (pictures for the first n samples)")
    if cfg.device != "auto":
        resolve_device(cfg.device)


class Experiment:
    def __init__(self, cfg: DictConfig, run_dir: str | Path, choices: dict | None = None):
        """choices: Hydra's config-group choices ({"scorer": "v2", ...}), which name the
        run's parts in W&B tags; None outside the CLI."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.choices = dict(choices or {})
        check_top_level(cfg)
        # Cheap parts first: their constructors validate their own keys.
        self.policy = build(cfg.policy, "policy")
        self.scorer = build(cfg.scorer, "scorer")
        self.pruner = build(cfg.pruner, "pruner")
        self.decoder = build(cfg.decoder, "decoder")
        self.logger = build(cfg.logger, "logger")
        # The model's config is read without weights, so `layer` is checked before loading.
        m = cfg.model
        self.model_config = model_config(m.pretrained, random_init=m.random_init, architecture=m.architecture,
                                         trust_remote_code=m.trust_remote_code)
        self.n_layers = num_layers(self.model_config)
        self.policy.check(self.n_layers)
        if hasattr(self.scorer, "check_heads"):     # v2's head_count must fit the model's heads
            self.scorer.check_heads(self.model_config.get_text_config().num_attention_heads)
        self.dataset = build(cfg.dataset, "dataset")    # checks its path; images load lazily

    # ---------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        n_total = len(self.dataset) if cfg.limit is None else min(cfg.limit, len(self.dataset))
        # A SLURM job requeued after a timeout or preemption (submitit checkpointing)
        # restarts in the same run dir: it resumes instead of starting over.
        resume = bool(cfg.resume) or int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
        book = SampleLog(self.run_dir, resume=resume)
        todo = [i for i in range(n_total) if i not in book.done]
        if resume:
            log.info("resume: %d of %d samples already done", n_total - len(todo), n_total)

        if cfg.threads is not None:
            torch.set_num_threads(int(cfg.threads))
        adapter = build(cfg.model, "model")
        text_cfg = self.model_config.get_text_config()
        self.logger.start(config=OmegaConf.to_container(cfg, resolve=True), run_dir=self.run_dir,
                          name=self.run_dir.name, group=_sweep_group(self.run_dir), tags=self.tags())
        failures = 0
        # running accuracy for the progress bar, resumed samples included
        scored = [r["score"] for r in book.records if r.get("error") is None]
        score_sum, n_scored = sum(scored), len(scored)
        reset_peak_memory(adapter.device)
        bar = tqdm(todo, desc="samples", unit="sample", dynamic_ncols=True, file=sys.stderr)
        for step, index in enumerate(bar):
            sample = None
            try:
                sample = self.dataset[index]      # images decode here: a corrupt one fails this sample only
                # Seeded per sample, not per run: a resumed run draws the same random
                # choices for a sample as an uninterrupted one.
                generator = torch.Generator().manual_seed(sample_seed(int(cfg.seed), sample.id))
                record = {"index": index, **self.answer(adapter, sample, generator, text_cfg,
                                                        want_pictures=step < int(cfg.viz.n))}
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as err:      # a corrupt image, an OOM: record it and go on
                failures += 1
                record = {"index": index, "id": getattr(sample, "id", f"#{index}"),
                          "question": getattr(sample, "question", None), "answers": getattr(sample, "answers", None),
                          "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=5)}
                log.error("sample %s failed: %s", record["id"], record["error"])
            book.append(record)
            self.logger.log_sample(record, step)
            self.logger.log_images(record.get("pictures") or {})   # after log_sample: the same W&B step
            if record.get("error") is None:
                score_sum, n_scored = score_sum + record["score"], n_scored + 1
                bar.set_postfix(acc=f"{score_sum / n_scored:.3f}")
        book.close()

        summary = self.summarize(book.records, failures, adapter)
        _write_json(self.run_dir / "results.json", summary)
        self.logger.finish(summary, book.records, exit_code=1 if failures else 0)
        return summary

    def tags(self) -> list[str]:
        """W&B tags from the config: the group choices and the budget, e.g. scorer=v2, keep=0.25."""
        groups = [f"{g}={self.choices[g]}" for g in ("model", "dataset", "scorer", "policy", "pruner")
                  if self.choices.get(g)]
        return groups + [f"keep={self.cfg.keep}", f"layer={self.cfg.layer}"]

    # ---------------------------------------------------------------------------------
    def answer(self, adapter, sample, generator, text_cfg, want_pictures: bool = False) -> dict:
        req = adapter.encode(sample)
        state = adapter.prefill(req, scorer=self.scorer, policy=self.policy, pruner=self.pruner,
                                generator=generator)
        tokens = self.decoder.generate(adapter, state)
        prediction = adapter.processor.tokenizer.decode(tokens[0], skip_special_tokens=True).strip()
        score = float(self.dataset.metric.score(prediction, sample))
        n_steps = max(1, tokens.shape[1] - 1)
        record = {
            "id": sample.id,
            "question": sample.question,
            "prediction": prediction,
            "answers": sample.answers,
            "score": score,
            "meta": sample.meta,
            "n_visual": state.n_visual,
            "prune_layers": [e.layer for e in state.events],
            "kept": [int(e.kept_index.shape[1]) for e in state.events],
            "recycled": [e.n_recycled for e in state.events],
            "layer_counts": state.layer_counts,
            # the paper's "192": visual tokens alive after each layer, averaged over layers
            "equivalent_tokens": mean(state.layer_counts) if state.layer_counts else 0,
            # exact for GQA; the paper's formula beside it, for comparison with its numbers
            "prefill_flops": prefill_flops_of(state.seq_lens, text_cfg),
            "prefill_flops_paper": prefill_flops_paper(state.seq_lens, text_cfg.hidden_size,
                                                       text_cfg.intermediate_size),
            "vision_ms": state.timings.get("vision"),
            "prefill_ms": state.timings.get("prefill"),
            "decode_ms_per_token": state.timings.get("decode", 0.0) / n_steps,
            "new_tokens": int(tokens.shape[1]),
            "error": None,
        }
        if sample.evidence is not None and state.n_visual > 0:
            mask = evidence_token_mask(sample.evidence, [im.size for im in sample.images], req.image_grids,
                                       req.visual_coords[0])
            evidence_index = req.visual_index[0][mask]
            record["evidence_tokens"] = int(mask.sum())
            record["evidence_recall"] = [evidence_recall(evidence_index, e.kept_index[0].cpu()) for e in state.events]
        if want_pictures and state.events:
            # drawn after the timers stopped: speed numbers are unaffected
            from .viz import kept_token_pictures

            pictures = kept_token_pictures(sample.images, req.image_grids, req.visual_index[0], req.visual_coords[0],
                                           state.events, sample.evidence, self.run_dir / self.cfg.viz.dir,
                                           prefix=str(sample.id))
            record["pictures"] = {key: str(path) for key, path in pictures.items()}
        return record

    def summarize(self, records: list[dict], failures: int, adapter) -> dict:
        ok = [r for r in records if r.get("error") is None]
        quality = self.dataset.metric.summarize(ok) if ok else {"accuracy": float("nan")}

        def avg(key):
            values = [r[key] for r in ok if r.get(key) is not None]
            return mean(values) if values else None

        recall_by_layer = {}
        for r in ok:
            for layer, value in zip(r.get("prune_layers", []), r.get("evidence_recall") or []):
                if value is not None:
                    recall_by_layer.setdefault(str(layer), []).append(value)
        kept_by_layer = {}
        for r in ok:
            for layer, kept in zip(r["prune_layers"], r["kept"]):
                kept_by_layer.setdefault(str(layer), []).append(kept)
        return {
            **quality,
            "n_samples": len(records),
            "n_failed": sum(1 for r in records if r.get("error") is not None),
            "failed_this_run": failures,
            # the policy's pruning layers on THIS model (presets map 32-layer ones to its depth)
            "prune_layers": self.policy.layers(self.n_layers),
            "evidence_recall": {k: mean(v) for k, v in recall_by_layer.items()},
            "n_visual": avg("n_visual"),
            "kept": {k: mean(v) for k, v in kept_by_layer.items()},
            "equivalent_tokens": avg("equivalent_tokens"),
            "prefill_tflops": (avg("prefill_flops") or 0) / 1e12,
            "prefill_tflops_paper": (avg("prefill_flops_paper") or 0) / 1e12,
            "vision_ms": avg("vision_ms"),
            "prefill_ms": avg("prefill_ms"),
            "decode_ms_per_token": avg("decode_ms_per_token"),
            "peak_memory_bytes": peak_memory_bytes(adapter.device),
            "device": str(adapter.device),
            "env": _environment(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }


def sample_seed(seed: int, sample_id: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(str(sample_id).encode())) % (2**63)


def _sweep_group(run_dir: Path) -> str | None:
    # multirun dirs are .../<date>/<time>/<job num>: the sweep dir names the W&B group
    if not run_dir.name.isdigit():
        return None
    return f"{run_dir.parent.parent.name}_{run_dir.parent.name}"


def _environment() -> dict:
    return {
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _write_json(path: Path, data: dict) -> None:
    import json

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    tmp.replace(path)


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
