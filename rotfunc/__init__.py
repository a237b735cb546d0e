"""rotfunc: RoAD, OFT and RandLoRA adapters as pure torch.func functions over parameter pytrees.

The core is stateless (``apply_road``, ``oft_rotate``, ``apply_randlora``, ...: params first, statics
keyword-only, composable with ``torch.func.grad``/``vmap``/``jvp``/``functional_call``/``torch.compile``); the
shims (``attach``, ``adapter_params``, ``merge``, ...) bind them onto ``nn.Linear`` and bitsandbytes layers of a
real model; ``save_adapter``/``load_adapter`` speak PEFT's checkpoint format.

Imports are lazy (PEP 562): ``import rotfunc`` loads no torch until a name is used, so the command line
(``python -m rotfunc demo --help``) answers at once; ``from rotfunc import attach`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # rotfunc.adapter
    "REGISTRY": "adapter",
    "Adapter": "adapter",
    "config_for_peft_type": "adapter",
    "register": "adapter",
    # rotfunc.bind
    "BASE_ADAPTER": "bind",
    "AdaptedLinear": "bind",
    "AdapterState": "bind",
    "active_adapter": "bind",
    "adapter_batch": "bind",
    "adapter_names": "bind",
    "adapter_params": "bind",
    "adapter_state": "bind",
    "adapted_layers": "bind",
    "attach": "bind",
    "detach": "bind",
    "disable_adapters": "bind",
    "disabled": "bind",
    "enable_adapters": "bind",
    "group_rows": "bind",
    "load_params": "bind",
    "merge": "bind",
    "merge_and_unload": "bind",
    "num_trainable": "bind",
    "prepare": "bind",
    "set_adapter": "bind",
    "unmerge": "bind",
    "unprepare": "bind",
    # rotfunc.checkpoint
    "CheckpointError": "checkpoint",
    "load_adapter": "checkpoint",
    "save_adapter": "checkpoint",
    # rotfunc.ensemble
    "EnsembleState": "ensemble",
    "ensemble_init": "ensemble",
    "ensemble_step": "ensemble",
    "init_params": "ensemble",
    "rename_params": "ensemble",
    "split_by_adapter": "ensemble",
    "stack_params": "ensemble",
    "unstack_params": "ensemble",
    # rotfunc.linalg
    "cayley": "linalg",
    "cayley_neumann": "linalg",
    "skew": "linalg",
    # rotfunc.oft
    "OFTConfig": "oft",
    "OFTParams": "oft",
    "coft_project": "oft",
    "oft_blocks": "oft",
    "oft_init": "oft",
    "oft_matrix": "oft",
    "oft_merge": "oft",
    "oft_rotate": "oft",
    "oft_unmerge": "oft",
    "resolve_block_size": "oft",
    # rotfunc.randlora
    "RandLoraBases": "randlora",
    "RandLoraConfig": "randlora",
    "RandLoraParams": "randlora",
    "apply_randlora": "randlora",
    "randlora_bases": "randlora",
    "randlora_delta": "randlora",
    "randlora_dims": "randlora",
    "randlora_init": "randlora",
    "randlora_merge": "randlora",
    "randlora_unmerge": "randlora",
    # rotfunc.road
    "RoadConfig": "road",
    "RoadParams": "road",
    "apply_road": "road",
    "road_init": "road",
    "road_matrix": "road",
    "road_merge": "road",
    "road_unmerge": "road",
    # rotfunc.train
    "AdamState": "train",
    "Optimizer": "train",
    "SGDState": "train",
    "adam": "train",
    "compile_blocks": "train",
    "uncompile_blocks": "train",
    "sgd": "train",
    "value_and_grad": "train",
    "quant": "",
}

__version__ = "0.1.0"

__all__ = [
    # adapters: RoAD
    "RoadParams", "road_init", "apply_road", "road_matrix", "road_merge", "road_unmerge", "RoadConfig",
    # OFT
    "skew", "cayley", "cayley_neumann",
    "OFTParams", "oft_init", "oft_blocks", "oft_rotate", "oft_matrix", "oft_merge", "oft_unmerge",
    "coft_project", "resolve_block_size", "OFTConfig",
    # RandLoRA
    "RandLoraBases", "RandLoraParams", "randlora_bases", "randlora_dims", "randlora_init", "apply_randlora",
    "randlora_delta", "randlora_merge", "randlora_unmerge", "RandLoraConfig",
    # the protocol
    "Adapter", "REGISTRY", "register", "config_for_peft_type",
    # shims
    "BASE_ADAPTER", "AdaptedLinear", "AdapterState", "adapter_state", "adapted_layers", "attach", "detach", "prepare", "unprepare", "adapter_params", "load_params",
    "set_adapter", "active_adapter", "adapter_names", "disable_adapters", "enable_adapters", "disabled",
    "adapter_batch", "merge", "unmerge", "merge_and_unload", "num_trainable",
    # training step
    "value_and_grad", "compile_blocks", "uncompile_blocks", "Optimizer", "SGDState", "AdamState", "sgd", "adam",
    # many adapters on one base
    "stack_params", "unstack_params", "rename_params", "split_by_adapter", "init_params",
    "EnsembleState", "ensemble_init", "ensemble_step",
    # checkpoints
    "save_adapter", "load_adapter", "CheckpointError",
    # the quantized seam (module)
    "quant",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rotfunc' has no attribute {name!r}")
    value = importlib.import_module(f".{module or name}", __name__)
    if module:
        value = getattr(value, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
