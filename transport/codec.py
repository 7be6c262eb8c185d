"""The wire codec: a msgpack envelope in frame 0, large numpy arrays as their own frames.

Frame 0 is ``msgpack([VERSION, kind, request_id, [field values...]])``.  The
channel's schema says which fields are arrays; an array field's value is
``[dtype name, shape, payload]`` where payload is either the raw bytes (arrays of
at most ``inline_threshold`` bytes) or the index of the frame that carries them.
Big arrays are therefore never copied into the envelope: the sender passes them
to ZeroMQ with ``copy=False`` and the receiver wraps the frame in a read-only
``np.frombuffer`` view.  Decoding is strict: anything unexpected raises
``ProtocolError`` (with the request id once it is known).
"""
from __future__ import annotations

import threading
from typing import Any, Sequence

import msgpack

from fastdecode.transport.errors import ProtocolError
from fastdecode.transport.field_codec import build_decoder, build_encoder, is_int
from fastdecode.transport.messages import DTYPES, MAX_REQUEST_ID, Channel, Message  # noqa: F401  (DTYPES: API)

VERSION = 1
DEFAULT_INLINE_THRESHOLD = 4096  # one page: seq_ids of up to 512 sequences ride in the envelope
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30


class Codec:
    """Encodes and decodes the messages of one channel.

    ``encode`` returns the frames to hand to ``send_multipart(copy=False)``: frame
    0 as bytes, then one flat uint8 ndarray view per big array (no copy when the
    array is C-contiguous).  ``decode`` takes the frames from
    ``recv_multipart(copy=False)`` (zmq.Frame, bytes or any buffer) and returns
    ``(request_id, message)`` whose arrays are read-only views on those frames.
    Both may be called from several threads at once.

    The fields of each message class go through an encoder and a decoder written
    out for that class (``field_codec``); a decoded message is built by filling its
    ``__dict__`` and then running its ``__post_init__``, the same validation as its
    constructor.
    """

    def __init__(
        self,
        channel: Channel,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        inline_threshold: int = DEFAULT_INLINE_THRESHOLD,
    ) -> None:
        if max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be at least 1024, got {max_message_bytes}")
        if inline_threshold < 0:
            raise ValueError(f"inline_threshold must be >= 0, got {inline_threshold}")
        self.channel = channel
        self.max_message_bytes = max_message_bytes
        self.inline_threshold = inline_threshold
        # precomputed per class (encode) and per kind (decode): the channel is read-only after import
        schemas = [channel.by_class(cls) for cls in channel.message_classes]
        self._encoders = {s.cls: (s.kind, build_encoder(s)) for s in schemas if s is not None}
        self._decoders = {s.kind: (s.cls, build_decoder(s)) for s in schemas if s is not None}
        # one msgpack Packer per thread (a Packer is not thread-safe; msgpack.packb makes a new one every call)
        self._per_thread = threading.local()

    # ---------------------------------------------------------------- encode
    def encode(self, request_id: int, message: Message) -> list[Any]:
        encoder = self._encoders.get(type(message))
        if encoder is None:
            raise TypeError(f"{type(message).__name__} is not a message of channel {self.channel.name}")
        if not (type(request_id) is int or is_int(request_id)) or not 0 <= request_id <= MAX_REQUEST_ID:
            raise ValueError(f"request_id must be an integer in [0, 2**63), got {request_id!r}")
        kind, encode_fields = encoder
        frames: list[Any] = [b""]
        values, num_bytes = encode_fields(message, frames, self.inline_threshold)
        try:
            packer = self._per_thread.packer
        except AttributeError:
            packer = self._per_thread.packer = msgpack.Packer(use_bin_type=True)
        frames[0] = header = packer.pack((VERSION, kind, request_id, values))
        num_bytes += len(header)
        if num_bytes > self.max_message_bytes:
            raise ProtocolError(
                f"{type(message).__name__} is {num_bytes} bytes, over the maximum of {self.max_message_bytes}",
                request_id=request_id,
            )
        return frames

    # ---------------------------------------------------------------- decode
    def decode(self, frames: Sequence[Any]) -> tuple[int, Message]:
        if not frames:
            raise ProtocolError("empty message")
        try:
            envelope = msgpack.unpackb(frames[0], use_list=False, raw=False, strict_map_key=True)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ProtocolError(f"frame 0 is not a msgpack envelope: {exc}") from None
        if type(envelope) is not tuple or len(envelope) != 4:
            raise ProtocolError("envelope must be [version, kind, request_id, fields]")
        version, kind, request_id, values = envelope
        if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
            raise ProtocolError(f"bad request id {request_id!r}")
        if type(values) is not tuple:
            raise ProtocolError("envelope fields must be an array", request_id=request_id)
        if version != VERSION:
            raise ProtocolError(f"unsupported protocol version {version!r}", request_id=request_id)
        decoder = self._decoders.get(kind) if type(kind) is int else None
        if decoder is None:
            raise ProtocolError(f"unknown message kind {kind!r} on channel {self.channel.name}",
                                request_id=request_id)
        cls, decode_fields = decoder
        try:
            message, num_bytes = decode_fields(values, frames)
            num_bytes += memoryview(frames[0]).nbytes
            if num_bytes > self.max_message_bytes:
                raise ProtocolError(f"message of {num_bytes} bytes is over the maximum of {self.max_message_bytes}")
        except ProtocolError as exc:
            raise ProtocolError(f"{cls.__name__}: {exc}", request_id=request_id) from None
        except (ValueError, TypeError) as exc:
            raise ProtocolError(f"invalid {cls.__name__}: {exc}", request_id=request_id) from None
        return request_id, message
