"""``fdctl keygen --out DIR``: CURVE keys for the Executor <-> shard links.

Writes a server key pair (for every shard), a client key pair (for the
Executor) and ``authorized_clients/`` listing the client key, as z85 text files
(secrets readable by the owner only). Give the folder as ``--curve-dir`` to
``start-shard``, ``serve``, ``start-gpu`` and ``generate``; a shard host needs
``server.*`` and ``authorized_clients/``, the Executor's host ``client.*`` and
``server.public``.
"""
from __future__ import annotations

import click

from fastdecode.cli.errors import OneLineCommand, OneLineError


@click.command("keygen", cls=OneLineCommand)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to write the keys into (created if missing).")
@click.option("--force", "is_overwriting", is_flag=True, help="Replace keys already in the folder.")
def keygen(out_dir: str, is_overwriting: bool) -> None:
    """Make a CURVE server and client key pair and an authorized-clients folder."""
    from fastdecode.transport.security import CurveKeyError, write_keys

    try:
        paths = write_keys(out_dir, is_overwriting=is_overwriting)
    except (CurveKeyError, OSError) as exc:
        raise OneLineError(str(exc)) from None
    for path in paths:
        click.echo(str(path))
