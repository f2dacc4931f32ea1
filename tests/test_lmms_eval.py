"""lmms-eval both ways (issue 20), offline, on the embedded model.

- dataset=lmms_eval: an lmms-eval task inside our runner;
- --model sparsevlm_exp: our pruning inside lmms-eval's own loop (entry-point plugin);
- one answer: on a small local task built from the shapes benchmark both paths give
  the same predictions and the same score as our runner with our shapes loader;
- --batch_size 4 gives every request its batch-1 answer and record, in request order.

Needs the optional lmms-eval install (README "lmms-eval"); skipped without it.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

pytest.importorskip("lmms_eval")

from sparsevlm_exp.data.shapes import ShapesDataset  # noqa: E402
from sparsevlm_exp.errors import ConfigError  # noqa: E402
from sparsevlm_exp.paths import CONF_DIR  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N_SAMPLES = 4
TASK = "shapes_lmms"
RUN = ["scorer=v2", "keep=0.25", "layer=2", "logger=none", "viz.n=0"]

UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    # exact match after case and a trailing period, as our shapes metric forgives
    prediction = results[0].strip().lower().rstrip(".")
    return {"exact_match": float(prediction == doc["answer"].strip().lower())}
'''


def write_shapes_task(directory: Path, n: int) -> Path:
    """An lmms-eval task over the first n shapes test questions: questions.json (question,
    answer, image path), PNG images (lossless, so the pixels are our loader's), a task
    yaml reading the json through HF datasets, and utils.py with exact-match scoring."""
    directory.mkdir(parents=True, exist_ok=True)
    shapes = ShapesDataset(size=n)
    rows = []
    for i in range(n):
        sample = shapes[i]
        image = directory / f"image_{i}.png"
        sample.images[0].save(image)
        rows.append({"id": sample.id, "question": sample.question, "answer": sample.answers[0], "image": str(image)})
    (directory / "questions.json").write_text(json.dumps(rows))
    (directory / "utils.py").write_text(UTILS)
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {directory / 'questions.json'}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\n"
        "doc_to_target: answer\n"
        "generation_kwargs:\n"
        "  max_new_tokens: 16\n"
        "  until: [\"\\n\"]\n"
        "  do_sample: false\n"
        "process_results: !function utils.process_results\n"
        "metric_list:\n"
        "  - metric: exact_match\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n")
    return directory


def entry_point_dir(directory: Path) -> Path:
    """A dist-info declaring pyproject's `lmms_eval.models` entry points, for a checkout
    that is not pip-installed with them (put the directory on PYTHONPATH)."""
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    info = directory / "sparsevlm_exp_lmms_entry_points-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sparsevlm-exp-lmms-entry-points\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[lmms_eval.models]\n" + "".join(f"{name} = {target}\n" for name, target in table.items()))
    return directory


def offline_env(tmp_path: Path) -> dict:
    return {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
            "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "hf_datasets"), "TOKENIZERS_PARALLELISM": "false"}


def composed(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(config_name="config", overrides=overrides)


def run_ours(overrides: list[str], run_dir: Path) -> tuple[list[str], dict]:
    from sparsevlm_exp.runner import Experiment

    summary = Experiment(composed(overrides), run_dir).run()
    records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert all(r["error"] is None for r in records), records
    return [r["prediction"] for r in sorted(records, key=lambda r: r["index"])], summary


def test_entry_point_names_the_plugin_model():
    """pyproject's entry point loads a manifest whose class is an lmms-eval simple model."""
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelManifest, ModelRegistryV2

    table = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    module, attr = table["sparsevlm_exp"].split(":")
    payload = getattr(__import__(module, fromlist=[attr]), attr)
    registry = ModelRegistryV2()
    for manifest in registry._coerce_payload_to_manifests(payload):
        assert isinstance(manifest, ModelManifest)
        registry.register_manifest(manifest)
    cls = registry.get_model_class("sparsevlm_exp")
    assert issubclass(cls, lmms) and cls.is_simple


@pytest.mark.parametrize("args, key", [
    # lmms-eval's --batch_size arrives as text; a whole number >= 1 runs, the rest is refused
    ({"batch_size": "auto"}, "batch_size='auto' is not allowed: a whole number >= 1"),
    ({"batch_size": "0"}, "batch_size='0'"),
    ({"batch_size": -2}, "batch_size=-2"),
    ({"batch_size": "2.5"}, "batch_size='2.5'"),
    ({"keep": 0}, "keep"),                             # the runner's own checks, same messages
    ({"scorer": "nope"}, "scorer"),
    ({"nonsense_key": 1}, "nonsense_key"),
    # stage mismatches the runner refuses (engine.check_parts); before, accepted here
    ({"scorer": "v15", "layer": -1}, "layer=-1 (the pre-LLM stage) is not allowed with scorer V15Scorer"),
    ({"scorer": "divprune", "layer": 2}, "layer=2 (inside the LLM) is not allowed with scorer DivPruneScorer"),
])
def test_bad_model_args_refused_in_one_line(args, key):
    from sparsevlm_exp.lmms_eval_model import SparseVLMExpLMM

    with pytest.raises(ConfigError) as err:
        SparseVLMExpLMM(pretrained="asset:shapes_vlm", **args)
    assert key in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_batched_generate_until_gives_batch_1_answers_in_request_order():
    """batch_size=4 on the embedded model: 10 requests with different gen_kwargs (their
    own max_new_tokens, none, and `until` strings that cut inside an answer) get exactly
    the answers, kept counts and FLOPs of batch_size=1, returned in request order although
    they are answered in length-sorted batches; records say batch_size and the lengths
    hold per request (a request asking 1 token gets 1 although its batch decodes 16)."""
    from lmms_eval.api.instance import Instance

    from sparsevlm_exp.lmms_eval_model import SparseVLMExpLMM

    shapes = ShapesDataset(size=10)
    docs = [{"image": shapes[i].images[0], "question": shapes[i].question} for i in range(10)]
    gen_kwargs = [{"max_new_tokens": 8, "until": "e"}, {"max_new_tokens": 1},
                  {"max_new_tokens": 3, "until": ["t", "\n"]}, {"max_new_tokens": 16, "until": ["\n"]}, {}]

    def requests():
        return [Instance(request_type="generate_until", idx=0,
                         arguments=("<image>" + doc["question"], gen_kwargs[i % len(gen_kwargs)],
                                    lambda d: [d["image"]], i, "shapes", "test"),
                         metadata={"task": "shapes", "doc_id": i, "repeats": 1})
                for i, doc in enumerate(docs)]

    answers, records = {}, {}
    for size in (1, 4):
        lm = SparseVLMExpLMM.create_from_arg_string("pretrained=asset:shapes_vlm,scorer=v2,keep=0.25,layer=2,threads=1",
                                                    {"batch_size": str(size)})
        assert lm.batch_size == size
        lm.task_dict = {"shapes": {"test": docs}}
        answers[size] = [r.text for r in lm.generate_until(requests())]
        records[size] = {r["doc_id"]: r for r in lm.records}
        order = [r["doc_id"] for r in lm.records]                    # the order they were answered in
    assert order != sorted(order)                                   # batch 4 answered out of request order ...
    assert answers[4] == answers[1]                                 # ... and returned them in it
    assert len(set(answers[1])) > 1
    for i in range(10):
        one, four = records[1][i], records[4][i]
        for key in ("prediction", "kept", "n_visual", "prefill_flops", "new_tokens", "input_tokens"):
            assert one[key] == four[key], (key, i)
        assert one["batch_size"] == 1 and four["batch_size"] in (2, 4)
        asked = gen_kwargs[i % len(gen_kwargs)]
        assert four["new_tokens"] <= asked.get("max_new_tokens", 16)
        if asked.get("max_new_tokens") == 1:
            assert four["new_tokens"] == 1
    # `until` is each request's own: "e" cuts "blue" / "red" (the reference answers) to "blu" / "r"
    cut = [i for i in range(10) if gen_kwargs[i % len(gen_kwargs)].get("until") == "e"]
    assert all("e" not in answers[4][i] for i in cut)
    assert any("e" in shapes[i].answers[0] and shapes[i].answers[0].startswith(answers[4][i]) for i in cut)


def test_signed_numbers_in_model_args_keep_their_meaning():
    """lmms-eval turns --model_args text into Python values with its own rule: "-1" is
    not str.isnumeric(), so it arrives as the float -1.0, which Hydra then keeps as a
    float and the policy refuses ("policy.layer=-1.0 ... an int"). A negative whole
    number must reach our config as the int the user typed (layer=-1 cuts before the
    LLM), while keep=1.0 stays the fraction 1.0 and keep=64 the count 64."""
    from sparsevlm_exp.lmms_eval_model import SparseVLMExpLMM

    lm = SparseVLMExpLMM.create_from_arg_string(
        "pretrained=asset:shapes_vlm,scorer=vision_attn,layer=-1,seed=-3,keep=1.0,threads=1")
    assert lm.cfg.layer == -1 and type(lm.cfg.layer) is int and lm.policy.layer == -1
    assert lm.cfg.seed == -3 and type(lm.cfg.seed) is int
    assert lm.cfg.keep == 1.0 and type(lm.cfg.keep) is float
    assert type(SparseVLMExpLMM.create_from_arg_string("pretrained=asset:shapes_vlm,keep=64").cfg.keep) is int


def test_model_args_may_name_keys_an_experiment_adds():
    """+experiment=paper_table1 adds the key `row`; naming it in model_args is valid (as
    on our command line), so the unknown-key check must look at the tree with it."""
    from sparsevlm_exp.lmms_eval_model import compose_config

    cfg = compose_config({"pretrained": "asset:shapes_vlm", "+experiment": "paper_table1", "row": "fastv_64"})
    assert cfg.row == "fastv_64"
    with pytest.raises(ConfigError, match="close keys: row"):
        compose_config({"pretrained": "asset:shapes_vlm", "+experiment": "paper_table1", "rwo": "fastv_64"})


@pytest.mark.parametrize("arg, wanted", [
    # an unknown key names the value and the close keys (Hydra's first line named neither)
    ("kepp=0.25", ["kepp=0.25", "keep"]),
    ("scorer=v2,scorer.head_fractoin=0.25", ["scorer.head_fractoin=0.25", "scorer.head_fraction"]),
    # an unknown group choice lists the choices (Hydra's first line did not)
    ("scorer=v3", ["scorer='v3'", "v15", "vispruner", "visionzip"]),
    ("policy=fixd", ["policy='fixd'", "fixed", "schedule"]),
])
def test_unknown_model_arg_names_what_is_allowed(arg, wanted):
    """A mistyped model_arg key or group choice: one line naming key, value and what is
    allowed, before any weights load (the rule of our CLI's errors)."""
    from sparsevlm_exp.lmms_eval_model import SparseVLMExpLMM

    with pytest.raises(ConfigError) as err:
        SparseVLMExpLMM.create_from_arg_string(f"pretrained=asset:shapes_vlm,{arg}")
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in wanted), message


def test_second_run_into_the_same_output_path_keeps_the_first_runs_records(tmp_path, monkeypatch):
    """lmms-eval keeps every run's results under one --output_path (timestamped files);
    our per-sample efficiency records must not be overwritten by the next run either
    (e.g. keep=0.5 then keep=0.25), and each record says which model_args made it."""
    from sparsevlm_exp import lmms_eval_model
    from sparsevlm_exp.lmms_eval_model import SparseVLMExpLMM

    monkeypatch.setattr(lmms_eval_model, "_lmms_output_dir", lambda: tmp_path)
    for keep in ("0.5", "0.25"):
        lm = SparseVLMExpLMM.create_from_arg_string(f"pretrained=asset:shapes_vlm,keep={keep},threads=1")
        lm._log({"doc_id": 0, "model_args": lm.model_args})
    files = sorted(tmp_path.glob("sparsevlm_exp_efficiency_*.jsonl"))
    kept = sorted(json.loads(f.read_text())["model_args"]["keep"] for f in files)
    assert kept == ["0.25", "0.5"], files


def test_unknown_task_one_line_with_close_names(tmp_path, monkeypatch):
    """A typo in the task name: one line naming close tasks, raised while the run is
    set up (Experiment's constructor), before the model's weights load."""
    from sparsevlm_exp.runner import Experiment

    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    task_dir = write_shapes_task(tmp_path / "task", 2)
    cfg = composed(RUN + ["dataset=lmms_eval", "dataset.task=shapes_lmmz", f"dataset.include_path={task_dir}"])
    with pytest.raises(ConfigError) as err:
        Experiment(cfg, tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and "'shapes_lmmz'" in message and TASK in message.split("close names:")[1]


@pytest.mark.slow
def test_one_answer_our_runner_dataset_path_and_lmms_eval_cli(tmp_path, monkeypatch):
    """Same samples, model and components: our runner with our shapes loader, our runner
    with dataset=lmms_eval, and lmms-eval's CLI with --model sparsevlm_exp give the same
    predictions and the same score; the plugin records kept tokens, prefill ms, FLOPs."""
    env = offline_env(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    task_dir = write_shapes_task(tmp_path / "task", N_SAMPLES)

    # lmms-eval's own loop in a subprocess (its CLI is what users run); started first,
    # it reads the task while this process runs the two in-process paths.
    out = tmp_path / "lmms_out"
    plugin_path = entry_point_dir(tmp_path / "entry_points")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "sparsevlm_exp",
           "--model_args", "pretrained=asset:shapes_vlm,scorer=v2,keep=0.25,layer=2,threads=1",
           "--tasks", TASK, "--include_path", str(task_dir), "--output_path", str(out), "--log_samples"]
    sub_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(REPO), str(plugin_path)])}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=sub_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)

    ours, ours_summary = run_ours(RUN + ["dataset=shapes", f"dataset.size={N_SAMPLES}"], tmp_path / "ours")
    via_task, task_summary = run_ours(RUN + ["dataset=lmms_eval", f"dataset.task={TASK}",
                                             f"dataset.include_path={task_dir}"], tmp_path / "task_run")

    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    samples = [json.loads(line) for line in open(glob.glob(str(out / "*" / f"*_samples_{TASK}.jsonl"))[0])]
    via_cli = [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
    results = json.loads(Path(glob.glob(str(out / "*" / "*_results.json"))[0]).read_text())
    cli_score = results["results"][TASK]["exact_match,none"]

    assert via_task == ours, (via_task, ours)
    assert via_cli == ours, (via_cli, ours)
    assert task_summary["accuracy"] == task_summary["exact_match"] == ours_summary["accuracy"]
    assert cli_score == ours_summary["accuracy"]
    assert task_summary["headline"]["key"] == "exact_match"
    # per-sample efficiency records beside lmms-eval's output, the pruning visible in them
    (efficiency_file,) = out.glob("sparsevlm_exp_efficiency_*.jsonl")
    efficiency = [json.loads(line) for line in efficiency_file.read_text().splitlines()]
    assert [r["prediction"] for r in sorted(efficiency, key=lambda r: r["doc_id"])] == ours
    ours_records = [json.loads(line) for line in (tmp_path / "ours" / "samples.jsonl").read_text().splitlines()]
    for mine, theirs in zip(sorted(efficiency, key=lambda r: r["doc_id"]), ours_records):
        assert mine["kept"] == theirs["kept"] == [64]            # 256 visual tokens x 0.25
        assert mine["prefill_flops"] == theirs["prefill_flops"] > 0
        assert mine["prefill_ms"] > 0


YESNO_UTILS = '''
def doc_to_visual(doc):
    return [doc["image"]]          # a path: the dataset opens it


def doc_to_text(doc):
    return "<image>" + doc["question"]


def process_results(doc, results):
    item = {"score": float(results[0].lower() == doc["answer"]), "prediction": results[0].lower()}
    return {"yn_accuracy": item, "yn_yes_ratio": item}


def accuracy(items):
    return sum(i["score"] for i in items) / len(items)


def yes_ratio(items):
    return sum(i["prediction"] == "yes" for i in items) / len(items)
'''


def test_task_scoring_is_lmms_evals(tmp_path, monkeypatch):
    """POPE-style scoring: dict items per sample, the task's own aggregation functions,
    generation cut at `until`; 'accuracy' is the mean per-sample score and the headline
    is the task's first metric. Hand-worked numbers."""
    from PIL import Image

    from sparsevlm_exp.data.lmms_eval import LmmsEvalDataset

    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    task_dir = tmp_path / "yesno"
    task_dir.mkdir()
    Image.new("RGB", (32, 32), "red").save(task_dir / "red.png")
    rows = [{"question": f"Is it red {i}?", "answer": a, "image": str(task_dir / "red.png")}
            for i, a in enumerate(["yes", "no", "yes", "no"])]
    (task_dir / "q.json").write_text(json.dumps(rows))
    (task_dir / "utils.py").write_text(YESNO_UTILS)
    (task_dir / "yesno.yaml").write_text(
        "task: yesno\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {task_dir / 'q.json'}\n"
        "test_split: test\noutput_type: generate_until\n"
        "doc_to_visual: !function utils.doc_to_visual\ndoc_to_text: !function utils.doc_to_text\n"
        "doc_to_target: answer\ngeneration_kwargs:\n  max_new_tokens: 8\n  until: [\".\"]\n"
        "process_results: !function utils.process_results\nmetric_list:\n"
        "  - metric: yn_accuracy\n    aggregation: !function utils.accuracy\n    higher_is_better: true\n"
        "  - metric: yn_yes_ratio\n    aggregation: !function utils.yes_ratio\n    higher_is_better: false\n")

    data = LmmsEvalDataset(task="yesno", include_path=str(task_dir))
    sample = data[2]
    assert sample.question == "Is it red 2?" and sample.answers == ["yes"] and sample.id == "yesno/2"
    assert sample.images[0].size == (32, 32) and sample.images[0].getpixel((0, 0)) == (255, 0, 0)
    predictions = ["Yes. It is red.", "no", "No", "maybe"]      # "Yes. It is red." is cut at "." -> "Yes"
    scores = [data.metric.score(p, data[i]) for i, p in enumerate(predictions)]
    assert scores == [1.0, 1.0, 0.0, 0.0]
    summary = data.metric.summarize([{"prediction": p, "meta": {"doc_id": i}} for i, p in enumerate(predictions)])
    assert summary["accuracy"] == summary["yn_accuracy"] == 0.5
    assert summary["yn_yes_ratio"] == 0.25
    assert data.metric.headline[0] == "yn_accuracy"


def write_length_task(directory: Path, n: int, max_new_tokens: int | None) -> Path:
    """The shapes task of write_shapes_task, its generation_kwargs asking max_new_tokens
    (or naming no length when None)."""
    write_shapes_task(directory, n)
    yaml = directory / f"{TASK}.yaml"
    length = "" if max_new_tokens is None else f"  max_new_tokens: {max_new_tokens}\n"
    yaml.write_text(yaml.read_text().replace("  max_new_tokens: 16\n", length))
    return directory


def test_generation_length_comes_from_the_task(tmp_path, monkeypatch):
    """dataset=lmms_eval: each sample carries its task's generation_kwargs.max_new_tokens
    (meta), dataset.max_new_tokens overrides it, a task naming none leaves the decoder's."""
    from sparsevlm_exp.contracts import MAX_NEW_TOKENS
    from sparsevlm_exp.data.lmms_eval import LmmsEvalDataset

    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    asks_3 = write_length_task(tmp_path / "three", 2, 3)
    assert LmmsEvalDataset(task=TASK, include_path=str(asks_3))[1].meta[MAX_NEW_TOKENS] == 3
    assert LmmsEvalDataset(task=TASK, include_path=str(asks_3), max_new_tokens=5)[0].meta[MAX_NEW_TOKENS] == 5
    silent = write_length_task(tmp_path / "none", 2, None)
    assert MAX_NEW_TOKENS not in LmmsEvalDataset(task=TASK, include_path=str(silent))[0].meta
    with pytest.raises(ConfigError, match=r"dataset.max_new_tokens=0 is not allowed: a whole number >= 1"):
        LmmsEvalDataset(task=TASK, include_path=str(asks_3), max_new_tokens=0)


@pytest.mark.slow
def test_runner_generates_the_tasks_length(tmp_path, monkeypatch):
    """The runner decodes each sample with its task's length, not decoder.max_new_tokens:
    a task asking 1 token gives exactly what our shapes loader gives with
    decoder.max_new_tokens=1, while the global setting stays 16 (with 16 every answer
    would carry at least its EOS as a second token)."""
    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    n = 2
    task_dir = write_length_task(tmp_path / "task", n, 1)
    via_task, _ = run_ours(RUN + ["dataset=lmms_eval", f"dataset.task={TASK}", f"dataset.include_path={task_dir}",
                                  "decoder.max_new_tokens=16"], tmp_path / "task_run")
    one_token, _ = run_ours(RUN + ["dataset=shapes", f"dataset.size={n}", "decoder.max_new_tokens=1"],
                            tmp_path / "ours_1")
    records = [json.loads(line) for line in (tmp_path / "task_run" / "samples.jsonl").read_text().splitlines()]
    assert [r["new_tokens"] for r in records] == [1] * n
    assert via_task == one_token
