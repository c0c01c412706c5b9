"""Route dependencies taken from the container of the app that received the request.

dependency-injector's wiring (`@inject` + `Provide`) patches a route module once per process,
for the container wired last: two apps of one kind in one process (the test harness runs whole
stacks in threads, sometimes two at once) would both serve from that container, so one stack's
worker heart-beating to its own controller landed in the other stack's registry. Each app keeps
its container in `app.state.container`; `provided(name)` resolves the provider of that name
there, per request, so every app serves from its own. Tests override providers on the container
as before.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Request


def provided(name: str) -> Any:
    """`Depends` on the container provider `name` of the request's app."""

    def dependency(request: Request) -> Any:
        return getattr(request.app.state.container, name)()

    dependency.__name__ = f"provided_{name}"
    return Depends(dependency)
