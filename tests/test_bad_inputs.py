"""A table of bad inputs replayed against the command line and the API.

Every row must give ONE line on stderr (``dlm-decode: error: …``, no traceback), exit
code 2, a message naming the problem, and leave every file as it was. The API rows
assert the exception type and a one-line message. Sweeps, plugins, checkpoints and the
sandbox have their own fault modules (``test_sweep_concurrency``, ``test_plugin_faults``,
``test_checkpoint_faults``, ``test_sandbox``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from dlm_decode import cli
from dlm_decode.caches import NoCache
from dlm_decode.decoder import (
    CacheContractError,
    Decoder,
    NonFiniteLogitsError,
    PolicyContractError,
)
from dlm_decode.models import loading
from dlm_decode.policies.rules import ThresholdPolicy


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``dlm-decode ARGV`` in process: (exit code, stdout, stderr)."""
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse errors
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def snapshot(folder: Path) -> dict[str, str]:
    """Path → sha256 of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _gsm(tmp: Path, records: list[Any], name: str = "test.jsonl") -> str:
    path = tmp / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


GOOD = {"question": "1+1?", "answer": "#### 2"}


def _gsm_eval(data: str | Path, *more: str) -> list[str]:
    """``eval --task gsm8k --shots 0 --data DATA …``."""
    return ["eval", "--task", "gsm8k", "--shots", "0", "--data", str(data), *more]


# (id, argv builder(tmp) → argv, message fragment)
CLI_ROWS: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("limit-negative", lambda t: ["eval", "--limit", "-1"], "--limit: must be a positive"),
    ("limit-zero", lambda t: ["eval", "--limit", "0"], "--limit: must be a positive"),
    ("limit-text", lambda t: ["eval", "--limit", "all"], "--limit: expected an integer"),
    ("quickstart-limit", lambda t: ["quickstart", "--limit", "-598"], "--limit"),
    ("batch-negative", lambda t: ["eval", "--batch-size", "-1"], "--batch-size"),
    ("batch-zero", lambda t: ["quickstart", "--batch-size", "0"], "--batch-size"),
    ("temperature-inf", lambda t: ["eval", "--temperature", "inf"], "--temperature"),
    ("temperature-nan", lambda t: ["generate", "--temperature", "nan", "x"], "--temperature"),
    ("temperature-negative", lambda t: ["eval", "--temperature", "-1"], "--temperature"),
    ("seed-float", lambda t: ["eval", "--seed", "1e23"], "--seed: expected an integer"),
    ("seed-huge", lambda t: ["eval", "--seed", str(2**64)], "--seed: must be at most"),
    ("seed-negative", lambda t: ["generate", "--seed", "-3", "x"], "--seed"),
    ("gen-length-zero", lambda t: ["generate", "--gen-length", "0", "x"], "--gen-length"),
    ("steps-zero", lambda t: ["eval", "--steps", "0"], "--steps"),
    ("shots-negative", lambda t: ["eval", "--shots", "-2"], "--shots"),
    ("device-tpu", lambda t: ["generate", "--device", "tpu", "x"], "device 'tpu'"),
    ("device-meta", lambda t: ["eval", "--device", "meta"], "device 'meta'"),
    ("device-cpu-index", lambda t: ["generate", "--device", "cpu:5", "x"], "device 'cpu:5'"),
    ("device-empty", lambda t: ["quickstart", "--device", ""], "device ''"),
    ("synthetic-shots", lambda t: ["eval", "--shots", "3"], "does not take shots (--shots)"),
    (
        "synthetic-data",
        lambda t: ["eval", "--data", _gsm(t, [GOOD])],
        "does not take data_path (--data)",
    ),
    (
        "record-2-missing-field",
        lambda t: _gsm_eval(_gsm(t, [GOOD, {"question": "q"}])),
        "record 1 lacks the required field 'answer'",
    ),
    (
        "record-3-wrong-type",
        lambda t: _gsm_eval(_gsm(t, [GOOD, GOOD, {"question": "q", "answer": 4}])),
        "record 2: field 'answer' must be a string, got int",
    ),
    (
        "record-lone-surrogate",
        lambda t: _gsm_eval(_gsm(t, [GOOD, {"question": "q \ud800", "answer": "#### 1"}])),
        "lone surrogate",
    ),
    (
        "deeply-nested-json",
        lambda t: _gsm_eval(str(_write(t / "deep.json", "[" * 100_000 + "]" * 100_000))),
        "nests JSON too deeply",
    ),
    (
        "output-is-data",
        lambda t: _gsm_eval(_gsm(t, [GOOD]), "--output", str(t / "test.jsonl")),
        "is the --data file",
    ),
    (
        "output-is-a-data-folder-file",
        lambda t: _gsm_eval(Path(_gsm(t, [GOOD])).parent, "--output", str(t / "test.jsonl")),
        "is the --data file",
    ),
    (
        "duplicate-sample-ids",
        lambda t: [
            "eval",
            "--task",
            "math500",
            "--data",
            _gsm(t, [{"problem": "1+1?", "answer": "2", "unique_id": "a"}] * 3, "m.jsonl"),
        ],
        "sample id 'a' occurs 3 times",
    ),
    ("plot-not-png", lambda t: ["quickstart", "--plot", str(t / "x.jpg")], "must be a .png"),
    (
        "plot-unwritable",
        lambda t: ["quickstart", "--plot", "/proc/dlm_decode_test/x.png"],
        "cannot be written",
    ),
    ("bench-repeats-zero", lambda t: ["bench", "--repeats", "0"], "--repeats: must be a positive"),
    ("bench-warmup-negative", lambda t: ["bench", "--warmup", "-1"], "--warmup"),
    ("bench-prompt-zero", lambda t: ["bench", "--prompt-length", "0"], "--prompt-length"),
    (
        "image-missing",
        lambda t: ["generate", "--image", str(t / "nope.png"), "what is this?"],
        "--image",
    ),
    ("unknown-policy", lambda t: ["generate", "--policy", "nosuch", "x"], "nosuch"),
    ("unknown-option", lambda t: ["eval", "--limt", "3"], "unrecognized arguments: --limt"),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("argv_of", "fragment"), [r[1:] for r in CLI_ROWS], ids=[r[0] for r in CLI_ROWS]
)
def test_cli_bad_input_is_one_line_exit_2_and_changes_no_file(
    argv_of: Callable[[Path], list[str]],
    fragment: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_model: None,
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = argv_of(tmp_path)
    before = snapshot(tmp_path)
    rc, _out, err = run_cli(argv, capsys)
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dlm-decode: error: "), err
    assert "Traceback" not in err
    assert fragment in lines[0], lines[0]
    assert snapshot(tmp_path) == before  # nothing written, truncated or created


def test_eval_output_appends_and_rows_carry_their_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"earlier": "row"}\n', encoding="utf-8")
    for policy in ("threshold", "frechet"):
        argv = ["eval", "--limit", "2", "--batch-size", "2", "--policy", policy]
        rc, _, err = run_cli([*argv, "--output", str(rows)], capsys)
        assert rc == 0, err
    lines = rows.read_text(encoding="utf-8").splitlines()
    assert lines[0] == '{"earlier": "row"}'  # never truncated
    got = [json.loads(line) for line in lines[1:]]
    assert [r["settings"]["policy"] for r in got] == ["threshold.v1"] * 2 + ["frechet.v1"] * 2
    assert all(r["settings"]["cache"] == "dual.v1" for r in got)


def test_quickstart_plot_path_is_normalised_and_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.plot_path(str(tmp_path / "fig")) == tmp_path / "fig.png"
    assert cli.plot_path(str(tmp_path)) == tmp_path / "quickstart.png"
    assert cli.plot_path(str(tmp_path / "new") + "/") == tmp_path / "new" / "quickstart.png"
    assert cli.plot_path("") is None
    rc, out, err = run_cli(
        ["quickstart", "--limit", "2", "--batch-size", "2", "--plot", str(tmp_path / "q")], capsys
    )
    assert rc == 0, err
    assert (tmp_path / "q.png").is_file() and not (tmp_path / "q").exists()
    assert f"plot: {tmp_path / 'q.png'}" in out


# --------------------------------------------------------------------------------------
# the API: prompts, plugin outputs, non-finite values


@pytest.fixture(scope="module")
def tiny() -> Any:
    return loading.load_model("tiny", device="cpu")


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize(
    ("prompt", "fragment"),
    [
        ([[12.7, 3.2]], "float"),
        ("hello", "text"),
        ([[True, False]], "bool"),
        (torch.tensor([[1.5, 2.0]]), "float"),
        ([[5, 10**9]], "outside the model's vocabulary"),
        ([[5, -3]], "outside the model's vocabulary"),
    ],
    ids=["float-list", "text", "bool", "float-tensor", "id-too-large", "id-negative"],
)
def test_bad_prompt_ids_are_refused_before_decoding(tiny: Any, prompt: Any, fragment: str) -> None:
    with pytest.raises((ValueError, TypeError)) as exc:
        Decoder(tiny, policy="threshold", gen_length=16, block_length=16).generate(prompt)
    assert fragment in _one_line(exc)


def test_mask_token_in_the_prompt_is_refused(tiny: Any) -> None:
    ids = [[5, tiny.mask_token_id, 6]]
    with pytest.raises(ValueError) as exc:
        Decoder(tiny, policy="threshold", gen_length=16, block_length=16).generate(ids)
    assert "mask token" in _one_line(exc)


class _BadShape(ThresholdPolicy):
    name: ClassVar[str] = "bad_shape"
    shape: ClassVar[str] = "b1"

    def select(self, confidence: torch.Tensor, masked: torch.Tensor, state: Any) -> Any:
        if self.shape == "b1":
            return torch.ones(masked.shape[0], 1, dtype=torch.bool)
        return torch.ones(masked.shape[1], dtype=torch.bool)


class _BadShapeL(_BadShape):
    name: ClassVar[str] = "bad_shape_l"
    shape: ClassVar[str] = "l"


class _Mutates(ThresholdPolicy):
    name: ClassVar[str] = "mutates"

    def select(self, confidence: torch.Tensor, masked: torch.Tensor, state: Any) -> Any:
        out = super().select(confidence, masked, state)
        masked.fill_(True)  # writes its read-only argument
        return out


@pytest.mark.parametrize("policy", [_BadShape(), _BadShapeL()], ids=["(B,1)", "(L,)"])
def test_policy_returning_a_broadcastable_shape_is_an_error(tiny: Any, policy: Any) -> None:
    with pytest.raises(PolicyContractError) as exc:
        Decoder(tiny, policy=policy, gen_length=16, block_length=16).generate([[5, 6, 7]])
    assert "(B, L)" in _one_line(exc)


def test_policy_mutating_masked_changes_nothing(tiny: Any) -> None:
    """The policy gets a copy: writing ``masked`` cannot overwrite committed tokens."""
    ref = Decoder(tiny, policy="threshold", gen_length=16, block_length=16).generate([[5, 6, 7]])
    got = Decoder(tiny, policy=_Mutates(), gen_length=16, block_length=16).generate([[5, 6, 7]])
    assert torch.equal(ref.sequences, got.sequences)


class _FlatLogits(NoCache):
    name: ClassVar[str] = "flat_logits"

    def refresh(self, ctx: Any, x: torch.Tensor, bs: int, be: int) -> torch.Tensor:
        return super().refresh(ctx, x, bs, be)[:, 0]  # (B, V): the position axis dropped

    step = refresh


class _NaNLogits(NoCache):
    name: ClassVar[str] = "nan_logits"

    def refresh(self, ctx: Any, x: torch.Tensor, bs: int, be: int) -> torch.Tensor:
        return torch.full_like(super().refresh(ctx, x, bs, be), float("nan"))

    step = refresh


def test_cache_returning_b_v_logits_is_an_error(tiny: Any) -> None:
    with pytest.raises(CacheContractError) as exc:
        Decoder(
            tiny, policy="threshold", cache=_FlatLogits(), gen_length=16, block_length=16
        ).generate([[5, 6, 7]])
    assert "flat_logits" in _one_line(exc)


def test_nan_logits_are_an_error_naming_the_step(tiny: Any) -> None:
    with pytest.raises(NonFiniteLogitsError) as exc:
        Decoder(
            tiny, policy="threshold", cache=_NaNLogits(), gen_length=16, block_length=16
        ).generate([[5, 6, 7]])
    assert "NaN" in _one_line(exc) or "non-finite" in str(exc.value)


def test_infinite_temperature_is_refused_by_the_config(tiny: Any) -> None:
    with pytest.raises(ValueError) as exc:
        Decoder(tiny, policy="frechet", temperature=float("inf"))
    assert "temperature" in str(exc.value)


# --------------------------------------------------------------------------------------
# the lm-eval adapter


lm_eval_adapter = pytest.importorskip("dlm_decode.lm_eval_adapter")


@pytest.mark.parametrize(
    ("gen_kwargs", "fragment"),
    [
        (None, "gen_kwargs must be a dict"),
        ("until", "gen_kwargs must be a dict"),
        ({"max_gen_toks": 0}, "max_gen_toks must be an integer ≥ 1"),
        ({"max_gen_toks": -5}, "max_gen_toks must be an integer ≥ 1"),
        ({"max_gen_toks": "64"}, "max_gen_toks must be an integer"),
        ({"until": 3}, "until must be a string or a list of strings"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"do_sample": "yes"}, "do_sample must be true or false"),
    ],
)
def test_lm_eval_gen_kwargs_are_checked(gen_kwargs: Any, fragment: str) -> None:
    with pytest.raises(ValueError) as exc:
        lm_eval_adapter.check_gen_kwargs(gen_kwargs)
    assert fragment in _one_line(exc)


def test_lm_eval_default_length_fits_the_model_and_explicit_too_long_is_refused(tiny: Any) -> None:
    lm = lm_eval_adapter.DLMDecodeLM(model=tiny, block_length=16)
    prompt = tiny.max_length - 40  # leaves room for two blocks of 16
    cfg = lm.config_for({"until": ["\n"]}, prompt)
    assert cfg.gen_length == 32 and prompt + cfg.gen_length <= tiny.max_length
    with pytest.raises(ValueError) as exc:
        lm.config_for({"max_gen_toks": 64}, prompt)
    assert "use gen_length=32 or less" in _one_line(exc)


def test_lm_eval_main_passes_the_device_that_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert lm_eval_adapter.with_device(["--model", "dlm_decode"])[-2:] == ["--device", "cpu"]
    assert lm_eval_adapter.with_device(["--device", "cuda:1"]) == ["--device", "cuda:1"]
    given = ["--model_args", "model=tiny,device=cpu"]
    assert lm_eval_adapter.with_device(given)[-2:] == ["--device", "cpu"]


def test_denormal_temperature_is_refused_not_silently_wrong(tiny: Any) -> None:
    """``logits / 1e-320`` overflows: every positive logit became ``inf`` and the first won."""
    with pytest.raises(ValueError) as exc:
        Decoder(tiny, policy="threshold", temperature=1e-320)
    assert "use 0 for argmax" in str(exc.value)
    ok = Decoder(tiny, policy="threshold", temperature=1e-6, gen_length=16, block_length=16)
    greedy = Decoder(tiny, policy="threshold", gen_length=16, block_length=16)
    ids = [[int(t) for t in tiny.tokenizer.encode("sort: 5143132214512231\n")]]
    assert torch.equal(ok.generate(ids).sequences, greedy.generate(ids).sequences)


def test_bench_says_when_a_length_stretches_the_random_weights(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dlm_decode import bench

    config = bench.arch_config("llada-tiny", 100_000)
    assert config.get("max_sequence_length", config.get("max_position_embeddings")) == 100_000
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "100000 positions exceed llada-tiny's" in err[0], err
    bench.arch_config("llada-tiny", 16)
    assert capsys.readouterr().err == ""  # a length that fits says nothing


def test_image_with_a_text_model_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    rc, _, err = run_cli(["generate", "--image", str(img), "what is this?"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "--image needs a multimodal model (llada_v)" in err
