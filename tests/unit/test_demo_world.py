"""The demo's picture generator, its vocabulary, its build cache and in-process asking.

No torch here: the generator needs only PIL, and asking runs against the fake adapters.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from fakes import PNG_MAGIC, FakeTextGenerator, FakeVisionEncoder
from PIL import ImageStat

from vilaserve.adapters.offline.demo import everyday, shapes
from vilaserve.adapters.offline.demo.build_cache import build_key, is_built, variant_dir
from vilaserve.adapters.offline.demo.calibration import calibration_lines
from vilaserve.application.chat.ask_image import AskAboutImages, AskFailed
from vilaserve.domain.api.chat_prompt import build_chat_prompt
from vilaserve.domain.api.openai_requests import parse_chat_request
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


def test_a_follow_up_question_is_asked_as_the_web_chat_asks_its_turn_3() -> None:
    generator = FakeTextGenerator(reply=("blue", ""), template=TEMPLATES["chatml"])
    vision = FakeVisionEncoder()
    asker = AskAboutImages(generator, vision)
    image = PNG_MAGIC + b"x"
    history = [("What shape is this?", "circle"), ("What colour is the circle?", "red")]
    answer = asyncio.run(asker.answer("Is it big or small?", [image], history=history))
    assert answer == "blue"
    prompt, _ = generator.calls[0]
    assert prompt.endswith(
        "<|im_start|>user\n<image>\nWhat shape is this?<|im_end|>\n"
        "<|im_start|>assistant\ncircle<|im_end|>\n"
        "<|im_start|>user\nWhat colour is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\nIs it big or small?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.count("<image>") == 1
    assert vision.encoded == [(image,)]  # the picture travels again with every turn
    # What chat.js sends for that turn: the whole history, the picture only in message 1.
    url = "data:image/png;base64,AAAA"
    body = {
        "model": "vila-demo",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What shape is this?"},
                ],
            },
            {"role": "assistant", "content": "circle"},
            {"role": "user", "content": "What colour is the circle?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "Is it big or small?"},
        ],
    }
    for template in (TEMPLATES["chatml"], TEMPLATES["vicuna_v1"]):
        web = build_chat_prompt(template, parse_chat_request(body).messages, multimodal=True)
        asker = AskAboutImages(FakeTextGenerator(template=template), vision)
        assert asker.prompt("Is it big or small?", 1, history) == web.text
        assert web.image_urls == (url,)
    # Without history the prompt is the single-turn one.
    assert asker.prompt("What shape is this?", 1) == asker.prompt("What shape is this?", 1, ())


def test_asking_reports_a_refused_image() -> None:
    asker = AskAboutImages(FakeTextGenerator(), FakeVisionEncoder())

    async def ask() -> str:
        return await asker.answer("What is it?", [b"not a picture"])

    with pytest.raises(AskFailed, match="could not be decoded"):
        asyncio.run(ask())


# --- the everyday style (training pictures as people draw them) -------------------------------


def _object_box(example: shapes.DemoExample) -> tuple[int, int, int, int]:
    box = example.mask.getbbox()
    assert box is not None, example.scene
    return box


def test_everyday_pictures_are_a_function_of_seed_and_index() -> None:
    first, again = everyday.generate(3, 17), everyday.generate(3, 17)
    assert first.png() == again.png()
    assert (first.question, first.answer) == (again.question, again.answer)
    assert everyday.generate(4, 17).png() != first.png()


def test_everyday_pictures_cover_the_whole_vocabulary_and_wide_frames() -> None:
    seen_kinds: set[str] = set()
    sizes = set()
    for index in range(300):
        example = everyday.generate(0, index)
        assert example.scene.kind in shapes.VOCABULARY[0].scenes or example.scene.kind == "word"
        assert example.answer == example.scene.answer(example.question_kind)
        seen_kinds.add(example.question_kind)
        sizes.add(example.image.size)
        width, height = example.image.size
        assert min(width, height) >= 48 and max(width, height) <= 480
        assert max(width, height) <= 2 * min(width, height) + 1
    assert seen_kinds == set(shapes.QUESTION_KINDS)
    assert any(max(w, h) >= 1.6 * min(w, h) for w, h in sizes)  # non-square frames occur


def test_everyday_size_and_position_answers_match_what_is_drawn() -> None:
    checked = 0
    for index in range(250):
        example = everyday.generate(1, index)
        scene = example.scene
        if scene.kind != "single":
            continue
        checked += 1
        width, height = example.mask.size
        left, top, right, bottom = _object_box(example)
        extent = max(right - left, bottom - top) / min(width, height)
        if scene.size == "small":
            assert extent <= everyday.SMALL_EXTENT[1] + 0.03, (index, extent)
        else:  # big ones may be cut by the border a little
            assert extent >= 0.8 * everyday.BIG_EXTENT[0], (index, extent)
        centre_x, centre_y = (left + right) / 2 / width, (top + bottom) / 2 / height
        expected = {
            "left": centre_x < 0.4,
            "right": centre_x > 0.6,
            "top": centre_y < 0.4,
            "bottom": centre_y > 0.6,
            "center": 0.36 < centre_x < 0.64 and 0.36 < centre_y < 0.64,
        }
        assert expected[str(scene.position)], (index, scene, centre_x, centre_y)
    assert checked > 100


def test_everyday_shapes_stand_out_from_their_background() -> None:
    for index in range(120):
        example = everyday.generate(2, index)
        if example.scene.kind == "word":
            continue
        objects = example.mask.point(lambda v: 255 if v else 0)
        background = objects.point(lambda v: 255 - v)
        # Medians per channel: outlines, anti-aliasing and noise blur a few pixels only.
        shape = ImageStat.Stat(example.image, objects).median
        around = ImageStat.Stat(example.image, background).median
        difference = sum(abs(a - b) for a, b in zip(shape, around, strict=True))
        assert difference > 60, (index, example.scene, shape, around)


def _kind_of(question: str, scene: shapes.Scene) -> str:
    shape = scene.shape or ""
    for kind in shapes.VOCABULARY:
        for phrasing in kind.phrasings.get(scene.kind, ()):
            if phrasing.format(shape=shape, shapes=shapes.PLURALS.get(shape, "")) == question:
                return kind.name
    raise AssertionError(f"{question!r} is not in the vocabulary")


def test_a_conversation_ends_with_the_examples_own_question_after_other_kinds() -> None:
    for index in range(20):
        example = shapes.generate("train", 0, index)
        chat = shapes.conversation(random.Random(index), example, 3)
        assert len(chat) == 3
        assert chat[-1] == (example.question, example.answer)
        for question, answer in chat[:-1]:
            kind = _kind_of(question, example.scene)
            assert kind != example.question_kind
            assert answer == example.scene.answer(kind)
