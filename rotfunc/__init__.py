"""rotfunc: RoAD, OFT and RandLoRA adapters as pure torch.func functions over parameter pytrees."""

from .adapter import REGISTRY, Adapter, config_for_peft_type, register

__all__ = ["Adapter", "REGISTRY", "config_for_peft_type", "register"]
