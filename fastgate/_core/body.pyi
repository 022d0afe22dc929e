"""Strict incremental chunked-body scanner (RFC 9112 §7.1)."""

class ChunkedScanner:
    done: bool
    collect: bool
    error: str | None
    def __init__(self, collect: bool = False, max_trailer_bytes: int = 16384) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Consume `data`; return how many bytes belong to this message.

        Less than len(data) only when the message ended inside it (the rest is the next
        message); 0 once done. Raises HttpError(400, reason) on bad framing: non-hex or empty
        size, size over 2**63-1 or more than 16 hex digits, whitespace after the size other
        than before ";", missing CRLF after data, bare LF or CR, NUL, size line (size and
        extensions) over 4096 bytes, trailer section over max_trailer_bytes, obs-fold or a bad
        field name in trailers. Chunk extensions are accepted and ignored. After an error every
        call raises again until reset().
        """
    def reset(self) -> None:
        """Forget the current message (and collected payload) to scan the next one."""
    @property
    def payload(self) -> bytes:
        """The decoded data so far (only with collect=True; ValueError otherwise)."""
