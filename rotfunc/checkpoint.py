"""Adapters on disk in PEFT's format, both directions; safetensors only, never a pickle.

A checkpoint is a directory with ``adapter_model.safetensors`` (PEFT's key names, e.g.
``base_model.model.encoder.layer.0.attention.self.query.road_theta``) and ``adapter_config.json`` (PEFT's
config fields plus ``peft_type``), which is what ``PeftModel.save_pretrained`` writes and
``PeftModel.from_pretrained`` reads. Each config type names its PEFT keys (``peft_param_names``: params field ->
key suffix; ``peft_shared_names``: shared frozen pytree field -> key suffix, e.g. RandLoRA's projection bases).

Loading is atomic: the file and config are checked completely (unknown config fields, another method, missing
or extra keys, wrong shapes, a truncated file) before the model keeps anything, and on any error the model is
left exactly as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import bind
from .adapter import config_for_peft_type

__all__ = ["save_adapter", "load_adapter", "CheckpointError", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PICKLES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
_PREFIX = "base_model.model."
_SHARED_PREFIX = "base_model."


class CheckpointError(ValueError):
    """A checkpoint that rotfunc will not load; the message names the file or key."""


def _peft_version() -> str:
    try:
        from importlib.metadata import version

        return version("peft")
    except Exception:
        return "0.21.2"


def _expected(model: nn.Module, adapter_name: str, config: Any) -> dict[str, torch.Tensor]:
    """PEFT key -> the model tensor it maps to, for one attached adapter."""
    names = type(config).peft_param_names
    shared_names = getattr(type(config), "peft_shared_names", {})
    save_shared = bool(getattr(config, "save_projection", True)) and shared_names
    out: dict[str, torch.Tensor] = {}
    shared = None
    for path, w in bind.adapted_layers(model):
        if adapter_name not in w.configs:
            continue
        slot = w.slots[adapter_name]
        for field in slot.params_type._fields:
            out[f"{_PREFIX}{path}.{names[field]}"] = getattr(slot, field)
        if slot.own_bias() is not None:  # bias="<method>_only" / "all": PEFT saves the trained bias of the base layer
            out[f"{_PREFIX}{path}.base_layer.bias"] = slot.own_bias()
        if save_shared:
            shared = slot.shared()
            for field, value in zip(shared._fields, shared):
                out[f"{_PREFIX}{path}.{shared_names[field]}"] = value
    if save_shared and shared is not None:
        for field, value in zip(shared._fields, shared):
            out[f"{_SHARED_PREFIX}{shared_names[field]}"] = value
    return out


def _model_name(model: nn.Module) -> str | None:
    """The base model's name for ``adapter_config.json``: ``config._name_or_path`` when it is a name (a hub id
    such as ``HuggingFaceTB/SmolLM2-135M-Instruct``); for a local directory only its last component, never a
    path of the machine that trained the adapter."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(name, str) or not name:
        return None
    if os.path.isabs(name) or os.path.exists(name) or name.startswith((".", "~")):
        return Path(name).name or None
    return name


def save_adapter(
    model: nn.Module, path: str | os.PathLike, /, *, adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to directory ``path`` in PEFT's format.

    ``base_model_name_or_path`` is recorded in ``adapter_config.json`` (default: the model's name, see
    :func:`_model_name`). Files are written with ordinary permissions (``0o644`` under the usual umask).

    Returns:
        The directory written (created if needed).
    """
    from safetensors.torch import save_file

    configs = {w.configs[adapter_name] for _, w in bind.adapted_layers(model) if adapter_name in w.configs}
    if not configs:
        raise ValueError(f"adapter_name={adapter_name!r} is not attached; attached: {bind.adapter_names(model)}")
    (config,) = configs
    tensors = {k: v.detach().contiguous().clone() for k, v in _expected(model, adapter_name, config).items()}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    _ordinary_permissions(out / WEIGHTS_NAME)
    base_name = base_model_name_or_path if base_model_name_or_path is not None else _model_name(model)
    cfg = {
        **config.to_peft_dict(),
        "peft_type": type(config).peft_type,
        "base_model_name_or_path": base_name,
        "task_type": None,
        "inference_mode": True,
        "revision": None,
        "peft_version": _peft_version(),
    }
    if isinstance(cfg.get("target_modules"), (set, frozenset, tuple)):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    if isinstance(cfg.get("exclude_modules"), (set, frozenset, tuple)):
        cfg["exclude_modules"] = sorted(cfg["exclude_modules"])
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def _ordinary_permissions(file: Path) -> None:
    # safetensors writes through a private temporary file (mode 0600); give it what open() would have
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)


def _read_config(directory: Path) -> Any:
    cfg_file = directory / CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} does not exist: not a PEFT adapter directory")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or "peft_type" not in raw:
        raise CheckpointError(f"{cfg_file} has no 'peft_type' field")
    try:
        cls = config_for_peft_type(str(raw["peft_type"]))
        return cls.from_peft_dict(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [p for p in _PICKLES if (directory / p).exists()]
        if pickles:
            raise CheckpointError(
                f"{directory / pickles[0]} is a pickle file; rotfunc never unpickles checkpoints. "
                f"Convert it to {WEIGHTS_NAME} with a tool you trust"
            )
        raise CheckpointError(f"{weights} does not exist")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def load_adapter(
    model: nn.Module, path: str | os.PathLike, /, *, adapter_name: str = "default"
) -> nn.Module:
    """Attach the adapter saved in directory ``path`` (by PEFT's ``save_pretrained`` or :func:`save_adapter`).

    The adapter is attached with the saved config under ``adapter_name`` and its tensors are copied in. All or
    nothing: on any error the model is unchanged.

    Raises:
        CheckpointError: a pickle instead of safetensors, a truncated file, a config for another method or with
            unknown fields, missing or extra keys, or a tensor of the wrong shape (the message names it).
    """
    directory = Path(path)
    if directory.is_file():
        if directory.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"):
            raise CheckpointError(f"{directory} is a pickle file; rotfunc never unpickles checkpoints")
        raise CheckpointError(f"{directory} is a file; pass the adapter directory holding {WEIGHTS_NAME}")
    config = _read_config(directory)
    tensors = _read_tensors(directory)
    try:
        bind.attach(model, config, adapter_name=adapter_name)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{directory / CONFIG_NAME} does not fit this model: {e}") from None
    try:
        expected = _expected(model, adapter_name, config)
        shared_names = set(getattr(type(config), "peft_shared_names", {}).values())
        # Projection bases are optional in the file (save_projection=False): they are regenerated from the key.
        missing = [k for k in expected if k not in tensors and k.rpartition(".")[2] not in shared_names]
        extra = [k for k in tensors if k not in expected]
        if missing:
            raise CheckpointError(f"{directory / WEIGHTS_NAME} is missing key {missing[0]!r} ({len(missing)} missing)")
        if extra:
            raise CheckpointError(
                f"{directory / WEIGHTS_NAME} has key {extra[0]!r} that no adapted layer of this model expects "
                f"({len(extra)} unexpected)"
            )
        for k, v in tensors.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise CheckpointError(
                    f"{directory / WEIGHTS_NAME}: {k!r} has shape={tuple(v.shape)}, the model expects "
                    f"{tuple(expected[k].shape)}"
                )
            if not v.dtype.is_floating_point:
                raise CheckpointError(f"{directory / WEIGHTS_NAME}: {k!r} has dtype={v.dtype}, expected a float")
    except BaseException:
        bind.detach(model, adapter_name)
        raise
    with torch.no_grad():
        for k, v in tensors.items():
            expected[k].copy_(v.to(expected[k].dtype))
    return model
