"""Finetuning methods by config name: every module of this package registers its own (see base.py)."""
from __future__ import annotations

import importlib
import pkgutil

from .base import METHODS, Method, MethodContext, count_params, get_method, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "MethodContext", "get_method", "count_params", "register"]
