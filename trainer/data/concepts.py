"""New concepts for adapters, over the synthetic vocabulary: what the worked examples teach and how they are
measured (trainer/recipes/cyan.md, trainer/recipes/diagonal.md).

A concept is a set of (colour, shape, motion) combinations the base model never saw, split into the ones a
user's clips show ("train") and held-out ones ("heldout") that only evaluation prompts name; every colour,
shape and motion of a held-out combination occurs in the train split with other partners. ``base`` is the
default model's own held-out prompts (to measure what an adapter made the model forget).
"""

import itertools
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from trainer.data.synthetic import (COLOURS, DIAGONAL_MOTIONS, HELDOUT_COMBOS, MOTIONS, SHAPES, SPLITS, ClipSpec,
                                    canonical_caption, make_caption, sample_spec, split_combos)

Combo = Tuple[str, str, str]


@dataclass(frozen=True)
class Concept:
    name: str
    colours: Tuple[str, ...]
    motions: Tuple[str, ...]
    heldout: Tuple[Combo, ...]

    def combos(self, split: str) -> List[Combo]:
        """The (colour, shape, motion) triples of ``split`` ("train" or "heldout"), in a fixed order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if self.name == "base":
            return split_combos(split, MOTIONS)
        every = list(itertools.product(self.colours, SHAPES, self.motions))
        held = set(self.heldout)
        return [c for c in every if (c in held) == (split == "heldout")]


CONCEPTS = {
    "base": Concept("base", tuple(COLOURS), MOTIONS, HELDOUT_COMBOS),
    # Cyan in every shape and direction; four combinations held out (each shape and motion still seen in cyan).
    "cyan": Concept("cyan", ("cyan",), MOTIONS, (("cyan", "triangle", "up"), ("cyan", "circle", "left"),
                                                 ("cyan", "square", "down"), ("cyan", "circle", "right"))),
    # The four diagonal motions with the base colours; eight combinations held out, two per direction.
    "diagonal": Concept("diagonal", tuple(COLOURS), DIAGONAL_MOTIONS, (
        ("red", "circle", "up-right"), ("blue", "square", "down-left"), ("green", "triangle", "up-left"),
        ("yellow", "square", "down-right"), ("white", "triangle", "up-right"), ("orange", "circle", "down-left"),
        ("purple", "square", "up-left"), ("green", "circle", "down-right"))),
}


def get_concept(name: str) -> Concept:
    if name not in CONCEPTS:
        raise ValueError(f"unknown concept {name!r}; choose from {', '.join(CONCEPTS)}")
    return CONCEPTS[name]


def concept_prompts(concept: str, split: str = "heldout", n: int = 16, seed: int = 0, paraphrase: bool = False,
                    num_frames: int = 16, height: int = 32, width: int = 32) -> List[Tuple[str, ClipSpec]]:
    """``n`` (caption, ClipSpec) pairs of a concept's split, its triples shuffled once and cycled (as
    :func:`trainer.data.synthetic.prompts_for` does for the base set)."""
    combos = get_concept(concept).combos(split)
    rng = np.random.default_rng([seed, SPLITS.index(split), 2 << 20, len(concept)])
    order = rng.permutation(len(combos))
    out = []
    for k in range(n):
        spec = sample_spec(rng, split, combo=combos[order[k % len(combos)]], num_frames=num_frames, height=height,
                           width=width)
        out.append((make_caption(spec, rng) if paraphrase else canonical_caption(spec), spec))
    return out


def mixed_specs(concept: str, n: int, base_fraction: float, seed: int, num_frames: int, height: int,
                width: int) -> List[Tuple[str, ClipSpec]]:
    """A user-style training set: ``n`` (paraphrased caption, spec) pairs, ``base_fraction`` of them from the
    base model's own train split (so the adapter keeps what the model knew), the rest from the concept's train
    split."""
    rng = np.random.default_rng([seed, 3 << 20, len(concept)])
    concept_combos = get_concept(concept).combos("train")
    base_combos: Sequence[Combo] = split_combos("train", MOTIONS)
    out = []
    for _ in range(n):
        combos = base_combos if rng.random() < base_fraction else concept_combos
        spec = sample_spec(rng, "train", combo=combos[int(rng.integers(len(combos)))], num_frames=num_frames,
                           height=height, width=width)
        out.append((make_caption(spec, rng), spec))
    return out
