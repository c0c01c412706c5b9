"""Two whole stacks in one process do not see each other (issue 24): each app serves from its
own container, so a worker heart-beating to its controller lands in that controller only, and
each API lists its own model. (With process-wide route wiring the newest stack served every
request: the older worker re-registered in the newer controller.)"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from servers import serving_stack


def test_two_stacks_in_one_process_serve_only_their_own_models(
    tiny_vila_siglip: Path, tiny_vila_clip: Path
) -> None:
    with (
        serving_stack(tiny_vila_siglip, heartbeat_interval_s=0.2) as first,
        serving_stack(tiny_vila_clip, heartbeat_interval_s=0.2) as second,
    ):
        time.sleep(1.0)  # several heartbeats of both workers
        for stack in (first, second):
            listed = httpx.post(stack.controller_url + "/list_models").json()["models"]
            assert listed == [stack.model], (stack.model, listed)
            cards = httpx.get(stack.api_url + "/v1/models").json()["data"]
            assert [card["id"] for card in cards] == [stack.model]
            body = {
                "model": stack.model,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
            }
            answer = httpx.post(stack.api_url + "/v1/chat/completions", json=body, timeout=60)
            assert answer.status_code == 200 and answer.json()["model"] == stack.model
