"""MathVista / MathVerse: local data with images the tests write, rule-based scoring, and
image samples evaluated on a tiny LLaDA-V through ``evaluate`` (chat template of the
released LLaDA-V tokenizer config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dlm_decode
from dlm_decode.config import DecodeConfig
from dlm_decode.evaluate import evaluate, get_task
from dlm_decode.interfaces import IMAGE_PLACEHOLDER, MultimodalPrompt
from dlm_decode.models import build_model
from dlm_decode.tasks.base import Sample
from dlm_decode.tasks.common import TaskDataError
from dlm_decode.tasks.synthetic import build_tokenizer
from dlm_decode.tasks.visual_math import (
    MathVerseTask,
    MathVistaTask,
    answer_span,
    choose_option,
    resolve_image,
)

Image = pytest.importorskip("PIL.Image")

SHARED = Path(__file__).resolve().parents[2] / "shared"
LLADA_V_TOKENIZER = SHARED / "data" / "model_configs" / "LLaDA-V-llm-init" / "tokenizer_config.json"


def _png(path: Path, w: int, h: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path)


@pytest.fixture
def mathvista_dir(tmp_path: Path) -> Path:
    """MathVista's own layout: ``testmini.json`` keyed by pid, images under ``images/``."""
    recs = {
        "1": {
            "question": "Which shape is largest?",
            "image": "images/1.png",
            "choices": ["circle", "square", "triangle"],
            "question_type": "multi_choice",
            "answer_type": "text",
            "answer": "square",
            "metadata": {"task": "figure question answering"},
        },
        "2": {
            "question": "How many bars are there?",
            "image": "images/2.png",
            "question_type": "free_form",
            "answer_type": "integer",
            "answer": "7",
            "metadata": {"task": "figure question answering"},
        },
        "3": {
            "question": "What is the slope?",
            "query": "Hint: answer with two decimals.\nQuestion: What is the slope?",
            "image": "images/3.png",
            "question_type": "free_form",
            "answer_type": "float",
            "precision": 2,
            "answer": "1.25",
            "metadata": {"task": "geometry problem solving"},
        },
        "4": {
            "question": "List the x values.",
            "image": "images/4.png",
            "question_type": "free_form",
            "answer_type": "list",
            "answer": "[1, 2, 3]",
            "metadata": {"task": "math word problem"},
        },
    }
    for i, (w, h) in enumerate([(40, 30), (20, 50), (33, 33), (64, 16)], 1):
        _png(tmp_path / "images" / f"{i}.png", w, h, i)
    (tmp_path / "testmini.json").write_text(json.dumps(recs))
    return tmp_path


def test_mathvista_reads_its_own_layout_with_images(mathvista_dir: Path) -> None:
    task = get_task("mathvista", data_path=mathvista_dir)
    samples = task.samples()
    assert [s.id for s in samples] == ["mathvista/1", "mathvista/2", "mathvista/3", "mathvista/4"]
    assert all(len(s.images) == 1 and Path(s.images[0]).is_file() for s in samples)
    assert samples[0].images[0] == mathvista_dir / "images" / "1.png"
    # the record's own query is the prompt; without one, a prompt with the lettered choices
    assert samples[2].prompt.startswith("Hint: answer with two decimals.")
    assert "(B) square" in samples[0].prompt and "letter" in samples[0].prompt
    assert "integer" in samples[1].prompt


@pytest.mark.parametrize(
    ("index", "completion", "correct", "extracted"),
    [
        (0, "The square is biggest. The answer is (B).", True, "square"),
        (0, "Answer: A", False, "circle"),
        (0, "It is clearly the square.", True, "square"),
        (1, "I count them: 1, 2, ... 7. Answer: 7", True, "7"),
        (1, "Answer: 7.5", False, "7.5"),
        (2, "rise over run = 5/4, so the answer is 1.25", True, "1.25"),
        (2, "the answer is 1.3", False, "1.3"),
        (3, "Answer: [1, 2, 3]", True, "[1, 2, 3]"),
        (3, "Answer: [1, 2]", False, "[1, 2]"),
    ],
)
def test_mathvista_rule_based_scoring(mathvista_dir, index, completion, correct, extracted):
    task = MathVistaTask(data_path=mathvista_dir)
    sample = task.samples()[index]
    got = task.score(sample, completion)
    assert (got["correct"], got["extracted"]) == (correct, extracted)
    assert got["family"] == sample.meta["family"]


@pytest.fixture
def mathverse_file(tmp_path: Path) -> Path:
    _png(tmp_path / "fig" / "a.png", 30, 30, 5)
    rows = [
        {
            "sample_index": "1",
            "problem_version": "Vision Dominant",
            "question": "Find the angle.",
            "query_wo": "Find the angle. Choices: A:30 B:45 C:60",
            "query_cot": "Think step by step. Find the angle. Choices: A:30 B:45 C:60",
            "question_type": "multi-choice",
            "answer": "B",
            "image": "fig/a.png",
        },
        {
            "sample_index": "2",
            "problem_version": "Text Lite",
            "question": "Find the length.",
            "question_type": "free-form",
            "answer": "12",
            "image": str(tmp_path / "fig" / "a.png"),
        },
        {
            "sample_index": "3",
            "problem_version": "Text Only",
            "question": "Find x.",
            "question_type": "free-form",
            "answer": "\\frac{1}{2}",
            "image": "",
        },
    ]
    path = tmp_path / "testmini.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_mathverse_versions_prompts_and_text_only(mathverse_file: Path) -> None:
    samples = MathVerseTask(data_path=mathverse_file).samples()
    assert [s.meta["family"] for s in samples] == ["Vision Dominant", "Text Lite", "Text Only"]
    assert [len(s.images) for s in samples] == [1, 1, 0]
    assert samples[0].prompt.startswith("Find the angle. Choices")
    cot = MathVerseTask(data_path=mathverse_file, cot=True).samples()
    assert cot[0].prompt.startswith("Think step by step.")
    only = MathVerseTask(data_path=mathverse_file, versions=["Text Lite"]).samples()
    assert [s.id for s in only] == ["mathverse/2"]
    with pytest.raises(TaskDataError, match="no record has problem_version"):
        MathVerseTask(data_path=mathverse_file, versions=["Vision Only"]).samples()


@pytest.mark.parametrize(
    ("index", "completion", "correct"),
    [
        (0, "The angle is 45 degrees, so the answer is B.", True),
        (0, "Answer: (C)", False),
        (1, "By Pythagoras the length is 12.0 cm. Answer: 12", True),
        (1, "Answer: 13", False),
        (2, "so x = \\boxed{\\dfrac{1}{2}}", True),
        (2, "the answer is 2", False),
    ],
)
def test_mathverse_rule_based_scoring(mathverse_file, index, completion, correct):
    task = MathVerseTask(data_path=mathverse_file)
    assert task.score(task.samples()[index], completion)["correct"] is correct


def test_answer_span_and_option_choice() -> None:
    assert answer_span("work...\nThe answer is 42.\nmore") == "42."
    assert answer_span("x = \\boxed{3}") == "3"
    assert choose_option("Answer: (D)", ["a", "b", "c"]) is None  # D is beyond the options
    assert choose_option("I pick triangle", ["circle", "triangle"]) == 1


def test_a_missing_image_is_a_one_line_error(tmp_path: Path) -> None:
    rec = {"pid": "9", "question": "q", "answer": "1", "image": "images/none.png"}
    (tmp_path / "testmini.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(TaskDataError) as err:
        MathVistaTask(data_path=tmp_path).samples()
    msg = str(err.value)
    assert "\n" not in msg and "record 0" in msg and "images/none.png" in msg
    assert "beside the data file" in msg


def test_images_as_datasets_writes_them_are_decoded(tmp_path: Path) -> None:
    _png(tmp_path / "x.png", 12, 9, 3)
    as_bytes = resolve_image({"bytes": (tmp_path / "x.png").read_bytes(), "path": None}, None, "r")
    assert as_bytes.size == (12, 9)
    assert resolve_image({"path": "x.png"}, tmp_path, "r") == tmp_path / "x.png"
    assert resolve_image(as_bytes, None, "r") is as_bytes
    with pytest.raises(TaskDataError, match="no image"):
        resolve_image(None, None, "record 4")


# --------------------------------------------------------------------------------------
# evaluate() with image samples
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llada_v():
    """The tiny LLaDA-V with a character tokenizer and the released chat template."""
    model = build_model("llada-v-tiny", dtype=torch.float64, seed=3)
    tok = build_tokenizer()
    tok.chat_template = json.loads(LLADA_V_TOKENIZER.read_text())["chat_template"]
    model.tokenizer = tok
    return model


def test_image_prompt_uses_the_chat_template_with_one_placeholder(llada_v) -> None:
    img = Image.new("RGB", (20, 20))
    prompt = llada_v.image_prompt("What is shown?", [img])
    assert isinstance(prompt, MultimodalPrompt)
    assert list(prompt.ids).count(IMAGE_PLACEHOLDER) == 1
    tok = llada_v.tokenizer
    assert prompt.ids[0] == tok.bos_token_id  # the template's bos_token, kept once
    text = tok.decode([t for t in prompt.ids if t != IMAGE_PLACEHOLDER])
    assert "<|start_header_id|>user<|end_header_id|>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert text.index("system") < text.index("What is shown?")


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_evaluate_decodes_image_samples_batched_as_alone(llada_v, mathverse_file, cache) -> None:
    task = MathVerseTask(data_path=mathverse_file)
    cfg = DecodeConfig(policy="threshold", cache=cache, gen_length=8, block_length=4)
    both = evaluate(llada_v, task, cfg, batch_size=3, progress=False)
    alone = evaluate(llada_v, task, cfg, batch_size=1, progress=False)
    assert [r["completion"] for r in both.rows] == [r["completion"] for r in alone.rows]
    assert both.rows[0]["images"] == [str(mathverse_file.parent / "fig" / "a.png")]
    assert "images" not in both.rows[2]  # the text-only version
    assert set(both.summary) >= {"accuracy_Vision Dominant", "accuracy_Text Only"}
    # the decode saw the image: another figure changes the first sample's logits
    s = task.samples()[0]
    other = Sample(s.id, s.prompt, s.reference, s.meta, images=(Image.new("RGB", (30, 30)),))
    a = dlm_decode.generate(llada_v, [llada_v.image_prompt(s.prompt, s.images)], **_kw())
    b = dlm_decode.generate(llada_v, [llada_v.image_prompt(other.prompt, other.images)], **_kw())
    assert a.trace[0].confidences != b.trace[0].confidences


def _kw() -> dict:
    return dict(policy="threshold", gen_length=8, block_length=4, trace=True)


def test_a_text_model_refuses_an_image_task_before_decoding(mathverse_file) -> None:
    model = build_model("llada-tiny", dtype=torch.float32)
    model.tokenizer = build_tokenizer()
    task = MathVerseTask(data_path=mathverse_file)
    with pytest.raises(ValueError, match="takes text only") as err:
        evaluate(model, task, DecodeConfig(policy="threshold"), progress=False)
    assert "\n" not in str(err.value) and "mathverse/1" in str(err.value)


def test_the_hub_path_takes_decoded_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """``datasets`` gives MathVista's figure as ``decoded_image`` (a PIL image) beside the
    ``image`` path string; the hub branch uses the decoded one."""
    import dlm_decode.tasks.visual_math as vm

    figure = Image.new("RGB", (16, 8))
    recs = [{"pid": "5", "question": "q?", "image": "images/5.jpg", "decoded_image": figure}]
    recs[0].update(answer="3", question_type="free_form", answer_type="integer")
    asked = []

    def fake_hub(dataset, config, splits, *, task):
        asked.append((dataset, config, tuple(splits), task))
        return {"testmini": recs}

    monkeypatch.setattr(vm, "load_hub", fake_hub)
    (sample,) = MathVistaTask().samples()
    assert asked == [("AI4Math/MathVista", None, ("testmini",), "mathvista")]
    assert sample.images == (figure,) and sample.id == "mathvista/5"
    monkeypatch.setattr(vm, "load_hub", lambda *a, **k: {"testmini": [dict(recs[0])]})
    with pytest.raises(TaskDataError, match="not found"):  # MathVerse reads only "image"
        MathVerseTask().samples()
