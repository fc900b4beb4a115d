"""The EDITOR benchmark's selection study (`lab/benchmarks/editor.py`): each rule picks what it says, and the
oracle's best bounds them all."""

from __future__ import annotations

from lab.benchmarks.editor import SELECTION_RULES, Scored, rule_rows


def scored(prompt: str, source: str, image: float, pixels: float, text: float, right: float) -> Scored:
    readings = {"colour": right, "shape": right, "position": right, "count": right}
    return Scored(prompt, source, image, pixels, text, readings)


START = scored("a red circle and a blue square", "start", 0.80, 0.010, 0.70, 1.0)
CLOSE_IN_CLIP = scored("a red circle", "eos", 0.85, 0.020, 0.60, 0.5)
CLOSE_IN_PIXELS = scored("a red circle on the left", "eos", 0.70, 0.005, 0.65, 0.0)
SCENES = [[START, CLOSE_IN_CLIP, CLOSE_IN_PIXELS], [CLOSE_IN_CLIP, START]]


def test_each_rule_picks_by_its_own_score() -> None:
    candidates = SCENES[0]
    assert SELECTION_RULES["start (VGD's prompt)"](candidates) is START
    assert SELECTION_RULES["CLIP image-image (EDITOR's)"](candidates) is CLOSE_IN_CLIP
    assert SELECTION_RULES["pixel MSE"](candidates) is CLOSE_IN_PIXELS
    assert SELECTION_RULES["CLIP prompt-picture"](candidates) is START
    assert SELECTION_RULES["the oracle's best (upper bound)"](candidates) is START


def test_rows_report_what_the_chosen_prompts_regenerate_and_how_often_the_start_stays() -> None:
    rows = {row["selection"]: row for row in rule_rows(SCENES, "two")}
    assert rows["CLIP image-image (EDITOR's)"]["regen shape"] == 50.0
    assert rows["CLIP image-image (EDITOR's)"]["start kept %"] == 0.0
    assert rows["pixel MSE"]["regen colour"] == 50.0  # 0 on the first scene, the start (1) on the second
    best = rows["the oracle's best (upper bound)"]
    assert best["regen position"] == 100.0 and best["start kept %"] == 100.0
    for row in rows.values():
        assert row["scenes"] == "two (2)"
        assert row["regen count"] <= best["regen count"]
