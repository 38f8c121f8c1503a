"""Stage 1 of the sparse method: token groups, the task's label-associated words and short phrases.

A group is the backbone's token ids for 1..max_ngram consecutive words of a training text. Each
group is scored by its association with each class: the weighted log-odds ratio with an
informative Dirichlet prior (Monroe, Colaresi & Quinn 2008), as a z-score, maximized over classes.
Counts are per example (a group counts once per text). No tokens are added to the vocabulary.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from .formats import encode   # the same tokenization the model sees, so token positions line up


@dataclass
class TokenGroups:
    groups: list[tuple[int, ...]]       # token ids, best first
    scores: list[float]                 # z-score of the best class
    classes: list[int]                  # the class each group points to
    counts: list[int]                   # training examples containing the group
    max_ngram: int
    index: dict = field(default_factory=dict)   # group -> rank, for position lookup

    def __post_init__(self):
        self.index = {g: i for i, g in enumerate(self.groups)}


def example_grams(enc, i: int, max_ngram: int):
    """(group token ids, token positions) for every 1..max_ngram run of consecutive words in example i."""
    words: list[list[int]] = []          # token positions of each word, in order
    last = None
    seq_ids = enc.sequence_ids(i)
    for pos, w in enumerate(enc.word_ids(i)):
        if w is None:
            last = None
            continue
        key = (seq_ids[pos], w)
        if key != last:
            words.append([])
            last = key
        words[-1].append(pos)
    ids = enc["input_ids"][i]
    for start in range(len(words)):
        positions: list[int] = []
        for n in range(max_ngram):
            if start + n >= len(words):
                break
            positions = positions + words[start + n]
            yield tuple(ids[p] for p in positions), positions


def mine(rows: list[dict], labels: list[str], tokenizer, max_length: int, num_groups: int, min_count: int,
         max_ngram: int, prior: float = 100.0) -> TokenGroups:
    label_id = {name: i for i, name in enumerate(labels)}
    enc = encode(tokenizer, rows, max_length)
    special = set(tokenizer.all_special_ids)
    wordlike: dict[int, bool] = {}   # a token with a letter or digit (not punctuation, not special)

    def has_word(gram) -> bool:
        for t in gram:
            if t not in wordlike:
                wordlike[t] = t not in special and any(ch.isalnum() for ch in tokenizer.decode([t]))
            if wordlike[t]:
                return True
        return False

    per_class: dict[tuple, Counter] = defaultdict(Counter)
    for i, row in enumerate(rows):
        c = label_id[row["label"]]
        for gram in {g for g, _ in example_grams(enc, i, max_ngram)}:
            if has_word(gram):
                per_class[gram][c] += 1
    grams = [g for g, cnt in per_class.items() if sum(cnt.values()) >= min_count]
    if not grams:
        return TokenGroups([], [], [], [], max_ngram)
    counts = np.zeros((len(grams), len(labels)), dtype=np.float64)
    for gi, g in enumerate(grams):
        for c, n in per_class[g].items():
            counts[gi, c] = n
    z = log_odds_z(counts, prior)
    best_class = z.argmax(1)
    best = z[np.arange(len(grams)), best_class]
    order = np.argsort(-best, kind="stable")[:num_groups]
    return TokenGroups([grams[i] for i in order], [float(best[i]) for i in order],
                       [int(best_class[i]) for i in order], [int(counts[i].sum()) for i in order], max_ngram)


def log_odds_z(counts: np.ndarray, prior: float) -> np.ndarray:
    """z-scores of the log-odds ratio of each group in each class vs all other classes,
    with an informative Dirichlet prior proportional to overall frequency (total strength `prior`)."""
    total_w = counts.sum(1, keepdims=True)                      # per group
    alpha = prior * total_w / total_w.sum()                      # prior per group
    a0 = alpha.sum()
    n_c = counts.sum(0, keepdims=True)                           # per class
    rest = total_w - counts
    n_rest = n_c.sum() - n_c
    log_c = np.log(counts + alpha) - np.log(n_c + a0 - counts - alpha)
    log_r = np.log(rest + alpha) - np.log(n_rest + a0 - rest - alpha)
    var = 1.0 / (counts + alpha) + 1.0 / (rest + alpha)
    return (log_c - log_r) / np.sqrt(var)


def position_mask(groups: TokenGroups, enc, i: int, length: int, label: int | None = None) -> np.ndarray:
    """1 at the token positions of example i covered by a kept group. With the example's label: only groups
    that point to that label count, each weighted by its association z-score (the largest where groups overlap)."""
    mask = np.zeros(length, dtype=np.float32)
    for gram, positions in example_grams(enc, i, groups.max_ngram):
        rank = groups.index.get(gram)
        if rank is None:
            continue
        if label is None:
            mask[positions] = 1.0
        elif groups.classes[rank] == label:
            mask[positions] = np.maximum(mask[positions], groups.scores[rank])
    return mask


def report(groups: TokenGroups, labels: list[str], tokenizer, top: int = 30, per_class: int = 5) -> dict:
    """The human-readable case study: the top groups overall and per class, as JSON and Markdown."""
    entries = [{"group": tokenizer.decode(list(g)).strip(), "token_ids": list(g), "class": labels[c],
                "score": round(s, 3), "count": n}
               for g, s, c, n in zip(groups.groups, groups.scores, groups.classes, groups.counts)]
    by_class: dict[str, list] = defaultdict(list)
    for e in entries:
        if len(by_class[e["class"]]) < per_class:
            by_class[e["class"]].append(e)
    lines = [f"# Token groups ({len(entries)} kept)", "", f"## Top {top} overall", "",
             "| group | class | score | count |", "|---|---|---|---|"]
    lines += [f"| {e['group']} | {e['class']} | {e['score']:.1f} | {e['count']} |" for e in entries[:top]]
    lines += ["", "## Per class", "", "| class | top groups (score) |", "|---|---|"]
    for name in labels:
        cell = ", ".join(f"{e['group']} ({e['score']:.1f})" for e in by_class.get(name, [])) or "(none)"
        lines.append(f"| {name} | {cell} |")
    return {"groups": entries, "per_class": {k: by_class.get(k, []) for k in labels},
            "markdown": "\n".join(lines) + "\n"}


def token_report(cfg) -> dict:
    """Mine a task's groups with the configured backbone tokenizer, without training (`sparsetune tokens`)."""
    from .config import method_defaults
    from .data import load_task
    from .models import load_tokenizer
    tokenizer = load_tokenizer(cfg.backbone)
    data = load_task(cfg.task, cfg.data_dir, cfg.seed)
    m = cfg.method if "num_groups" in cfg.method else method_defaults("sparse")   # sparse, sparse_all: their own
    groups = mine(data.splits["train"], data.labels, tokenizer, cfg.task.max_length, m.num_groups, m.min_count,
                  m.max_ngram)
    return report(groups, data.labels, tokenizer)
