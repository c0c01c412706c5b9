"""Fake adapters for the ports: scripted, instant, and observable by the tests."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from vilaserve.application.worker.engine.admission import Admission
from vilaserve.domain.shared.conversation import TEMPLATES, ConversationTemplate
from vilaserve.domain.shared.errors import (
    ContextOverflow,
    ControllerUnavailable,
    InvalidImage,
    InvalidRequest,
)
from vilaserve.domain.shared.generation import (
    IMAGE_PLACEHOLDER,
    FinishReason,
    GenerationStep,
    OutputConstraint,
    SamplingParams,
)
from vilaserve.domain.shared.worker_status import WorkerStatus
from vilaserve.domain.worker.first_token import NO_IMAGES, ImageTimings
from vilaserve.domain.worker.ports import (
    Admitted,
    CompiledConstraint,
    ConstraintCompiler,
    ControllerClient,
    ImageFeatures,
    TextGenerator,
    VisionEncoder,
)

PNG_MAGIC = b"\x89PNG"
FAKE_PNG_B64 = base64.b64encode(PNG_MAGIC + b"fake image body").decode()


@dataclass
class FakeFeatures(ImageFeatures):
    files: tuple[bytes, ...]
    image_timings: ImageTimings = NO_IMAGES

    @property
    def num_images(self) -> int:
        return len(self.files)

    @property
    def timings(self) -> ImageTimings:
        return self.image_timings


class FakeVisionEncoder(VisionEncoder):
    """Accepts anything that starts like a PNG; 4 positions per image.

    With a `gate`, every encode waits until it is set (from any thread): a request whose
    pictures are still being encoded. Its features say they took `timings`."""

    def __init__(
        self, gate: threading.Event | None = None, timings: ImageTimings = NO_IMAGES
    ) -> None:
        self.encoded: list[tuple[bytes, ...]] = []
        self.gate = gate
        self.timings = timings
        self.encoding = 0

    @property
    def tokens_per_image(self) -> int:
        return 4

    async def encode(self, images: Sequence[bytes]) -> ImageFeatures:
        self.encoding += 1
        try:
            while self.gate is not None and not self.gate.is_set():
                await asyncio.sleep(0.001)  # polled: a cancelled request leaves no thread behind
        finally:
            self.encoding -= 1
        for i, data in enumerate(images):
            if not data.startswith(PNG_MAGIC):
                raise InvalidImage(f"image {i + 1} could not be decoded as an image")
        self.encoded.append(tuple(images))
        return FakeFeatures(tuple(images), self.timings)


@dataclass(frozen=True)
class FakeCompiledConstraint(CompiledConstraint):
    compiled: OutputConstraint

    @property
    def constraint(self) -> OutputConstraint:
        return self.compiled


# What the fake compiler refuses, as llguidance would: a regex that does not parse.
BAD_REGEX = "("


@dataclass
class FakeConstraintCompiler(ConstraintCompiler):
    """Compiles any constraint but the regex `BAD_REGEX`; says on which thread each ran."""

    compiled: list[OutputConstraint] = field(default_factory=list)
    threads: list[str] = field(default_factory=list)

    def compile(self, constraint: OutputConstraint) -> CompiledConstraint:
        self.threads.append(threading.current_thread().name)
        if constraint.kind == "regex" and constraint.spec == BAD_REGEX:
            raise InvalidRequest("'structured_outputs.regex' cannot be used: unclosed group")
        self.compiled.append(constraint)
        return FakeCompiledConstraint(constraint)


@dataclass
class FakeTextGenerator(TextGenerator):
    """Replies with `reply` piece by piece; one whitespace-separated word is one token; the
    last piece ends it with `last_finish`.

    Its queue is the engine's real `Admission`, moved as an engine without a batch limit
    would: a request runs from its first step and leaves when its generation ends."""

    reply: Sequence[str] = ("Hello", ",", " world", "!")
    context: int = 64
    delay_s: float = 0.0
    fail_after: int | None = None
    template: ConversationTemplate = TEMPLATES["vicuna_v1"]
    admission: Admission = field(default_factory=Admission)
    calls: list[tuple[str, SamplingParams]] = field(default_factory=list)
    constraints: list[CompiledConstraint | None] = field(default_factory=list)
    last_finish: FinishReason = "stop"
    closed: int = 0

    @property
    def context_length(self) -> int:
        return self.context

    @property
    def conversation_template(self) -> ConversationTemplate:
        return self.template

    async def count_tokens(self, text: str) -> int:
        return self.count_words(text)

    def count_words(self, text: str) -> int:
        return len(text.replace(IMAGE_PLACEHOLDER, " ").split())

    def admit(self) -> Admitted:
        return self.admission.admit()

    @property
    def queue_length(self) -> int:
        return self.admission.queue_length

    def generate(
        self,
        prompt: str,
        images: ImageFeatures | None,
        params: SamplingParams,
        admitted: Admitted | None = None,
        constraint: CompiledConstraint | None = None,
    ) -> AsyncIterator[GenerationStep]:
        self.calls.append((prompt, params))
        self.constraints.append(constraint)
        prompt_tokens = self.count_words(prompt) + 4 * (images.num_images if images else 0)
        if prompt_tokens >= self.context:
            if admitted is not None:
                admitted.leave()  # its prompt is refused: it never runs
            raise ContextOverflow(
                f"the prompt takes {prompt_tokens} tokens; the context holds {self.context}"
            )
        return self._steps(prompt_tokens, params, admitted)

    async def _steps(
        self, prompt_tokens: int, params: SamplingParams, admitted: Admitted | None
    ) -> AsyncIterator[GenerationStep]:
        admission = self.admission
        ticket = admission.admit() if admitted is None else admission.claim(admitted)
        ticket.started()
        try:
            for i, piece in enumerate(self.reply):
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("simulated kernel failure")
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                n = i + 1
                last = n == len(self.reply)
                at_limit = n >= params.max_new_tokens
                finish = self.last_finish if last else ("length" if at_limit else None)
                yield GenerationStep(piece, prompt_tokens, n, finish)
                if finish:
                    return
        finally:
            ticket.ended()
            self.closed += 1


@dataclass
class FakeController(ControllerClient):
    """Records calls; `down` makes it unreachable; `known` answers heartbeats' `exist`."""

    down: bool = False
    known: bool = True
    registrations: list[tuple[str, WorkerStatus, bool]] = field(default_factory=list)
    heartbeats: list[tuple[str, int]] = field(default_factory=list)

    async def register(self, worker_address: str, status: WorkerStatus, multimodal: bool) -> None:
        if self.down:
            raise ControllerUnavailable("http://controller", "connection refused")
        self.registrations.append((worker_address, status, multimodal))
        self.known = True

    async def heartbeat(self, worker_address: str, queue_length: int) -> bool:
        if self.down:
            raise ControllerUnavailable("http://controller", "connection refused")
        self.heartbeats.append((worker_address, queue_length))
        return self.known
