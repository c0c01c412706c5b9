"""The demo's picture generator, its vocabulary, its build cache and in-process asking.

No torch here: the generator needs only PIL, and asking runs against the fake adapters.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fakes import PNG_MAGIC, FakeTextGenerator, FakeVisionEncoder

from vilaserve.adapters.offline.demo import shapes
from vilaserve.adapters.offline.demo.build_cache import build_key, is_built, variant_dir
from vilaserve.adapters.offline.demo.calibration import calibration_lines
from vilaserve.application.chat.ask_image import AskAboutImages, AskFailed
from vilaserve.domain.shared.conversation import TEMPLATES


def test_same_split_seed_and_index_give_the_same_picture_and_question() -> None:
    first, again = shapes.generate("train", 3, 17), shapes.generate("train", 3, 17)
    assert first.png() == again.png()
    assert (first.question, first.answer) == (again.question, again.answer)
    other = shapes.generate("train", 4, 17)
    assert other.png() != first.png()


def test_every_answer_is_in_its_question_kinds_answer_set() -> None:
    kinds = {kind.name: kind for kind in shapes.VOCABULARY}
    allowed = {
        "shape": set(shapes.SHAPES),
        "colour": set(shapes.COLOURS),
        "size": set(shapes.SIZES),
        "position": set(shapes.POSITIONS),
        "count": set(shapes.COUNTS),
        "text": set(shapes.WORDS),
    }
    seen: set[str] = set()
    for example in shapes.examples("train", 0, 300):
        kind = kinds[example.question_kind]
        assert example.scene.kind in kind.scenes
        assert "{" not in example.question, example.question
        seen.add(example.question_kind)
        assert example.answer in allowed[example.question_kind]
    assert seen == set(shapes.QUESTION_KINDS)


def test_held_out_pictures_never_share_an_image_size_with_training() -> None:
    train = {shapes.generate("train", 0, i).image.size for i in range(200)}
    held_out = {shapes.generate("eval", 0, i).image.size for i in range(200)}
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in train)
    assert not train & held_out
    for width, height in train | held_out:
        assert max(width, height) <= 1.25 * min(width, height)


def test_the_mask_marks_each_object_where_it_is_drawn() -> None:
    for index in range(40):
        example = shapes.generate("eval", 1, index)
        objects = {value for value in example.mask.get_flattened_data() if value}
        expected = example.scene.count if example.scene.kind != "word" else 1
        assert len(objects) == expected, example.scene


@pytest.mark.parametrize(
    ("text", "normal"), [(" Red.", "red"), ("3", "3"), ("A  red circle.\n", "a red circle")]
)
def test_answers_compare_without_case_space_or_final_period(text: str, normal: str) -> None:
    assert shapes.normalize_answer(text) == normal


def test_calibration_text_is_one_dialogue_per_line() -> None:
    lines = calibration_lines(5)
    assert len(lines) == 5
    assert all("\n" not in line and line.startswith("The picture shows") for line in lines)


def test_build_cache_key_follows_the_weights(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"one")
    first = variant_dir("awq", tmp_path, weights)
    assert first.name == "vila-demo" and first.parent.name == "awq"
    assert not is_built(first)
    weights.write_bytes(b"two")
    assert build_key(weights) != first.parent.parent.name
    with pytest.raises(FileNotFoundError, match="train-demo-vision"):
        build_key(tmp_path / "missing.safetensors")


def test_asking_builds_the_api_prompt_and_streams_the_answer() -> None:
    generator = FakeTextGenerator(reply=("red", ""), template=TEMPLATES["chatml"])
    vision = FakeVisionEncoder()
    asker = AskAboutImages(generator, vision)
    answer = asyncio.run(asker.answer("What colour is it?", [PNG_MAGIC + b"x"]))
    assert answer == "red"
    prompt, params = generator.calls[0]
    assert prompt.endswith(
        "<|im_start|>user\n<image>\nWhat colour is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert params.is_greedy
    assert vision.encoded == [(PNG_MAGIC + b"x",)]


def test_asking_reports_a_refused_image() -> None:
    asker = AskAboutImages(FakeTextGenerator(), FakeVisionEncoder())

    async def ask() -> str:
        return await asker.answer("What is it?", [b"not a picture"])

    with pytest.raises(AskFailed, match="could not be decoded"):
        asyncio.run(ask())
