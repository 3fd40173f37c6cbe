"""The plugin's own tests: dlm_decode's cache contract checks, and when it refreshes."""

from typing import ClassVar

from dlm_decode_burst import BurstRefreshCache

import dlm_decode
from dlm_decode.models import build_model
from dlm_decode.testing import check_cache


def test_burst_passes_the_cache_contract():
    check_cache(BurstRefreshCache)
    check_cache(BurstRefreshCache, {"min_commits": 1})


def test_burst_refreshes_after_a_step_that_commits_enough():
    refreshes = []

    class Counting(BurstRefreshCache):
        name: ClassVar[str] = "counting_burst"

        def refresh(self, ctx, x, block_start, block_end):
            refreshes.append(ctx.step.step)
            return super().refresh(ctx, x, block_start, block_end)

    model = build_model("llada-tiny", seed=0)
    kw = dict(policy="fixed", steps=8, gen_length=16, block_length=8)  # 2 commits a step
    dlm_decode.generate(model, [[5, 6, 7]], cache=Counting(Counting.Params(min_commits=2)), **kw)
    assert refreshes == [0, 2, 0, 2]  # step 1 sees step 0's 2 commits: step 2 refreshes
    refreshes.clear()
    dlm_decode.generate(model, [[5, 6, 7]], cache=Counting(Counting.Params(min_commits=3)), **kw)
    assert refreshes == [0, 0]
