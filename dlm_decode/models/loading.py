"""Loading models: ``load_model`` (checkpoints) and ``build_model`` (random weights).

Architecture detection goes through the plugin registry: the ``model_type`` of
``config.json`` is matched against each registered model class's ``config_model_types``,
so a third-party model plugin loads exactly like the built-ins.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from dlm_decode.interfaces import Model
from dlm_decode.models.llada import LLADA_BLOCK_CONFIG

__all__ = [
    "PRESETS",
    "TINY_FOLDER",
    "build_model",
    "find_model_class",
    "load_model",
    "load_tokenizer",
    "read_config",
    "read_weights",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_folder",
]

#: Where the shipped tiny model lives inside the package.
TINY_FOLDER = Path(__file__).resolve().parents[1] / "assets" / "tiny"

#: ``config.json`` dicts for :func:`build_model`: the released 8B/7B shapes and tiny ones.
PRESETS: dict[str, dict[str, Any]] = {
    "llada-8b": {
        "model_type": "llada",
        "d_model": 4096,
        "n_heads": 32,
        "n_kv_heads": 32,
        "n_layers": 32,
        "mlp_hidden_size": 12288,
        "mlp_ratio": 4,
        "vocab_size": 126464,
        "embedding_size": 126464,
        "max_sequence_length": 4096,
        "mask_token_id": 126336,
        "eos_token_id": 126081,
        "pad_token_id": 126081,
        **LLADA_BLOCK_CONFIG,
        "rope_theta": 500000.0,
        "include_bias": False,
        "alibi": False,
    },
    "dream-7b": {
        "model_type": "Dream",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "num_hidden_layers": 28,
        "vocab_size": 152064,
        "max_position_embeddings": 131072,
        "mask_token_id": 151666,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "pad_token_id": 151643,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "rope_scaling": None,
        "use_sliding_window": False,
        "torch_dtype": "bfloat16",
    },
    "llada-tiny": {
        "model_type": "llada",
        "d_model": 32,
        "n_heads": 4,
        "n_kv_heads": 4,
        "n_layers": 2,
        "mlp_hidden_size": 64,
        "vocab_size": 128,
        "embedding_size": 128,
        "max_sequence_length": 512,
        "mask_token_id": 127,
        "eos_token_id": 1,
        "pad_token_id": 1,
        **LLADA_BLOCK_CONFIG,
    },
    "dream-tiny": {
        "model_type": "Dream",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": 128,
        "max_position_embeddings": 512,
        "mask_token_id": 127,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "rope_scaling": None,
        "use_sliding_window": False,
    },
}

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
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def resolve_device(name: str | None) -> str:
    """The device to run on: ``name``, or ``cuda`` when one is available and ``name`` is
    ``None``, else ``cpu``.

    Raises:
        ValueError: ``name`` asks for CUDA and none is available (says to use ``cpu``).
    """
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA device is available here; use cpu")
    return name


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
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {Path(folder)}; is it a checkpoint folder?")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _weight_files(folder: Path) -> dict[str, Path]:
    """Checkpoint name → safetensors file, from the index or the single file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise FileNotFoundError(
                f"{index} lists shards that are not in the folder: {', '.join(missing)}"
            )
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
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
) -> dict[str, torch.Tensor]:
    """Read safetensors weights (one file or shards) straight onto a device.

    Names and shapes are checked from the file headers before any tensor is read.

    Args:
        folder: checkpoint folder.
        expected: checkpoint name → shape the architecture needs.
        device: device the tensors are loaded onto.
        dtype: dtype they are converted to.
        what: how to name the architecture in errors.

    Returns:
        Checkpoint name → tensor.

    Raises:
        FileNotFoundError: no weights, or shards missing.
        ValueError: missing, unexpected or wrong-shaped weights; lists the first names of
            each kind and their count.
    """
    from safetensors import safe_open

    folder = Path(folder)
    files = _weight_files(folder)
    dev = str(torch.device(device))
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    shapes: dict[str, tuple[int, ...]] = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for name in names:
                if name in keys:
                    shapes[name] = tuple(f.get_slice(name).get_shape())
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(
        f"{n} {shapes[n]} (expected {tuple(expected[n])})"
        for n in set(shapes) & set(expected)
        if shapes[n] != tuple(expected[n])
    )
    if missing or unexpected or wrong:
        parts = [
            _listing(kind, names)
            for kind, names in (
                ("missing weights", missing),
                ("unexpected weights", unexpected),
                ("wrong-shaped weights", wrong),
            )
            if names
        ]
        raise ValueError(f"checkpoint {folder} does not match {what}: " + "; ".join(parts))
    out: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt", device=dev) as f:
            for name in names:
                out[name] = f.get_tensor(name).to(dtype)
    return out


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


def resolve_model_folder(name_or_path: str | Path) -> Path:
    """The local folder for ``"tiny"``, a local path, or a Hugging Face hub id.

    Raises:
        FileNotFoundError: ``"tiny"`` is not built yet, or a local-looking path does not
            exist.
        OSError: a hub download failed (no network, unknown id, gated model).
    """
    if str(name_or_path) == "tiny":
        if not (TINY_FOLDER / "config.json").is_file():
            raise FileNotFoundError(
                f"the tiny checkpoint is not built (no {TINY_FOLDER / 'config.json'}); "
                f"build it with `python experiments/tiny/train.py`"
            )
        return TINY_FOLDER
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists():
        raise FileNotFoundError(f"{text} is a file; pass the checkpoint folder")
    if not _HUB_ID.match(text):
        raise FileNotFoundError(f"no checkpoint folder at {text}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:
        raise OSError(
            f"could not download {text} from the Hugging Face hub: {exc}; pass a local folder"
        ) from exc


def find_model_class(model_type: str) -> type[Model]:
    """The registered model class whose ``config_model_types`` contains ``model_type``.

    Raises:
        ValueError: no registered class loads ``model_type``, or several distinct ones do.
    """
    from dlm_decode.registry import get_registry

    entries = get_registry().entries["model"]
    found = []
    known = []
    for name in sorted(entries):
        cls = entries[name][max(entries[name])]
        known.extend(getattr(cls, "config_model_types", ()))
        if model_type in getattr(cls, "config_model_types", ()):
            found.append(cls)
    if not found:
        raise ValueError(
            f"unknown model_type {model_type!r} in config.json; registered model plugins "
            f"load: {', '.join(sorted(set(known))) or '(none)'}. Install a plugin that "
            f"registers it (hook register_models)."
        )
    if len(found) > 1:
        raise ValueError(
            f"model_type {model_type!r} is claimed by several model plugins: "
            + ", ".join(f"{c.__module__}.{c.__qualname__}" for c in found)
        )
    return found[0]


def _model_type(config: Mapping[str, Any], where: str) -> str:
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ValueError(f"{where} has no model_type; cannot tell the architecture")
    return model_type


def load_model(
    name_or_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> Model:
    """Load a model: ``"tiny"``, a local checkpoint folder, or a Hugging Face hub id.

    Args:
        name_or_path: ``"tiny"`` (the packaged model), a folder in the Hugging Face layout
            (``config.json``, ``model.safetensors`` or shards with an index, optional
            tokenizer files), or a hub id such as ``GSAI-ML/LLaDA-8B-Instruct``.
        device: where to put the weights.
        dtype: weight dtype or its name; default the config's ``torch_dtype``, else float32
            on CPU and bfloat16 elsewhere.

    Returns:
        The model, with ``model.tokenizer`` set when the folder has a tokenizer.

    Raises:
        FileNotFoundError: missing folder, config or weights (or the tiny model not built).
        OSError: a hub download failed.
        ValueError: unknown ``model_type``, or weights that do not match the architecture.

    Examples:
        >>> from dlm_decode.models import load_model
        >>> model = load_model("GSAI-ML/LLaDA-8B-Instruct", device="cuda")  # doctest: +SKIP
    """
    folder = resolve_model_folder(name_or_path)
    config = read_config(folder)
    cls = find_model_class(_model_type(config, str(folder / "config.json")))
    model = cls.from_pretrained(str(folder), device=device, dtype=dtype)
    if model.tokenizer is None:
        model.tokenizer = load_tokenizer(folder, getattr(cls, "tokenizer_fallbacks", ()))
    return model


def build_model(
    arch_or_config: str | Mapping[str, Any],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    seed: int = 0,
) -> Model:
    """A model with random weights ``N(0, 0.02²)``, allocated and filled on ``device``.

    No weight is ever materialised on the host, so ``build_model("llada-8b",
    device="cuda")`` costs only GPU memory (the 8B-shaped benchmark uses it).

    Args:
        arch_or_config: a preset name (``llada-8b``, ``dream-7b``, ``llada-tiny``,
            ``dream-tiny``; see :data:`PRESETS`) or a ``config.json`` dict with a
            ``model_type``. A dict may name ``"preset"`` to start from one and override
            keys, e.g. ``{"preset": "llada-8b", "n_layers": 4}``.
        device: target device.
        dtype: weight dtype; default as in :func:`load_model`.
        seed: seed of the device-side generator.

    Returns:
        The model (no tokenizer).

    Raises:
        ValueError: unknown preset or model_type.
        TypeError: the registered class cannot build random weights (no ``from_config``).
    """
    if isinstance(arch_or_config, str):
        if arch_or_config not in PRESETS:
            raise ValueError(
                f"unknown preset {arch_or_config!r}; presets: {', '.join(PRESETS)}, or pass "
                f"a config dict"
            )
        config = dict(PRESETS[arch_or_config])
    else:
        config = dict(arch_or_config)
        base = config.pop("preset", None)
        if base is not None:
            if base not in PRESETS:
                raise ValueError(f"unknown preset {base!r}; presets: {', '.join(PRESETS)}")
            config = {**PRESETS[base], **config}
    cls = find_model_class(_model_type(config, "the config"))
    from_config = getattr(cls, "from_config", None)
    if from_config is None:
        raise TypeError(f"{cls.__qualname__} has no from_config(); cannot build random weights")
    return from_config(config, device=device, dtype=dtype, seed=seed)
