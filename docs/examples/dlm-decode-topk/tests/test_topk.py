"""The plugin's own tests: the same contract checks dlm_decode runs on its built-ins."""

import torch
from dlm_decode_topk import TopKPolicy

from dlm_decode.testing import check_policy


def test_topk_passes_the_policy_contract():
    for k in (1, 2, 5):
        check_policy(TopKPolicy, {"k": k}, max_examples=100)


def test_topk_commits_the_k_most_confident():
    policy = TopKPolicy(TopKPolicy.Params(k=2))
    confidence = torch.tensor([[0.1, 0.9, 0.8, 0.7]])
    masked = torch.tensor([[True, True, False, True]])
    state = None  # topk never reads the step state
    assert policy.select(confidence, masked, state).tolist() == [[False, True, False, True]]
