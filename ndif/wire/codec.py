"""Messages to bytes and back: MessagePack, compressed with zstd, within size limits."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import msgspec
import zstandard

from .schema import PROTOCOL_VERSION, BatchRequest, Request, Result
from .values import Decoder, Limits, WireError

MAGIC = b"NDIF"


@dataclass
class SizeLimits:
    """How large a message may be, compressed and uncompressed (server configuration)."""

    max_compressed: int = 256 << 20
    max_uncompressed: int = 1 << 30
    values: Limits | None = None


def _pack(message: msgspec.Struct, level: int) -> bytes:
    return MAGIC + zstandard.ZstdCompressor(level=level).compress(msgspec.msgpack.encode(message))


def _unpack(data: bytes, kind: type, limits: SizeLimits) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"malformed message: expected bytes, got {type(data).__name__}")
    if len(data) > limits.max_compressed:
        raise WireError(
            f"the message is {len(data)} bytes, over the limit of {limits.max_compressed}; "
            "send smaller values (save less, or fewer captured tensors)"
        )
    if bytes(data[:4]) != MAGIC:
        raise WireError("malformed message: not an ndif message (bad magic)")
    payload = bytes(data[4:])
    try:
        declared = zstandard.frame_content_size(payload)
        if 0 <= declared <= limits.max_uncompressed:  # the common case: one call, sized up front
            raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=limits.max_uncompressed)
        else:  # unknown or too large: read at most one byte past the limit
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload), read_across_frames=False)
            raw = reader.read(limits.max_uncompressed + 1)
    except zstandard.ZstdError as error:
        raise WireError(f"malformed message: {error}") from None
    if len(raw) > limits.max_uncompressed:
        raise WireError(f"the message expands to more than {limits.max_uncompressed} bytes")
    try:
        message = msgspec.msgpack.decode(raw, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as error:
        raise WireError(f"malformed message: {error}") from None
    except RecursionError:
        raise WireError("malformed message: values nest too deeply") from None
    if message.protocol != PROTOCOL_VERSION:
        raise WireError(
            f"protocol version {message.protocol} is not supported (this side speaks {PROTOCOL_VERSION}); "
            "upgrade the older side"
        )
    return message


def encode_request(request: Request, level: int = 3) -> bytes:
    """Bytes of a request whose value fields hold wire trees (see `ndif.remote.build_request`)."""
    return _pack(request, level)


def decode_request(data: bytes, limits: SizeLimits | None = None) -> Request:
    """Validate and decode a request; values come back as data and code specs."""
    limits = limits or SizeLimits()
    request: Request = _unpack(data, Request, limits)
    decoder = Decoder(limits.values)
    request.inputs = [decoder.decode(item) for item in request.inputs]
    request.kwargs = {key: decoder.decode(item) for key, item in request.kwargs.items()}
    request.captured = {key: decoder.decode(item) for key, item in request.captured.items()}
    if not all(name.isidentifier() for name in request.captured):
        raise WireError("malformed message: captured names must be identifiers")
    return request


def encode_result(result: Result, level: int = 3) -> bytes:
    """Bytes of a result whose ``saved`` values hold wire trees."""
    return _pack(result, level)


def decode_result(data: bytes, limits: SizeLimits | None = None) -> Result:
    limits = limits or SizeLimits()
    result: Result = _unpack(data, Result, limits)
    decoder = Decoder(limits.values)
    result.saved = {key: decoder.decode(item) for key, item in result.saved.items()}
    return result


def encode_batch(name: str | None, items: list[bytes]) -> bytes:
    """A batch of already encoded requests (plain MessagePack: the items are compressed)."""
    return msgspec.msgpack.encode(BatchRequest(name=name, items=items))


def decode_batch(data: bytes, max_items: int) -> BatchRequest:
    """The envelope of a batch; decode each item with `decode_request`."""
    try:
        batch = msgspec.msgpack.decode(data, type=BatchRequest)
    except msgspec.DecodeError as error:
        raise WireError(f"malformed batch: {error}") from None
    if batch.protocol != PROTOCOL_VERSION:
        raise WireError(
            f"batch protocol version {batch.protocol} is not supported (this side speaks {PROTOCOL_VERSION})"
        )
    if not batch.items:
        raise WireError("the batch has no items")
    if len(batch.items) > max_items:
        raise WireError(f"the batch has {len(batch.items)} items; at most {max_items} are accepted at once")
    return batch
