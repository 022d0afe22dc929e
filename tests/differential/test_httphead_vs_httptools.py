"""fastgate's head parser and chunked scanner against llhttp (httptools), the test oracle.

Hypothesis builds well-formed requests and responses, then mutates them the ways smuggling
and desync attacks do. Each input goes to both parsers:

- accepted by both: every parsed field must agree (method, target, path and query, version,
  headers in order, keep-alive, framing and the decoded body, upgrade);
- accepted by one only: the input must fall in a listed category below, each with the RFC
  9112 / 9110 rule behind it (and, when we refuse, the exact status). Anything else fails the
  test with the input printed. The categories are judged from the input bytes (a few are
  narrowed, never widened, by llhttp's complaint), not from our answer, so a bug in our parser
  cannot classify itself away.

llhttp runs in its default strict mode. Its findings are taken for the first message only:
an error in bytes after a complete first message (a mutated Content-Length leaves some) is
about the next message.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import event as _event
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from fastgate._core import httphead
from fastgate._core.body import ChunkedScanner
from fastgate._core.httphead import RequestHead, ResponseHead, parse_request, parse_response
from fastgate.errors import HttpError

NONE = httphead.FRAMING_NONE
LENGTH = httphead.FRAMING_LENGTH
CHUNKED = httphead.FRAMING_CHUNKED
CLOSE = httphead.FRAMING_CLOSE

SETTINGS = settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---------------------------------------------------------------------------------------------
# Grammar pieces (RFC 9110 §5.6.2 tchar, §5.5 field-vchar; RFC 3986 §3.3 pchar)

TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
VALUE_CHARS = "".join(chr(c) for c in range(0x21, 0x7F)) + "".join(
    chr(c) for c in range(0x80, 0x100)
)
PCHAR = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@"
HOST_CHARS = string.ascii_lowercase + string.digits + "-"
OWS = b" \t"

# Names whose meaning to llhttp or to us goes beyond "a field": never generated at random.
SPECIAL = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"proxy-connection",
        b"upgrade",
        b"expect",
        b"keep-alive",
    }
)

TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
VERSION_RE = re.compile(rb"HTTP/[0-9]\.[0-9]")
CL_RE = re.compile(rb"[0-9]{1,18}")
# origin-form = absolute-path [ "?" query ]  (RFC 9112 §3.2.1, RFC 3986 §3.3/§3.4)
_PCHAR = rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})"
ORIGIN_RE = re.compile(rb"(?:/" + _PCHAR + rb"*)+(?:\?(?:" + _PCHAR + rb"|[/?])*)?")
ABSOLUTE_RE = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://([^/?#\s]*)([^?#\s]*)(?:\?([^#\s]*))?")
# uri-host [ ":" port ]  (RFC 9112 §3.2, RFC 3986 §3.2.2: IP-literal / IPv4 / reg-name)
HOST_RE = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?"
)
# chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] )  (§7.1.1)
_QSTR = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
CHUNK_EXT_RE = re.compile(
    rb"(?:[ \t]*;[ \t]*"
    + TOKEN_RE.pattern
    + rb"(?:[ \t]*=[ \t]*(?:"
    + TOKEN_RE.pattern
    + rb"|"
    + _QSTR
    + rb"))?)*"
)


def event(text: str) -> None:
    """Count an outcome in hypothesis statistics (pytest --hypothesis-show-statistics)."""
    if currently_in_test_context():
        _event(text)


def is_token(value: bytes) -> bool:
    return TOKEN_RE.fullmatch(value) is not None


def has_ctl(value: bytes) -> bool:
    """A byte a field value may not hold (RFC 9110 §5.5): CTLs but HTAB, and DEL."""
    return any((c < 0x20 and c != 0x09) or c == 0x7F for c in value)


# ---------------------------------------------------------------------------------------------
# The oracle: llhttp through httptools, one recorder per input


class Seen:
    """What llhttp reported about the first message of an input."""

    def __init__(self) -> None:
        self.messages = 0
        self.url = b""
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive: bool | None = None
        self.upgrade: bool | None = None
        self.version: str | None = None
        self.method: bytes | None = None
        self.status: int | None = None
        self.error: Exception | None = None
        self.upgraded = False
        self.parser: httptools.HttpRequestParser | httptools.HttpResponseParser

    @property
    def verdict(self) -> str:
        if self.complete or (self.headers_done and self.error is None):
            return "accept"
        return "reject" if self.error is not None else "pending"

    def first(self) -> bool:
        return self.messages == 1 and not self.complete

    def on_message_begin(self) -> None:
        self.messages += 1

    def on_url(self, url: bytes) -> None:
        if self.first():
            self.url += url

    def on_status(self, reason: bytes) -> None:
        if self.first():
            self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.first():
            (self.trailers if self.headers_done else self.headers).append((name, value))

    def on_headers_complete(self) -> None:
        if self.first():
            self.headers_done = True
            self.keep_alive = self.parser.should_keep_alive()
            self.upgrade = self.parser.should_upgrade()
            self.version = self.parser.get_http_version()
            if isinstance(self.parser, httptools.HttpRequestParser):
                self.method = self.parser.get_method()
            else:
                self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.first():
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.messages == 1:
            self.complete = True


def llhttp(data: bytes, response: bool = False) -> Seen:
    seen = Seen()
    cls = httptools.HttpResponseParser if response else httptools.HttpRequestParser
    seen.parser = cls(seen)
    try:
        seen.parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        seen.upgraded = True
    except httptools.HttpParserError as exc:
        seen.error = exc
    return seen


# ---------------------------------------------------------------------------------------------
# Our side: head parser, then the body framing it chose


@dataclass
class Ours:
    verdict: str  # "accept" | "reject" | "pending"
    status: int = 0
    reason: str = ""
    where: str = "head"
    head: RequestHead | ResponseHead | None = None
    complete: bool = False
    body: bytes = b""


def check_prefixes(data: bytes, response: bool, end: int, status: int | None) -> None:
    """The head parser is fed the whole buffer on every read, so each shorter buffer must give
    (None, 0), or the same refusal as the whole input (a bare LF or NUL is seen early)."""
    parse = parse_response if response else parse_request
    for i in range(end):
        try:
            result = parse(data[:i])
        except HttpError as exc:
            assert exc.status == status, (data, i, exc)
        else:
            assert result == (None, 0), (data, i)


def ours(data: bytes, response: bool = False) -> Ours:
    try:
        head, n = parse_response(data) if response else parse_request(data)
    except HttpError as exc:
        check_prefixes(data, response, len(data), exc.status)
        return Ours("reject", exc.status, exc.reason)
    if head is None:
        assert n == 0
        check_prefixes(data, response, len(data), None)
        return Ours("pending")
    assert n == len(head.raw) and data[:n] == head.raw
    assert type(head.raw) is bytes
    check_prefixes(data, response, n, None)
    rest = data[n:]
    if head.framing == CHUNKED:
        scanner = ChunkedScanner(collect=True)
        try:
            scanner.feed(rest)
        except HttpError as exc:
            return Ours("reject", exc.status, exc.reason, "body", head)
        return Ours("accept", head=head, complete=scanner.done, body=scanner.payload)
    if head.framing == LENGTH:
        body = rest[: head.content_length]
        return Ours("accept", head=head, complete=len(body) == head.content_length, body=body)
    if head.framing == CLOSE:
        return Ours("accept", head=head, complete=False, body=rest)
    return Ours("accept", head=head, complete=True)


# ---------------------------------------------------------------------------------------------
# Facts about an input, read leniently from its bytes, for the classifier


@dataclass
class Facts:
    data: bytes
    response: bool
    start: bytes = b""
    parts: list[bytes] = field(default_factory=list)  # start line split on single SPs
    version: bytes = b""
    method: bytes = b""
    target: bytes = b""
    lines: list[bytes] = field(default_factory=list)  # field lines, split on CRLF
    fields: list[tuple[bytes, bytes]] = field(default_factory=list)  # (name, trimmed value)
    body: bytes = b""

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.fields if n.lower() == name]

    @property
    def head(self) -> bytes:
        end = self.data.find(b"\r\n\r\n")
        return self.data if end < 0 else self.data[: end + 4]


def analyse(data: bytes, response: bool = False) -> Facts:
    facts = Facts(data, response)
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    facts.body = b"" if end < 0 else data[end + 4 :]
    lines = head.split(b"\r\n")
    facts.start, facts.lines = lines[0], lines[1:]
    facts.parts = facts.start.split(b" ")
    if response:
        facts.version = facts.parts[0]
    elif len(facts.parts) == 3:
        facts.method, facts.target, facts.version = facts.parts
    for line in facts.lines:
        name, colon, value = line.partition(b":")
        if colon:
            facts.fields.append((name, value.strip(OWS)))
    return facts


def bare_cr(f: Facts, s: Seen | None = None) -> bool:
    return b"\r" in f.head.replace(b"\r\n", b"")


def bare_lf(f: Facts, s: Seen | None = None) -> bool:
    return b"\n" in f.head.replace(b"\r\n", b"")


def te_codings(f: Facts) -> list[bytes]:
    return [c.strip(OWS).lower() for v in f.values(b"transfer-encoding") for c in v.split(b",")]


def lone_chunked(f: Facts) -> bool:
    return te_codings(f) == [b"chunked"]


def chunk_lines(f: Facts) -> list[bytes]:
    """The size lines of a chunked body, read leniently (stops where the framing breaks)."""
    out, pos, body = [], 0, f.body
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            return out
        line = body[pos:eol]
        out.append(line)
        m = re.match(rb"[0-9A-Fa-f]+", line)
        if m is None or int(m.group(), 16) == 0:
            return out
        pos = eol + 2 + int(m.group(), 16) + 2
        if pos > len(body):
            return out


def chunk_size_too_big(f: Facts, s: Seen | None = None) -> bool:
    for line in chunk_lines(f):
        digits = re.match(rb"[0-9A-Fa-f]*", line).group()
        if len(digits) > 16 or (digits and int(digits, 16) > 2**63 - 1):
            return True
    return False


def chunk_exts(f: Facts) -> list[bytes]:
    """What follows the size on each size line: empty, or extensions from BWS ';' on."""
    return [line.lstrip(string.hexdigits.encode()) for line in chunk_lines(f)]


def chunk_ext_not_grammar(f: Facts) -> bool:
    """Some size line has extensions off the §7.1.1 grammar, and every size line is a size
    followed by nothing or by BWS ';' (anything else is no extension but a bad size)."""
    exts = chunk_exts(f)
    shaped = all(not ext or re.match(rb"[ \t]*;", ext) for ext in exts)
    return shaped and any(CHUNK_EXT_RE.fullmatch(ext) is None for ext in exts)


def request_line_bad(f: Facts) -> bool:
    return len(f.parts) != 3 or not is_token(f.method) or not f.target


def target_bad(f: Facts) -> bool:
    t = f.target
    if t == b"*":
        return f.method != b"OPTIONS"
    if ORIGIN_RE.fullmatch(t):
        return False
    absolute = ABSOLUTE_RE.fullmatch(t)
    if absolute is None:
        return True
    # A gateway is no forward proxy: http(s) only, and userinfo is an error (RFC 9110 §4.2.4).
    scheme = t.split(b":", 1)[0].lower()
    authority = absolute.group(1)
    return scheme not in (b"http", b"https") or HOST_RE.fullmatch(authority) is None


def host_bad(f: Facts) -> bool:
    return any(HOST_RE.fullmatch(h) is None for h in f.values(b"host"))


def status_line_bad(f: Facts) -> bool:
    m = re.fullmatch(rb"(HTTP/[0-9]\.[0-9]) ([0-9]{3})(?: (.*))?", f.start, re.S)
    return m is None or has_ctl(m.group(3) or b"") or not 100 <= int(m.group(2)) <= 599


# ---------------------------------------------------------------------------------------------
# The listed differences. Each names the rule that makes our answer right. The predicates
# read the input (Facts); a few also narrow by llhttp's own complaint (Seen), never widen.


def no_host(f: Facts, s: Seen) -> bool:
    return not f.response and f.version == b"HTTP/1.1" and not f.values(b"host")


def duplicate_host(f: Facts, s: Seen) -> bool:
    return not f.response and len(f.values(b"host")) > 1


def bad_host(f: Facts, s: Seen) -> bool:
    return not f.response and host_bad(f)


def cl_with_te(f: Facts, s: Seen) -> bool:
    return bool(f.values(b"content-length")) and bool(f.values(b"transfer-encoding"))


def te_in_http10(f: Facts, s: Seen) -> bool:
    return f.version == b"HTTP/1.0" and bool(f.values(b"transfer-encoding"))


def te_not_lone_chunked(f: Facts, s: Seen) -> bool:
    return bool(f.values(b"transfer-encoding")) and not lone_chunked(f)


def cl_malformed(f: Facts, s: Seen) -> bool:
    values = [c.strip(OWS) for v in f.values(b"content-length") for c in v.split(b",")]
    return any(CL_RE.fullmatch(c) is None for c in values) or len(set(values)) > 1


def obs_fold(f: Facts, s: Seen) -> bool:
    return any(line[:1] in (b" ", b"\t") for line in f.lines)


def space_before_colon(f: Facts, s: Seen) -> bool:
    return any(n[-1:] in (b" ", b"\t") for n, _ in f.fields)


def leading_empty_line(f: Facts, s: Seen) -> bool:
    return not f.response and f.data[:1] in (b"\r", b"\n")


def unknown_version(f: Facts, s: Seen) -> bool:
    return (
        not f.response
        and VERSION_RE.fullmatch(f.version) is not None
        and f.version not in (b"HTTP/1.0", b"HTTP/1.1")
    )


def request_line_syntax(f: Facts, s: Seen) -> bool:
    return not f.response and request_line_bad(f)


def request_target_syntax(f: Facts, s: Seen) -> bool:
    return not f.response and target_bad(f)


def connect(f: Facts, s: Seen) -> bool:
    return f.method == b"CONNECT"


def response_version(f: Facts, s: Seen) -> bool:
    return f.response and f.version not in (b"HTTP/1.0", b"HTTP/1.1")


def status_line_syntax(f: Facts, s: Seen) -> bool:
    return f.response and status_line_bad(f)


def te_empty_elements(f: Facts, s: Seen) -> bool:
    codings = te_codings(f)
    return b"" in codings and [c for c in codings if c] == [b"chunked"] and not cl_with_te(f, s)


def identical_cls(f: Facts, s: Seen) -> bool:
    values = [c.strip(OWS) for v in f.values(b"content-length") for c in v.split(b",")]
    return (
        len(values) > 1
        and len(set(values)) == 1
        and CL_RE.fullmatch(values[0]) is not None
        and not f.values(b"transfer-encoding")
    )


def extension_method(f: Facts, s: Seen) -> bool:
    # llhttp reads "PRI" as the start of the HTTP/2 preface (RFC 9113 §3.4) and nothing else.
    preface = f.method == b"PRI" and "Preface" in str(s.error)
    invalid = isinstance(s.error, httptools.HttpParserInvalidMethodError)
    return is_token(f.method) and (invalid or preface)


def bodiless_response_framing(f: Facts, s: Seen) -> bool:
    code = f.start[9:12]
    bodiless = code[:1] == b"1" or code in (b"204", b"304")
    framing = bool(f.values(b"content-length") or f.values(b"transfer-encoding"))
    complaint = "Content-Length" in str(s.error) or "Transfer-Encoding" in str(s.error)
    return f.response and bodiless and framing and complaint


def chunk_ext_unchecked(f: Facts, s: Seen) -> bool:
    return "chunk" in str(s.error) and chunk_ext_not_grammar(f)


def chunk_ext_bws(f: Facts, s: Seen) -> bool:
    exts = [re.sub(_QSTR, b"", ext) for ext in chunk_exts(f)]
    bws = any(b" " in ext or b"\t" in ext for ext in exts)
    grammar = all(CHUNK_EXT_RE.fullmatch(ext) for ext in chunk_exts(f))
    return bws and grammar and "chunk" in str(s.error)


@dataclass(frozen=True)
class Rule:
    name: str
    why: str
    applies: Callable[[Facts, Seen], bool]
    statuses: frozenset[int] = frozenset({400})


TE_STATUSES = frozenset({400, 501})

# We refuse, llhttp accepts (or has not decided yet). Shared by requests and responses; a
# response refusal is always 502 (the gateway answers for its upstream, RFC 9110 §15.6.3).
WE_REFUSE = [
    Rule("no Host", "RFC 9112 §3.2: HTTP/1.1 request without Host MUST get 400", no_host),
    Rule("duplicate Host", "RFC 9112 §3.2: more than one Host MUST get 400", duplicate_host),
    Rule(
        "bad Host value",
        "RFC 9112 §3.2: a Host with an invalid value MUST get 400 (uri-host [':' port], "
        "RFC 3986 §3.2.2)",
        bad_host,
    ),
    Rule(
        "CL with TE",
        "RFC 9112 §6.1: a message with both ought to be handled as an error (request "
        "smuggling, §11.2); we reject",
        cl_with_te,
    ),
    Rule(
        "TE in HTTP/1.0",
        "RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 MUST be treated as faulty framing",
        te_in_http10,
    ),
    Rule(
        "TE not a lone chunked",
        "RFC 9112 §6.1/§7: we relay chunked verbatim and decode nothing else; chunked must be "
        "final and once (RFC 9110 §15.6.2: 501 for an unknown coding)",
        te_not_lone_chunked,
        TE_STATUSES,
    ),
    Rule(
        "malformed or differing Content-Length",
        "RFC 9110 §8.6: 1*DIGIT; over 18 digits could overflow int64 (MUST prevent conversion "
        "overflow); RFC 9112 §6.3 item 5: differing values are unrecoverable",
        cl_malformed,
    ),
    Rule(
        "obs-fold",
        "RFC 9112 §5.2: obs-fold in a request MUST get 400 or be replaced by SP; in a response "
        "a gateway MUST answer 502 or replace it; we reject",
        obs_fold,
    ),
    Rule("whitespace before colon", "RFC 9112 §5.1: MUST reject with 400", space_before_colon),
    Rule("bare CR", "RFC 9112 §2.2: a bare CR MUST be invalid or replaced by SP", bare_cr),
    Rule(
        "bare LF",
        "RFC 9112 §2.2: a recipient MAY accept a bare LF; a gateway must not, its upstream may "
        "read the head differently",
        bare_lf,
    ),
    Rule(
        "leading empty line",
        "RFC 9112 §2.2: a server SHOULD ignore an empty line before the request-line; "
        "httphead refuses it (documented choice: the connection strips it first)",
        leading_empty_line,
    ),
    Rule(
        "unknown version",
        "RFC 9112 §2.3, RFC 9110 §15.6.6: 505 for a version we do not speak",
        unknown_version,
        frozenset({505}),
    ),
    Rule(
        "request-line syntax",
        "RFC 9112 §3: method SP request-target SP HTTP-version with single SPs (recipients MAY "
        "be lenient; a gateway is not)",
        request_line_syntax,
    ),
    Rule(
        "request-target syntax",
        "RFC 9112 §3.2: origin-form, absolute-form, or asterisk-form with OPTIONS only; "
        "absolute-form only for http(s) and without userinfo (RFC 9110 §4.2.4: treat it as an "
        "error)",
        request_target_syntax,
    ),
    Rule(
        "CONNECT",
        "RFC 9112 §3.2.3: authority-form is for CONNECT, which a gateway does not serve "
        "(RFC 9110 §15.6.2 501)",
        connect,
        frozenset({501}),
    ),
    Rule("response version", "a gateway speaks HTTP/1.0 and 1.1 upstream", response_version),
    Rule(
        "status-line syntax",
        "RFC 9112 §4: HTTP-version SP 3DIGIT SP reason-phrase; RFC 9110 §15: 100..599",
        status_line_syntax,
    ),
    Rule(
        "chunk-size over 16 hex digits or 2**63-1",
        "RFC 9112 §7.1: MUST prevent integer overflow; the scanner bounds a size to 16 digits "
        "(leading zeros included) and to a signed 64-bit value",
        chunk_size_too_big,
    ),
]

# We accept, llhttp refuses.
WE_ACCEPT = [
    Rule(
        "identical duplicate Content-Length",
        "RFC 9110 §8.6: a recipient MAY replace identical repeated values by one",
        identical_cls,
    ),
    Rule(
        "empty Transfer-Encoding line or element",
        "RFC 9110 §5.6.1.2: a recipient MUST ignore a reasonable number of empty list elements, "
        "and §5.3: field lines with one name combine with commas; what is left is one chunked",
        te_empty_elements,
    ),
    Rule(
        "extension method",
        "RFC 9110 §9.1: a method is any token (case-sensitive); llhttp knows a fixed list. An "
        "unknown method is the application's 501, not a framing error",
        extension_method,
    ),
    Rule(
        "chunk-ext not checked",
        "RFC 9112 §7.1.1: a recipient MUST ignore unrecognized chunk extensions; the scanner "
        "checks their octets, not their grammar",
        chunk_ext_unchecked,
    ),
    Rule(
        "BWS in chunk-ext",
        "RFC 9112 §7.1.1: chunk-ext = *( BWS ';' BWS name [ BWS '=' BWS value ] ); llhttp "
        "refuses the whitespace",
        chunk_ext_bws,
    ),
    Rule(
        "framing fields of a bodiless response",
        "RFC 9112 §6.3 items 1-2: a 1xx, 204 or 304 response ends at its empty line whatever "
        "CL or TE say, so their values cannot desynchronise anything",
        bodiless_response_framing,
    ),
]

# Both accept, one field differs.
FIELD_DIFFS = {
    "upgrade": [
        Rule(
            "Upgrade ignored in HTTP/1.0",
            "RFC 9110 §7.8: a server MUST ignore Upgrade in an HTTP/1.0 request",
            lambda f, s: f.version == b"HTTP/1.0",
        ),
    ],
}


def classify(
    rules: list[Rule], facts: Facts, seen: Seen, status: int | None = None, where: str = "head"
) -> Rule | None:
    """The first rule that covers the input (and, for a refusal, our status), or None."""
    for rule in rules:
        if status is None:
            fits = True
        elif facts.response and where == "head":
            fits = status == 502  # every response head fault: the gateway answers 502
        else:
            fits = status in rule.statuses
        if fits and rule.applies(facts, seen):
            return rule
    return None


# ---------------------------------------------------------------------------------------------
# Comparison


def expected_fields(data: bytes, seen: Seen, response: bool) -> dict:
    """Our head's fields, as llhttp saw them."""
    want: dict = {
        "version": {"1.0": 10, "1.1": 11}.get(seen.version, seen.version),
        "headers": [(n, v.rstrip(OWS)) for n, v in seen.headers],  # llhttp keeps trailing OWS
        "keep_alive": seen.keep_alive,
    }
    te = [v for n, v in seen.headers if n.lower() == b"transfer-encoding"]
    cl = [v for n, v in seen.headers if n.lower() == b"content-length"]
    if response:
        want["status"] = seen.status
        want["reason"] = seen.reason
        if seen.status in (204, 304) or seen.status < 200:
            want["framing"] = NONE
        elif te:
            want["framing"] = CHUNKED
        elif cl:
            want["framing"] = LENGTH
        else:
            want["framing"] = CLOSE
    else:
        url = httptools.parse_url(seen.url) if seen.url != b"*" else None
        want["method"] = seen.method
        want["target"] = seen.url
        if url is not None:
            want["path"] = url.path or b"/"
            # llhttp reports an empty query ("/a?") as absent; ours is b"" then.
            want["query"] = url.query if url.query or b"?" not in seen.url else b""
        want["framing"] = CHUNKED if te else LENGTH if cl else NONE
        hosts = [v.strip(OWS) for n, v in seen.headers if n.lower() == b"host"]
        want["host"] = hosts[0] if hosts else None
        if url is not None and url.schema is not None:
            want["host"] = ABSOLUTE_RE.fullmatch(seen.url).group(1)
        want["expect_continue"] = seen.version == "1.1" and any(
            n.lower() == b"expect" and v.strip(OWS).lower() == b"100-continue"
            for n, v in seen.headers
        )  # RFC 9110 §10.1.1: ignored in HTTP/1.0
        want["upgrade"] = None
        if seen.upgrade:
            want["upgrade"] = next(v.strip(OWS) for n, v in seen.headers if n.lower() == b"upgrade")
    if want["framing"] == LENGTH:
        want["content_length"] = int(cl[0].strip(OWS).split(b",")[0])
    else:
        want["content_length"] = -1
    return want


def got_fields(head, want: dict) -> dict:
    got = {}
    for name in want:
        got[name] = head.headers() if name == "headers" else getattr(head, name)
    return got


def differential(data: bytes, response: bool = False) -> str:
    """Run both parsers on `data`; fail on an unlisted difference. Returns what happened."""
    seen = llhttp(data, response)
    mine = ours(data, response)
    facts = analyse(data, response)
    shown = f"input: {data!r}\nllhttp: {seen.verdict} {seen.error!r}\nours: {mine}"

    if mine.verdict == "pending":
        # The head is incomplete only while no CRLFCRLF has arrived, and a bare LF or a NUL is
        # refused on sight (httphead.pxd find_head_end).
        assert b"\r\n\r\n" not in data, shown
        assert not bare_lf(facts) and b"\x00" not in data, shown
        if seen.verdict != "accept":
            return (
                f"both {seen.verdict}" if seen.verdict == "pending" else "we wait, llhttp refuses"
            )
    if mine.verdict == seen.verdict == "reject":
        return "both refuse"
    if seen.upgraded and mine.where == "body":
        # httptools tells llhttp to skip the body of an upgrade request: llhttp judged the
        # head only, so our head is what to compare.
        mine = Ours("accept", head=mine.head)

    if mine.verdict != "accept" and seen.verdict != "reject":
        status = mine.status if mine.verdict == "reject" else None
        rule = classify(WE_REFUSE, facts, seen, status, mine.where)
        assert rule is not None, f"we refuse, llhttp does not: unlisted\n{shown}"
        return f"we refuse: {rule.name}"
    if mine.verdict == "accept" and seen.verdict != "accept":
        rule = classify(WE_ACCEPT, facts, seen)
        assert rule is not None, f"llhttp refuses, we accept: unlisted\n{shown}"
        return f"we accept: {rule.name}"

    # Both accepted the head: compare every field.
    head = mine.head
    want = expected_fields(data, seen, response)
    got = got_fields(head, want)
    assert head.n_headers == len(head.headers()), shown
    differences = []
    for name, value in want.items():
        if got[name] != value:
            rule = classify(FIELD_DIFFS.get(name, []), facts, seen)
            assert rule is not None, f"{name}: ours {got[name]!r} llhttp {value!r}\n{shown}"
            differences.append(rule.name)
    if not seen.upgraded:
        # Equal framing over equal bytes ends the message at the same place, with equal data.
        assert mine.complete == seen.complete, f"message end differs\n{shown}"
        if mine.complete or head.framing == CLOSE:
            assert mine.body == b"".join(seen.body), shown
    return "both accept" + "".join(f", but: {name}" for name in differences)


# ---------------------------------------------------------------------------------------------
# Generators


@dataclass
class Message:
    lines: list[bytes]  # start line, then field lines
    body: bytes = b""
    chunked: bool = False
    payload: bytes = b""  # the body's data, decoded

    def encode(self) -> bytes:
        return b"".join(line + b"\r\n" for line in self.lines) + b"\r\n" + self.body

    def field_indexes(self, name: bytes | None = None) -> list[int]:
        return [
            i
            for i, line in enumerate(self.lines[1:], 1)
            if name is None or line.split(b":", 1)[0].lower() == name
        ]


def latin1(alphabet: str, min_size: int = 0, max_size: int = 12) -> st.SearchStrategy[bytes]:
    return st.text(alphabet, min_size=min_size, max_size=max_size).map(
        lambda s: s.encode("latin-1")
    )


names = latin1(TCHAR, 1, 14).filter(lambda n: n.lower() not in SPECIAL)


@st.composite
def values(draw) -> bytes:
    inner = draw(st.lists(latin1(VALUE_CHARS, 1, 8), max_size=4))
    seps = [draw(st.sampled_from([b" ", b"\t", b"  "])) for _ in inner[1:]]
    value = inner[0] if inner else b""
    for sep, word in zip(seps, inner[1:], strict=True):
        value += sep + word
    return (
        draw(st.sampled_from([b"", b" ", b"\t", b" \t"]))
        + value
        + draw(st.sampled_from([b"", b"", b" ", b"\t "]))
    )


hosts = st.one_of(
    st.builds(
        lambda labels, port: b".".join(labels) + port,
        st.lists(latin1(HOST_CHARS, 1, 10), min_size=1, max_size=3),
        st.sampled_from([b"", b":80", b":8080", b":443"]),
    ),
    st.sampled_from([b"127.0.0.1", b"[::1]", b"[::1]:8080", b"localhost:1"]),
)

targets = st.builds(
    lambda segs, query: b"/" + b"/".join(segs) + query,
    st.lists(latin1(PCHAR, 0, 8), max_size=4),
    st.one_of(st.just(b""), latin1(PCHAR + "/?", 0, 12).map(lambda q: b"?" + q)),
)


# Chunk extensions that follow §7.1.1; llhttp refuses the BWS in the last two, so only the
# scanner's own differential uses those (in a message they would hide the head's verdict).
EXTS = [b"", b"", b";a", b";a=b", b';n="q v"', b';k="\\""', b"; a", b" ;x=1;y"]


@st.composite
def chunked_bodies(draw, max_chunks: int = 5, exts: int = len(EXTS) - 2) -> tuple[bytes, bytes]:
    """(encoded body, payload): sizes in either case with leading zeros (16 digits at most),
    extensions (the first `exts` of EXTS), and trailer fields."""
    chunks = draw(st.lists(st.binary(min_size=1, max_size=64), max_size=max_chunks))
    out = []
    for chunk in [*chunks, b""]:
        size = (b"%X" if draw(st.booleans()) else b"%x") % len(chunk)
        zeros = draw(st.integers(0, 16 - len(size))) if draw(st.booleans()) else 0
        digits = b"0" * zeros + size
        ext = draw(st.sampled_from(EXTS[:exts]))
        out.append(digits + ext + b"\r\n" + (chunk + b"\r\n" if chunk else b""))
    trailers = draw(st.lists(st.tuples(names, values()), max_size=2))
    out.extend(n + b": " + v.strip(OWS) + b"\r\n" for n, v in trailers)
    out.append(b"\r\n")
    return b"".join(out), b"".join(chunks)


CONNECTION = [
    [],
    [b"Connection: close"],
    [b"Connection: keep-alive"],
    [b"Connection: Keep-Alive"],
    [b"Connection: close, foo"],
    [b"Connection: foo,keep-alive"],
    [b"Connection: Upgrade", b"Upgrade: websocket"],
    [b"Connection: keep-alive, upgrade", b"Upgrade: h2c"],
    [b"Upgrade: websocket"],
    [b"Connection: x-a", b"Connection: close"],
]


@st.composite
def requests(draw) -> Message:
    method = draw(
        st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"])
    )
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    fields = [n + b":" + v for n, v in draw(st.lists(st.tuples(names, values()), max_size=6))]
    if version == b"HTTP/1.1" or draw(st.booleans()):
        fields.append(b"Host: " + draw(hosts))
    fields += draw(st.sampled_from(CONNECTION))
    if draw(st.integers(0, 9)) == 0:
        fields.append(b"Expect: 100-continue")
    kind = draw(
        st.sampled_from(
            ["none", "length", "chunked"] if version == b"HTTP/1.1" else ["none", "length"]
        )
    )
    body = payload = b""
    if kind == "length":
        body = draw(st.binary(max_size=80))
        fields.append(b"Content-Length: %d" % len(body))
    elif kind == "chunked":
        body, payload = draw(chunked_bodies())
        fields.append(b"Transfer-Encoding: chunked")
    fields = draw(st.permutations(fields))
    start = method + b" " + draw(targets) + b" " + version
    return Message(
        [start, *fields], body, kind == "chunked", payload if kind == "chunked" else body
    )


@st.composite
def responses(draw) -> Message:
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    status = draw(st.sampled_from([200, 201, 203, 206, 301, 302, 400, 404, 500, 503, 204, 304]))
    reason = draw(st.one_of(st.just(b"OK"), values().map(lambda v: v.strip(OWS))))
    fields = [n + b":" + v for n, v in draw(st.lists(st.tuples(names, values()), max_size=6))]
    fields += draw(st.sampled_from(CONNECTION[:6]))
    kinds = ["none", "length"] if status in (204, 304) else ["length", "chunked", "close"]
    kind = draw(
        st.sampled_from(kinds if version == b"HTTP/1.1" else [k for k in kinds if k != "chunked"])
    )
    body = payload = b""
    if kind == "length" and status in (204, 304):
        fields.append(b"Content-Length: %d" % draw(st.integers(0, 99)))  # no body follows
    elif kind == "length":
        body = draw(st.binary(max_size=80))
        fields.append(b"Content-Length: %d" % len(body))
    elif kind == "chunked":
        body, payload = draw(chunked_bodies())
        fields.append(b"Transfer-Encoding: chunked")
    elif kind == "close":
        body = draw(st.binary(max_size=80))
    fields = draw(st.permutations(fields))
    start = version + b" %d " % status + reason
    return Message(
        [start, *fields], body, kind == "chunked", payload if kind == "chunked" else body
    )


# Mutations: each takes (draw, message) and returns the bytes to parse.

INTERESTING = b' \t\r\n\x00:;,"#?/@\x7f\x80\xff0aA'


def _position(draw, msg: Message) -> int:
    """An offset in the head (or the first body bytes), spread over the lines: hypothesis
    favours small integers, which would put most mutations in the method."""
    starts, pos = [], 0
    for line in [*msg.lines, b""]:
        starts.append((pos, len(line) + 2))
        pos += len(line) + 2
    if msg.body:
        starts.append((pos, min(8, len(msg.body))))
    start, length = draw(st.sampled_from(starts))
    return start + draw(st.integers(0, length - 1))


def m_flip(draw, msg: Message) -> bytes:
    data = bytearray(msg.encode())
    data[_position(draw, msg)] = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, 255)))
    return bytes(data)


def m_insert(draw, msg: Message) -> bytes:
    data = msg.encode()
    i = _position(draw, msg)
    return data[:i] + bytes([draw(st.sampled_from(INTERESTING))]) + data[i:]


def _pick_field(draw, msg: Message) -> int | None:
    idx = msg.field_indexes()
    return draw(st.sampled_from(idx)) if idx else None


def m_space_before_colon(draw, msg: Message) -> bytes:
    i = _pick_field(draw, msg)
    if i is not None:
        name, _, value = msg.lines[i].partition(b":")
        msg.lines[i] = name + draw(st.sampled_from([b" ", b"\t", b"  "])) + b":" + value
    return msg.encode()


def m_line_end(draw, msg: Message) -> bytes:
    """Replace one CRLF of the head with a bare LF, a bare CR, or LFCR."""
    data = msg.encode()
    head_len = len(data) - len(msg.body)
    ends = [m.start() for m in re.finditer(rb"\r\n", data[:head_len])]
    i = draw(st.sampled_from(ends))
    return data[:i] + draw(st.sampled_from([b"\n", b"\r", b"\n\r", b"\r\r\n"])) + data[i + 2 :]


def m_inline_control(draw, msg: Message) -> bytes:
    """A CR, LF or NUL inside a field value, name or the start line."""
    i = draw(st.integers(0, len(msg.lines) - 1))
    line = msg.lines[i]
    j = draw(st.integers(0, len(line)))
    msg.lines[i] = line[:j] + draw(st.sampled_from([b"\r", b"\n", b"\x00", b"\x01"])) + line[j:]
    return msg.encode()


def m_obs_fold(draw, msg: Message) -> bytes:
    i = _pick_field(draw, msg)
    if i is not None:
        msg.lines.insert(i + 1, draw(st.sampled_from([b" ", b"\t"])) + b"folded")
    return msg.encode()


def _set_field(msg: Message, name: bytes, line: bytes | None, drop: bool = True) -> None:
    if drop:
        for i in reversed(msg.field_indexes(name)):
            del msg.lines[i]
    if line is not None:
        msg.lines.append(line)


def m_content_length(draw, msg: Message) -> bytes:
    existing = [msg.lines[i] for i in msg.field_indexes(b"content-length")]
    n = len(msg.body)
    choice = draw(st.sampled_from(["same", "differ", "list", "malformed", "te"]))
    if choice == "same":
        for line in existing[:1] or [b"Content-Length: %d" % n, b"content-length: %d" % n]:
            _set_field(msg, b"content-length", line, drop=False)
    elif choice == "differ":
        _set_field(msg, b"content-length", b"Content-Length: %d" % (n + 1), drop=False)
    elif choice == "list":
        _set_field(
            msg,
            b"content-length",
            b"Content-Length: %d, %d" % (n, draw(st.sampled_from([n, n + 1]))),
        )
    elif choice == "malformed":
        value = draw(
            st.sampled_from(
                [
                    b"+%d" % n,
                    b"-1",
                    b"%da" % n,
                    b"",
                    b"0x%x" % n,
                    b"0" * 19 + b"%d" % n,
                    b"%d %d" % (n, n),
                    b"18446744073709551616",
                ]
            )
        )
        _set_field(msg, b"content-length", b"Content-Length: " + value)
    else:
        first = [b"Content-Length: %d" % n, b"Transfer-Encoding: chunked"]
        for line in draw(st.permutations(first)):
            _set_field(msg, line.split(b":")[0].lower(), line, drop=False)
    return msg.encode()


def m_transfer_encoding(draw, msg: Message) -> bytes:
    value = draw(
        st.sampled_from(
            [
                b"gzip",
                b"gzip, chunked",
                b"chunked, gzip",
                b"chunked,chunked",
                b"identity",
                b"Chunked",
                b"CHUNKED ",
                b" chunked",
                b"chunked;q=1",
                b"",
                b",chunked",
                b"x-custom, chunked",
            ]
        )
    )
    _set_field(msg, b"content-length", None)
    _set_field(msg, b"transfer-encoding", b"Transfer-Encoding: " + value)
    if draw(st.booleans()):
        msg.lines.append(b"Transfer-Encoding: chunked")
    if not msg.chunked:
        msg.body = b"0\r\n\r\n"
    return msg.encode()


def m_http10_te(draw, msg: Message) -> bytes:
    msg.lines[0] = msg.lines[0].replace(b"HTTP/1.1", b"HTTP/1.0")
    _set_field(msg, b"content-length", None)
    _set_field(msg, b"transfer-encoding", b"Transfer-Encoding: chunked")
    if not msg.chunked:
        msg.body = b"3\r\nabc\r\n0\r\n\r\n"
    return msg.encode()


def m_host(draw, msg: Message) -> bytes:
    existing = [msg.lines[i] for i in msg.field_indexes(b"host")]
    choice = draw(st.sampled_from(["remove", "double", "double-case", "bad"]))
    if choice == "remove":
        _set_field(msg, b"host", None)
    elif choice == "double":
        _set_field(msg, b"host", existing[0] if existing else b"Host: a", drop=False)
        _set_field(msg, b"host", b"Host: other.example", drop=False)
    elif choice == "double-case":
        _set_field(msg, b"host", b"hOsT: other.example", drop=False)
        if not existing:
            _set_field(msg, b"host", b"Host: other.example", drop=False)
    else:
        value = draw(
            st.sampled_from(
                [
                    b"a b",
                    b"a/b",
                    b"u@a",
                    b"[::1",
                    b'a"b',
                    b"a:b:c",
                    b"",
                    b"a_b.example",
                    b"%41.example",
                    b"a:",
                    b"[::1]x",
                ]
            )
        )
        _set_field(msg, b"host", b"Host: " + value)
    return msg.encode()


def m_version(draw, msg: Message) -> bytes:
    start = msg.lines[0]
    old = start.split(b" ")[0] if msg.lines[0].startswith(b"HTTP/") else start.split(b" ")[-1]
    new = draw(
        st.sampled_from(
            [
                b"HTTP/1.2",
                b"HTTP/2.0",
                b"HTTP/0.9",
                b"HTTP/3.0",
                b"HTTP/1.1x",
                b"http/1.1",
                b"HTTP/1",
                b"HTTP/11",
                b"HTTP/1.10",
                b"HTTPS/1.1",
                b"HTTP/1.0",
                b"HTTP/1.1",
            ]
        )
    )
    msg.lines[0] = start.replace(old, new, 1)
    return msg.encode()


def m_request_line(draw, msg: Message) -> bytes:
    method, target, version = msg.lines[0].split(b" ")
    choice = draw(st.sampled_from(["method", "target", "spaces", "leading"]))
    if choice == "method":
        method = draw(
            st.sampled_from(
                [
                    b"PURGE",
                    b"get",
                    b"FOO",
                    b"M-SEARCH",
                    b"QUERY",
                    b"G(T",
                    b"CONNECT",
                    b"PRI",
                    b"TRACE",
                    b"ACL",
                ]
            )
        )
    elif choice == "target":
        target = draw(
            st.sampled_from(
                [
                    b"*",
                    b"http://h.example/p?q",
                    b"http://h.example",
                    b"/a#frag",
                    b"/a?b#c",
                    b'/"q"',
                    b"/{x}",
                    b"//x/y",
                    b"a/b",
                    b"/%zz",
                    b"/a\\b",
                    b"http://u@h/p",
                    b"/\x80",
                    b"HTTP://H.EXAMPLE:8080/P",
                    b"https://h:1/",
                ]
            )
        )
    elif choice == "spaces":
        return (
            method
            + draw(st.sampled_from([b"  ", b"\t", b" \t"]))
            + target
            + b" "
            + version
            + b"\r\n"
            + msg.encode().split(b"\r\n", 1)[1]
        )
    else:
        return draw(st.sampled_from([b"\r\n", b"\n", b" "])) + msg.encode()
    msg.lines[0] = method + b" " + target + b" " + version
    return msg.encode()


def m_chunk_body(draw, msg: Message) -> bytes:
    """Flip a byte in a chunked body, or stretch a chunk-size with zeros."""
    if not msg.chunked:
        return m_flip(draw, msg)
    head = msg.encode()[: -len(msg.body)]
    body = bytearray(msg.body)
    if draw(st.booleans()):
        i = draw(st.integers(0, len(body) - 1))
        body[i] = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, 255)))
        return head + bytes(body)
    return head + b"0" * draw(st.integers(1, 20)) + bytes(body)


REQUEST_MUTATIONS = [
    m_flip,
    m_flip,
    m_flip,
    m_insert,
    m_space_before_colon,
    m_line_end,
    m_inline_control,
    m_obs_fold,
    m_content_length,
    m_transfer_encoding,
    m_http10_te,
    m_host,
    m_version,
    m_request_line,
    m_chunk_body,
]
RESPONSE_MUTATIONS = [
    m_flip,
    m_flip,
    m_insert,
    m_space_before_colon,
    m_line_end,
    m_inline_control,
    m_obs_fold,
    m_content_length,
    m_transfer_encoding,
    m_version,
    m_chunk_body,
]


@st.composite
def mutated(draw, messages, mutations) -> bytes:
    msg = draw(messages)
    mutation = draw(st.sampled_from(mutations))
    event(f"mutation {mutation.__name__}")
    return mutation(draw, msg)


# ---------------------------------------------------------------------------------------------
# The tests


@SETTINGS
@given(requests())
def test_well_formed_requests_agree(msg: Message) -> None:
    data = msg.encode()
    outcome = differential(data)
    event(outcome)
    # A well-formed request is accepted by us, except where a listed rule says otherwise.
    assert outcome.startswith(("both accept", "we accept:")), (outcome, data)
    mine = ours(data)
    assert (mine.complete, mine.body) == (True, msg.payload), data


@settings(SETTINGS, max_examples=800)
@given(mutated(requests(), REQUEST_MUTATIONS))
@example(b"GET / HTTP/1.1\r\n\r\n")
@example(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc")
@example(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0000000000000000003\r\n\r\nabc")
@example(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
@example(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
@example(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n")
@example(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
@example(b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n")
@example(b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n")
def test_mutated_requests_differ_only_as_listed(data: bytes) -> None:
    event(differential(data))


@SETTINGS
@given(responses())
def test_well_formed_responses_agree(msg: Message) -> None:
    data = msg.encode()
    outcome = differential(data, response=True)
    event(outcome)
    assert outcome.startswith(("both accept", "we accept:")), (outcome, data)
    mine = ours(data, response=True)
    assert mine.body == msg.payload, data
    assert mine.complete is (mine.head.framing != CLOSE), data


@settings(SETTINGS, max_examples=500)
@given(mutated(responses(), RESPONSE_MUTATIONS))
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
@example(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
@example(b"HTTP/1.1 200\r\nContent-Length: 1\r\n\r\na")
def test_mutated_responses_differ_only_as_listed(data: bytes) -> None:
    event(differential(data, response=True))


CHUNKED_HEAD = b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


def scan(pieces: list[bytes]) -> tuple[str, bytes, int]:
    """Feed the pieces to one scanner: ("done" | "pending" | "reject", payload, bytes used)."""
    scanner = ChunkedScanner(collect=True)
    used = 0
    try:
        for piece in pieces:
            n = scanner.feed(piece)
            assert n == len(piece) or scanner.done, (pieces, n)
            used += n
    except HttpError as exc:
        assert exc.status == 400
        return "reject", b"", used
    return ("done" if scanner.done else "pending"), scanner.payload, used


def scan_three_ways(body: bytes) -> tuple[str, bytes]:
    """Feed `body` whole, byte by byte, and followed by a next request (STYLE.md §5)."""
    verdict, payload, used = scan([body])
    assert scan([body[i : i + 1] for i in range(len(body))])[:2] == (verdict, payload), body
    after = scan([body + CHUNKED_HEAD])
    if verdict == "done":
        assert after == (verdict, payload, used), body
    elif verdict == "reject":
        assert after[0] == "reject", body
    # A pending body takes the next bytes as its own: no claim about them.
    return verdict, payload


@st.composite
def chunk_inputs(draw) -> bytes:
    body, _ = draw(chunked_bodies(max_chunks=4, exts=len(EXTS)))
    if draw(st.booleans()):
        return body
    body = bytearray(body)
    for _ in range(draw(st.integers(1, 2))):
        i = draw(st.integers(0, len(body) - 1))
        if draw(st.booleans()):
            body[i] = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, 255)))
        else:
            body[i:i] = draw(st.sampled_from([b"0", b" ", b"\r\n", b";", b"\n", b"a"]))
    return bytes(body)


@settings(SETTINGS, max_examples=600)
@given(chunk_inputs())
@example(b"00000000000000001\r\na\r\n0\r\n\r\n")
@example(b"8000000000000000\r\nabc")
@example(b"1;\r\na\r\n0\r\n\r\n")
def test_chunked_scanner_agrees_with_llhttp(body: bytes) -> None:
    verdict, payload = scan_three_ways(body)
    data = CHUNKED_HEAD + body
    seen = llhttp(data)
    facts = analyse(data)
    shown = f"body: {body!r}\nllhttp: {seen.verdict} {seen.error!r} {seen.body}\nours: {verdict}"
    assert seen.headers_done, shown
    if verdict == "done" and seen.complete:
        assert payload == b"".join(seen.body), shown
        event("both done")
    elif verdict == "reject" and seen.error is not None and not seen.complete:
        event("both refuse")
    elif verdict == "pending" and not seen.complete and seen.error is None:
        event("both wait")
    elif verdict == "reject":
        rule = classify(WE_REFUSE, facts, seen, 400, "body")
        assert rule is not None, f"we refuse, llhttp does not: unlisted\n{shown}"
        event(f"we refuse: {rule.name}")
    else:
        rule = classify(WE_ACCEPT, facts, seen)
        assert rule is not None, f"llhttp refuses, we do not: unlisted\n{shown}"
        event(f"we accept: {rule.name}")


# One input per listed category (and per rule where llhttp happens to agree with us), with
# the outcome it must have. A classifier that matched everything would let the properties
# above pass vacuously; this table pins each rule to an input it is meant for.
H = b"Host: a\r\n"
TE = b"Transfer-Encoding: chunked\r\n"
KNOWN = [
    ("no Host", b"GET / HTTP/1.1\r\n\r\n", "we refuse: no Host"),
    ("duplicate Host", b"GET / HTTP/1.1\r\n" + H + b"host: a\r\n\r\n", "we refuse: duplicate Host"),
    ("bad Host value", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "we refuse: bad Host value"),
    (
        "CL with TE",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n" + TE + b"\r\n0\r\n\r\n",
        "both refuse",
    ),
    ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\n" + TE + b"\r\n0\r\n\r\n", "we refuse: TE in HTTP/1.0"),
    (
        "TE not a lone chunked",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "we refuse: TE not a lone chunked",
    ),
    (
        "malformed or differing Content-Length",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0000000000000000003\r\n\r\nabc",
        "we refuse: malformed or differing Content-Length",
    ),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n b\r\n\r\n", "both refuse"),
    ("whitespace before colon", b"GET / HTTP/1.1\r\n" + H + b"X : a\r\n\r\n", "both refuse"),
    ("bare CR", b"\rGET / HTTP/1.1\r\n" + H + b"\r\n", "we refuse: bare CR"),
    ("bare LF", b"\nGET / HTTP/1.1\r\n" + H + b"\r\n", "we refuse: bare LF"),
    (
        "leading empty line",
        b"\r\nGET / HTTP/1.1\r\n" + H + b"\r\n",
        "we refuse: leading empty line",
    ),
    ("unknown version", b"GET / HTTP/2.0\r\n" + H + b"\r\n", "we refuse: unknown version"),
    ("request-line syntax", b"GET  / HTTP/1.1\r\n" + H + b"\r\n", "we refuse: request-line syntax"),
    (
        "request-target syntax",
        b"GET http://u@h/p HTTP/1.1\r\n" + H + b"\r\n",
        "we refuse: request-target syntax",
    ),
    ("CONNECT", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", "we refuse: CONNECT"),
    (
        "response version",
        b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        "we refuse: response version",
    ),
    (
        "status-line syntax",
        b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n",
        "we refuse: status-line syntax",
    ),
    (
        "chunk-size over 16 hex digits or 2**63-1",
        b"POST / HTTP/1.1\r\n" + H + TE + b"\r\n00000000000000001\r\na\r\n0\r\n\r\n",
        "we refuse: chunk-size over 16 hex digits or 2**63-1",
    ),
    (
        "identical duplicate Content-Length",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\na",
        "we accept: identical duplicate Content-Length",
    ),
    (
        "empty Transfer-Encoding line or element",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: \r\n" + TE + b"\r\n0\r\n\r\n",
        "we accept: empty Transfer-Encoding line or element",
    ),
    ("extension method", b"FOO / HTTP/1.1\r\n" + H + b"\r\n", "we accept: extension method"),
    (
        "chunk-ext not checked",
        b"POST / HTTP/1.1\r\n" + H + TE + b"\r\n1;\r\na\r\n0\r\n\r\n",
        "we accept: chunk-ext not checked",
    ),
    (
        "BWS in chunk-ext",
        b"POST / HTTP/1.1\r\n" + H + TE + b"\r\n1 ;a\r\na\r\n0\r\n\r\n",
        "we accept: BWS in chunk-ext",
    ),
    (
        "framing fields of a bodiless response",
        b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: \r\n\r\n",
        "we accept: framing fields of a bodiless response",
    ),
    (
        "Upgrade ignored in HTTP/1.0",
        b"GET / HTTP/1.0\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        "both accept, but: Upgrade ignored in HTTP/1.0",
    ),
    (
        "request-target syntax",
        b"GET /a?b#c HTTP/1.1\r\n" + H + b"\r\n",
        "we refuse: request-target syntax",
    ),
    ("plain request", b"GET /a?b HTTP/1.1\r\n" + H + b"X:  v \r\n\r\n", "both accept"),
]


@pytest.mark.parametrize(("data", "outcome"), [pytest.param(d, o, id=i) for i, d, o in KNOWN])
def test_known_differences_are_classified(data: bytes, outcome: str) -> None:
    assert differential(data, response=data.startswith(b"HTTP/")) == outcome


def test_every_listed_category_has_a_known_input() -> None:
    rules = WE_REFUSE + WE_ACCEPT + [r for rs in FIELD_DIFFS.values() for r in rs]
    names_ = [r.name for r in rules]
    assert len(names_) == len(set(names_))
    assert all(r.why for r in rules)
    assert set(names_) <= {name for name, _, _ in KNOWN}
