"""The demo vision recipe: teach a small SigLIP tower + projector to talk to a frozen SmolLM2.

Three stages, on pictures `shapes.generate` draws on the fly (never the same one twice):

0. **Instruction** (`learn_instruction`, through the frozen LLM, no pictures): the last
   `CaptionTargets.FREE_TOKENS` image tokens become learned vectors that make the LLM answer in
   one word, trained with the other image tokens set to the true caption's word embeddings.
1. **Tower and projector** (no LLM): each image token is regressed onto its target (the caption
   word's input embedding, or stage 0's vector), plus small classification heads per attribute
   and per patch that give the tower more signal per picture.
2. **Polish through the frozen LLMs** (`stage2_steps`): the LLMs' cross-entropy on the
   answer tokens (and the closing `<|im_end|>`), averaged over the 16-bit LLM and, with
   `instruction_quantized_llm`, its W4A16 AWQ build, with the heads' and caption losses kept
   beside it. Prompts are built by the serving code itself (`build_chat_prompt` with the
   worker's template, `tokenize_with_images`), so training sees exactly the positions serving
   will.

The LLM runs in bf16 (what the CPU worker serves in) with its weights frozen, or in fp32 on a CPU
that only emulates bf16 (`dtype: auto`; a step there runs several times faster); the constant
prompt head (system turn and `<|im_start|>user\\n`) is run once into a KV cache and shared by
every row, so a step only runs the 16 image positions, the question and the answer.

The heads exist only for training and are not saved in the committed weights.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import platform
import random
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from vilaserve.adapters.offline.demo import everyday, shapes
from vilaserve.adapters.offline.demo.vision_model import (
    ASPECT_RATIO,
    IMAGE_SIZE,
    PATCH_SIZE,
    DemoVision,
    load_weights,
    new_demo_vision,
    preprocessor,
    save_weights,
)
from vilaserve.adapters.offline.gguf_import import SMOLLM2_REQUIREMENT
from vilaserve.adapters.shared.jinja_chat_template import JinjaChatTemplateRenderer
from vilaserve.adapters.worker.torch_vila.checkpoint import VilaCheckpoint
from vilaserve.adapters.worker.torch_vila.device import cpu_computes_bf16_natively
from vilaserve.adapters.worker.torch_vila.kv_cache import KVCache
from vilaserve.adapters.worker.torch_vila.llama import Llama
from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs
from vilaserve.adapters.worker.torch_vila.runtime import load_llm, pick_template
from vilaserve.adapters.worker.torch_vila.tokenization import (
    IMAGE_TOKEN_INDEX,
    load_tokenizer,
    tokenize_with_images,
)
from vilaserve.application.chat.ask_image import chat_messages
from vilaserve.domain.api.chat_prompt import build_chat_prompt
from vilaserve.domain.shared.conversation import ConversationTemplate

log = logging.getLogger(__name__)

# Every attribute a head predicts, with its classes (index = label).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "scene": shapes.SCENE_KINDS,
    "shape": shapes.SHAPES,
    "colour": tuple(shapes.COLOURS),
    "size": shapes.SIZES,
    "position": shapes.POSITIONS,
    "count": shapes.COUNTS,
    "word": shapes.WORDS,
}
IGNORE = -100
# Stage 2 draws its pictures from another part of the index space than stage 1.
STAGE2_INDEX_OFFSET = 10_000_000
VALIDATION_SEED = 10_001  # eval-split pictures; the accuracy benchmark uses other seeds


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    stage1_steps: int = 5000
    stage1_batch: int = 32
    stage1_lr: float = 2e-3
    stage1_caption_weight: float = 1.0
    stage2_steps: int = 150
    stage2_batch: int = 16
    stage2_lr: float = 3e-4
    tower_lr_scale: float = 0.3  # stage 2: the pre-trained tower moves slower than the projector
    aux_weight: float = 0.2  # stage 2: the heads' loss, keeping what the tower knows
    caption_weight: float = 1.0  # stage 2: the caption loss, keeping the image tokens readable
    weight_decay: float = 0.01
    validate_every: int = 100
    validation_size: int = 96
    checkpoint_every: int = 50
    # ... and at least this often in minutes, so a run stopped at any point loses little.
    checkpoint_minutes: float = 5.0
    threads: int = 0  # 0: torch's default
    # Stage 0: the instruction tokens, through the LLM. 150 steps left follow-ups far behind
    # (turn 3 77 % from true captions); 400 with an equal turn mix reach 97 % on every turn.
    instruction_steps: int = 400
    instruction_lr: float = 1e-2
    instruction_batch: int = 16
    # Stage 0 also fits the vectors through this W4A16 AWQ demo checkpoint's LLM (a built
    # `awq/vila-demo` folder; "" for none), so that the 4-bit build obeys them too.
    instruction_quantized_llm: str = ""
    # Stage 0 starts from the vectors of an earlier stage 0 (its `instruction.pt`; "" for the
    # embeddings of " Answer in one word").
    instruction_init: str = ""
    # Stage 0 skipped: the vectors are what `stage1_init_weights` makes its free tokens (their
    # mean over pictures), so a run continuing trained weights keeps the instruction they obey.
    instruction_from_init: bool = False
    # Stage 1 starts the tower and projector from these weights ("" for a fresh init), e.g. to
    # move a trained tower's free tokens onto new instruction vectors in a short run.
    stage1_init_weights: str = ""
    device: str = "cpu"  # stage 1 only ("cuda" where there is one); stage 2 runs on the CPU
    loader_workers: int = 0  # processes drawing stage-1 pictures (0: in the training loop)
    log_every: int = 10  # stage 1: steps between progress updates
    # The frozen LLMs' dtype and the vision side's autocast: "auto" is bf16 where the CPU
    # computes it natively (what the committed weights were trained in), else fp32.
    dtype: str = "auto"
    instruction_validation_size: int = 128  # stage 0's held-out scenes, per LLM
    # Stages 0 and 2: the share of chats with 1, 2 and 3 questions about the picture (the
    # earlier ones answered right, as a chat's history shows them); the loss is on the last.
    instruction_turns: tuple[float, ...] = (0.34, 0.33, 0.33)
    # Stages 1 and 2: the share of pictures in the everyday style (`everyday`), the rest in
    # the original one (`shapes`).
    stage1_everyday_share: float = 0.6


@dataclass
class TrainReport:
    config: TrainConfig
    stage_seconds: dict[str, float] = field(default_factory=dict)
    validation: list[dict[str, Any]] = field(default_factory=list)
    heads_validation: dict[str, float] = field(default_factory=dict)


def scene_labels(scene: shapes.Scene) -> dict[str, int]:
    values = {
        "scene": scene.kind,
        "shape": scene.shape,
        "colour": scene.colour,
        "size": scene.size,
        "position": scene.position,
        "count": None if scene.count is None else str(scene.count),
        "word": scene.word,
    }
    return {
        name: IGNORE if values[name] is None else ATTRIBUTES[name].index(str(values[name]))
        for name in ATTRIBUTES
    }


# Per-patch attributes. Two are local: what the patch itself shows (nothing, a shape kind,
# text) and its colour. The others are facts about the whole picture that every patch learns
# to carry, so that each image token the projector makes from a 2 x 2 window can say them
# (see `CaptionTargets`). Dense labels teach the tower many facts per picture instead of
# seven, which is what makes training from scratch on some ten thousand pictures work.
# "none" (index 0) is the background class of the local attributes.
PATCH_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "patch_kind": ("none", *shapes.SHAPES, "text"),
    "patch_colour": ("none", *shapes.COLOURS),
    "all_kind": (*shapes.SHAPES, "text"),
    "all_colour": tuple(shapes.COLOURS),
    "all_word": shapes.WORDS,
    "all_position": shapes.POSITIONS,
    "all_size": shapes.SIZES,
    "all_count": shapes.COUNTS,
}
_WITH_BACKGROUND = ("patch_kind", "patch_colour")
# A patch counts as showing an object from this share of its pixels on; below it, but above
# zero, it is ambiguous and not scored.
_OBJECT_SHARE = 0.12


def _column_mask(columns: list[int]) -> torch.Tensor:
    mask = torch.zeros(1, len(PATCH_ATTRIBUTES), dtype=torch.bool)
    mask[0, columns] = True
    return mask


def patch_labels(example: shapes.DemoExample, image_size: int, patch: int) -> torch.Tensor:
    """[patches, len(PATCH_ATTRIBUTES)] labels on the model's patch grid (row-major)."""
    mask = np.asarray(example.mask.resize((image_size, image_size), Image.Resampling.NEAREST))
    side = image_size // patch
    share = (mask > 0).reshape(side, patch, side, patch).mean(axis=(1, 3)).reshape(-1)
    scene = example.scene
    kind = "text" if scene.kind == "word" else str(scene.shape)
    facts = {
        "patch_kind": kind,
        "patch_colour": scene.colour,
        "all_kind": kind,
        "all_colour": scene.colour,
        "all_word": scene.word,
        "all_position": scene.position,
        "all_size": scene.size,
        "all_count": None if scene.count is None else str(scene.count),
    }
    values = [
        IGNORE if facts[name] is None else classes.index(str(facts[name]))
        for name, classes in PATCH_ATTRIBUTES.items()
    ]
    local = [i for i, name in enumerate(PATCH_ATTRIBUTES) if name in _WITH_BACKGROUND]
    labels = torch.tensor(values).repeat(share.size, 1)
    labels[torch.from_numpy(share == 0)[:, None] & _column_mask(local)] = 0
    ambiguous = (share > 0) & (share < _OBJECT_SHARE)
    labels[torch.from_numpy(ambiguous)[:, None] & _column_mask(local)] = IGNORE
    return labels


class AttributeHeads(nn.Module):
    """Training-only heads on the tower's patch features: one learned query per picture
    attribute pools the patches (attention), and a linear layer per patch attribute."""

    def __init__(self, width: int, hidden: int = 256) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.queries = nn.Parameter(torch.randn(len(ATTRIBUTES), width) * 0.02)
        self.pool = nn.MultiheadAttention(width, num_heads=4, batch_first=True)
        self.heads = nn.ModuleDict(
            {
                name: nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, len(c)))
                for name, c in ATTRIBUTES.items()
            }
        )
        self.patch_heads = nn.ModuleDict(
            {name: nn.Linear(width, len(c)) for name, c in PATCH_ATTRIBUTES.items()}
        )

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.norm(features)
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        pooled, _ = self.pool(queries, features, features, need_weights=False)
        out = {name: head(pooled[:, i]) for i, (name, head) in enumerate(self.heads.items())}
        for name, head in self.patch_heads.items():
            out[name] = head(features)
        return out


# Most patches show background: weighting it down keeps the dense heads from settling on
# "none everywhere", and the dense terms count double (they carry most of the signal early).
_BACKGROUND_WEIGHT = 0.15
_PATCH_TERM_WEIGHT = 2.0


def heads_loss(
    logits: dict[str, torch.Tensor], labels: torch.Tensor, patches: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted cross-entropy over every picture and patch attribute; their accuracies (for
    patch attributes: on the patches that show something)."""
    total = logits["scene"].new_zeros(())
    accuracy: dict[str, float] = {}
    columns = [(name, labels[:, i], 1.0) for i, name in enumerate(ATTRIBUTES)]
    columns += [
        (name, patches[..., i], _PATCH_TERM_WEIGHT) for i, name in enumerate(PATCH_ATTRIBUTES)
    ]
    for name, target, term_weight in columns:
        scores = logits[name].reshape(-1, logits[name].shape[-1]).float()
        target = target.reshape(-1)
        known = target != IGNORE
        if not known.any():
            continue
        class_weight = None
        if name in _WITH_BACKGROUND:
            class_weight = torch.ones(scores.shape[-1], device=scores.device)
            class_weight[0] = _BACKGROUND_WEIGHT
        loss = F.cross_entropy(scores[known], target[known], weight=class_weight)
        total = total + term_weight * loss
        scored = known & (target != 0) if class_weight is not None else known
        if scored.any():
            hits = scores[scored].argmax(-1) == target[scored]
            accuracy[name] = float(hits.float().mean())
    return total / len(columns), accuracy


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Batch:
    pixels: torch.Tensor
    examples: list[shapes.DemoExample]
    labels: torch.Tensor  # [N, len(ATTRIBUTES)]
    patch_labels: torch.Tensor  # [N, patches, len(PATCH_ATTRIBUTES)]


# Where a batch's pictures come from: "train" mixes both styles (the recipe's stream),
# "eval" is the original style's held-out split, "everyday" the everyday style for `seed`.
Source = Literal["train", "eval", "everyday"]


def training_example(seed: int, index: int, everyday_share: float) -> shapes.DemoExample:
    """The recipe's `index`-th picture: everyday style with probability `everyday_share`."""
    pick = random.Random(f"vilaserve-demo/style/{seed}/{index}").random()
    if pick < everyday_share:
        return everyday.generate(seed, index)
    return shapes.generate("train", seed, index)


def chat_about(
    example: shapes.DemoExample, seed: int, index: int, turn_weights: Sequence[float]
) -> list[tuple[str, str]]:
    """The chat an example is asked in: 1 to len(turn_weights) questions, its own last."""
    rng = random.Random(f"vilaserve-demo/turns/{seed}/{index}")
    turns = rng.choices(range(1, len(turn_weights) + 1), weights=turn_weights)[0]
    return shapes.conversation(rng, example, turns)


def _examples(
    source: Source, seed: int, start: int, size: int, everyday_share: float
) -> list[shapes.DemoExample]:
    indices = range(start, start + size)
    if source == "train":
        return [training_example(seed, i, everyday_share) for i in indices]
    if source == "everyday":
        return [everyday.generate(seed, i) for i in indices]
    return list(shapes.examples("eval", seed, size, start))


def _batch(source: Source, seed: int, start: int, size: int, everyday_share: float = 0.0) -> Batch:
    batch = _examples(source, seed, start, size, everyday_share)
    pixels = _PREPROCESS([e.image for e in batch])
    labels = torch.tensor([list(scene_labels(e.scene).values()) for e in batch])
    patches = torch.stack([patch_labels(e, IMAGE_SIZE, PATCH_SIZE) for e in batch])
    return Batch(pixels, batch, labels, patches)


_PREPROCESS = preprocessor()


_Stage1Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[shapes.Scene]]


class _Stage1Pictures(torch.utils.data.IterableDataset):
    """Stage-1 batches from `first_step` on, drawn by the loader's workers in step order (the
    loader takes one batch from each worker in turn, and worker w draws steps w, w + n, ...)."""

    def __init__(self, config: TrainConfig, first_step: int) -> None:
        self.config = config
        self.first_step = first_step

    def __iter__(self) -> Iterator[_Stage1Batch]:
        worker = torch.utils.data.get_worker_info()
        offset, stride = (0, 1) if worker is None else (worker.id, worker.num_workers)
        size = self.config.stage1_batch
        for step in range(self.first_step + offset, self.config.stage1_steps, stride):
            batch = _batch(
                "train", self.config.seed, step * size, size, self.config.stage1_everyday_share
            )
            yield batch.pixels, batch.labels, batch.patch_labels, [e.scene for e in batch.examples]


def _stage1_batches(config: TrainConfig, first_step: int) -> Iterator[_Stage1Batch]:
    pictures = _Stage1Pictures(config, first_step)
    if config.loader_workers == 0:
        return iter(pictures)
    loader = torch.utils.data.DataLoader(
        pictures,
        batch_size=None,
        num_workers=config.loader_workers,
        prefetch_factor=4,
        persistent_workers=False,
    )
    return iter(loader)


# --- the caption the image tokens learn to spell ----------------------------------------------


class CaptionTargets:
    """What each image token should look like to the LLM before it is trained through it.

    Token k of a picture's image tokens is taught to equal the LLM's input embedding of word k
    of a caption of key-value pairs, `shape circle colour red size big position left count 1
    word none` (" none" where a fact does not apply). The frozen LLM reads the picture as
    text from the start, and answering becomes finding the key the question names and copying
    the word after it, which even a small language model does well. The last `FREE_TOKENS`
    image tokens follow no caption: training through the LLM (stage 2) makes them the
    instruction that turns its chatty replies into the short answers asked for, while the
    caption loss keeps the rest readable.
    """

    PAIRS = (
        ("shape", "kind"),
        ("colour", "colour"),
        ("size", "size"),
        ("position", "position"),
        ("count", "count"),
        ("word", "word"),
    )
    FREE_TOKENS = 4
    FREE = -1
    NEAREST_WEIGHT = 0.2
    SHARPNESS = 8.0

    def __init__(
        self,
        tokenizer: Any,
        embeddings: torch.Tensor,
        tokens_per_image: int,
        instruction: torch.Tensor | None = None,
    ) -> None:
        self.embeddings = embeddings.float()
        # Learned vectors the free tokens should become (`learn_instruction`), if known.
        self.instruction = None if instruction is None else instruction.float()
        self.tokens_per_image = tokens_per_image
        self._ids: dict[str, int] = {}
        words = [*shapes.SHAPES, "text", *shapes.COLOURS, *shapes.SIZES, *shapes.POSITIONS]
        keys = [key for key, _ in self.PAIRS]
        for word in [*words, *shapes.WORDS, *keys, "none"]:
            self._ids[word] = self._single_id(tokenizer, " " + word)
        for count in shapes.COUNTS:  # digits are tokens of their own, without a space
            self._ids[count] = self._single_id(tokenizer, count)
        self.vocabulary = torch.tensor(sorted(set(self._ids.values())))
        # The scale of the targets: the variance of the caption words' embeddings only, so a
        # table holding just these rows gives the same loss as the whole one.
        self._scale = self.embeddings[self.vocabulary].var()
        said = 2 * len(self.PAIRS)
        if said + self.FREE_TOKENS != tokens_per_image:
            raise ValueError(f"the caption fills {said} + {self.FREE_TOKENS} of {tokens_per_image}")

    @staticmethod
    def _single_id(tokenizer: Any, text: str) -> int:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return int(ids[0])  # every caption word is one token for SmolLM2; else its first piece

    def ids(self, scene: shapes.Scene) -> list[int]:
        facts = {
            "kind": "text" if scene.kind == "word" else scene.shape,
            "colour": scene.colour,
            "size": scene.size,
            "position": scene.position,
            "count": None if scene.count is None else str(scene.count),
            "word": scene.word,
        }
        caption = []
        for key, fact in self.PAIRS:
            caption += [self._ids[key], self._ids[facts[fact] or "none"]]
        return [*caption, *[self.FREE] * self.FREE_TOKENS]

    def to(self, device: torch.device) -> CaptionTargets:
        self.embeddings = self.embeddings.to(device)
        self.vocabulary = self.vocabulary.to(device)
        self._scale = self._scale.to(device)
        if self.instruction is not None:
            self.instruction = self.instruction.to(device)
        return self

    def loss(
        self, images: torch.Tensor, scenes: Sequence[shapes.Scene]
    ) -> tuple[torch.Tensor, float]:
        """Squared distance to the caption embeddings (in units of the caption words'
        variance) plus a cross-entropy that makes the right word the nearest one among the
        caption words; and the share of tokens whose nearest caption word is the right one.
        With `instruction` set, the free tokens are pulled onto those vectors too."""
        ids = torch.tensor([self.ids(scene) for scene in scenes], device=images.device)
        said = ids != self.FREE
        target = self.embeddings[ids[said]]
        said_images = images.float()[said]
        loss = F.mse_loss(said_images, target) / self._scale
        candidates = self.embeddings[self.vocabulary]  # [V, H]
        # Squared distances in units of the typical distance between two caption words.
        typical = 2 * self._scale * target.shape[-1]
        distances = torch.cdist(said_images, candidates).pow(2) / typical
        labels = torch.searchsorted(self.vocabulary, ids[said])
        loss = loss + self.NEAREST_WEIGHT * F.cross_entropy(-self.SHARPNESS * distances, labels)
        if self.instruction is not None:
            free = images.float()[~said].reshape(len(scenes), self.FREE_TOKENS, -1)
            loss = loss + F.mse_loss(free, self.instruction.expand_as(free)) / self._scale
        hits = (distances.detach().argmin(-1) == labels).float().mean()
        return loss, float(hits)


def load_token_embeddings(llm_dir: Path) -> torch.Tensor:
    """The LLM's input embedding table, read without loading the rest of the model."""
    from safetensors import safe_open

    from vilaserve.adapters.worker.torch_vila.checkpoint import safetensors_files

    for path in safetensors_files(llm_dir):
        with safe_open(str(path), framework="pt") as handle:
            if "model.embed_tokens.weight" in handle.keys():  # noqa: SIM118 (not a dict)
                return handle.get_tensor("model.embed_tokens.weight")
    raise ValueError(f"{llm_dir} has no model.embed_tokens.weight")


# --- stage 2: prompts and the frozen LLM -------------------------------------------------------


@dataclass(frozen=True)
class EncodedExample:
    after_image: list[int]  # prompt ids after the image (the question and the turn change)
    answer: list[int]  # answer ids, ending with the end-of-turn token


class PromptEncoder:
    """Prompt ids exactly as the worker tokenizes an OpenAI chat turn with one image."""

    def __init__(self, tokenizer: Any, template: ConversationTemplate) -> None:
        self.tokenizer = tokenizer
        self._template = template
        self._renderer = JinjaChatTemplateRenderer()  # the demo's template is its tokenizer's
        self.end_of_turn = int(tokenizer.eos_token_id)
        self.prefix = self._split(self.prompt_ids("?"))[0]

    def prompt_ids(self, question: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """The chat as the web chat and the OpenAI API send it: the picture with the first
        question, the earlier (question, answer) turns as history, `question` last."""
        messages = chat_messages(question, 1, history)
        text = build_chat_prompt(self._template, messages, True, self._renderer).text
        return tokenize_with_images(self.tokenizer, text)

    def encode(self, chat: Sequence[tuple[str, str]]) -> EncodedExample:
        """`chat`: (question, answer) pairs about one picture; the last answer is the target."""
        *history, (question, answer) = chat
        prefix, after = self._split(self.prompt_ids(question, history))
        if prefix != self.prefix:
            raise ValueError(f"the prompt head changed with the question {question!r}")
        answer_ids = list(self.tokenizer(answer, add_special_tokens=False)["input_ids"])
        return EncodedExample(after, [*answer_ids, self.end_of_turn])

    @staticmethod
    def _split(ids: list[int]) -> tuple[list[int], list[int]]:
        placeholder = ids.index(IMAGE_TOKEN_INDEX)
        return ids[:placeholder], ids[placeholder + 1 :]


class FrozenLlm:
    """SmolLM2 in bf16, weights frozen, with the prompt head's KV computed once."""

    def __init__(self, model: Llama, prefix_ids: list[int]) -> None:
        self.model = model
        self.prefix_len = len(prefix_ids)
        self._prefix_cache = model.new_cache(1, self.prefix_len)
        with torch.no_grad():
            model(self._prefix_cache, 0, input_ids=torch.tensor([prefix_ids]))

    def answer_logits(
        self, images: torch.Tensor, rows: Sequence[EncodedExample]
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Teacher-forced logits at every answer position of every row.

        Returns (logits [n_answer_tokens, vocab] fp32, targets [n_answer_tokens], answer
        lengths per row) for rows laid out as [image, after_image, answer] and right-padded.
        """
        model = self.model
        lengths = [images.shape[1] + len(r.after_image) + len(r.answer) for r in rows]
        width = max(lengths)
        pad_id = rows[0].answer[-1]
        embeds: list[torch.Tensor] = []
        positions: list[tuple[int, int]] = []
        targets: list[int] = []
        for index, row in enumerate(rows):
            text = [*row.after_image, *row.answer, *[pad_id] * (width - lengths[index])]
            with torch.no_grad():
                text_embeds = model.embed(torch.tensor(text))
            embeds.append(torch.cat([images[index].to(text_embeds.dtype), text_embeds]))
            first = images.shape[1] + len(row.after_image)  # position of the first answer token
            positions += [(index, first - 1 + k) for k in range(len(row.answer))]
            targets += row.answer
        hidden = torch.stack(embeds)
        cache = self._batch_cache(len(rows), width)
        step = model.make_step(self.prefix_len, width, hidden)
        for layer in model.model.layers:
            hidden = layer(hidden, step, cache)
        row_index = torch.tensor([p[0] for p in positions])
        col_index = torch.tensor([p[1] for p in positions])
        picked = hidden[row_index, col_index]
        logits = model.lm_head(model.model.norm(picked)).float()
        return logits, torch.tensor(targets), [len(r.answer) for r in rows]

    def answer_loss(
        self, images: torch.Tensor, rows: Sequence[EncodedExample]
    ) -> tuple[torch.Tensor, float]:
        """Cross-entropy over every answer token, and the share of rows answered exactly."""
        logits, targets, lengths = self.answer_logits(images, rows)
        exact = sum(exact_rows(logits.detach(), targets, lengths)) / len(rows)
        return F.cross_entropy(logits, targets), exact

    def _batch_cache(self, batch: int, width: int) -> KVCache:
        cache = self.model.new_cache(batch, self.prefix_len + width)
        for layer, (keys, values) in enumerate(
            zip(self._prefix_cache.keys, self._prefix_cache.values, strict=True)
        ):
            cache.keys[layer][:, :, : self.prefix_len] = keys
            cache.values[layer][:, :, : self.prefix_len] = values
        return cache


def exact_rows(logits: torch.Tensor, targets: torch.Tensor, lengths: Sequence[int]) -> list[bool]:
    """Per row: does greedy decoding reproduce the whole answer (and stop right after it)?"""
    hits = (logits.argmax(-1) == targets).tolist()
    out, start = [], 0
    for length in lengths:
        out.append(all(hits[start : start + length]))
        start += length
    return out


# --- the recipe -------------------------------------------------------------------------------


def train_demo_vision(
    config: TrainConfig,
    llm_dir: Path,
    output: Path,
    work_dir: Path,
    command: str,
    progress: bool = True,
    resume: bool = False,
) -> TrainReport:
    """Runs the stages and writes the trained weights to `output`, their provenance next to
    it (`.json`). With `resume`, a stopped run continues from `work_dir/checkpoint.pt` (the
    weights, heads, optimizer and step; the pictures are a function of the step, and nothing
    else in a step draws random numbers, so the continued run equals an unstopped one), and a
    run that changes only stage-2 settings starts from the finished stage 1 in
    `work_dir/stage1.pt`. Without it, a work dir holding such state is refused."""
    if config.threads:
        torch.set_num_threads(config.threads)
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = work_dir / "checkpoint.pt"
    left = [p.name for p in (checkpoint_path, work_dir / "stage1.pt") if p.is_file()]
    if left and not resume:
        raise TrainingStateExists(
            f"{work_dir} holds an earlier run's state ({', '.join(left)}): pass --resume to "
            "continue it, or give another --work-dir"
        )
    llm_checkpoint = VilaCheckpoint.open(llm_dir)
    llm_hidden = int(llm_checkpoint.llm_config["hidden_size"])
    vision = new_demo_vision(llm_hidden, config.seed)
    if config.stage1_init_weights:
        vision.load_trained_state(load_weights(Path(config.stage1_init_weights)))
    heads = AttributeHeads(vision.tower.hidden_size)
    report = TrainReport(config)
    stage1_path = work_dir / "stage1.pt"
    state = _load_checkpoint(checkpoint_path, vision, heads, report, _stage_fields(config, 2))
    if state is None:
        state = _load_checkpoint(stage1_path, vision, heads, report, _stage_fields(config, 1))
    if state is None and left:
        raise TrainingStateExists(
            f"{work_dir}'s state ({', '.join(left)}) was written with other settings: run it "
            "with the settings it was started with (its provenance lists them), or give "
            "another --work-dir"
        )
    if state is None:
        state = {"stage": 1, "step": 0, "optimizer": None}
    random.seed(config.seed)

    tokenizer = load_tokenizer(llm_checkpoint.llm_dir)

    @functools.cache
    def through_llms() -> tuple[PromptEncoder, list[FrozenLlm]]:
        """The prompt encoder and the frozen LLMs stages 0 and 2 fit through, loaded once."""
        encoder = PromptEncoder(
            tokenizer, pick_template(llm_checkpoint.llm_config, tokenizer, None)
        )
        dtype = compute_dtype(config)
        models = [load_llm(llm_checkpoint, dtype, torch.device("cpu"))]
        if config.instruction_quantized_llm:
            models.append(differentiable_awq_llm(Path(config.instruction_quantized_llm), dtype))
        return encoder, [FrozenLlm(model, encoder.prefix) for model in models]

    embeddings = load_token_embeddings(llm_checkpoint.llm_dir)
    captions = CaptionTargets(tokenizer, embeddings, vision.tokens_per_image)
    instruction_path = work_dir / "instruction.pt"
    if config.instruction_from_init:
        if not config.stage1_init_weights:
            raise ValueError("instruction_from_init needs stage1_init_weights")
        start_from = new_demo_vision(llm_hidden, config.seed)
        start_from.load_trained_state(load_weights(Path(config.stage1_init_weights)))
        captions.instruction = instruction_of(start_from, config)
    elif _load_instruction(instruction_path, captions, report, _stage_fields(config, 0)):
        pass
    elif config.instruction_steps:
        started = time.perf_counter()
        captions.instruction = learn_instruction(config, *through_llms(), captions, progress)
        report.stage_seconds["instruction"] = time.perf_counter() - started
        payload = {
            "vectors": captions.instruction,
            "seconds": report.stage_seconds["instruction"],
            "config": _stage_fields(config, 0),
        }
        torch.save(payload, instruction_path)
    if state["stage"] == 1:
        started = time.perf_counter() - report.stage_seconds.get("stage1", 0.0)
        _stage1(config, vision, heads, captions, state, checkpoint_path, report, started, progress)
        report.stage_seconds["stage1"] = time.perf_counter() - started
        state = {"stage": 2, "step": 0, "optimizer": None}
        _save_checkpoint(stage1_path, vision, heads, report, state, _stage_fields(config, 1))

    if state["stage"] == 2 and config.stage2_steps:
        started = time.perf_counter() - report.stage_seconds.get("stage2", 0.0)
        encoder, llms = through_llms()
        _stage2(
            config,
            vision,
            heads,
            captions,
            llms,
            encoder,
            state,
            checkpoint_path,
            report,
            started,
            progress,
        )
        report.stage_seconds["stage2"] = time.perf_counter() - started
        state = {"stage": 3, "step": 0, "optimizer": None}
        _save_checkpoint(checkpoint_path, vision, heads, report, state, _stage_fields(config, 2))

    save_weights(vision, output)
    _write_provenance(output.with_suffix(".json"), report, command)
    return report


def export_state(work_dir: Path, output: Path) -> dict[str, Any]:
    """Writes the tower and projector of the run state `work_dir` holds (a run stopped or
    still going) to `output`, to evaluate or to start another run from; returns where the
    run stood (stage, step)."""
    path = work_dir / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{work_dir} holds no run state (checkpoint.pt)")
    payload = torch.load(path, weights_only=False)
    state = payload["vision"]
    # The LLM's width: the projector's last layer's output (the state is in layer order).
    hidden = [v for k, v in state.items() if k.startswith("projector.")][-1].shape[0]
    vision = new_demo_vision(int(hidden), 0)
    vision.load_state_dict(state)
    save_weights(vision, output)
    return {"stage": payload["stage"], "step": payload["step"]}


class TrainingStateExists(RuntimeError):
    """The work dir holds a run's state and the caller did not ask to resume it."""


def instruction_of(vision: DemoVision, config: TrainConfig, pictures: int = 256) -> torch.Tensor:
    """The vectors trained weights make their free tokens: their mean over training pictures
    (they barely vary: stage 1 pulls them onto one target for every picture)."""
    vision.eval()
    free: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, pictures, 32):
            batch = _batch("train", config.seed, start, 32, config.stage1_everyday_share)
            images = vision(batch.pixels).float()
            free.append(images[:, -CaptionTargets.FREE_TOKENS :].reshape(-1, *images.shape[2:]))
    stacked = torch.cat(free).reshape(-1, CaptionTargets.FREE_TOKENS, free[0].shape[-1])
    return stacked.mean(0)


INSTRUCTION_SEED = 99  # stage 0 draws its scenes from their own stream
INSTRUCTION_VALIDATION_SEED = 4242


def learn_instruction(
    config: TrainConfig,
    encoder: PromptEncoder,
    llms: Sequence[FrozenLlm],
    captions: CaptionTargets,
    progress: bool,
) -> torch.Tensor:
    """Stage 0: the vectors the free image tokens should carry, [FREE_TOKENS, hidden].

    No pictures yet: each row's image tokens are the exact caption embeddings of a generated
    scene followed by these learned vectors, and only they train, on the frozen LLM's
    cross-entropy of the short answer and its end of turn (the mean over the 16-bit LLM and,
    with `instruction_quantized_llm`, its W4A16 AWQ build: vectors fitted to the 16-bit LLM
    alone stop working once its weights are rounded to 4 bits). The frozen SmolLM2 answers in whole
    sentences when asked in words (even "Answer with one word." does not stop it); a few
    learned vectors in front of the question do, and they become stage 1's targets for the
    free tokens, so the tower learns them like the caption, without the LLM.
    """
    start_ids = encoder.tokenizer(" Answer in one word", add_special_tokens=False)["input_ids"]
    seed_ids = (start_ids * captions.FREE_TOKENS)[: captions.FREE_TOKENS]
    start = captions.embeddings[seed_ids].clone()
    if config.instruction_init:
        start = torch.load(config.instruction_init, weights_only=True)["vectors"].float()
    instruction = nn.Parameter(start)
    optimizer = torch.optim.Adam([instruction], lr=config.instruction_lr)
    said = captions.tokens_per_image - captions.FREE_TOKENS

    def image_tokens(scenes: Sequence[shapes.Scene]) -> torch.Tensor:
        ids = torch.tensor([captions.ids(scene)[:said] for scene in scenes])
        free = instruction.unsqueeze(0).expand(len(scenes), -1, -1)
        return torch.cat([captions.embeddings[ids], free], dim=1)

    size = config.instruction_batch
    bar = tqdm(range(config.instruction_steps), desc="stage 0 (instruction)", disable=not progress)
    running: dict[str, float] = defaultdict(float)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.instruction_lr * _lr_factor(step, config.instruction_steps, 1)
        batch = list(shapes.examples("train", INSTRUCTION_SEED, size, step * size))
        turns = config.instruction_turns
        rows = [
            encoder.encode(chat_about(e, INSTRUCTION_SEED, step * size + k, turns))
            for k, e in enumerate(batch)
        ]
        scenes = [e.scene for e in batch]
        optimizer.zero_grad(set_to_none=True)
        shown: dict[str, float] = {}
        for index, llm in enumerate(llms):
            loss, shown[f"exact{index}"] = llm.answer_loss(image_tokens(scenes), rows)
            (loss / len(llms)).backward()  # one LLM's graph at a time: half the memory
            shown[f"loss{index}"] = loss.item()
        optimizer.step()
        _smooth(running, shown)
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
    held_out = list(
        shapes.examples("eval", INSTRUCTION_VALIDATION_SEED, config.instruction_validation_size)
    )
    for index, llm in enumerate(llms):
        hits: dict[int, list[bool]] = defaultdict(list)
        with torch.no_grad():
            for start in range(0, len(held_out), 32):
                batch = held_out[start : start + 32]
                for turns in range(1, len(config.instruction_turns) + 1):
                    rows = [
                        encoder.encode(shapes.conversation(random.Random(start + k), e, turns))
                        for k, e in enumerate(batch)
                    ]
                    scenes = [e.scene for e in batch]
                    hits[turns] += exact_rows(*llm.answer_logits(image_tokens(scenes), rows))
        which = "16-bit" if index == 0 else "W4A16 AWQ"
        by_turn = ", ".join(f"turn {t} {np.mean(h):.3f}" for t, h in sorted(hits.items()))
        bar.write(
            f"stage 0: {which} LLM, exact answers from true captions on held-out scenes: {by_turn}"
        )
    return instruction.detach().clone()


def differentiable_awq_llm(checkpoint_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Llama:
    """The W4A16 AWQ build's LLM (frozen, in `dtype`) as a plain Llama whose linears hold the
    weights the 4-bit ones dequantize to: the same function, but one autograd can pass gradients
    through to the inputs (the 4-bit kernels run without autograd)."""
    from vilaserve.adapters.worker.awq.loading import find_awq_source, read_awq

    checkpoint = VilaCheckpoint.open(checkpoint_dir)
    args = LlamaArgs.from_hf_config(checkpoint.llm_config)
    quantized, state = read_awq(find_awq_source(checkpoint, None), args)
    state = dict(state)
    for name, weight in quantized.items():
        state[f"{name}.weight"] = weight.dequantize(dtype)
        if weight.bias is not None:
            state[f"{name}.bias"] = weight.bias
    model = Llama.empty(args, dtype, torch.device("cpu"))
    model.load_hf_state_dict(state)
    return model.eval().requires_grad_(False)


def _stage1(
    config: TrainConfig,
    vision: DemoVision,
    heads: AttributeHeads,
    captions: CaptionTargets,
    state: dict[str, Any],
    checkpoint_path: Path,
    report: TrainReport,
    started: float,
    progress: bool,
) -> None:
    device = torch.device(config.device)
    vision.to(device)
    heads.to(device)
    captions.to(device)
    params = [*vision.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.stage1_lr, weight_decay=config.weight_decay)
    if state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    steps, warmup = config.stage1_steps, max(1, config.stage1_steps // 20)
    bar = tqdm(range(state["step"], steps), desc="stage 1 (tower, projector)", disable=not progress)
    running: dict[str, float] = defaultdict(float)
    vision.train()
    batches = _stage1_batches(config, state["step"])
    saved_at = time.monotonic()
    for step, (pixels, labels, patches, scenes) in zip(bar, batches, strict=True):
        for group in optimizer.param_groups:
            group["lr"] = config.stage1_lr * _lr_factor(step, steps, warmup)
        pixels, labels, patches = pixels.to(device), labels.to(device), patches.to(device)
        with _autocast(config, device):
            features = vision.tower(pixels)
            loss, accuracy = heads_loss(heads(features), labels, patches)
            images = vision.projector(features)
        caption_loss, accuracy["caption"] = captions.loss(images, scenes)
        loss = loss + config.stage1_caption_weight * caption_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % config.log_every == 0 or step + 1 == steps:  # .item() waits for the GPU
            keep = 0.9 if config.log_every == 1 else 0.0
            _smooth(running, {"loss": loss.item(), **accuracy}, keep)
            bar.set_postfix({_short(k): f"{v:.2f}" for k, v in running.items()})
        due = time.monotonic() - saved_at > 60 * config.checkpoint_minutes
        if due or (step + 1) % config.checkpoint_every == 0 or step + 1 == steps:
            saved_at = time.monotonic()
            report.stage_seconds["stage1"] = time.perf_counter() - started
            state = {"stage": 1, "step": step + 1, "optimizer": optimizer.state_dict()}
            _save_checkpoint(
                checkpoint_path, vision, heads, report, state, _stage_fields(config, 2)
            )
    vision.cpu()
    heads.cpu()
    captions.to(torch.device("cpu"))
    report.heads_validation = _validate_heads(config, vision, heads, captions)
    bar.write(f"stage 1 heads on held-out pictures: {json.dumps(report.heads_validation)}")


def _validate_heads(
    config: TrainConfig, vision: DemoVision, heads: AttributeHeads, captions: CaptionTargets
) -> dict[str, float]:
    """Per-attribute accuracy of the heads on held-out (eval-split) pictures."""
    vision.eval()
    totals: dict[str, list[float]] = defaultdict(list)
    with torch.no_grad(), _autocast(config):
        for start in range(0, 4 * config.validation_size, config.stage1_batch):
            batch = _batch("eval", VALIDATION_SEED, start, config.stage1_batch)
            features = vision.tower(batch.pixels)
            _, accuracy = heads_loss(heads(features), batch.labels, batch.patch_labels)
            scenes = [e.scene for e in batch.examples]
            _, accuracy["caption"] = captions.loss(vision.projector(features), scenes)
            for name, value in accuracy.items():
                totals[name].append(value)
    return {name: round(sum(v) / len(v), 3) for name, v in totals.items()}


def _stage2(
    config: TrainConfig,
    vision: DemoVision,
    heads: AttributeHeads,
    captions: CaptionTargets,
    llms: Sequence[FrozenLlm],
    encoder: PromptEncoder,
    state: dict[str, Any],
    checkpoint_path: Path,
    report: TrainReport,
    started: float,
    progress: bool,
) -> None:
    groups = [
        {"params": list(vision.projector.parameters()), "scale": 1.0},
        {
            "params": [*vision.tower.parameters(), *heads.parameters()],
            "scale": config.tower_lr_scale,
        },
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.stage2_lr, weight_decay=config.weight_decay)
    if state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    steps, warmup = config.stage2_steps, max(1, config.stage2_steps // 20)
    bar = tqdm(range(state["step"], steps), desc="stage 2 (through the LLM)", disable=not progress)
    running: dict[str, float] = defaultdict(float)
    validation = _validation_set(config, encoder)
    saved_at = time.monotonic()
    for step in bar:
        vision.train()
        for group in optimizer.param_groups:
            group["lr"] = config.stage2_lr * group["scale"] * _lr_factor(step, steps, warmup)
        start = STAGE2_INDEX_OFFSET + step * config.stage2_batch
        batch = _batch(
            "train", config.seed, start, config.stage2_batch, config.stage1_everyday_share
        )
        rows = [
            encoder.encode(chat_about(e, config.seed, start + k, config.instruction_turns))
            for k, e in enumerate(batch.examples)
        ]
        with _autocast(config):
            features = vision.tower(batch.pixels)
            images = vision.projector(features)
            aux_loss, _ = heads_loss(heads(features), batch.labels, batch.patch_labels)
        caption_loss, caption_hits = captions.loss(images, [e.scene for e in batch.examples])
        # The answer's loss is the mean over the LLMs (the 16-bit one and its AWQ build).
        answer_losses, shown = [], {"caption": caption_hits}
        for index, llm in enumerate(llms):
            loss, shown[f"exact{index}"] = llm.answer_loss(images, rows)
            answer_losses.append(loss)
            shown[f"loss{index}"] = loss.item()
        answer_loss = torch.stack(answer_losses).mean()
        loss = answer_loss + config.aux_weight * aux_loss + config.caption_weight * caption_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        _smooth(running, shown)
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
        last = step + 1 == steps
        if (step + 1) % config.validate_every == 0 or last:
            result = {"step": step + 1, **_validate(vision, llms[0], validation)}
            report.validation.append(result)
            bar.write(f"validation at step {step + 1}: {json.dumps(result)}")
        due = time.monotonic() - saved_at > 60 * config.checkpoint_minutes
        if due or (step + 1) % config.checkpoint_every == 0 or last:
            saved_at = time.monotonic()
            report.stage_seconds["stage2"] = time.perf_counter() - started
            state = {"stage": 2, "step": step + 1, "optimizer": optimizer.state_dict()}
            _save_checkpoint(
                checkpoint_path, vision, heads, report, state, _stage_fields(config, 2)
            )


_ValidationBatch = tuple[torch.Tensor, list[shapes.DemoExample], list[EncodedExample], list[str]]


def _validation_set(config: TrainConfig, encoder: PromptEncoder) -> list[_ValidationBatch]:
    """Held-out pictures in batches with their encoded chats: half the original style's eval
    split (one question each), half everyday pictures of a seed training never draws, each
    asked as turn 1, 2 and 3 of a chat. Each row is tagged with what it measures."""
    out = []
    half = config.validation_size // 2
    for source in ("eval", "everyday"):
        for start in range(0, half, config.stage2_batch):
            size = min(config.stage2_batch, half - start)
            batch = _batch(source, VALIDATION_SEED, start, size)  # type: ignore[arg-type]
            turn_counts = [1] if source == "eval" else range(1, len(config.instruction_turns) + 1)
            for turns in turn_counts:
                chats = [
                    shapes.conversation(random.Random(start + k), e, turns)
                    for k, e in enumerate(batch.examples)
                ]
                rows = [encoder.encode(chat) for chat in chats]
                tags = [f"{source}/turn{turns}"] * size
                out.append((batch.pixels, batch.examples, rows, tags))
    return out


def _validate(
    vision: DemoVision, llm: FrozenLlm, validation: Sequence[_ValidationBatch]
) -> dict[str, Any]:
    """Teacher-forced exact-answer accuracy: overall, per question kind (of the last
    question), and per source and turn."""
    vision.eval()
    per_kind: dict[str, list[bool]] = defaultdict(list)
    per_tag: dict[str, list[bool]] = defaultdict(list)
    with torch.no_grad():
        for pixels, batch, rows, tags in validation:
            logits, targets, lengths = llm.answer_logits(vision(pixels), rows)
            hits = exact_rows(logits, targets, lengths)
            for example, tag, hit in zip(batch, tags, hits, strict=True):
                per_kind[example.question_kind].append(hit)
                per_tag[tag].append(hit)
    every = [hit for hits in per_kind.values() for hit in hits]
    return {
        "exact": round(sum(every) / len(every), 4),
        "by_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(per_kind.items())},
        "by_source_and_turn": {k: round(sum(v) / len(v), 3) for k, v in sorted(per_tag.items())},
    }


def _short(name: str) -> str:
    """Progress-bar names: `colo` for colour, `p.col` / `a.col` for the per-patch ones."""
    if name.startswith(("patch_", "all_")):
        prefix, _, rest = name.partition("_")
        return f"{prefix[0]}.{rest[:3]}"
    return name[:4]


def compute_dtype(config: TrainConfig) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if cpu_computes_bf16_natively() else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[config.dtype]


def _autocast(config: TrainConfig, device: torch.device | None = None) -> torch.autocast:
    """bf16 matmuls for the vision side where bf16 is the compute dtype (about 1.3x faster on a
    CPU with native bf16; the weights stay fp32); plain fp32 elsewhere."""
    device_type = "cpu" if device is None else device.type
    bf16 = device_type == "cuda" or compute_dtype(config) == torch.bfloat16
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16)


def _smooth(running: dict[str, float], values: dict[str, float], keep: float = 0.9) -> None:
    for name, value in values.items():
        running[name] = value if name not in running else keep * running[name] + (1 - keep) * value


def _stage_fields(config: TrainConfig, stage: int) -> dict[str, Any]:
    """The settings a stage's result depends on (threads and reporting change nothing)."""
    fields = asdict(config)
    for name in (
        "threads",
        "validate_every",
        "validation_size",
        "checkpoint_every",
        "checkpoint_minutes",
        "device",
        "loader_workers",
        "log_every",
    ):
        fields.pop(name)
    if stage == 0:
        fields = {k: v for k, v in fields.items() if k.startswith("instruction_")}
    if stage == 1:
        fields = {
            k: v
            for k, v in fields.items()
            if k.startswith(("stage1_", "instruction_")) or k in ("seed", "weight_decay")
        }
    return fields


def _load_instruction(
    path: Path, captions: CaptionTargets, report: TrainReport, fields: dict[str, Any]
) -> bool:
    """Stage 0's vectors from an earlier run with the same stage-0 settings, if any."""
    if not path.is_file():
        return False
    payload = torch.load(path, weights_only=True)
    if payload["config"] != fields:
        return False
    captions.instruction = payload["vectors"].float()
    report.stage_seconds["instruction"] = float(payload["seconds"])
    return True


def _save_checkpoint(
    path: Path,
    vision: DemoVision,
    heads: AttributeHeads,
    report: TrainReport,
    state: dict[str, Any],
    fields: dict[str, Any],
) -> None:
    payload = {
        "vision": vision.state_dict(),
        "heads": heads.state_dict(),
        "config": fields,
        "stage_seconds": report.stage_seconds,
        "validation": report.validation,
        "heads_validation": report.heads_validation,
        **state,
    }
    partial = path.with_suffix(".partial")
    torch.save(payload, partial)
    partial.replace(path)  # a crash mid-write never leaves a broken checkpoint behind


def _load_checkpoint(
    path: Path,
    vision: DemoVision,
    heads: AttributeHeads,
    report: TrainReport,
    fields: dict[str, Any],
) -> dict[str, Any] | None:
    """Restores `path` when it was written with the same settings; None when it cannot."""
    if not path.is_file():
        return None
    payload = torch.load(path, weights_only=False)
    if payload["config"] != fields:
        log.info("not resuming: other settings", extra={"checkpoint": str(path)})
        return None
    vision.load_state_dict(payload["vision"])
    heads.load_state_dict(payload["heads"])
    report.stage_seconds.update(payload["stage_seconds"])
    report.validation.extend(payload["validation"])
    report.heads_validation.update(payload["heads_validation"])
    log.info("resuming", extra={"checkpoint": str(path), "stage": payload["stage"]})
    return {k: payload[k] for k in ("stage", "step", "optimizer")}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _write_provenance(path: Path, report: TrainReport, command: str) -> None:
    config = report.config
    data = {
        "what": "vision tower (SigLIP, layers that run) + mlp_downsample projector, bf16",
        "compute_dtype": str(compute_dtype(config)).removeprefix("torch."),
        "image_aspect_ratio": ASPECT_RATIO,
        "command": command,
        "seed": config.seed,
        "config": asdict(config),
        "pictures_seen": config.stage1_steps * config.stage1_batch
        + config.stage2_steps * config.stage2_batch,
        "wall_seconds": {k: round(v, 1) for k, v in report.stage_seconds.items()},
        "validation": report.validation[-1] if report.validation else None,
        "stage1_heads_validation": report.heads_validation,
        "starts_from": _earlier_provenance(config.stage1_init_weights),
        "instruction_starts_from": _earlier_instruction(config.instruction_init),
        "llm": f"SmolLM2-135M-Instruct ({SMOLLM2_REQUIREMENT}, Q4_1 GGUF), frozen",
        "machine": {
            "cpu": _cpu_name(),
            "logical_cpus": _cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": _device_name(config.device),
        },
    }
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _earlier_provenance(init_weights: str) -> dict[str, Any] | None:
    """The provenance of the weights stage 1 started from, so the chain of runs stays known."""
    if not init_weights:
        return None
    path = Path(init_weights).with_suffix(".json")
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {"weights": init_weights, "provenance": "unknown"}


def _earlier_instruction(init: str) -> dict[str, Any] | None:
    """The settings and wall time of the stage 0 this one continued."""
    if not init:
        return None
    payload = torch.load(init, weights_only=True)
    return {"config": payload["config"], "seconds": round(float(payload["seconds"]), 1)}


def _device_name(device: str) -> str:
    """Where stage 1 ran: "cpu", or the GPU's name (stage 2 always runs on the CPU)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"stage 1: {torch.cuda.get_device_name(device)}; stage 2: cpu"
    return "cpu"


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 0
