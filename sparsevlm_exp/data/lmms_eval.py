"""Any lmms-eval task as a dataset of our runner (dataset=lmms_eval dataset.task=NAME).

Everything that decides the number comes from lmms-eval itself, so a score here is
lmms-eval's score by construction:
- documents: the task's evaluation split (test split, else validation), loaded by
  lmms-eval through HF `datasets` (a local json/parquet `dataset_path` + `data_files`
  runs offline);
- prompt: the context lmms-eval's evaluator builds for a plain (non-chat) model,
  `task.fewshot_context(doc, num_fewshot)` (doc_to_text plus description/few-shot),
  and the images `task.doc_to_visual(doc)`;
- scoring: the generation is cut at the task's `until` strings (what lmms-eval's
  models do), passed through the task's first filter pipeline, then
  `task.process_results(doc, [response])` per sample and the task's own aggregation
  functions over all samples.
Everything else (sweeps, SLURM, resume, W&B, samples.jsonl, reports) is ours.

lmms-eval is an optional dependency (`pip install -e ".[lmms]"` and then
`pip install --no-deps lmms-eval==0.7.3`, see README "lmms-eval"); it is imported
only when this dataset is built.
"""
from __future__ import annotations

import difflib
import inspect
import logging
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

from PIL import Image

from sparsevlm_exp.contracts import MAX_NEW_TOKENS, Sample
from sparsevlm_exp.errors import ConfigError

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[lmms]" && pip install --no-deps lmms-eval==0.7.3'


def load_task(name: str, include_path: str | None = None):
    """The lmms-eval task object (a ConfigurableTask) called `name`.

    include_path: a directory of extra task yamls (lmms-eval's --include_path). When
    the task is found there, lmms-eval's ~2000 built-in task yamls are not indexed
    (that index alone takes ~10 s).
    Raises ConfigError (one line) for: lmms-eval missing, include_path not a
    directory, an unknown name (listing close names), a group or tag (listing its
    tasks), a task that is not `generate_until`.
    """
    try:
        from lmms_eval.tasks import TaskManager
    except ImportError as err:
        raise ConfigError(f"dataset=lmms_eval needs the lmms-eval package ({err}); install: {INSTALL_HINT}") from None
    quiet_lmms_eval_logger()
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"dataset.include_path={include_path!r} is not allowed: a directory of lmms-eval task yamls")
    manager = None
    if include_path is not None:
        manager = TaskManager(verbosity="WARNING", include_path=str(include_path), include_defaults=False)
        if name not in manager.all_tasks:
            manager = None
    if manager is None:
        manager = TaskManager(verbosity="WARNING", include_path=None if include_path is None else str(include_path))
    if name not in manager.all_tasks:
        close = difflib.get_close_matches(name, manager.all_tasks, n=8, cutoff=0.6)
        if not close:      # a prefix often finds the family: "textvq" -> textvqa_val, ...
            close = [t for t in manager.all_tasks if t.startswith(name[:4])][:8]
        raise ConfigError(f"dataset.task={name!r} is not an lmms-eval task; close names: "
                          f"{', '.join(close) or 'none'} (all: python -m lmms_eval --tasks list)")
    kind = manager.task_index[name]["type"]
    if kind != "task":
        members = [t for t in manager.all_subtasks if t.startswith(name)][:12]
        raise ConfigError(f"dataset.task={name!r} is an lmms-eval {kind}, not one task: pick one task, "
                          f"e.g. {', '.join(members) or '(see python -m lmms_eval --tasks list)'}")
    try:
        task = manager.load_task_or_group([name], "simple")[name]
    except Exception as err:   # noqa: BLE001 - a data source problem becomes one ConfigError line
        raise ConfigError(f"dataset.task={name!r}: lmms-eval could not load its documents "
                          f"({_root_cause(err)}); without network, point the task at local files "
                          f"(dataset_path: json|parquet + dataset_kwargs.data_files)") from None
    if task.OUTPUT_TYPE != "generate_until":
        raise ConfigError(f"dataset.task={name!r} has output_type {task.OUTPUT_TYPE!r}: only generate_until "
                          f"tasks run through our pruned generation")
    return task


def quiet_lmms_eval_logger() -> None:
    """lmms-eval logs through loguru at DEBUG by default (a dozen lines per task index);
    keep its warnings only, on stderr, as lmms_eval.models does when it is imported."""
    import sys

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost error (lmms-eval wraps download errors in tenacity's RetryError)."""
    last = getattr(err, "last_attempt", None)
    if last is not None and last.exception() is not None:
        err = last.exception()
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


def eval_split(task) -> str:
    """The split lmms-eval evaluates: the test split if the task has one, else validation."""
    return task.config.test_split if task.has_test_docs() else task.config.validation_split


def question_text(context: str) -> str:
    """The user text our adapters get from an lmms-eval context: the images are placed
    by the chat template, so a literal "<image>" placeholder is dropped (as lmms-eval's
    own Qwen2-VL model does)."""
    return context.replace("<image>", "").strip()


def to_images(visuals) -> list[Image.Image]:
    """doc_to_visual's output -> RGB PIL images. Paths are opened; video/audio are refused."""
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    images = []
    for visual in visuals:
        if isinstance(visual, Image.Image):
            images.append(visual.convert("RGB"))
        elif isinstance(visual, (str, Path)) and Path(visual).suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}:
            with Image.open(visual) as im:
                images.append(im.convert("RGB"))
        else:
            raise ValueError(f"lmms-eval visual of type {type(visual).__name__} ({str(visual)[:80]!r}): "
                             f"only images are supported")
    return images


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The generation up to the first stop string (lmms-eval models stop there)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def stop_strings(generation_kwargs: dict) -> list[str]:
    until = (generation_kwargs or {}).get("until") or []
    return [until] if isinstance(until, str) else list(until)


class LmmsEvalMetric:
    """Our Metric interface around one lmms-eval task's own scoring.

    score(prediction, sample): process_results of that sample -> one number: the first
    metric's value if it is a number, else its 'score' field (POPE-style dict items),
    else NaN (the task only scores in aggregate).
    summarize(records): the task's aggregation functions over process_results of every
    record (recomputed from the recorded predictions, so resumed samples count), each
    under its lmms-eval name; 'accuracy' is the mean per-sample number (in [0, 1], what
    our Wilson interval and report expect; None when the task has none), and `headline`
    names the task's first metric, lmms-eval's own number (an MME score, an F1 ...).
    """

    name = "lmms_eval"

    def __init__(self, task, output_path: str | None = None):
        self.task = task
        self.docs = task.eval_docs_no_media    # what lmms-eval's evaluator scores against
        self.until = stop_strings(task.config.generation_kwargs)
        self.metric_names = list(task.aggregation().keys())
        self.output_path = output_path
        first = self.metric_names[0] if self.metric_names else "accuracy"
        self.headline = (first, f"{task.config.task} {first}")   # (summary key, label) for the report

    def response(self, prediction: str, doc_id: int):
        """The response process_results sees: cut at `until`, then the task's first filter
        pipeline (lmms-eval reports one row per filter; tasks without filter_list have one,
        "none" = take the first response)."""
        from lmms_eval.api.instance import Instance

        text = cut_at_stop(prediction, self.until).strip()
        ensemble = self.task._filters[0]
        inst = Instance(request_type="generate_until", arguments=(), idx=0,
                        metadata={"task": self.task.config.task, "doc_id": doc_id, "repeats": 1})
        inst.resps = [text]
        ensemble.apply([inst], [self.docs[doc_id]])
        return inst.filtered_resps[ensemble.name]

    def results(self, prediction: str, doc_id: int) -> dict:
        return self.task.process_results(self.docs[doc_id], [self.response(prediction, doc_id)])

    def score(self, prediction: str, sample: Sample) -> float:
        values = self.results(prediction, int(sample.meta["doc_id"]))
        return per_sample_number(values.get(self.metric_names[0]) if self.metric_names else None)

    def summarize(self, records: Sequence[dict]) -> dict[str, float]:
        items: dict[str, list] = {m: [] for m in self.metric_names}
        numbers = []
        for r in records:
            values = self.results(r["prediction"], int(r["meta"]["doc_id"]))
            for m in self.metric_names:
                if m in values:
                    items[m].append(values[m])
            if self.metric_names:
                numbers.append(per_sample_number(values.get(self.metric_names[0])))
        out: dict[str, Any] = {}
        for metric, values in items.items():
            if not values:
                continue
            agg = self.task.aggregation()[metric]
            if "args" in inspect.signature(agg).parameters:
                # some aggregations write a submission file under args.output_path
                path = self.output_path or tempfile.mkdtemp(prefix="lmms_eval_")
                out[metric] = agg(values, args=SimpleNamespace(output_path=path))
            else:
                out[metric] = agg(values)
        numbers = [x for x in numbers if not math.isnan(x)]
        accuracy = sum(numbers) / len(numbers) if numbers else None
        return {"accuracy": accuracy, **out, "n": float(len(records))}


def per_sample_number(value) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict) and isinstance(value.get("score"), (int, float)):
        return float(value["score"])
    return float("nan")


class LmmsEvalDataset:
    """dataset=lmms_eval: the documents, prompts and scoring of one lmms-eval task.

    task: the lmms-eval task name (`python -m lmms_eval --tasks list`);
    include_path: a directory of your own task yamls (lmms-eval's --include_path);
    max_new_tokens: the generation length of every sample; None (the yaml's default):
      the task's own generation_kwargs.max_new_tokens, as lmms-eval generates it, and
      decoder.max_new_tokens for a task that names none. It reaches the runner's decoder
      per sample through meta[MAX_NEW_TOKENS] (contracts.MAX_NEW_TOKENS);
    output_path: where aggregations that write submission files put them (null: a temp dir).
    Sample ids are "<task>/<doc_id>"; meta carries doc_id for the metric.
    """

    def __init__(self, task: str | None = None, include_path: str | None = None, max_new_tokens: int | None = None,
                 output_path: str | None = None, metric=None):
        if not task:
            raise ConfigError("dataset.task=None is not allowed: an lmms-eval task name, e.g. dataset.task=textvqa_val")
        if metric is not None:
            raise ConfigError("dataset.metric is not allowed for dataset=lmms_eval: the task's own "
                              "process_results and aggregation score it")
        self.name = task
        self.task = load_task(task, include_path)
        self.split = eval_split(self.task)
        self.docs = self.task.dataset[self.split]
        self.generation_kwargs = dict(self.task.config.generation_kwargs or {})
        self.metric = LmmsEvalMetric(self.task, output_path)
        length = max_new_tokens if max_new_tokens is not None else self.generation_kwargs.get("max_new_tokens")
        if length is not None and (isinstance(length, bool) or not str(length).isdigit() or int(length) < 1):
            source = "dataset.max_new_tokens" if max_new_tokens is not None else \
                f"lmms-eval task {task}'s generation_kwargs.max_new_tokens"
            raise ConfigError(f"{source}={length!r} is not allowed: a whole number >= 1")
        self.max_new_tokens = None if length is None else int(length)
        if self.generation_kwargs.get("do_sample") or float(self.generation_kwargs.get("temperature") or 0) > 0:
            log.warning("lmms-eval task %s asks for sampling (%s); our decoder is greedy", task,
                        {k: self.generation_kwargs.get(k) for k in ("do_sample", "temperature")})

    def __len__(self) -> int:
        return len(self.docs)

    def sample_id(self, index: int) -> str:
        """A sample's id without decoding it (names the error record of a failed sample)."""
        return f"{self.name}/{index}"

    def context(self, doc) -> str:
        """The prompt lmms-eval's evaluator builds for a simple model (no system instruction,
        no chat template, the task's own num_fewshot)."""
        shots = self.task.config.num_fewshot or 0
        return self.task.fewshot_context(doc, shots, None, False, False, None)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self.docs):
            raise IndexError(index)
        doc = self.docs[index]
        target = self.task.doc_to_target(doc)
        if self.task.config.doc_to_choice is not None and isinstance(target, int):
            target = self.task.doc_to_choice(doc)[target]
        answers = [str(t) for t in target] if isinstance(target, list) else [str(target)]
        return Sample(id=self.sample_id(index), question=question_text(self.context(doc)),
                      images=to_images(self.task.doc_to_visual(doc)), answers=answers,
                      meta={"lmms_eval_task": self.name, "doc_id": index,
                            **({} if self.max_new_tokens is None else {MAX_NEW_TOKENS: self.max_new_tokens})})

    def __iter__(self) -> Iterator[Sample]:
        for index in range(len(self)):
            yield self[index]
