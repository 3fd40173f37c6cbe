"""The lm-evaluation-harness adapter, end to end and offline, on a tiny random checkpoint.

The task is ``tests/data/lm_eval/dlm_decode_tiny_qa.yaml`` (generate_until, exact match).
Its data file is written by the test: the targets of half the documents are the model's
own generations, the rest can never be generated, so the expected exact match (0.5) is
only reached when lm-eval scores what our Decoder generated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

# Nothing may touch the network: set before `datasets` is imported.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")
yaml = pytest.importorskip("yaml")

TASK_DIR = Path(__file__).resolve().parent / "data" / "lm_eval"
TASK_NAME = "dlm_decode_tiny_qa"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dlm_decode.models.testing import write_char_tokenizer, write_random_checkpoint

    folder = write_random_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "llada", seed=3)
    write_char_tokenizer(folder)
    return folder


def _make_lm(checkpoint: Path):
    from lm_eval.api.registry import get_model

    import dlm_decode.lm_eval_adapter  # noqa: F401  (registers "dlm_decode")

    cls = get_model("dlm_decode")
    args = (
        f"model={checkpoint},device=cpu,dtype=float32,policy=frechet,margin=0.25,"
        f"cache=dual,block_length=4"
    )
    return cls.create_from_arg_string(args, {"batch_size": 1})


def test_model_args_parse_into_decode_config(checkpoint: Path) -> None:
    lm = _make_lm(checkpoint)
    cfg = lm.config_for({"max_gen_toks": 10, "until": ["\n"]})
    assert cfg.policy == "frechet.v1" and cfg.policy_args == {"margin": 0.25}
    assert cfg.cache == "dual.v1" and cfg.block_length == 4
    assert cfg.gen_length == 12  # max_gen_toks rounded up to a multiple of block_length
    with pytest.raises(NotImplementedError, match="generatively"):
        lm.loglikelihood([])
    with pytest.raises(NotImplementedError, match="generate_until"):
        lm.loglikelihood_rolling([])


def test_bad_policy_arg_fails_before_loading(tmp_path: Path) -> None:
    from dlm_decode.lm_eval_adapter import DLMDecodeLM

    with pytest.raises(ValueError):
        DLMDecodeLM(model=str(tmp_path / "missing"), policy="frechet", no_such_param=1)


def test_simple_evaluate_scores_our_generations(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf", raising=False)
    lm = _make_lm(checkpoint)
    task = yaml.safe_load((TASK_DIR / f"{TASK_NAME}.yaml").read_text())
    gen_kwargs = task["generation_kwargs"]
    docs = [json.loads(x) for x in (TASK_DIR / "tiny_qa_prompts.jsonl").read_text().splitlines()]

    # Our own generations for the prompts (batch 1, greedy: deterministic).
    reqs = [SimpleNamespace(args=(d["question"], dict(gen_kwargs))) for d in docs]
    ours = lm.generate_until(reqs, disable_tqdm=True)
    assert all("\n" not in g for g in ours)  # `until` applied to the text
    for i, d in enumerate(docs):
        d["answer"] = ours[i] if i % 2 == 0 else f"<never generated {i}>"
    data = tmp_path / "dlm_decode_tiny_qa.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    task["dataset_kwargs"]["data_files"]["test"] = str(data)

    from lm_eval.tasks import TaskManager

    # include_defaults=False: do not index lm-eval's thousands of built-in tasks (~20 s).
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[task], task_manager=manager, log_samples=True, bootstrap_iters=0
    )
    result = out["results"][TASK_NAME]
    em = next(v for k, v in result.items() if k.startswith("exact_match,"))
    assert em == pytest.approx(0.5)
    samples = out["samples"][TASK_NAME]
    assert len(samples) == len(docs)
    for s in samples:
        assert s["resps"][0][0] == ours[s["doc_id"]]


def test_decode_metrics_are_collected_across_generate_until_calls(
    checkpoint: Path, tmp_path: Path
) -> None:
    lm = _make_lm(checkpoint)
    gen_kwargs = {"until": ["\n"], "max_gen_toks": 8}
    reqs = [SimpleNamespace(args=(q, dict(gen_kwargs))) for q in ("Q: 1+1=?\nA:", "Q: hi\nA:")]
    lm.generate_until(reqs[:1], disable_tqdm=True)
    first = lm.decode_metrics()
    lm.generate_until(reqs, disable_tqdm=True)
    m = lm.decode_metrics()
    assert m["generate_until_calls"] == 2 and m["requests"] == 3
    assert m["nfe"] > first["nfe"] > 0  # summed over both calls
    assert m["token_forwards"] > first["token_forwards"]
    assert m["tokens_per_nfe"] == pytest.approx(m["response_tokens"] / m["nfe"])
    assert m["tokens_per_s"] == pytest.approx(m["response_tokens"] / m["decode_s"])
    written = lm.write_decode_metrics(tmp_path)
    assert written == tmp_path / "dlm_decode_metrics.json"
    assert json.loads(written.read_text())["nfe"] == m["nfe"]


def test_metrics_path_follows_output_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dlm_decode.lm_eval_adapter import metrics_path

    monkeypatch.chdir(tmp_path)
    assert metrics_path(["--tasks", "x"]) == tmp_path / "dlm_decode_metrics.json"
    assert metrics_path(["--output_path", "out"]) == Path("out") / "dlm_decode_metrics.json"
    assert metrics_path(["-o", "r/res.json"]) == Path("r") / "dlm_decode_metrics.json"
    assert metrics_path(["--output_path=o2"]) == Path("o2") / "dlm_decode_metrics.json"


def test_main_writes_metrics_beside_lm_eval_output(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The lm-eval command line on the local task: ``dlm_decode_metrics.json`` lands in
    ``--output_path`` beside lm-eval's results, with a one-line summary on stderr."""
    from dlm_decode.lm_eval_adapter import main

    docs = [json.loads(x) for x in (TASK_DIR / "tiny_qa_prompts.jsonl").read_text().splitlines()]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({**d, "answer": "x"}) + "\n" for d in docs))
    task = yaml.safe_load((TASK_DIR / f"{TASK_NAME}.yaml").read_text())
    task["dataset_kwargs"]["data_files"]["test"] = str(data)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK_NAME}.yaml").write_text(yaml.safe_dump(task))
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    model_args = f"model={checkpoint},device=cpu,dtype=float32,policy=frechet,block_length=4"
    main(
        [
            "--model", "dlm_decode", "--model_args", model_args, "--tasks", TASK_NAME,
            "--include_path", str(tasks), "--output_path", str(out), "--batch_size", "2",
        ]
    )  # fmt: skip
    metrics = json.loads((out / "dlm_decode_metrics.json").read_text())
    assert metrics["requests"] == len(docs) and metrics["nfe"] > 0
    assert metrics["tokens_per_nfe"] > 0 and metrics["token_forwards"] > 0
    assert list(out.rglob("results_*.json"))  # lm-eval's own output, beside ours
    lines = [
        ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dlm_decode metrics:")
    ]
    assert len(lines) == 1 and f"NFE {metrics['nfe']}" in lines[0]
