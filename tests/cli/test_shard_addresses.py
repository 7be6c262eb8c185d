"""``--shard ADDR`` of the commands that connect to shard daemons: an address a daemon listens on, checked when the
options are read (ZeroMQ's own words for a bad one were "Invalid argument", after the weights had loaded)."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from fastdecode.cli.main import main

COMMANDS = [["serve"], ["start-gpu"], ["generate", "hi"], ["bench", "offline"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize(("address", "words"), [
    ("127.0.0.1:8150", "must start with tcp:// or ipc://"),
    ("tcp://127.0.0.1:0", "port '0' of 'tcp://127.0.0.1:0' is not in 1..65535"),
    ("tcp://127.0.0.1:*", "is not in 1..65535: give the port the shard daemon listens on"),
    ("tcp://127.0.0.1:notaport", "port 'notaport'"),
    ("tcp://[::1]:99999", "port '99999'"),
    ("ipc://", "names no path"),
])
def test_a_bad_shard_address_is_refused_with_its_reason(command, address, words):
    result = CliRunner().invoke(main, [*command, "--model", "random:tiny", "--shard", address])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--shard'" in result.output and words in result.output


def test_good_addresses_pass_the_check():
    from fastdecode.cli.start_shard import shard_addresses_option

    addresses = ("tcp://127.0.0.1:5555", "tcp://[::1]:1", "tcp://host.example:65535", "ipc:///tmp/shard.sock")
    assert shard_addresses_option(None, None, addresses) == addresses
