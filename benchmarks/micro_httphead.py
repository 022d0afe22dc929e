"""Micro benchmark: nanoseconds per `httphead.parse_request` / `parse_response` call.

Run after building the extension in place:
    cythonize -i -3 fastgate/_core/httphead.pyx && python benchmarks/micro_httphead.py
The request is a realistic ~200-byte browser-ish GET; the figure includes the Python call,
the head object and the (head, length) tuple, so the C parse alone costs less.
"""

from __future__ import annotations

import pathlib
import sys
import timeit

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout

from fastgate._core import httphead

REQUEST = (
    b"GET /api/v1/users/42?fields=name,email HTTP/1.1\r\n"
    b"Host: api.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) curl/8.5.0\r\n"
    b"Accept: application/json\r\n"
    b"Accept-Encoding: gzip, br\r\n"
    b"Authorization: Bearer abcdef0123456789\r\n"
    b"\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: 512\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
    b"\r\n"
)


def bench(label: str, stmt, number: int = 200_000, repeat: int = 5) -> None:
    best = min(timeit.repeat(stmt, number=number, repeat=repeat))
    print(f"{label:<28} {best / number * 1e9:8.0f} ns/parse")


def main() -> None:
    print(f"request head {len(REQUEST)} bytes, response head {len(RESPONSE)} bytes")
    parse_request = httphead.parse_request
    parse_response = httphead.parse_response
    bench("parse_request", lambda: parse_request(REQUEST))
    bench("parse_request + get(host)", lambda: parse_request(REQUEST)[0].get(b"host"))
    bench("parse_response", lambda: parse_response(RESPONSE))


if __name__ == "__main__":
    main()
