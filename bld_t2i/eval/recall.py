"""Caption recall from the Hamming neighbour search: does a sample land among the training
latents of its own prompt? It needs no weights.

A prompt is *seen* when the training set has it: for a text-conditioned model, when its
caption equals a training caption after `normalise_caption` (lower case, surrounding and
repeated whitespace removed, nothing else: "Red  apple " is "red apple", "red apples" is
not); for a class-conditional model, when its label (the prompt is the label) is a
training sample's `.json` label. Unconditional models have no seen prompts.

recall@k over a setting's samples of seen prompts = the fraction whose k nearest training
latents (the search the evaluation already runs, nearest first) include one carrying the
prompt's caption (or label). A model that copies its training set scores 1.0 at k = 1; a
model whose samples ignore the prompt scores about the prompt's share of the training set
at k = 1 (chance).
"""

from __future__ import annotations

from collections.abc import Sequence

from bld_t2i.eval.neighbours import LatentShard, Neighbour

KS = (1, 10)


def normalise_caption(text: str) -> str:
    return " ".join(text.lower().split())


class TrainingConditions:
    """The captions and labels of a latent data set, collected shard by shard (`add` is an
    `on_shard` of the neighbour search)."""

    def __init__(self) -> None:
        self.captions: set[str] = set()
        self.labels: set[int] = set()

    def add(self, name: str, shard: LatentShard) -> None:
        self.captions.update(normalise_caption(c) for c in shard.captions)
        self.labels.update(label for label in shard.labels if label >= 0)

    def target(self, prompt: str, by: str) -> str | int | None:
        """What a sample of `prompt` must match in its neighbours, or None when the prompt is unseen."""
        if by == "caption":
            caption = normalise_caption(prompt)
            return caption if caption in self.captions else None
        try:
            label = int(prompt)
        except ValueError:
            return None
        return label if label in self.labels else None


def recall_at(found: Sequence[Sequence[Neighbour]], targets: Sequence[str | int | None], by: str,
              ks: Sequence[int] = KS) -> dict[str, float]:
    """{"recall_at_{k}": fraction} over the samples whose target is not None; `found[i]` is
    sample i's neighbours, nearest first. Empty when no sample has a target, or a k is
    beyond the neighbours searched."""
    if by not in ("caption", "label"):
        raise ValueError(f"recall by 'caption' or 'label', got {by!r}")
    pairs = [(ns, t) for ns, t in zip(found, targets, strict=True) if t is not None]
    if not pairs:
        return {}
    out = {}
    for k in ks:
        if any(len(ns) < k for ns, _ in pairs):
            continue
        hits = [any((normalise_caption(n.caption) if by == "caption" else n.label) == t for n in ns[:k])
                for ns, t in pairs]
        out[f"recall_at_{k}"] = sum(hits) / len(hits)
    return out
