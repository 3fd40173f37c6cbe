"""``DecodeConfig``: every knob of a decode, validated before anything touches a device."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["DecodeConfig"]


class DecodeConfig(BaseModel):
    """The fields of [`generate`][dlm_decode.decoder.generate]; what experiments serialize.

    Attributes:
        policy: commit policy name (``frechet``, ``frechet.v1``, a plugin's name, …).
        policy_args: the policy's parameters (validated by its pydantic ``Params``).
        cache: ``none``, ``prefix``, ``dual`` or a plugin's name.
        cache_args: the cache's parameters.
        gen_length: tokens to generate per row; a multiple of ``block_length``.
        block_length: tokens per semi-autoregressive block.
        steps: total denoising steps over all blocks (LLaDA's meaning); required by
            ``fixed``, a multiple of the number of blocks. Other policies ignore it.
        temperature: 0 for argmax; > 0 for Gumbel-max sampling (float64 noise).
        seed: seed of the Gumbel noise.
        early_stop: once a row has committed EOS and every earlier position is decided,
            fill the rest with EOS and stop spending forwards on it.
        trace: record each step's sorted confidence profile and commits.
        profile: synchronize the device around forwards to time them apart from selection.
    """

    model_config = ConfigDict(extra="forbid")

    policy: str = "frechet"
    policy_args: dict[str, Any] = Field(default_factory=lambda: {"margin": 0.25})
    cache: str = "dual"
    cache_args: dict[str, Any] = Field(default_factory=dict)
    gen_length: int = Field(256, ge=1)
    block_length: int = Field(32, ge=1)
    steps: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    seed: int = 0
    early_stop: bool = False
    trace: bool = False
    profile: bool = False

    @model_validator(mode="after")
    def _check_lengths(self) -> DecodeConfig:
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length={self.gen_length} is not a multiple of "
                f"block_length={self.block_length}; choose e.g. gen_length="
                f"{-(-self.gen_length // self.block_length) * self.block_length}"
            )
        if self.steps is not None:
            blocks = self.num_blocks
            if self.steps % blocks:
                raise ValueError(
                    f"steps={self.steps} is not a multiple of the number of blocks "
                    f"({blocks} = gen_length {self.gen_length} / block_length "
                    f"{self.block_length}); use steps={blocks * max(1, self.steps // blocks)}"
                )
            if self.steps // blocks > self.block_length:
                raise ValueError(
                    f"steps={self.steps} gives {self.steps // blocks} steps per block, more "
                    f"than block_length={self.block_length} tokens; use at most "
                    f"steps={blocks * self.block_length}"
                )
        return self

    @property
    def num_blocks(self) -> int:
        """Number of blocks, ``gen_length // block_length``."""
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int | None:
        """``steps // num_blocks``, or ``None`` without a step budget."""
        return None if self.steps is None else self.steps // self.num_blocks
