"""Pure helpers with no I/O: command encoding, Lua scripts, and cluster hash tags.

Encoding. A command is a RESP2 array of bulk strings: `*<n>\\r\\n` then `$<len>\\r\\n<bytes>\\r\\n`
per argument. Arguments may be bytes (sent as is), str (UTF-8), int (decimal) or float
(Python's shortest round-trip repr, e.g. `0.1`, `1e+20`, `inf`); bool, None and containers are
refused with TypeError, since every guess (`True` -> `1`?) hides a bug. The work is done by
`hiredis.pack_command` (C); the unit tests hold it to a plain reference encoder.

Hash tags (Redis Cluster specification, "Hash tags"). A cluster maps each key to one of 16384
slots by CRC16 of the key, or, when the key contains `{...}` with at least one byte between
the first `{` and the first `}` after it, by CRC16 of that part only. A script or a multi-key
command must touch keys of one slot, else the cluster answers CROSSSLOT. So keys derived from
one identity are built as `hash_tag(identity) + b":suffix"`: the braces make the identity the
hashed part, and every suffix lands in the same slot. Identities come from requests (API keys,
addresses, token subjects), so a hostile one must not escape the braces: an identity that is
empty or holds `{` or `}` is written as `{{<hex>}` instead. The tag is then `{<hex>`, never
empty, and the mapping stays one-to-one (a plain tag never starts with `{`). No cluster client
is provided: a single Redis (or a Sentinel-managed master) ignores the braces.
"""

from __future__ import annotations

import binascii
import hashlib

from hiredis import pack_command

__all__ = ["CLUSTER_SLOTS", "Script", "encode_command", "hash_tag", "key_slot"]

CLUSTER_SLOTS = 16384


def encode_command(args: tuple) -> bytes:
    """One command (a tuple of bytes/str/int/float) as RESP2 bytes; TypeError for other types."""
    return pack_command(args)


def hash_tag(key: bytes) -> bytes:
    """`key` wrapped as a cluster hash tag, `{key}`, for prefixing keys that must share a slot.

    An empty key, or one holding `{` or `}`, becomes `{{<hex of key>}` so that the tag can be
    neither empty nor cut short by the key's own braces (see the module docstring).
    """
    if not key or b"{" in key or b"}" in key:
        return b"{{" + key.hex().encode("ascii") + b"}"
    return b"{" + key + b"}"


def key_slot(key: bytes) -> int:
    """The cluster slot of `key` (CRC16-XMODEM of the key or of its hash tag, mod 16384)."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % CLUSTER_SLOTS


class Script:
    """A Lua script: its source bytes and their SHA1, the name EVALSHA calls it by.

    The server keeps loaded scripts until SCRIPT FLUSH or a restart, so the client runs a
    script by SHA1 and loads the source only when the server answers NOSCRIPT
    (`RedisClient.eval_script`).
    """

    __slots__ = ("sha", "source")

    def __init__(self, source: str | bytes) -> None:
        self.source: bytes = source.encode("utf-8") if isinstance(source, str) else bytes(source)
        self.sha: str = hashlib.sha1(self.source).hexdigest()

    def __repr__(self) -> str:
        return f"Script(sha={self.sha[:12]}..., {len(self.source)} bytes)"
