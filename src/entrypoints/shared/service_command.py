"""What every service's command does between its flags and its HTTP server: settings from the
flags given, then log and serve."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from vilaserve.entrypoints.shared.http_server import limits_of, run_http_server

SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def settings_from_args(
    settings_type: type[SettingsT], args: argparse.Namespace, program: str
) -> SettingsT:
    """The service's settings: the flags given on the command line (every flag defaults to
    None) over the environment and the settings' own defaults. A value the settings refuse
    ends the program with one line per problem, not a traceback."""
    fields = settings_type.model_fields
    given = {k: v for k, v in vars(args).items() if v is not None and k in fields}
    try:
        return settings_type(**given)
    except ValidationError as exc:
        problems = (str(e.get("ctx", {}).get("error") or e["msg"]) for e in exc.errors())
        sys.exit(f"{program}: " + "; ".join(problems))


def serve_http(service: str, app: Any, settings: Any) -> None:
    """Logs the start of `service` and runs its server until it is stopped."""
    logging.getLogger(f"vilaserve.entrypoints.{service}.main").info(
        f"starting {service}", extra={"host": settings.host, "port": settings.port}
    )
    run_http_server(app, settings.host, settings.port, limits_of(settings))
