"""Unit tests of the evaluation helpers: aggregation and per-row commit bookkeeping."""

from __future__ import annotations

import pytest
import torch

from dlm_decode.evaluate import encode_prompts, row_commits, summarize


def _row(correct, tokens, nfe, latency=1.0, **kw):
    return dict(correct=correct, response_tokens=tokens, nfe=nfe, latency_s=latency, **kw)


def test_summarize_counts_response_tokens_per_second_and_per_nfe():
    rows = [_row(True, 30, 10, family="add"), _row(False, 10, 30, family="copy")]
    s = summarize(rows, wall_s=4.0)
    assert s["n"] == 2 and s["accuracy"] == 0.5
    assert s["tokens_per_s"] == pytest.approx(40 / 4.0)
    assert s["tokens_per_nfe"] == pytest.approx(40 / 40)
    assert s["nfe_per_sample"] == 20
    assert s["accuracy_add"] == 1.0 and s["accuracy_copy"] == 0.0


def test_summarize_reports_every_boolean_verdict_such_as_gsm8k_strict():
    rows = [_row(True, 5, 5, correct_strict=False), _row(True, 5, 5, correct_strict=True)]
    s = summarize(rows)
    assert s["accuracy"] == 1.0
    assert s["accuracy_strict"] == 0.5
    assert s["wall_s"] == 2.0  # the rows' latencies when no wall time is given


def test_summarize_of_nothing():
    assert summarize([]) == {"n": 0}


def test_row_commits_skips_steps_without_work_and_counts_steps_per_block():
    counts = torch.tensor([[3, 1], [0, 2], [1, 0], [4, 4]])  # (steps, B)
    blocks = torch.tensor([0, 0, 1, 1])
    assert row_commits(counts, blocks, 0) == ([3, 1, 4], [1, 2])
    assert row_commits(counts, blocks, 1) == ([1, 2, 4], [2, 1])


def test_encode_prompts_without_tokenizer_says_what_to_do():
    class NoTok:
        tokenizer = None

    with pytest.raises(ValueError, match="no tokenizer"):
        encode_prompts(NoTok(), ["hi"])
