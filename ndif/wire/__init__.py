"""Wire format v1: requests and results as versioned, compressed MessagePack (see docs/wire-format.md)."""

from .codec import SizeLimits, decode_request, decode_result, encode_request, encode_result
from .schema import PROTOCOL_VERSION, ClientInfo, ErrorInfo, Frame, Request, Result, Source, Timings
from .values import Decoder, Encoder, Limits, WireError

__all__ = [
    "PROTOCOL_VERSION",
    "ClientInfo",
    "Decoder",
    "Encoder",
    "ErrorInfo",
    "Frame",
    "Limits",
    "Request",
    "Result",
    "SizeLimits",
    "Source",
    "Timings",
    "WireError",
    "decode_request",
    "decode_result",
    "encode_request",
    "encode_result",
]
