"""Argument types and the error format shared by every ``dlm-decode`` command.

An argparse ``type`` callable turns a bad value into a one-line message
(``--limit must be a positive integer, got '-1'``);
[`OneLineParser`][dlm_decode.argtypes.OneLineParser] prints parser errors as one
line (``dlm-decode: error: …``, exit code 2) instead of the usage block, like every
other user error of the command line.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import NoReturn

from dlm_decode.config import SEED_MAX

__all__ = ["OneLineParser", "finite_float", "nonnegative_int", "positive_int", "seed_int"]


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``dlm-decode: error: <message> (see <prog> --help)`` and exit 2."""
        print(f"dlm-decode: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer ≥ 1 (sample limits, batch sizes, repeats)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer ≥ 0 (seeds, warm-up counts)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 0, got {text!r}")
    return value


def seed_int(text: str) -> int:
    """A seed: an integer in ``[0, 2**63 - 1]`` (``1e23`` is not an integer)."""
    value = nonnegative_int(text)
    if value > SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be at most 2**63 - 1, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """A finite float ≥ 0 (temperatures)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, got {text!r}")
    return value
