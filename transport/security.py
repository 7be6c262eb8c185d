"""ZeroMQ CURVE encryption and authentication for the Executor <-> KVShard links.

A key folder (``fdctl keygen --out DIR``) holds z85 text files::

    server.public  server.secret      the shard's key pair (every shard may share it)
    client.public  client.secret      the Executor's key pair
    authorized_clients/*.public       client public keys a shard accepts (one key per file)

A shard needs ``server.*`` and ``authorized_clients/``; an Executor needs
``client.*`` and ``server.public``. Security is set on a zmq Context as default
socket options, so every socket the transport makes on that Context is a CURVE
socket: ``server_context(keys)`` also starts a ZAP authenticator that admits only
the listed client keys and counts every refused one (logged once per interval,
with the count held back); ``client_context(keys)`` makes sockets that insist on
the shard's public key. A client with an unlisted key never gets a message
through: the handshake is refused before any frame reaches the actor.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from fastdecode.transport.log_throttle import ThrottledWarning

log = logging.getLogger("fastdecode.security")

SERVER_PUBLIC = "server.public"
SERVER_SECRET = "server.secret"
CLIENT_PUBLIC = "client.public"
CLIENT_SECRET = "client.secret"
AUTHORIZED_DIR = "authorized_clients"
Z85_KEY_LEN = 40


class CurveKeyError(ValueError):
    """A key folder or key file that cannot be used."""


def _read_key(path: Path) -> bytes:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise CurveKeyError(f"missing key file {path} (make keys with: fdctl keygen --out DIR)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CurveKeyError(f"cannot read key file {path}: {exc}") from None
    if len(text) != Z85_KEY_LEN:
        raise CurveKeyError(f"{path} does not hold a z85 CURVE key ({Z85_KEY_LEN} characters)")
    try:
        zmq.utils.z85.decode(text)
    except ValueError as exc:
        raise CurveKeyError(f"{path} does not hold a z85 CURVE key: {exc}") from None
    return text.encode("ascii")


def _read_key_pair(root: Path, public_name: str, secret_name: str) -> tuple[bytes, bytes]:
    """A public and a secret key that belong together (the public one derives from the secret one)."""
    public, secret = _read_key(root / public_name), _read_key(root / secret_name)
    if zmq.curve_public(secret) != public:
        raise CurveKeyError(f"{root / public_name} is not the public key of {root / secret_name}: the pair was "
                            "mixed up with another fdctl keygen run's; copy both files from one folder")
    return public, secret


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    authorized: frozenset[bytes]  # z85 client public keys

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "ServerKeys":
        root = Path(folder)
        authorized_dir = root / AUTHORIZED_DIR
        if not authorized_dir.is_dir():
            raise CurveKeyError(f"missing folder {authorized_dir} of authorized client keys")
        authorized = frozenset(_read_key(p) for p in sorted(authorized_dir.glob("*.public")))
        if not authorized:
            raise CurveKeyError(f"{authorized_dir} lists no client key (*.public): no client could connect")
        return cls(*_read_key_pair(root, SERVER_PUBLIC, SERVER_SECRET), authorized)


@dataclass(frozen=True)
class ClientKeys:
    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "ClientKeys":
        root = Path(folder)
        return cls(*_read_key_pair(root, CLIENT_PUBLIC, CLIENT_SECRET), _read_key(root / SERVER_PUBLIC))


def write_keys(folder: str | os.PathLike, *, is_overwriting: bool = False) -> list[Path]:
    """A new server and client key pair and an authorized-clients folder listing the client; returns the files."""
    root = Path(folder)
    targets = [root / n for n in (SERVER_PUBLIC, SERVER_SECRET, CLIENT_PUBLIC, CLIENT_SECRET)]
    authorized = root / AUTHORIZED_DIR / CLIENT_PUBLIC
    existing = [p for p in [*targets, authorized] if p.exists()]
    if existing and not is_overwriting:
        raise CurveKeyError(f"{existing[0]} exists; refusing to overwrite keys (use --force)")
    (root / AUTHORIZED_DIR).mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    contents = [server_public, server_secret, client_public, client_secret, client_public]
    for path, key in zip([*targets, authorized], contents):
        is_secret = path.name.endswith(".secret")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if is_secret else 0o644)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(key.decode("ascii") + "\n")
    return [*targets, authorized]


class _AuthorizedKeys:
    """The ZAP credentials callback: admit listed keys, count every refusal and log them (a line per interval: anyone
    who reaches the port can open connections with an unlisted key as fast as it likes)."""

    def __init__(self, authorized: frozenset[bytes]) -> None:
        self._authorized = authorized
        self.num_refused = 0
        self._warn_refused = ThrottledWarning(log)

    def callback(self, domain: str, client_key: bytes) -> bool:
        if client_key in self._authorized:
            return True
        self.num_refused += 1
        self._warn_refused("refused a CURVE client with unlisted key %s", client_key.decode("ascii", "replace"))
        return False


@dataclass
class ServerSecurity:
    """A server Context with CURVE defaults and its running authenticator; ``close()`` stops both."""

    ctx: zmq.asyncio.Context
    authenticator: AsyncioAuthenticator
    keys: _AuthorizedKeys

    @property
    def num_refused(self) -> int:
        return self.keys.num_refused

    def close(self) -> None:
        self.authenticator.stop()
        self.ctx.destroy(linger=0)


def server_context(keys: ServerKeys) -> ServerSecurity:
    """A fresh Context whose sockets are CURVE servers admitting only ``keys.authorized`` (needs a running loop)."""
    ctx = zmq.asyncio.Context()
    authenticator = AsyncioAuthenticator(ctx)
    authenticator.start()  # its ZAP socket is made before the CURVE defaults are set
    checker = _AuthorizedKeys(keys.authorized)
    authenticator.configure_curve_callback("*", credentials_provider=checker)
    ctx.setsockopt(zmq.CURVE_SERVER, 1)
    ctx.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    ctx.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    return ServerSecurity(ctx, authenticator, checker)


def client_context(keys: ClientKeys) -> zmq.asyncio.Context:
    """A fresh Context whose sockets are CURVE clients of the server key in ``keys``."""
    ctx = zmq.asyncio.Context()
    ctx.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    ctx.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    ctx.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    return ctx
