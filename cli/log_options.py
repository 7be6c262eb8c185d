"""The daemons' logging (serve, start-gpu, start-shard): one ``--log-level`` option and how it is applied."""
from __future__ import annotations

import logging
import sys

import click

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The level of the root logger, so of fastdecode's loggers and of the access log too (its lines are INFO).
LOG_LEVEL_OPTION = click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True,
                                help="Least severe log records written to stderr.")


def configure_logging(log_level: str) -> None:
    """Log records at ``log_level`` (one of ``LOG_LEVELS``) and above to stderr, one line each."""
    level = log_level.upper()
    logging.basicConfig(stream=sys.stderr, format=LOG_FORMAT)
    logging.getLogger().setLevel(level)  # here, not in basicConfig, which leaves a configured root as it is
