"""`ignore_eos` (vLLM's and llama-server's flag): the model's own end-of-turn does not end the
answer, on the worker protocol and through the API; the request's own stops still do."""

from __future__ import annotations

import pytest

from vilaserve.domain.api.openai_requests import CompletionRequest
from vilaserve.domain.api.worker_jobs import job_for
from vilaserve.domain.shared.conversation import TEMPLATES
from vilaserve.domain.shared.errors import InvalidRequest
from vilaserve.domain.shared.generation import parse_generation_request


def test_the_worker_protocol_reads_the_flag() -> None:
    assert parse_generation_request({"prompt": "hi"}).params.ignore_eos is False
    assert parse_generation_request({"prompt": "hi", "ignore_eos": True}).params.ignore_eos
    assert parse_generation_request({"prompt": "hi", "ignore_eos": None}).params.ignore_eos is False
    with pytest.raises(InvalidRequest, match="'ignore_eos' must be a boolean"):
        parse_generation_request({"prompt": "hi", "ignore_eos": "yes"})


def test_the_api_drops_the_templates_stops_and_keeps_the_requests() -> None:
    template = TEMPLATES["llama_3"]
    assert template.stop_str and template.stop_token_ids
    body = {"model": "m", "prompt": "hi", "stop": ["END"], "stop_token_ids": [9]}
    usual = job_for(CompletionRequest(**body), "hi", template, 2048)
    ignoring = job_for(CompletionRequest(**body, ignore_eos=True), "hi", template, 2048)
    assert set(template.stop_str) <= set(usual.stop)
    assert ignoring.stop == ("END",)
    assert ignoring.stop_token_ids == (9,)
    assert ignoring.to_payload()["ignore_eos"] is True
    assert "ignore_eos" not in usual.to_payload()
