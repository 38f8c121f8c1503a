"""Finetuning methods by config name. Each is a small class (see base.Method)."""
from __future__ import annotations

from ..errors import UserError
from .base import Method, count_params
from .peft_methods import Lora, Prefix
from .simple import BitFit, Full, HeadOnly, LayerSelect
from .sparse import Sparse

METHODS: dict[str, type[Method]] = {m.name: m for m in (Sparse, Full, Lora, LayerSelect, Prefix, HeadOnly, BitFit)}


def get_method(cfg) -> Method:
    if cfg.name not in METHODS:
        raise UserError(f"unknown method {cfg.name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[cfg.name](cfg)


__all__ = ["METHODS", "Method", "get_method", "count_params"]
