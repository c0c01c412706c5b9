"""What `vilaserve serve --ray` logs about its replicas: one line each time their states change
(starting, running, being stopped, unhealthy), read from `serve.status()`."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

POLL_S = 2.0


def replica_summary(status: Any, app_name: str, deployment_name: str) -> str:
    """One line for the deployment's state in a `serve.status()` (ServeStatus) object."""
    app = status.applications.get(app_name)
    if app is None:
        return "not deployed"
    deployment = app.deployments.get(deployment_name)
    if deployment is None:
        return f"application {_name(app.status)}, no replicas yet"
    states: Mapping[str, int] = deployment.replica_states or {}
    counts = ", ".join(f"{n} {_name(s).lower()}" for s, n in sorted(states.items()) if n)
    line = f"replicas: {counts or 'none'} ({_name(deployment.status).lower()})"
    return f"{line}: {deployment.message}" if deployment.message else line


def _name(value: Any) -> str:
    return str(getattr(value, "value", value))


class ReplicaStateLog:
    """Polls `read_status` on a thread of its own and says each new summary once."""

    def __init__(
        self,
        read_status: Callable[[], Any],
        app_name: str,
        deployment_name: str,
        say: Callable[[str], None],
        poll_s: float = POLL_S,
    ) -> None:
        self._read = read_status
        self._names = (app_name, deployment_name)
        self._say = say
        self._poll_s = poll_s
        self._last = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replica-states", daemon=True)

    def check(self) -> None:
        """Reads the status once and says it if it changed."""
        try:
            summary = replica_summary(self._read(), *self._names)
        except Exception as exc:  # the cluster is going away, or not reachable for a moment
            summary = f"replica states unknown ({type(exc).__name__}: {exc})"
        if summary != self._last:
            self._last = summary
            self._say(summary)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            self.check()
