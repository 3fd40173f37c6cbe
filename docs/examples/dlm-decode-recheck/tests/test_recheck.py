"""The plugin's own tests: dlm_decode's contract checks, and its rule on a hand-made step."""

import torch
from dlm_decode_recheck import RecheckPolicy

from dlm_decode import StepState
from dlm_decode.signals import History, StepSignals, parse_needs
from dlm_decode.testing import check_policy


def test_recheck_passes_the_policy_contract():
    check_policy(RecheckPolicy, max_examples=100)
    check_policy(RecheckPolicy, {"max_entropy": 0.0, "doubt": 0.9}, max_examples=50)


def test_recheck_commits_low_entropy_and_sends_doubtful_tokens_back_once():
    policy = RecheckPolicy(RecheckPolicy.Params(max_entropy=0.5, doubt=0.3))
    masked = torch.tensor([[False, False, True, True]])
    hist = History.empty(1, 4, "cpu")
    hist.committed_at.copy_(torch.tensor([[0, 0, -1, -1]]))
    values = {
        "entropy": torch.tensor([[0.0, 0.0, 0.2, 1.5]]),
        "current": torch.tensor([[0.9, 0.1, 0.0, 0.0]]),
        "history": hist,
    }
    block = torch.tensor([[3, 4, 9, 9]])
    spec = parse_needs(RecheckPolicy.needs)
    sig = StepSignals(torch.zeros_like(block), torch.ones(1, 4), block, 9, spec, "test", values)
    own = policy.make_state(1, 4, 10, torch.device("cpu"))
    state = StepState(1, 0, 1, None, masked.sum(-1), sig, own)
    first = policy.select(sig.confidence, masked, state)
    assert first.commit.tolist() == [[False, False, True, False]]
    assert first.remask.tolist() == [[False, True, False, False]]
    again = policy.select(sig.confidence, masked, state)
    assert not again.remask.any()  # each position goes back at most once
