"""Model code: one file per architecture, plain nn.Modules."""

from __future__ import annotations

from torch import nn

from tinytitan.config import ModelConfig
from tinytitan.models.cache import KVCache
from tinytitan.models.gemma3 import Gemma3
from tinytitan.models.llama import Llama

ARCHITECTURES: dict[str, type[nn.Module]] = {"gemma3": Gemma3, "llama": Llama}


def build_model(cfg: ModelConfig) -> nn.Module:
    return ARCHITECTURES[cfg.arch](cfg)


__all__ = ["ARCHITECTURES", "Gemma3", "KVCache", "Llama", "build_model"]
