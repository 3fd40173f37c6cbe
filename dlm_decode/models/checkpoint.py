"""Checkpoint files in the Hugging Face layout: ``config.json``, safetensors weights (one
file or shards), tokenizers, and the weight dtype. Nothing here knows an architecture.

A broken checkpoint (invalid or non-object ``config.json``, a truncated or corrupt
safetensors file, weights that do not match the config, NaN/inf values) raises a
[`CheckpointError`][dlm_decode.models.checkpoint.CheckpointError]: one line naming the file
or tensor, the problem and the fix, raised before the weights are allocated where the
problem is visible from the headers.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

__all__ = [
    "CheckpointError",
    "ConfigError",
    "check_finite",
    "load_tokenizer",
    "read_config",
    "read_weights",
    "resolve_dtype",
]

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}
_SUPPORTED = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number"}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is: an invalid ``config.json``, a
    truncated or corrupt weight file, weights that do not match the config, or non-finite
    weight values. The message is one line naming the file, field or tensor and the fix."""


class ConfigError(CheckpointError):
    """A ``config.json`` value that cannot describe a model: a missing required key, a value
    of the wrong type (a string or a boolean where an integer belongs), a size that is not
    positive, sizes that do not divide (hidden size by heads, heads by key/value heads), or
    a special token id outside the vocabulary. Raised when a model is built or loaded,
    before anything is allocated; the message is one line naming ``config.json``, the key,
    the value and the fix."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def resolve_dtype(
    dtype: torch.dtype | str | None,
    config: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> torch.dtype:
    """The weight dtype to use.

    Args:
        dtype: a torch dtype or a name (``"bfloat16"``, ``"bf16"``, ``"fp16"``, ``"float32"``,
            ``"torch.float64"``, …); ``None`` for the default.
        config: ``config.json`` dict; its ``torch_dtype`` (or ``dtype``) is the default.
        device: without a config dtype, float32 on CPU and bfloat16 elsewhere.

    Returns:
        One of bfloat16, float16, float32, float64.

    Raises:
        ValueError: an unknown or unsupported dtype.
    """
    if dtype is None and config is not None:
        dtype = config.get("torch_dtype") or config.get("dtype")
    if dtype is None:
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(
                f"unknown dtype {dtype!r}; use one of bfloat16, float16, float32, float64"
            )
        dtype = _DTYPES[key]
    if dtype not in _SUPPORTED:
        raise ValueError(f"unsupported weight dtype {dtype}; use bf16, fp16, fp32 or fp64")
    return dtype


def read_config(folder: str | Path) -> dict[str, Any]:
    """Read ``folder/config.json``.

    Raises:
        FileNotFoundError: no ``config.json`` in the folder.
        CheckpointError: the file is not UTF-8, not valid JSON, or not a JSON object.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {Path(folder)}; is it a checkpoint folder?")
    return _read_json_object(path, "config.json")


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``, or a one-line ``CheckpointError`` saying what is wrong."""
    fix = f"fix {path.name} or re-download the checkpoint"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text (is it really {what}?); {fix}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise CheckpointError(f"{path} is not valid JSON ({exc.msg} at {where}); {fix}") from None
    if not isinstance(data, dict):
        kind = _JSON_TYPES.get(type(data), "null" if data is None else type(data).__name__)
        raise CheckpointError(
            f'{path} holds {kind}, not a JSON object of settings ({{"key": value, …}}); {fix}'
        )
    return data


def _open(path: Path, device: str | None = None) -> Any:
    """``safe_open`` of one weight file; a truncated or corrupt header raises a one-line
    ``CheckpointError`` instead of the raw ``SafetensorError``."""
    kw = {} if device is None else {"device": device}
    try:
        return safe_open(str(path), framework="pt", **kw)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {_one_line(exc)}") from exc
    except Exception as exc:  # safetensors raises SafetensorError (not an OSError/ValueError)
        size = path.stat().st_size if path.is_file() else 0
        state = "empty (0 bytes)" if size == 0 else f"truncated or corrupt ({size} bytes)"
        raise CheckpointError(
            f"{path} is {state}: {_one_line(exc)}; re-download or re-save it"
        ) from exc


def _weight_files(folder: Path) -> dict[str, Path]:
    """Checkpoint name → safetensors file, from the index or the single file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json_object(index, "a safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointError(
                f'{index} has no "weight_map" object of weight name → shard file; '
                f"re-download it, or delete it to load a single model.safetensors"
            )
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise FileNotFoundError(
                f"{index} lists shards that are not in the folder: {', '.join(missing)}; "
                f"download the missing shards"
            )
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        with _open(single) as f:
            return dict.fromkeys(f.keys(), single)
    raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {folder} "
        f"(only the safetensors format is supported)"
    )


def _listing(kind: str, names: list[str], limit: int = 10) -> str:
    more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
    return f"{len(names)} {kind}: {', '.join(names[:limit])}{more}"


def read_weights(
    folder: str | Path,
    expected: Mapping[str, tuple[int, ...]],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    what: str = "the model",
    check_weights: bool = True,
) -> dict[str, torch.Tensor]:
    """Read safetensors weights (one file or shards) straight onto a device.

    Names, shapes and storage dtypes are checked from the file headers before any tensor
    is read; after reading, every tensor is checked to be finite (see
    [`check_finite`][dlm_decode.models.checkpoint.check_finite]) unless ``check_weights``
    is false.

    Args:
        folder: checkpoint folder.
        expected: checkpoint name → shape the architecture needs.
        device: device the tensors are loaded onto.
        dtype: dtype they are converted to.
        what: how to name the architecture in errors.
        check_weights: check that no tensor holds NaN or inf (one reduction per tensor,
            one host sync in all); ``False`` skips it to load faster.

    Returns:
        Checkpoint name → tensor.

    Raises:
        FileNotFoundError: no weights, or shards missing.
        CheckpointError: a truncated or corrupt file; missing, unexpected, wrong-shaped or
            non-floating weights (lists the first names of each kind and their count);
            NaN/inf values.
    """
    folder = Path(folder)
    files = _weight_files(folder)
    dev = str(torch.device(device))
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    shapes: dict[str, tuple[int, ...]] = {}
    not_float: list[str] = []
    for path, names in by_file.items():
        with _open(path) as f:
            keys = set(f.keys())
            for name in names:
                if name in keys:
                    info = f.get_slice(name)
                    shapes[name] = tuple(info.get_shape())
                    if not info.get_dtype().startswith(("F", "BF")):
                        not_float.append(f"{name} ({info.get_dtype()})")
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(
        f"{n} {shapes[n]} (expected {tuple(expected[n])})"
        for n in set(shapes) & set(expected)
        if shapes[n] != tuple(expected[n])
    )
    not_float = sorted(n for n in not_float if n.split(" ", 1)[0] in expected)
    if missing or unexpected or wrong or not_float:
        parts = [
            _listing(kind, names)
            for kind, names in (
                ("missing weights", missing),
                ("unexpected weights", unexpected),
                ("wrong-shaped weights", wrong),
                ("non-floating weights", not_float),
            )
            if names
        ]
        raise CheckpointError(
            f"checkpoint {folder} does not match {what}: "
            + "; ".join(parts)
            + "; config.json and the weight files disagree: fix config.json or re-save the "
            "checkpoint"
        )
    out: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with _open(path, dev) as f:
            for name in names:
                try:
                    tensor = f.get_tensor(name)
                except (MemoryError, torch.cuda.OutOfMemoryError):
                    raise
                except Exception as exc:  # I/O or decoding error past a valid header
                    raise CheckpointError(
                        f"cannot read tensor {name} from {path}: {_one_line(exc)}; "
                        f"re-download or re-save it"
                    ) from exc
                out[name] = tensor.to(dtype)
    if check_weights:
        check_finite(out, where=f"checkpoint {folder}")
    return out


def check_finite(tensors: Mapping[str, torch.Tensor], *, where: str = "the checkpoint") -> None:
    """Check that every floating tensor holds only finite values.

    One ``aminmax`` reduction per tensor (no tensor-sized temporary: NaN propagates into
    both ends and ±inf shows at one of them), gathered on the tensors' device and read back
    with a single host sync; only a failing tensor is counted element by element.

    Args:
        tensors: name → tensor (non-floating and empty tensors are skipped).
        where: how to name the source in the error.

    Raises:
        CheckpointError: the first non-finite tensor, its name, how many NaN/inf values
            it has, and how many other tensors are affected.
    """
    names: list[str] = []
    flags: list[torch.Tensor] = []
    for name, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        lo, hi = torch.aminmax(t)
        names.append(name)
        flags.append(torch.isfinite(lo) & torch.isfinite(hi))
    if not flags:
        return
    ok: list[bool] = []
    for device in dict.fromkeys(f.device for f in flags):  # one sync per device (one in all)
        ok += torch.stack([f for f in flags if f.device == device]).tolist()
    names = [
        n
        for device in dict.fromkeys(f.device for f in flags)
        for n, f in zip(names, flags, strict=True)
        if f.device == device
    ]
    bad = [name for name, good in zip(names, ok, strict=True) if not good]
    if not bad:
        return
    first = tensors[bad[0]]
    count = int((~torch.isfinite(first)).sum())
    others = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
    cause = "is corrupt"
    if first.dtype == torch.float16:
        cause += " or overflows float16 (load it with dtype='bfloat16' or 'float32')"
    raise CheckpointError(
        f"{bad[0]} has {count} NaN/inf values of {first.numel()}{others}; {where} {cause}: "
        f"re-download or re-save it (load_model(..., check_weights=False) skips this check)"
    )


def load_tokenizer(folder: str | Path, fallbacks: Iterable[str] = ()) -> Any:
    """Load the tokenizer of a checkpoint folder, never running remote code.

    Tries ``transformers.AutoTokenizer`` (``trust_remote_code=False``), then each class
    named in ``fallbacks`` (e.g. ``Qwen2TokenizerFast`` for Dream, whose config names a
    remote-code class).

    Args:
        folder: checkpoint folder.
        fallbacks: transformers tokenizer class names to try after ``AutoTokenizer``.

    Returns:
        The tokenizer (with its chat template), or ``None`` when the folder has no
        tokenizer files or none of the classes could load them (with a warning).
    """
    folder = Path(folder)
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    import transformers

    errors = []
    # AutoTokenizer reads config.json and warns that it does not know `llada`/`Dream`
    # model types; the tokenizer files are all it needs, so keep that warning quiet.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:  # fall through to the architecture's known classes
        errors.append(f"AutoTokenizer: {exc}")
    finally:
        transformers.logging.set_verbosity(verbosity)
    for name in fallbacks:
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        try:
            return cls.from_pretrained(str(folder))
        except Exception as exc:
            errors.append(f"{name}: {exc}")
    warnings.warn(
        f"could not load the tokenizer in {folder} ({'; '.join(errors)}); model.tokenizer is None",
        stacklevel=2,
    )
    return None
