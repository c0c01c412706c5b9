"""The use case that describes the worker's model: its details, its conversation template and
how many positions a prompt takes."""

from __future__ import annotations

from typing import Any

from vilaserve.application.worker.prompt_bounds import check_prompt_chars
from vilaserve.domain.shared.conversation import ConversationTemplate
from vilaserve.domain.shared.errors import InvalidRequest
from vilaserve.domain.shared.generation import IMAGE_PLACEHOLDER
from vilaserve.domain.shared.worker_status import ModelDescription
from vilaserve.domain.worker.ports import TextGenerator, VisionEncoder


class DescribeModel:
    """`/model_details`, `/count_token` and `/worker_get_conv_template`."""

    def __init__(
        self,
        model_name: str,
        generator: TextGenerator,
        vision: VisionEncoder | None,
        max_prompt_chars: int | None = None,
    ) -> None:
        self._name = model_name
        self._generator = generator
        self._vision = vision
        self._max_prompt_chars = max_prompt_chars

    def details(self) -> ModelDescription:
        return ModelDescription(
            name=self._name,
            context_length=self._generator.context_length,
            tokens_per_image=self._vision.tokens_per_image if self._vision else 0,
            multimodal=self._vision is not None,
            cpu_path=self._generator.compute_path,
        )

    def conversation_template(self) -> ConversationTemplate:
        return self._generator.conversation_template

    async def count_tokens(self, body: Any) -> int:
        """Tokens the prompt will occupy, each `<image>` counted as the positions it takes.

        FastChat counts text only; counting images too keeps `context_length - count` honest
        for clients that size `max_new_tokens` from it.
        """
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise InvalidRequest("'prompt' (a string) is required")
        prompt: str = body["prompt"]
        check_prompt_chars(prompt, self._generator.context_length, self._max_prompt_chars)
        images = prompt.count(IMAGE_PLACEHOLDER) if self._vision else 0
        per_image = self._vision.tokens_per_image if self._vision else 0
        return await self._generator.count_tokens(prompt) + images * per_image
