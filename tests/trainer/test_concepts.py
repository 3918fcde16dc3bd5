"""The adapters' worked-example concepts (trainer/data/concepts.py), the recipe's clip folder and the
measurement of cyan and the diagonals."""

import numpy as np
import pytest

from trainer.attributes import measure_attributes
from trainer.data.concepts import CONCEPTS, concept_prompts, mixed_specs
from trainer.data.synthetic import ALL_COLOURS, ALL_MOTIONS, COLOURS, render_clip


@pytest.mark.parametrize("name", ["cyan", "diagonal"])
def test_held_out_combinations_never_reach_training(name):
    concept = CONCEPTS[name]
    train, held = set(concept.combos("train")), set(concept.combos("heldout"))
    assert held == set(concept.heldout) and not (train & held)
    for part in range(3):  # every colour, shape and motion of a held-out triple is seen in training
        assert {c[part] for c in held} <= {c[part] for c in train}
    specs = mixed_specs(name, 200, 0.25, seed=0, num_frames=16, height=32, width=32)
    assert not any(s.combo in held for _, s in specs)
    assert 0.1 < np.mean([s.combo in train for _, s in specs]) < 0.95  # both the concept and the base


@pytest.mark.parametrize("name,size", [("cyan", 32), ("cyan", 64), ("diagonal", 32), ("diagonal", 64)])
def test_real_clips_of_the_concepts_measure_right(name, size):
    """The measure learns the new colour and directions: rendered held-out clips read as what they are."""
    for caption, spec in concept_prompts(name, "heldout", 8, seed=0, height=size, width=size):
        got = measure_attributes(render_clip(spec, 16, size, size), colours=ALL_COLOURS, motions=ALL_MOTIONS)
        assert (got["colour"], got["motion"]) == (spec.colour, spec.motion), caption


def test_base_palette_is_unchanged():
    assert "cyan" not in COLOURS and ALL_COLOURS["cyan"] == (0, 230, 230)


def test_render_clips_folder_reads_through_the_video_path(tmp_path, capsys):
    from trainer.data.videos import open_video_folder
    from trainer.recipes.render_clips import main

    out = tmp_path / "clips"
    assert main(["--concept", "cyan", "--num-clips", "3", "--size", "32", "--out", str(out)]) == 0
    data = open_video_folder(str(out), 16, 32, 32)
    assert len(data) == 3 and data[0]["video"].shape == (16, 3, 32, 32)
    assert main(["--concept", "cyan", "--num-clips", "3", "--out", str(out)]) == 2  # exists: refused
    assert "exists already" in capsys.readouterr().err
