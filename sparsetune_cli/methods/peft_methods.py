"""Methods from peft: LoRA and prefix tuning. The head (and a fresh pooler) train fully."""
from __future__ import annotations

from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

from ..errors import UserError
from .base import Method


def _head_modules(model) -> list[str]:
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    return [m for m in ("classifier", "score", "pooler") if m in names]


class Lora(Method):
    name = "lora"

    def prepare(self, model, context=None, state=None):
        targets = "all-linear" if self.cfg.target == "all_linear" else list(self.cfg.target_modules[model.config.model_type])
        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=self.cfg.r, lora_alpha=self.cfg.alpha,
                            lora_dropout=self.cfg.dropout, target_modules=targets,
                            modules_to_save=_head_modules(model))
        return get_peft_model(model, config)

    def export(self, model):
        """Fold the adapter into the base weights: a plain model with no inference overhead."""
        return model.merge_and_unload()


class Prefix(Method):
    name = "prefix"

    def prepare(self, model, context=None, state=None):
        config = PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=self.cfg.num_virtual_tokens,
                                    prefix_projection=bool(self.cfg.get("projection", False)),
                                    modules_to_save=_head_modules(model))
        return get_peft_model(model, config)

    def export(self, model):
        raise UserError("prefix tuning cannot be merged into the base weights: its virtual tokens are extra "
                        "inputs; use `sparsetune predict` on the run instead")
