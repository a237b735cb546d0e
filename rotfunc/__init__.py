"""rotfunc: RoAD, OFT and RandLoRA adapters as pure torch.func functions over parameter pytrees.

The core is stateless (``apply_road``, ``oft_rotate``, ``apply_randlora``, ...: params first, statics
keyword-only, composable with ``torch.func.grad``/``vmap``/``jvp``/``functional_call``/``torch.compile``); the
shims (``attach``, ``adapter_params``, ``merge``, ...) bind them onto ``nn.Linear`` and bitsandbytes layers of a
real model; ``save_adapter``/``load_adapter`` speak PEFT's checkpoint format.
"""

from . import quant
from .adapter import REGISTRY, Adapter, config_for_peft_type, register
from .bind import (
    BASE_ADAPTER,
    AdaptedLinear,
    AdapterState,
    active_adapter,
    adapter_batch,
    adapter_names,
    adapter_params,
    adapter_state,
    adapted_layers,
    attach,
    detach,
    disable_adapters,
    disabled,
    enable_adapters,
    load_params,
    merge,
    merge_and_unload,
    num_trainable,
    prepare,
    set_adapter,
    unmerge,
    unprepare,
)
from .checkpoint import CheckpointError, load_adapter, save_adapter
from .ensemble import (
    EnsembleState,
    ensemble_init,
    ensemble_step,
    init_params,
    rename_params,
    split_by_adapter,
    stack_params,
    unstack_params,
)
from .linalg import cayley, cayley_neumann, skew
from .oft import (
    OFTConfig,
    OFTParams,
    coft_project,
    oft_blocks,
    oft_init,
    oft_matrix,
    oft_merge,
    oft_rotate,
    oft_unmerge,
    resolve_block_size,
)
from .randlora import (
    RandLoraBases,
    RandLoraConfig,
    RandLoraParams,
    apply_randlora,
    randlora_bases,
    randlora_delta,
    randlora_dims,
    randlora_init,
    randlora_merge,
    randlora_unmerge,
)
from .road import RoadConfig, RoadParams, apply_road, road_init, road_matrix, road_merge, road_unmerge
from .train import AdamState, Optimizer, SGDState, adam, sgd, value_and_grad

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
    "value_and_grad", "Optimizer", "SGDState", "AdamState", "sgd", "adam",
    # many adapters on one base
    "stack_params", "unstack_params", "rename_params", "split_by_adapter", "init_params",
    "EnsembleState", "ensemble_init", "ensemble_step",
    # checkpoints
    "save_adapter", "load_adapter", "CheckpointError",
    # the quantized seam (module)
    "quant",
]
