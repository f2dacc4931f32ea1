"""Benchmark datasets on tiny local copies written in each release's parquet layout."""
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from sparsevlm_exp.data import benchmarks
from sparsevlm_exp.contracts import Sample
from sparsevlm_exp.errors import ConfigError
from sparsevlm_exp.metrics import ExactMatch, GQAAccuracy, MMEMetric, MultipleChoice, PopeMetric, VQAAccuracy

CONF = Path(__file__).resolve().parents[1] / "conf"
VQA_PROMPT = "\nAnswer the question using a single word or phrase."
MC_PROMPT = "\nAnswer with the option's letter from the given choices directly."

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])   # the HF Image feature


def png(color, size=(4, 3)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def image_cell(color, size=(4, 3)):
    return {"bytes": png(color, size), "path": None}


def write_parquet(path: Path, columns: dict, types: dict | None = None, row_group_size=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    types = types or {}
    arrays = {name: pa.array(values, type=types.get(name)) for name, values in columns.items()}
    pq.write_table(pa.table(arrays), path, row_group_size=row_group_size)


def config_error_of(exc: BaseException) -> ConfigError:
    """hydra.utils.instantiate wraps what a constructor raises in an
    InstantiationException; the ConfigError is its cause."""
    while exc is not None and not isinstance(exc, ConfigError):
        exc = exc.__cause__
    assert exc is not None, "no ConfigError in the exception chain"
    return exc


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """The arrow copies HF datasets writes go to the test's tmp dir, not ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def from_yaml(name: str, **overrides):
    cfg = OmegaConf.load(CONF / "dataset" / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return instantiate(cfg)


# --------------------------------------------------------------------------- #
# fixtures in each release's layout
# --------------------------------------------------------------------------- #

@pytest.fixture
def textvqa_dir(tmp_path):
    root = tmp_path / "textvqa"
    # two files, the first with two row groups: exercises the row -> (file, group) map
    write_parquet(root / "data" / "validation-00000-of-00002.parquet", {
        "image_id": ["i0", "i1", "i2"],
        "question_id": [10, 11, 12],
        "question": ["what brand is this?", "what number is shown?", "what color?"],
        "answers": [["nike"] * 10, ["2"] * 2 + ["3"] * 8, ["red"] * 10],
        "image": [image_cell("red"), image_cell("green"), image_cell("blue", (5, 5))],
        "ocr_tokens": [["NIKE", "just"], [], ["x"]],
    }, {"image": IMAGE_TYPE}, row_group_size=2)
    write_parquet(root / "data" / "validation-00001-of-00002.parquet", {
        "image_id": ["i3"], "question_id": [13], "question": ["what time?"],
        "answers": [["noon"] * 10], "image": [image_cell("white", (2, 7))], "ocr_tokens": [[]],
    }, {"image": IMAGE_TYPE})
    write_parquet(root / "data" / "train-00000-of-00001.parquet", {
        "image_id": ["t"], "question_id": [1], "question": ["train?"],
        "answers": [["x"] * 10], "image": [image_cell("black")], "ocr_tokens": [[]],
    }, {"image": IMAGE_TYPE})
    return root


@pytest.fixture
def gqa_dir(tmp_path):
    root = tmp_path / "gqa"
    write_parquet(root / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet", {
        "id": ["201", "202", "203"],
        "imageId": ["n1", "n2", "n1"],
        "question": ["Is the sky blue?", "What is on the table?", "Which side is the cup on?"],
        "answer": ["yes", "cup", "left"],
        "fullAnswer": ["Yes, the sky is blue.", "The cup is on the table.", "The cup is on the left."],
        "isBalanced": [True, True, True],
        "types": [{"structural": "verify", "semantic": "attr", "detailed": "x"}] * 3,
    })
    write_parquet(root / "testdev_balanced_images" / "testdev-00000-of-00001.parquet", {
        "id": ["n2", "n1"], "image": [image_cell("green", (6, 2)), image_cell("blue", (3, 3))],
    }, {"image": IMAGE_TYPE})
    return root


@pytest.fixture
def pope_dir(tmp_path):
    root = tmp_path / "pope"
    write_parquet(root / "data" / "test-00000-of-00001.parquet", {
        "id": ["0", "1", "2", "3"],
        "question_id": ["1", "2", "1", "2"],
        "question": ["Is there a dog in the image?", "Is there a cat in the image?",
                     "Is there a car in the image?", "Is there a bus in the image?"],
        "answer": ["yes", "no", "Yes", "no"],
        "image_source": ["COCO_1", "COCO_1", "COCO_2", "COCO_2"],
        "image": [image_cell("red")] * 4,
        "category": ["adversarial", "adversarial", "random", "random"],
    }, {"image": IMAGE_TYPE})
    return root


@pytest.fixture
def mme_dir(tmp_path):
    root = tmp_path / "mme"
    write_parquet(root / "data" / "test-00000-of-00001.parquet", {
        "question_id": ["existence/1.jpg", "existence/1.jpg", "code_reasoning/2.png", "code_reasoning/2.png"],
        "image": [image_cell("red")] * 2 + [image_cell("white")] * 2,
        "question": ["Is there a dog in this image? Please answer yes or no.",
                     "Is there a cat in this image? Please answer yes or no.",
                     "Will the code print 3? Please answer yes or no.",
                     "Will the code print 4? Please answer yes or no."],
        "answer": ["Yes", "No", "Yes", "No"],
        "category": ["existence", "existence", "code_reasoning", "code_reasoning"],
    }, {"image": IMAGE_TYPE})
    return root


@pytest.fixture
def scienceqa_dir(tmp_path):
    root = tmp_path / "scienceqa"
    write_parquet(root / "ScienceQA-IMG" / "test-00000-of-00001.parquet", {
        "image": [image_cell("red"), image_cell("blue")],
        "question": ["Which animal is shown?", "Which is a solid?"],
        "choices": [["dog", "cat", "bird"], ["water", "rock"]],
        "answer": [1, 1],
        "hint": ["The picture shows a pet.", ""],
        "task": ["closed choice"] * 2, "grade": ["grade2", "grade3"],
        "subject": ["natural science"] * 2, "topic": ["biology", "physics"],
        "category": ["Animals", "States of matter"], "skill": ["x", "y"],
        "lecture": ["", ""], "solution": ["", ""],
    }, {"image": IMAGE_TYPE, "answer": pa.int8()})
    return root


@pytest.fixture
def mmbench_dir(tmp_path):
    root = tmp_path / "mmbench"
    write_parquet(root / "en" / "dev-00000-of-00001.parquet", {
        "index": ["241", "1000241"],
        "question": ["What is the main color?", "What is the main color?"],
        "hint": [None, "Look closely."],
        "answer": ["A", "C"],
        "A": ["red", "green"], "B": ["green", "blue"], "C": ["blue", "red"], "D": ["nan", None],
        "category": ["attribute_recognition"] * 2, "image": [image_cell("red")] * 2,
        "source": ["s"] * 2, "L2-category": ["attribute"] * 2, "comment": [None, None],
        "split": ["dev"] * 2,
    }, {"image": IMAGE_TYPE})
    return root


# --------------------------------------------------------------------------- #
# TextVQA
# --------------------------------------------------------------------------- #

def test_textvqa_reads_layout_and_decodes_lazily(textvqa_dir, monkeypatch):
    decoded = []
    real_decode = benchmarks.decode_image
    monkeypatch.setattr(benchmarks, "decode_image", lambda cell, root: decoded.append(1) or real_decode(cell, root))
    ds = benchmarks.TextVQA(path=str(textvqa_dir))
    assert len(ds) == 4                       # the validation files only, not train
    assert decoded == []                      # nothing decoded by the constructor
    ds[1]
    assert len(decoded) == 1                  # one sample: its image only
    assert isinstance(ds.metric, VQAAccuracy)
    samples = list(ds)
    assert [s.id for s in samples] == ["10", "11", "12", "13"]
    first = samples[0]
    assert isinstance(first, Sample)
    assert first.question == "What brand is this?" + VQA_PROMPT
    assert len(first.answers) == 10
    assert first.images[0].size == (4, 3) and first.images[0].mode == "RGB"
    assert first.images[0].getpixel((0, 0)) == (255, 0, 0)
    assert samples[2].images[0].size == (5, 5)      # second row group
    assert samples[3].images[0].size == (2, 7)      # second file
    assert ds.metric.score("Two", samples[1]) == pytest.approx(0.6)


def test_textvqa_ocr_tokens(textvqa_dir):
    ds = benchmarks.TextVQA(path=str(textvqa_dir), ocr_tokens=True)
    assert ds[0].question == "What brand is this?\nReference OCR token: NIKE, just" + VQA_PROMPT
    assert ds[1].question == "What number is shown?" + VQA_PROMPT      # no tokens, no line


def test_textvqa_from_yaml_and_compose(textvqa_dir):
    ds = from_yaml("textvqa", path=str(textvqa_dir))
    assert isinstance(ds, benchmarks.TextVQA) and isinstance(ds.metric, VQAAccuracy)
    assert len(ds) == 4 and ds[0].question.endswith(VQA_PROMPT)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(overrides=["+dataset=textvqa", f"dataset.path={textvqa_dir}", "dataset.split=train"])
    ds = instantiate(cfg.dataset)
    assert [s.id for s in ds] == ["1"]


def test_textvqa_ocr_option_is_llava_official_prompt(textvqa_dir):
    # LLaVA-1.5's TextVQA evaluation file (which SparseVLM's paper numbers use) reads
    # "<Question>\nReference OCR token: <tok>, <tok>\nAnswer the question using a single word or phrase."
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(overrides=["+dataset=textvqa_ocr", f"dataset.path={textvqa_dir}"])
    ds = instantiate(cfg.dataset)
    assert ds[0].question == ("What brand is this?\nReference OCR token: NIKE, just\n"
                              "Answer the question using a single word or phrase.")
    assert isinstance(ds.metric, VQAAccuracy)


# --------------------------------------------------------------------------- #
# the errors
# --------------------------------------------------------------------------- #

def test_missing_path_is_one_config_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as info:
        benchmarks.TextVQA(path=str(missing))
    message = str(info.value)
    assert "dataset.path" in message and str(missing) in message and "\n" not in message
    with pytest.raises(Exception) as info:
        from_yaml("pope", path=str(missing))
    assert str(config_error_of(info.value)).startswith(f"dataset.path='{missing}' does not exist")


def test_missing_files_and_columns(tmp_path, textvqa_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"dataset.path=.*no parquet files.*data/validation-\*.parquet"):
        benchmarks.TextVQA(path=str(empty))
    with pytest.raises(ConfigError, match="dataset.split='nosuch'"):
        benchmarks.TextVQA(path=str(textvqa_dir), split="nosuch")
    write_parquet(tmp_path / "bad" / "data" / "test-0.parquet", {"question": ["q"], "image": [png("red")]})
    with pytest.raises(ConfigError, match=r"lacks the columns \['question_id', 'answers'\]"):
        benchmarks.TextVQA(path=str(tmp_path / "bad"), split="test")
    with pytest.raises(ConfigError, match="dataset.path"):
        benchmarks.MME(path=str(empty))


def test_hub_id_downloads_only_the_split(monkeypatch, textvqa_dir):
    import huggingface_hub
    calls = []

    def fake_snapshot_download(repo_id, repo_type, allow_patterns):
        calls.append((repo_id, repo_type, allow_patterns))
        return str(textvqa_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ds = benchmarks.TextVQA(path="lmms-lab/textvqa")
    assert len(ds) == 4
    assert calls[0][:2] == ("lmms-lab/textvqa", "dataset")
    assert "data/validation-*.parquet" in calls[0][2]


def test_hub_id_offline_is_one_config_error(monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore text")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConfigError) as info:
        benchmarks.POPE(path="lmms-lab/POPE")
    message = str(info.value)
    assert "dataset.path='lmms-lab/POPE'" in message and "dataset.path=/local/dir" in message
    assert "\n" not in message


# --------------------------------------------------------------------------- #
# GQA, POPE, MME, ScienceQA, MMBench
# --------------------------------------------------------------------------- #

def test_gqa_joins_images(gqa_dir):
    ds = from_yaml("gqa", path=str(gqa_dir))
    assert isinstance(ds, benchmarks.GQA)
    assert isinstance(ds.metric, ExactMatch) and ds.metric.normalizer == "gqa"
    # one source of truth: GQA built in Python scores as dataset=gqa does
    built = benchmarks.GQA(path=str(gqa_dir))
    assert type(built.metric) is type(ds.metric) is GQAAccuracy
    assert built.metric.score("The table", ds[0]) == ds.metric.score("The table", ds[0]) == 0.0
    samples = list(ds)
    assert [s.id for s in samples] == ["201", "202", "203"]
    assert samples[0].question == "Is the sky blue?" + VQA_PROMPT
    assert samples[0].answers == ["yes"]
    assert samples[0].images[0].size == (3, 3)       # n1
    assert samples[1].images[0].size == (6, 2)       # n2
    assert samples[2].images[0].size == (3, 3)
    assert samples[0].meta["structural"] == "verify"
    assert ds.metric.score("Yes.", samples[0]) == 1.0


def test_gqa_missing_image_table(gqa_dir):
    import shutil
    shutil.rmtree(gqa_dir / "testdev_balanced_images")
    with pytest.raises(ConfigError, match="testdev_balanced_images"):
        benchmarks.GQA(path=str(gqa_dir))


def test_pope(pope_dir):
    ds = from_yaml("pope", path=str(pope_dir))
    assert isinstance(ds.metric, PopeMetric)
    samples = list(ds)
    assert len(samples) == 4 and len({s.id for s in samples}) == 4
    assert samples[0].question == "Is there a dog in the image?" + VQA_PROMPT
    assert samples[2].answers == ["yes"]                 # "Yes" lower-cased
    assert samples[3].meta["category"] == "random"
    only = from_yaml("pope", path=str(pope_dir), categories=["adversarial"])
    assert [s.meta["category"] for s in only] == ["adversarial", "adversarial"]
    with pytest.raises(ConfigError, match="dataset.categories"):
        benchmarks.POPE(path=str(pope_dir), categories=["popular"])
    records = []
    for s, pred in zip(samples, ["Yes", "No", "No", "No"]):
        records.append({"prediction": pred, "answers": s.answers, "score": ds.metric.score(pred, s), "meta": s.meta})
    out = ds.metric.summarize(records)
    assert out["accuracy"] == 0.75 and out["adversarial/f1"] == 1.0


def test_mme(mme_dir):
    ds = from_yaml("mme", path=str(mme_dir))
    assert isinstance(ds.metric, MMEMetric)
    samples = list(ds)
    assert [s.id for s in samples] == ["existence/1.jpg#0", "existence/1.jpg#1",
                                       "code_reasoning/2.png#0", "code_reasoning/2.png#1"]
    assert samples[0].question == "Is there a dog in this image?" + VQA_PROMPT
    assert samples[1].answers == ["no"]
    assert samples[2].meta == {"category": "code_reasoning", "question_id": "code_reasoning/2.png",
                               "task": "cognition"}
    kept = benchmarks.MME(path=str(mme_dir), prompt="")
    assert kept[0].question == "Is there a dog in this image? Please answer yes or no."
    records = []
    for s, pred in zip(samples, ["Yes", "No", "Yes", "Yes"]):
        records.append({"prediction": pred, "answers": s.answers, "score": ds.metric.score(pred, s), "meta": s.meta})
    out = ds.metric.summarize(records)
    assert out["existence/score"] == 200.0              # acc 1, acc+ 1
    assert out["code_reasoning/score"] == 50.0          # acc 1/2, acc+ 0
    assert out["perception"] == 200.0 and out["cognition"] == 50.0


def test_scienceqa(scienceqa_dir):
    ds = from_yaml("scienceqa", path=str(scienceqa_dir))
    assert isinstance(ds.metric, MultipleChoice)
    first, second = list(ds)
    assert first.question == ("Context: The picture shows a pet.\nWhich animal is shown?\n"
                              "A. dog\nB. cat\nC. bird" + MC_PROMPT)
    assert first.answers == ["B"] and first.meta["options"] == ["dog", "cat", "bird"]
    assert second.question == "Which is a solid?\nA. water\nB. rock" + MC_PROMPT     # empty hint: no context
    assert first.images[0].getpixel((0, 0)) == (255, 0, 0)
    assert ds.metric.score("B", first) == 1.0
    assert ds.metric.score("The answer is C", first) == 0.0


def test_mmbench(mmbench_dir):
    ds = from_yaml("mmbench", path=str(mmbench_dir))
    first, second = list(ds)
    assert first.id == "241"
    assert first.question == "What is the main color?\nA. red\nB. green\nC. blue" + MC_PROMPT
    assert first.meta["options"] == ["red", "green", "blue"]        # 'nan' D dropped
    assert second.question == ("Look closely.\nWhat is the main color?\nA. green\nB. blue\nC. red"
                               + MC_PROMPT)
    assert ds.metric.score("C. red", second) == 1.0
    assert ds.metric.score("red", second) == 1.0                    # option text


# --------------------------------------------------------------------------- #
# folder
# --------------------------------------------------------------------------- #

@pytest.fixture
def folder_dir(tmp_path):
    root = tmp_path / "mine"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (4, 4), "red").save(root / "img" / "a.png")
    Image.new("RGB", (2, 2), "blue").save(root / "b.png")
    lines = [
        {"id": "q1", "image": "img/a.png", "question": "What color?", "answers": ["red"]},
        {"id": "q2", "image": ["img/a.png", "b.png"], "question": "Same color?", "answers": "no",
         "kind": "compare"},
    ]
    (root / "questions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root


def test_folder(folder_dir):
    ds = from_yaml("folder", path=str(folder_dir))
    assert isinstance(ds, benchmarks.FolderDataset) and isinstance(ds.metric, ExactMatch)
    first, second = list(ds)
    assert first.id == "q1" and first.question == "What color?" + VQA_PROMPT
    assert first.images[0].size == (4, 4)
    assert [im.size for im in second.images] == [(4, 4), (2, 2)]
    assert second.answers == ["no"] and second.meta == {"kind": "compare"}
    assert ds.metric.score("Red.", first) == 1.0


def test_folder_errors(tmp_path, folder_dir):
    with pytest.raises(Exception) as info:
        from_yaml("folder")                                   # the yaml's default path
    assert "dataset.path=None is not set" in str(config_error_of(info.value))
    with pytest.raises(ConfigError, match="does not exist"):
        benchmarks.FolderDataset(path=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="has no questions.jsonl"):
        benchmarks.FolderDataset(path=str(tmp_path))
    with open(folder_dir / "questions.jsonl", "a") as f:
        f.write(json.dumps({"id": "q3", "image": "gone.png", "question": "?"}) + "\n")
    with pytest.raises(ConfigError, match=r"questions.jsonl:3 names the image 'gone.png'"):
        benchmarks.FolderDataset(path=str(folder_dir))
    (folder_dir / "questions.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match=r"questions.jsonl:1 is not valid JSON"):
        benchmarks.FolderDataset(path=str(folder_dir))


def test_every_yaml_names_every_constructor_kwarg():
    import inspect
    classes = {"textvqa": benchmarks.TextVQA, "gqa": benchmarks.GQA, "pope": benchmarks.POPE,
               "mme": benchmarks.MME, "scienceqa": benchmarks.ScienceQA, "mmbench": benchmarks.MMBench,
               "folder": benchmarks.FolderDataset}
    for name, cls in classes.items():
        cfg = OmegaConf.load(CONF / "dataset" / f"{name}.yaml")
        assert cfg._target_ == f"{cls.__module__}.{cls.__qualname__}"
        kwargs = set(inspect.signature(cls.__init__).parameters) - {"self"}
        assert kwargs == set(cfg.keys()) - {"_target_"}, name


@pytest.mark.parametrize("line, expected", [
    ({"id": "q3", "image": "b.png", "question": "?"}, r"questions.jsonl:3 has answers=None: expected a string or"),
    ({"id": "q3", "image": "b.png", "question": "?", "answers": []}, r"questions.jsonl:3 has answers=\[\]"),
    ({"id": "q3", "image": "b.png", "question": "?", "answers": 2}, r"questions.jsonl:3 has answers=2: expected"),
    ({"id": "q3", "image": "b.png", "question": "?", "answers": [2]}, r"questions.jsonl:3 has answers=\[2\]"),
    ({"id": "q3", "image": "b.png", "question": None, "answers": ["x"]},
     r"questions.jsonl:3 has question=None: expected a non-empty string"),
    ({"id": "q1", "image": "b.png", "question": "?", "answers": ["x"]},
     r"questions.jsonl:3 repeats the id 'q1' of line 1: every id must be unique"),
])
def test_folder_bad_lines_name_file_and_line(folder_dir, line, expected):
    with open(folder_dir / "questions.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    with pytest.raises(ConfigError, match=expected) as info:
        benchmarks.FolderDataset(path=str(folder_dir))
    assert "\n" not in str(info.value)


def test_folder_empty_questions_file_is_refused(folder_dir):
    (folder_dir / "questions.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="questions.jsonl holds no questions"):
        benchmarks.FolderDataset(path=str(folder_dir))


def test_folder_names_a_sample_without_decoding_it(folder_dir):
    (folder_dir / "img" / "a.png").write_bytes(b"not a png")        # corrupt: __getitem__ would fail
    ds = benchmarks.FolderDataset(path=str(folder_dir))
    assert ds.sample_id(1) == "q2"


# --------------------------------------------------------------------------- #
# the HF datasets reader gives exactly the samples the hand-written reader gave
# --------------------------------------------------------------------------- #

class HandRows:
    """The pre-`datasets` reader (pyarrow by hand), kept here as the oracle: text columns
    with pyarrow's to_pylist, image cells by row, file after file."""

    def __init__(self, files, text_columns, image_column):
        self.rows, self.cells = [], []
        for file in files:
            table = pq.read_table(file)
            present = [c for c in text_columns if c in table.column_names]
            self.rows.extend(table.select(present).to_pylist())
            if image_column:
                self.cells.extend(table.column(image_column).to_pylist())

    def __len__(self):
        return len(self.rows)

    def image_cell(self, i):
        return self.cells[i]


def hand_decode(cell, root):
    """The pre-`datasets` decoder: PIL on the bytes (or root-relative path), then RGB."""
    if isinstance(cell, dict):
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, bytes):
        return Image.open(io.BytesIO(cell)).convert("RGB")
    return Image.open(Path(root) / cell).convert("RGB")


def as_plain(sample: Sample) -> dict:
    """Everything a Sample carries, images as (mode, size, pixel bytes)."""
    return {"id": sample.id, "question": sample.question, "answers": sample.answers, "meta": sample.meta,
            "evidence": sample.evidence,
            "images": [(im.mode, im.size, im.tobytes()) for im in sample.images]}


def samples_both_ways(monkeypatch, build):
    new = [as_plain(s) for s in build()]
    with monkeypatch.context() as m:
        m.setattr(benchmarks, "ParquetRows", HandRows)
        m.setattr(benchmarks, "decode_image", hand_decode)
        old = [as_plain(s) for s in build()]
    return new, old


@pytest.mark.parametrize("name, cls, kwargs", [
    ("textvqa", benchmarks.TextVQA, {"ocr_tokens": True}),
    ("gqa", benchmarks.GQA, {}),
    ("pope", benchmarks.POPE, {}),
    ("mme", benchmarks.MME, {}),
    ("scienceqa", benchmarks.ScienceQA, {}),
    ("mmbench", benchmarks.MMBench, {}),
])
def test_datasets_reader_yields_the_hand_readers_samples(request, monkeypatch, name, cls, kwargs):
    root = request.getfixturevalue(f"{name}_dir")
    new, old = samples_both_ways(monkeypatch, lambda: list(cls(path=str(root), **kwargs)))
    assert len(new) == len(old) > 0
    assert new == old


def test_every_image_cell_form_reads_as_before(tmp_path, monkeypatch):
    """The cell forms a parquet image column comes in: the HF Image feature written by
    `datasets` itself (schema metadata), a bare {bytes, path} struct, raw bytes, and a
    path relative to the dataset directory; modes L / P / RGBA become RGB as before."""
    import datasets

    colors = [Image.new("L", (3, 2), 90), Image.new("P", (2, 5), 3), Image.new("RGBA", (4, 4), (1, 2, 3, 4))]
    encoded = []
    for k, im in enumerate(colors):
        buffer = io.BytesIO()
        im.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
        im.save(tmp_path / f"img{k}.png")
    text = {"id": ["0", "1", "2"], "question_id": ["1", "2", "3"], "question": ["Is it?"] * 3,
            "answer": ["yes", "no", "yes"], "category": ["random"] * 3}
    forms = {
        "feature": None,
        "struct": ([{"bytes": b, "path": None} for b in encoded], IMAGE_TYPE),
        "bytes": (encoded, pa.binary()),
        "path": ([f"img{k}.png" for k in range(3)], pa.string()),
    }
    for form, column in forms.items():
        root = tmp_path / form
        file = root / "data" / "test-00000-of-00001.parquet"
        if column is None:     # written by datasets: the Image feature in the schema metadata
            file.parent.mkdir(parents=True)
            features = datasets.Features({**{k: datasets.Value("string") for k in text}, "image": datasets.Image()})
            datasets.Dataset.from_dict({**text, "image": [{"bytes": b, "path": None} for b in encoded]},
                                       features=features).to_parquet(str(file))
        else:
            write_parquet(file, {**text, "image": column[0]}, {"image": column[1]})
        if form == "path":
            for k in range(3):
                (root / f"img{k}.png").write_bytes((tmp_path / f"img{k}.png").read_bytes())
        new, old = samples_both_ways(monkeypatch, lambda: list(benchmarks.POPE(path=str(root))))
        assert new == old, form
        assert [im[:2] for im in (s["images"][0] for s in new)] == [("RGB", (3, 2)), ("RGB", (2, 5)),
                                                                    ("RGB", (4, 4))], form


def test_images_decode_as_hf_datasets_does_exif_orientation(tmp_path):
    """The one intended change: an image with an EXIF orientation is turned upright, as
    the `datasets.Image` feature (and so lmms-eval) decodes it; PIL alone does not."""
    import datasets

    image = Image.new("RGB", (6, 2), "red")
    exif = image.getexif()
    exif[0x0112] = 6                                  # Orientation: rotate 90 CW to view
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    data = buffer.getvalue()
    root = tmp_path / "pope"
    write_parquet(root / "data" / "test-0.parquet", {
        "id": ["0"], "question_id": ["1"], "question": ["Is it?"], "answer": ["yes"], "category": ["random"],
        "image": [{"bytes": data, "path": None}]}, {"image": IMAGE_TYPE})
    ours = benchmarks.POPE(path=str(root))[0].images[0]
    theirs = datasets.Image().decode_example({"bytes": data, "path": None}).convert("RGB")
    assert ours.size == theirs.size == (2, 6)          # upright, as lmms-eval sees it
    assert ours.tobytes() == theirs.tobytes()
    assert hand_decode({"bytes": data}, root).size == (6, 2)


def test_remote_image_path_is_refused_not_fetched(tmp_path):
    root = tmp_path / "pope"
    write_parquet(root / "data" / "test-0.parquet", {
        "id": ["0"], "question_id": ["1"], "question": ["Is it?"], "answer": ["yes"], "category": ["random"],
        "image": ["https://example.com/a.png"]})
    ds = benchmarks.POPE(path=str(root))
    with pytest.raises(ValueError, match="remote: only local files"):
        ds[0]


def test_loaders_make_no_network_call(request, monkeypatch):
    """Offline by construction: every loader reads its local files with sockets refused."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network call attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name, cls in (("textvqa", benchmarks.TextVQA), ("gqa", benchmarks.GQA), ("pope", benchmarks.POPE),
                      ("mme", benchmarks.MME), ("scienceqa", benchmarks.ScienceQA),
                      ("mmbench", benchmarks.MMBench)):
        samples = list(cls(path=str(request.getfixturevalue(f"{name}_dir"))))
        assert samples and all(s.images for s in samples), name


def test_files_that_do_not_form_one_table_are_one_config_error(tmp_path):
    root = tmp_path / "pope"
    base = {"id": ["0"], "question_id": ["1"], "question": ["Is it?"], "answer": ["yes"], "category": ["random"],
            "image": [image_cell("red")]}
    write_parquet(root / "data" / "test-00000-of-00002.parquet", base, {"image": IMAGE_TYPE})
    write_parquet(root / "data" / "test-00001-of-00002.parquet", {**base, "question_id": [[1, 2]]},
                  {"image": IMAGE_TYPE})
    with pytest.raises(ConfigError, match=r"dataset.path: could not read .*test-00000-of-00002.parquet") as info:
        benchmarks.POPE(path=str(root))
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- #
# our prompts against lmms-eval 0.7.3's doc_to_text (docs/LOADERS.md)
# --------------------------------------------------------------------------- #

def hand_rows(root: Path, pattern: str) -> list[dict]:
    files = sorted(root.glob(pattern))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def test_prompts_equal_lmms_evals_where_docs_say_so(textvqa_dir, gqa_dir, pope_dir, mme_dir, scienceqa_dir,
                                                     mmbench_dir):
    """Same text for the same row: TextVQA (no OCR line), GQA, POPE, MME and ScienceQA are
    lmms-eval's default prompt; MMBench keeps LLaVA-1.5's layout (lmms-eval's differs)."""
    pytest.importorskip("lmms_eval")
    from lmms_eval.tasks.gqa.utils import gqa_doc_to_text
    from lmms_eval.tasks.mme.utils import mme_doc_to_text
    from lmms_eval.tasks.mmbench.en_utils import mmbench_doc_to_text
    from lmms_eval.tasks.pope.utils import pope_doc_to_text
    from lmms_eval.tasks.scienceqa.utils import sqa_doc_to_text
    from lmms_eval.tasks.textvqa.utils import textvqa_doc_to_text

    vqa = {"pre_prompt": "", "post_prompt": VQA_PROMPT}
    cases = [
        (benchmarks.TextVQA(path=str(textvqa_dir)), hand_rows(textvqa_dir, "data/validation-*.parquet"),
         lambda doc: textvqa_doc_to_text(doc, {**vqa, "ocr": False})),
        (benchmarks.GQA(path=str(gqa_dir)), hand_rows(gqa_dir, "testdev_balanced_instructions/*.parquet"),
         lambda doc: gqa_doc_to_text(doc, vqa)),
        (benchmarks.POPE(path=str(pope_dir)), hand_rows(pope_dir, "data/*.parquet"),
         lambda doc: pope_doc_to_text(doc, vqa)),
        (benchmarks.MME(path=str(mme_dir)), hand_rows(mme_dir, "data/*.parquet"),
         lambda doc: mme_doc_to_text(doc, vqa)),
        (benchmarks.ScienceQA(path=str(scienceqa_dir)), hand_rows(scienceqa_dir, "ScienceQA-IMG/*.parquet"),
         lambda doc: sqa_doc_to_text(doc, {"format": "default", "pre_prompt": "", "post_prompt": MC_PROMPT})),
    ]
    for ds, rows, theirs in cases:
        assert len(ds) == len(rows)
        for sample, doc in zip(ds, rows):
            assert sample.question == theirs(doc), type(ds).__name__
    # TextVQA: lmms-eval's str.capitalize() also lower-cases the rest; ours keeps it
    assert textvqa_doc_to_text({"question": "what does the NYC sign say?"}, {**vqa, "ocr": False}) == \
        "What does the nyc sign say?" + VQA_PROMPT
    mmbench, = [row for row in hand_rows(mmbench_dir, "en/*.parquet") if row["hint"]]
    ours = [s for s in benchmarks.MMBench(path=str(mmbench_dir)) if s.id == mmbench["index"]][0].question
    assert ours == "Look closely.\nWhat is the main color?\nA. green\nB. blue\nC. red" + MC_PROMPT
    assert mmbench_doc_to_text(mmbench, {"pre_prompt": "", "post_prompt": MC_PROMPT}) == (
        "Look closely. What is the main color? There are several options:\nA. green\nB. blue\nC. red\n" + MC_PROMPT)
