"""Loading models: ``load_model`` (checkpoints) and ``build_model`` (random weights).

Architecture detection goes through the plugin registry: the ``model_type`` of
``config.json`` is matched against each registered model class's ``config_model_types``,
so a third-party model plugin loads exactly like the built-ins. Presets (named
``config.json`` dicts such as ``llada-8b``) are declared by the model classes themselves
([`Model.presets`][dlm_decode.interfaces.Model.presets]), so a model plugin adds its own.
Nothing here is specific to one architecture.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dlm_decode.interfaces import Model
from dlm_decode.models.checkpoint import check_finite, load_tokenizer, read_config
from dlm_decode.registry import BUILTIN_OWNER, get_registry

__all__ = [
    "SHIPPED_MODELS",
    "TINY_FOLDER",
    "build_model",
    "find_model_class",
    "load_model",
    "preset_config",
    "presets",
    "resolve_device",
    "resolve_model_folder",
]

#: Where the shipped tiny model lives inside the package.
TINY_FOLDER = Path(__file__).resolve().parents[1] / "assets" / "tiny"

SHIPPED_MODELS: dict[str, tuple[Path, str]] = {
    "tiny": (TINY_FOLDER, "experiments/tiny/train.py"),
    "tiny-bd": (TINY_FOLDER.parent / "tiny_bd", "experiments/tiny_bd/train.py"),
}
"""The shipped models by name, each with its folder and the training recipe that builds
it: ``tiny`` (LLaDA layout, full attention) and ``tiny-bd`` (SDAR layout, block
diffusion)."""

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


_DEVICE_RE = re.compile(r"^(cpu|cuda|mps)(:(\d+))?$")


def resolve_device(name: str | None) -> str:
    """The device to run on: ``name``, or ``cuda`` when one is available and ``name`` is
    ``None``, else ``cpu``.

    Accepted names: ``cpu``, ``cuda``, ``cuda:N`` (an index below the number of GPUs
    here) and ``mps`` (where PyTorch has it).

    Raises:
        ValueError: an unknown or malformed device name (``tpu``, ``meta``, ``cpu:5``,
            ``""``), a CUDA device that is not here, or ``mps`` where it is not available;
            the message says what is available.
    """
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    here = ["cpu"] + (
        ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    m = _DEVICE_RE.match(name) if isinstance(name, str) else None
    if m is None or (m[1] == "cpu" and m[2] is not None):
        raise ValueError(
            f"device {name!r} is not a device dlm_decode runs on; use one of: {', '.join(here)}"
        )
    kind = m[1]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: no CUDA device is available here; use cpu")
        if m[3] is not None and int(m[3]) >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA "
                f"device(s); use one of: {', '.join(here[1:])}"
            )
    if kind == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ValueError(f"device {name!r}: MPS is not available here; use cpu")
    return name


def presets() -> dict[str, dict[str, Any]]:
    """Every preset the registered model classes declare: name → ``config.json`` dict.

    Raises:
        ValueError: two model classes declare the same preset name.
    """
    out: dict[str, dict[str, Any]] = {}
    owner: dict[str, str] = {}
    entries = get_registry().entries["model"]
    for name in sorted(entries):
        for cls in entries[name].values():
            for preset, config in getattr(cls, "presets", {}).items():
                if preset in out and owner[preset] != cls.__qualname__:
                    raise ValueError(
                        f"preset {preset!r} is declared by both {owner[preset]} and "
                        f"{cls.__qualname__}; rename one"
                    )
                out[preset], owner[preset] = dict(config), cls.__qualname__
    return out


def preset_config(name: str) -> dict[str, Any]:
    """The ``config.json`` dict of preset ``name`` (a copy).

    Raises:
        ValueError: no registered model class declares ``name``.
    """
    known = presets()
    if name not in known:
        raise ValueError(
            f"unknown preset {name!r}; presets: {', '.join(sorted(known))}, or pass a config dict"
        )
    return known[name]


def resolve_model_folder(name_or_path: str | Path) -> Path:
    """The local folder for a shipped model (``"tiny"``, ``"tiny-bd"``; see
    [`SHIPPED_MODELS`][dlm_decode.models.loading.SHIPPED_MODELS]), a local path, or a
    Hugging Face hub id.

    Raises:
        FileNotFoundError: a shipped model is not built yet, or a local-looking path does
            not exist.
        OSError: a hub download failed (no network, unknown id, gated model).
    """
    if str(name_or_path) in SHIPPED_MODELS:
        folder, recipe = SHIPPED_MODELS[str(name_or_path)]
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"the {name_or_path} checkpoint is not built (no {folder / 'config.json'}); "
                f"build it with `python {recipe}`"
            )
        return folder
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

    A built-in that loads ``model_type`` wins over plugins claiming it too (built-ins own
    their model types, as they own their names); several plugins claiming a type no
    built-in loads is an error.

    Raises:
        ValueError: no registered class loads ``model_type``, or several distinct ones do.
    """
    registry = get_registry()
    found = registry.matching("model", lambda c: model_type in getattr(c, "config_model_types", ()))
    if not found:
        every = registry.matching("model", lambda c: True)
        known = [t for c in every for t in getattr(c, "config_model_types", ())]
        raise ValueError(
            f"unknown model_type {model_type!r} in config.json; registered model plugins "
            f"load: {', '.join(sorted(set(known))) or '(none)'}. Install a plugin that "
            f"registers it (hook register_models)."
        )
    builtin = [c for c in found if registry.owner("model", c.name) == BUILTIN_OWNER]
    found = builtin or found  # the built-ins own the model types they load
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
    check_weights: bool = True,
) -> Model:
    """Load a model: ``"tiny"`` / ``"tiny-bd"``, a local checkpoint folder, or a hub id.

    Every check that can fail runs before the weights are allocated where the problem is
    visible without them: ``config.json`` (valid JSON, an object, sizes and token ids that
    fit together) and the safetensors headers (complete, names and shapes as the config
    says). The weights are then checked to be finite (one reduction per tensor) unless
    ``check_weights=False``.

    Args:
        name_or_path: ``"tiny"`` or ``"tiny-bd"`` (the packaged models), a folder in the
            Hugging Face layout (``config.json``, ``model.safetensors`` or shards with an
            index, optional tokenizer files), or a hub id such as ``GSAI-ML/LLaDA-8B-Instruct``.
        device: where to put the weights.
        dtype: weight dtype or its name; default the config's ``torch_dtype``, else float32
            on CPU and bfloat16 elsewhere.
        check_weights: check that no weight holds NaN or inf (see
            [`check_finite`][dlm_decode.models.checkpoint.check_finite]); ``False`` skips
            the check to load faster. A model class whose ``from_pretrained`` takes no
            ``check_weights`` has its parameters checked here after loading.

    Returns:
        The model, with ``model.tokenizer`` set when the folder has a tokenizer.

    Raises:
        FileNotFoundError: missing folder, config or weights (or the tiny model not built).
        OSError: a hub download failed.
        CheckpointError: ``config.json`` is not a JSON object, or holds invalid values (a
            [`ConfigError`][dlm_decode.models.checkpoint.ConfigError]); a weight file is
            empty, truncated or corrupt; weights do not match the architecture; a weight
            holds NaN/inf. A ``ValueError`` subclass; the message is one line.
        ValueError: unknown ``model_type``.

    Examples:
        >>> from dlm_decode.models import load_model
        >>> model = load_model("tiny")
        >>> type(model).__name__, model.mask_token_id == model.tokenizer.mask_token_id
        ('LLaDAModel', True)

        On a GPU with the hub: ``load_model("GSAI-ML/LLaDA-8B-Instruct", device="cuda")``.
    """
    folder = resolve_model_folder(name_or_path)
    config = read_config(folder)
    cls = find_model_class(_model_type(config, str(folder / "config.json")))
    takes_check = _accepts(cls.from_pretrained, "check_weights")
    extra = {"check_weights": check_weights} if takes_check else {}
    model = cls.from_pretrained(str(folder), device=device, dtype=dtype, config=config, **extra)
    if check_weights and not takes_check and callable(getattr(model, "named_parameters", None)):
        check_finite(dict(model.named_parameters()), where=f"checkpoint {folder}")
    if model.tokenizer is None:
        model.tokenizer = load_tokenizer(folder, getattr(cls, "tokenizer_fallbacks", ()))
    return model


def _accepts(func: Any, name: str) -> bool:
    """Whether ``func`` takes a keyword argument ``name`` (or ``**kwargs``)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


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
            ``dream-tiny``, or a model plugin's; see
            [`presets`][dlm_decode.models.loading.presets]) or a ``config.json`` dict with a
            ``model_type``. A dict may name ``"preset"`` to start from one and override
            keys, e.g. ``{"preset": "llada-8b", "n_layers": 4}``.
        device: target device.
        dtype: weight dtype; default as in [`load_model`][dlm_decode.models.loading.load_model].
        seed: seed of the device-side generator.

    Returns:
        The model (no tokenizer).

    Raises:
        ConfigError: invalid config values (see
            [`NativeModel.spec_from_config`][dlm_decode.models.native.NativeModel.spec_from_config]),
            raised before anything is allocated.
        ValueError: unknown preset or model_type.
        TypeError: the registered class cannot build random weights (no ``from_config``).
    """
    if isinstance(arch_or_config, str):
        config = preset_config(arch_or_config)
    else:
        config = dict(arch_or_config)
        base = config.pop("preset", None)
        if base is not None:
            config = {**preset_config(base), **config}
    cls = find_model_class(_model_type(config, "the config"))
    from_config = getattr(cls, "from_config", None)
    if from_config is None:
        raise TypeError(f"{cls.__qualname__} has no from_config(); cannot build random weights")
    return from_config(config, device=device, dtype=dtype, seed=seed)
