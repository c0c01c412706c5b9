"""The ports: what the application needs from the outside world, stated without any library.

Adapters implement them (torch for the model, httpx for the controller); unit tests use fakes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Generic, TypeVar

from vilaserve.domain.shared.conversation import ConversationTemplate
from vilaserve.domain.shared.errors import ServingError
from vilaserve.domain.shared.generation import GenerationStep, OutputConstraint, SamplingParams
from vilaserve.domain.shared.worker_status import WorkerStatus
from vilaserve.domain.worker.batch import ModelBatch, PositionKey, StepTiming
from vilaserve.domain.worker.first_token import NO_IMAGES, ImageTimings


class ImageFeatures(ABC):
    """Encoded images, opaque to the application; only the adapter that made them reads them."""

    @property
    @abstractmethod
    def num_images(self) -> int: ...

    @property
    def timings(self) -> ImageTimings:
        """How long these images took to encode; zeros from an encoder that does not say."""
        return NO_IMAGES


class VisionEncoder(ABC):
    """Turns raw image bytes into features the matching `TextGenerator` can splice in."""

    @property
    @abstractmethod
    def tokens_per_image(self) -> int:
        """How many LLM positions one image occupies (196 for VILA-1.5 SigLIP, 576 for CLIP-336)."""

    @abstractmethod
    async def encode(self, images: Sequence[bytes]) -> ImageFeatures:
        """Decode and encode the images in order. Raises `InvalidImage` naming the bad one."""


class CompiledConstraint(ABC):
    """An `OutputConstraint` compiled for the model's tokenizer, opaque to the application: only
    the model runner that goes with the compiler reads it (each request gets its own state
    from it there)."""

    @property
    @abstractmethod
    def constraint(self) -> OutputConstraint: ...


class ConstraintCompiler(ABC):
    """Turns a request's `structured_outputs` into what the model runner masks tokens with."""

    @abstractmethod
    def compile(self, constraint: OutputConstraint) -> CompiledConstraint:
        """Compiles, or finds compiled (equal constraints share one compilation). A big schema
        takes milliseconds or more: call it off the event loop and off the model thread.
        Raises `InvalidRequest` naming the problem: a schema, regex or grammar that is invalid
        or that the compiler does not support."""


class Admitted(ABC):
    """A request the worker accepted: its place in the worker's one queue, counted as waiting
    until its sequence runs, then as running, until it leaves the count, exactly once."""

    @abstractmethod
    def leave(self) -> None:
        """The request is over, however it ended. It leaves the count now or, when the engine
        still holds its sequence (an abort is on its way), as soon as the engine lets the
        sequence go, so that the count never shows a cache row free before it is. Calling it
        again, or after the generation ended it, does nothing."""

    @abstractmethod
    def turn(self) -> AbstractAsyncContextManager[None]:
        """Held while the request is served (its pictures encoded, then its generation): the
        worker serves a bounded number at once; the others wait here, still counted."""


class TextGenerator(ABC):
    """The language model: tokenizer, template and token-by-token generation, and the one
    admission queue in front of it."""

    @property
    @abstractmethod
    def context_length(self) -> int: ...

    @property
    def compute_path(self) -> str | None:
        """Which kernels run the model: on CPU the ISA path (`avx512_bf16`, `avx2`, `torch`),
        `cuda` on a GPU; None when the adapter does not say."""
        return None

    @property
    @abstractmethod
    def conversation_template(self) -> ConversationTemplate: ...

    @abstractmethod
    async def count_tokens(self, text: str) -> int:
        """Text tokens of `text` as the model would see them; `<image>` placeholders count 0.
        Tokenizing a long text takes a while: never on the event loop's own thread."""

    @abstractmethod
    def admit(self) -> Admitted:
        """Takes a request in, as waiting, or raises `EngineOverloaded` when the worker holds
        as many as it may: the worker's one accept-or-refuse decision, made before anything is
        done for the request (its pictures are encoded while it waits)."""

    @property
    @abstractmethod
    def queue_length(self) -> int:
        """Requests admitted and not yet gone, running plus waiting (FastChat's and TinyChat's
        `queue_length`); the engine's load figures are the same two counts."""

    @abstractmethod
    def generate(
        self,
        prompt: str,
        images: ImageFeatures | None,
        params: SamplingParams,
        admitted: Admitted | None = None,
        constraint: CompiledConstraint | None = None,
    ) -> AsyncIterator[GenerationStep]:
        """Stream the reply to `prompt`; `<image>` placeholders take `images` in order.

        `admitted`: the request's place from `admit()`; the generation moves it to running and
        out of the count when it ends. Without one the generation admits itself (raising
        `EngineOverloaded` from the first iteration when the queue is full).
        `constraint`: every token is one the constraint allows; when it allows none, the reply
        ends with finish reason "grammar_error".
        Stops on the params' stop token ids, the template's and the tokenizer's end tokens, or
        `max_new_tokens`. Raises `ContextOverflow` (from the first iteration) before any step
        when the prompt cannot fit.
        Closing the iterator early cancels the generation.
        """

    async def stop_all(self, error: ServingError) -> None:  # noqa: B027 - optional hook
        """Ends every generation in flight with `error` (the worker's drain time is over); new
        ones fail the same way. Generators without an engine need not do anything."""


class PreparedPrompt(ABC):
    """A tokenized prompt with its images spliced in, ready to prefill; the runner that made it
    keeps what else it needs (embeddings, the request's sampler) inside."""

    @property
    @abstractmethod
    def keys(self) -> Sequence[PositionKey]:
        """One key per prompt position (see `PositionKey`); its length is the prompt's."""

    @property
    @abstractmethod
    def max_new_tokens(self) -> int:
        """New tokens allowed: the request's limit, capped by the room left in the context."""

    @property
    @abstractmethod
    def stop_token_ids(self) -> frozenset[int]: ...

    @property
    def constrained(self) -> bool:
        """Its tokens are masked by an output constraint (the scheduler tells the runner which
        steps hold such prompts, so that the others do no constraint work at all)."""
        return False

    @property
    def constraint_failed(self) -> bool:
        """Its output constraint dead-ended in the last step (no token allowed, or the
        constraint's matcher failed): the token the runner returned for it is not part of the
        answer, which ends there with finish reason "grammar_error"."""
        return False


class Detokenizer(ABC):
    """Token ids of one stream in, text out as soon as it is printable."""

    @abstractmethod
    def push(self, token: int) -> str: ...

    @abstractmethod
    def flush(self) -> str: ...


P = TypeVar("P", bound=PreparedPrompt)


class ModelRunner(ABC, Generic[P]):
    """The model as the engine drives it: a KV cache of `num_cache_rows` rows of
    `cache_row_length` positions, filled and extended by batched steps."""

    @property
    @abstractmethod
    def context_length(self) -> int: ...

    @property
    def compute_path(self) -> str | None:
        return None

    @property
    @abstractmethod
    def conversation_template(self) -> ConversationTemplate: ...

    @property
    @abstractmethod
    def num_cache_rows(self) -> int: ...

    @property
    @abstractmethod
    def cache_row_length(self) -> int: ...

    @abstractmethod
    def count_tokens(self, text: str) -> int: ...

    @abstractmethod
    def prepare(
        self,
        prompt: str,
        images: ImageFeatures | None,
        params: SamplingParams,
        constraint: CompiledConstraint | None = None,
    ) -> P:
        """Tokenize and splice; raises `InvalidRequest` / `ContextOverflow` naming the problem.
        `constraint`: the prompt carries its own state of it (the runner masks its tokens)."""

    @abstractmethod
    def execute(self, batch: ModelBatch[P]) -> Sequence[int]:
        """Runs one step; called only on the model's own thread (see `submit`). Returns the
        sampled tokens in the batch's order (`ModelBatch`). Raises `OutOfDeviceMemory` when the
        device is full."""

    @property
    def last_step_timing(self) -> StepTiming | None:
        """How the last `execute` whose batch held prompt chunks split its time (read on the
        model's thread right after it); None from a runner that does not measure."""
        return None

    @abstractmethod
    def submit(self, work: Callable[[], None]) -> None:
        """Queues `work` on the model's own thread, first in first out with the other work
        there (image encodes). `work` must not raise."""

    @abstractmethod
    def detokenizer(self) -> Detokenizer: ...


class ControllerClient(ABC):
    """The FastChat / TinyChat controller as seen by a worker."""

    @abstractmethod
    async def register(self, worker_address: str, status: WorkerStatus, multimodal: bool) -> None:
        """Raises `ControllerUnavailable` when the controller cannot be reached."""

    @abstractmethod
    async def heartbeat(self, worker_address: str, queue_length: int) -> bool:
        """Returns the controller's `exist`; raises `ControllerUnavailable` when unreachable."""

    async def leave(self, worker_address: str) -> None:  # noqa: B027 - optional hook
        """Tells the controller this worker is shutting down (a heartbeat with `leaving`;
        FastChat's controller ignores the flag and expires the worker instead)."""
