"""Methods that only choose which existing parameters train: full, head_only, bitfit, layer_select."""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..errors import UserError
from ..models import is_head, transformer_blocks
from .base import Method, freeze_all_but, register


@register
class Full(Method):
    """End-to-end finetuning: everything trains."""
    name = "full"
    changes_base_weights = True

    def prepare(self, model, context=None, state=None):
        for p in model.parameters():
            p.requires_grad = True
        return model


@register
class HeadOnly(Method):
    """Linear probe: the backbone is frozen, only the head trains (a cost floor)."""
    name = "head_only"
    frozen_bottom = True

    def prepare(self, model, context=None, state=None):
        freeze_all_but(model, lambda name: False)
        return model


@register
class BitFit(Method):
    """Biases of the backbone plus the head (Ben Zaken et al., 2022). Backbones without biases
    (Llama-style decoders) train their normalization gains instead, the nearest equivalent."""
    name = "bitfit"
    changes_base_weights = True

    def prepare(self, model, context=None, state=None):
        has_bias = any(n.endswith(".bias") and not is_head(n) for n, _ in model.named_parameters())
        freeze_all_but(model, (lambda n: n.endswith(".bias")) if has_bias else (lambda n: "norm" in n.lower()))
        return model


@register
class LayerSelect(Method):
    """Whole transformer blocks train, the rest is frozen: the top N by default."""
    name = "layer_select"
    changes_base_weights = True
    frozen_bottom = True

    @dataclasses.dataclass
    class Options:
        num_blocks: int = 2
        position: str = "top"
        blocks: Optional[list[int]] = None

    def validate(self) -> None:
        if self.cfg.position not in ("top", "bottom"):
            raise UserError(f"method.position={self.cfg.position!r}: choose top or bottom")

    def chosen_blocks(self, n_blocks: int) -> list[int]:
        if self.cfg.blocks:
            chosen = [int(i) for i in self.cfg.blocks]
            bad = [i for i in chosen if not -n_blocks <= i < n_blocks]
            if bad:
                raise UserError(f"method.blocks={chosen}: the backbone has blocks 0..{n_blocks - 1}")
            return sorted({i % n_blocks for i in chosen})
        n = int(self.cfg.num_blocks)
        if not 1 <= n <= n_blocks:
            raise UserError(f"method.num_blocks={n}: must be between 1 and {n_blocks} for this backbone")
        return list(range(n)) if self.cfg.position == "bottom" else list(range(n_blocks - n, n_blocks))

    def prepare(self, model, context=None, state=None):
        blocks = transformer_blocks(model)
        chosen = self.chosen_blocks(len(blocks))
        prefixes = tuple(f"{blocks[i][0]}." for i in chosen)
        freeze_all_but(model, lambda name: name.startswith(prefixes))
        self.state = {"blocks": chosen}
        return model
