"""Task formats, defined once: how a raw row (or a line a user types) becomes the model's input.

text: one text. pair: two texts, given to the tokenizer as a pair; with `attributes` each text is a record
serialized as "attr: value; attr: value" (Ditto's entity-matching format) and keeps only those attributes.
srl: a sentence with the predicate and the argument head marked, paired with "predicate: P ; argument: A".
Training data (data.py), the sparse method's token positions (tokens.py) and predict all go through `encode`,
so their token positions agree.
"""
from __future__ import annotations

import re

from .errors import UserError

FORMATS = ("text", "pair", "srl")
ATTRIBUTE_START = re.compile(r"(?:^|;\s*)(\w+):")   # "name: ..; description: ..": where each attribute begins


def _field(row: dict, key: str) -> str:
    if key not in row or row[key] is None:
        raise UserError(f"{row['_where']}: missing field '{key}' (fields present: "
                        f"{', '.join(k for k in row if k != '_where')})")
    return str(row[key])


def row_formatter(task):
    """A function from one raw row to {"text", "text_pair", "label"} following the task's input format.
    It reads the task config once: OmegaConf lookups per row took 10 of 11 seconds of loading CLINC150."""
    label_field = "label_coarse" if task.get("coarse") else task.label_field
    fmt, text_field, text_fields = task.format, task.get("text_field"), task.get("text_fields")
    if fmt not in FORMATS:
        raise UserError(f"task.format={fmt!r} is not one of text, pair, srl")
    if fmt == "pair" and (text_fields is None or len(text_fields) != 2):
        raise UserError(f"task.text_fields={text_fields}: a pair task names two fields, e.g. [text_a, text_b]")
    attributes = task.get("attributes")
    if attributes is not None and (fmt != "pair" or not attributes):
        raise UserError(f"task.attributes={list(attributes)}: only a pair task's records have attributes; give a "
                        "non-empty list such as [name, price], or null to keep the texts whole")
    record = (lambda text, where: keep_attributes(text, attributes, where)) if attributes else (lambda text, _: text)

    def format_row(row: dict) -> dict:
        label = _field(row, label_field)
        if fmt == "text":
            text, pair = _field(row, text_field), None
        elif fmt == "pair":
            text = record(_field(row, text_fields[0]), row["_where"])
            pair = record(_field(row, text_fields[1]), row["_where"])
        else:
            text, pair = srl_input(row)
        if not text.strip():
            raise UserError(f"{row['_where']}: empty text; remove the row or fill it in")
        return {"text": text, "text_pair": pair, "label": label}
    return format_row


def keep_attributes(text: str, attributes, where: str) -> str:
    """The named attributes of a serialized record, in the order named: "name: X; price: Y"."""
    starts = list(ATTRIBUTE_START.finditer(text))
    values = {m.group(1): text[m.end():(starts[i + 1].start() if i + 1 < len(starts) else len(text))].strip()
              for i, m in enumerate(starts)}
    missing = [a for a in attributes if a not in values]
    if missing:
        raise UserError(f"{where}: the record has no attribute '{missing[0]}' (it has: {', '.join(values) or 'none'}); "
                        "fix task.attributes or the data")
    return "; ".join(f"{a}: {values[a]}".strip() for a in attributes)


def srl_input(row: dict) -> tuple[str, str]:
    """Mark the predicate with << >> and the argument head with [[ ]] so the model sees both."""
    words = _field(row, "sentence").split(" ")
    p, a = int(_field(row, "predicate_index")), int(_field(row, "argument_index"))
    if not (0 <= p < len(words) and 0 <= a < len(words)):
        raise UserError(f"{row['_where']}: predicate_index/argument_index out of range of the sentence")
    words = list(words)
    words[p] = f"<< {words[p]} >>"
    words[a] = f"[[ {words[a]} ]]"
    return " ".join(words), f"predicate: {row['predicate']} ; argument: {row['argument']}"


def parse_input(task, line: str) -> dict:
    """One user input in the task's format, as a row for `encode`: plain text; 'a<TAB>b' for pairs;
    'sentence<TAB>predicate_index<TAB>argument_index' for srl."""
    parts = line.split("\t")
    if task.format == "pair":
        if len(parts) != 2:
            raise UserError(f"pair task {task.name}: give each input as text_a<TAB>text_b, got {line!r}")
        if task.get("attributes"):   # the model saw only these attributes in training
            parts = [keep_attributes(p, task.attributes, "input") for p in parts]
        return {"text": parts[0], "text_pair": parts[1]}
    if task.format == "srl":
        words = parts[0].split(" ")
        if len(parts) != 3 or not all(x.strip().isdigit() and int(x) < len(words) for x in parts[1:]):
            raise UserError(f"srl: give each input as sentence<TAB>predicate_index<TAB>argument_index, with 0-based "
                            f"word indices into the sentence; got {line!r}")
        p, a = int(parts[1]), int(parts[2])
        text, pair = srl_input({"sentence": parts[0], "predicate_index": p, "argument_index": a,
                                "predicate": words[p], "argument": words[a], "_where": "input"})
        return {"text": text, "text_pair": pair}
    return {"text": line, "text_pair": None}


def encode(tokenizer, rows: list[dict], max_length: int, truncation: bool = True):
    """The tokenizer call every path makes: texts, with pairs when the task has them."""
    texts = [r["text"] for r in rows]
    pairs = [r["text_pair"] for r in rows] if rows and rows[0]["text_pair"] is not None else None
    return tokenizer(texts, pairs, truncation=truncation, max_length=max_length if truncation else None)
