"""One-line CLI errors: bad input ends a command with ``Error: <message>`` on stderr and exit 2,
never a traceback or a usage block."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click


class OneLineError(click.ClickException):
    """Printed as a single ``Error: <message>`` line on stderr; exit code 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class OneLineCommand(click.Command):
    """A click command whose usage errors are one line too (no usage block)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise OneLineError(exc.format_message()) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise OneLineError(exc.format_message()) from None


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn the errors bad input causes (model, request, usage, CURVE keys, a shard that does not answer or refuses)
    and file-system errors (a read-only folder, a full disk) into ``OneLineError``."""
    from fastdecode.actors.model.errors import ModelError
    from fastdecode.actors.request import RequestError
    from fastdecode.transport.errors import TransportError
    from fastdecode.transport.security import CurveKeyError

    try:
        yield
    except (ModelError, RequestError, CurveKeyError, click.UsageError) as exc:
        message = exc.format_message() if isinstance(exc, click.UsageError) else str(exc)
        raise OneLineError(message) from None
    except TransportError as exc:
        raise OneLineError(shard_error_message(exc)) from None
    except OSError as exc:
        raise OneLineError(str(exc)) from None


def shard_error_message(exc: Exception) -> str:
    """One line for a shard link that failed at start: what happened, and where to look."""
    from fastdecode.transport.errors import RemoteRequestError

    if isinstance(exc, RemoteRequestError):
        if exc.code == "busy":
            return f"a shard refused this Executor: {exc.message}"
        return f"a shard refused this Executor's start-up [{exc.code}]: {exc.message}"
    if "inproc://" in str(exc):  # an in-process shard: no address, firewall or key to check
        return f"the in-process KV shard failed: {exc}"
    return (f"cannot reach a shard: {exc} (check the --shard address and port, that a firewall lets them "
            "through, and that the CURVE keys match: the shard's --curve-dir must list this host's client key "
            "and this host's server.public must be the shard's)")
