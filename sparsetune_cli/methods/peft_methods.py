"""Methods from peft: LoRA and prefix tuning. The head (and a fresh pooler) train fully."""
from __future__ import annotations

import dataclasses

from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

from ..errors import UserError
from .base import Method, register


def _head_modules(model) -> list[str]:
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    return [m for m in ("classifier", "score", "pooler") if m in names]


@register
class Lora(Method):
    name = "lora"

    @dataclasses.dataclass
    class Options:
        r: int = 8
        alpha: float = 16
        dropout: float = 0.1
        target: str = "attention"

    def validate(self) -> None:
        if self.cfg.r < 1 or not 0 <= self.cfg.dropout < 1 or self.cfg.target not in ("attention", "all_linear"):
            raise UserError(f"method.r={self.cfg.r}, method.dropout={self.cfg.dropout}, method.target="
                            f"{self.cfg.target!r}: allowed r >= 1, dropout in [0, 1), target attention or all_linear")

    def prepare(self, model, context=None, state=None):
        targets = "all-linear" if self.cfg.target == "all_linear" else list(self.cfg.target_modules[model.config.model_type])
        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=self.cfg.r, lora_alpha=self.cfg.alpha,
                            lora_dropout=self.cfg.dropout, target_modules=targets,
                            modules_to_save=_head_modules(model))
        return get_peft_model(model, config)

    def export(self, model):
        """Fold the adapter into the base weights: a plain model with no inference overhead."""
        return model.merge_and_unload()


@register
class Prefix(Method):
    name = "prefix"
    mergeable = False

    @dataclasses.dataclass
    class Options:
        num_virtual_tokens: int = 20
        projection: bool = False

    def validate(self) -> None:
        if self.cfg.num_virtual_tokens < 1:
            raise UserError(f"method.num_virtual_tokens={self.cfg.num_virtual_tokens}: allowed >= 1")

    def prepare(self, model, context=None, state=None):
        config = PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=self.cfg.num_virtual_tokens,
                                    prefix_projection=self.cfg.projection,
                                    modules_to_save=_head_modules(model))
        return get_peft_model(model, config)

    def export(self, model):
        raise UserError("prefix tuning cannot be merged into the base weights: its virtual tokens are extra "
                        "inputs; use `sparsetune predict` on the run instead")
