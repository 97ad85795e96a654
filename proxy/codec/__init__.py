"""The HTTP/1.1 codec: one small interface, two adapters.

Everything above this package (downstream.py, upstream_conn.py, forward.py) is written
once against the events below; only the adapter differs:

- `llhttp` (httptools): the default, fast path.
- `h11`: the strict reference codec, the fallback when httptools is missing, and the
  second opinion in differential tests.

Parsers only parse. They never write: gatewise frames what it sends itself, because it
re-frames bodies anyway (RFC 9112 §7: Transfer-Encoding is hop-by-hop).

Request parser events (server side), delivered to a handler (a base.RequestHandler):
    on_request_head(head: RequestHead)
    on_request_body(data: bytes)
    on_request_end(trailers: list[tuple[bytes, bytes]])
Response parser events (client side), to a base.ResponseHandler:
    on_response_head(head: ResponseHead)     # also for 1xx interim responses
    on_response_body(data: bytes)
    on_response_end(trailers: list[tuple[bytes, bytes]])

A request parser also answers in_head(): True while part of a request head has been fed
and not its end (the client side times such a head by client_header).

close() is called once the connection is gone: the adapter drops its references back to
the handler (its protocol), so protocol, adapter and parser are freed at once by reference
counting instead of waiting for the cyclic garbage collector (measured: RSS crept up by
several MiB under load before).

Errors are raised from feed() as proxy.errors leaves: BadRequest / RequestHeadersTooLarge
on the request side, UpstreamProtocolError / ResponseHeadersTooLarge on the response side.
That is the translation boundary: no codec exception escapes this package.
"""

from __future__ import annotations

from proxy.codec.base import (RequestHandler, RequestHead, RequestParser, ResponseHandler, ResponseHead,
                              ResponseParser)

__all__ = ["RequestHead", "ResponseHead", "make_request_parser", "make_response_parser", "resolve_parser"]


def resolve_parser(name: str) -> str:
    """"auto" -> "llhttp" when httptools imports, else "h11"."""
    if name != "auto":
        return name
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "llhttp"


def make_request_parser(kind: str, handler: RequestHandler, max_head_bytes: int) -> RequestParser:
    if kind == "llhttp":
        from proxy.codec.llhttp import LlhttpRequestParser

        return LlhttpRequestParser(handler, max_head_bytes)
    from proxy.codec.h11codec import H11RequestParser

    return H11RequestParser(handler, max_head_bytes)


def make_response_parser(kind: str, handler: ResponseHandler, max_head_bytes: int) -> ResponseParser:
    if kind == "llhttp":
        from proxy.codec.llhttp import LlhttpResponseParser

        return LlhttpResponseParser(handler, max_head_bytes)
    from proxy.codec.h11codec import H11ResponseParser

    return H11ResponseParser(handler, max_head_bytes)
