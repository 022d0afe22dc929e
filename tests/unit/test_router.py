"""Router tests: one table of cases per rule, run against the compiled Router and against the
naive oracle below (scan every route, keep the matches, take the max key), plus a property test
that random route sets and requests give the same answer from both."""

from __future__ import annotations

import dataclasses
import importlib.machinery
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgate._core import router as router_module
from fastgate._core.router import Router, RouteSpec

R = RouteSpec

# ---------------------------------------------------------------------------------------------
# The oracle: the ranking of the router's module docstring, written as plainly as possible.


def oracle_host(host: bytes | None) -> bytes | None:
    if host is None:
        return None
    if host.startswith(b"["):
        end = host.find(b"]")
        if end >= 0:
            host = host[1:end]
    else:
        host = host.split(b":", 1)[0]
        if host.endswith(b"."):
            host = host[:-1]
    return host.lower()


def oracle_host_rank(spec: RouteSpec, host: bytes | None) -> tuple[int, int] | None:
    if not spec.hosts:
        return (0, 0)
    if host is None:
        return None
    ranks = []
    for rule in spec.hosts:
        rule_b = rule.encode()
        if rule_b.startswith(b"*."):
            suffix = rule_b[2:]
            if host.endswith(b"." + suffix) and len(host) > len(suffix) + 1:
                ranks.append((1, len(suffix)))
        elif host == rule_b:
            ranks.append((2, 0))
    return max(ranks) if ranks else None


def oracle_path_rank(spec: RouteSpec, path: bytes) -> tuple[int, int] | None:
    rule = spec.path.encode()
    if spec.path_type == "exact":
        return (2, len(rule)) if path == rule else None
    if spec.path_type == "prefix":
        if rule.endswith(b"/"):
            hit = path.startswith(rule)
        else:
            hit = path == rule or path.startswith(rule + b"/")
        return (1, len(rule)) if hit else None
    return (0, 0) if re.fullmatch(rule, path) else None


def oracle(specs, host: bytes | None, path: bytes, method: bytes):
    host = oracle_host(host)
    best_key, best_target = None, None
    for index, spec in enumerate(specs):
        if spec.methods and method.decode("latin-1") not in spec.methods:
            continue
        host_rank = oracle_host_rank(spec, host)
        path_rank = oracle_path_rank(spec, path)
        if host_rank is None or path_rank is None:
            continue
        key = (spec.priority, host_rank, path_rank, -index)
        if best_key is None or key > best_key:
            best_key, best_target = key, spec.target
    return best_target


def check(specs, host, path, method, expected):
    """Assert the compiled router and the oracle both give `expected`."""
    assert oracle(specs, host, path, method) == expected, "oracle disagrees with the table"
    assert Router(specs).match(host, path, method) == expected


# ---------------------------------------------------------------------------------------------
# Table-driven rules

PATH_CASES = [
    pytest.param([R("p", "/api"), R("e", "/api", "exact")], b"/api", "e", id="exact beats prefix"),
    pytest.param([R("p", "/api"), R("e", "/api", "exact")], b"/api/x", "p", id="exact is exact"),
    pytest.param([R("e", "/api/", "exact")], b"/api", None, id="exact trailing slash differs"),
    pytest.param([R("s", "/api"), R("l", "/api/v1")], b"/api/v1/u", "l", id="longest prefix"),
    pytest.param([R("l", "/api/v1"), R("s", "/api")], b"/api/v2", "s", id="shorter prefix"),
    pytest.param([R("p", "/api")], b"/api", "p", id="prefix matches itself"),
    pytest.param([R("p", "/api")], b"/api/", "p", id="prefix matches with slash"),
    pytest.param([R("p", "/api")], b"/api/x/y", "p", id="prefix matches below"),
    pytest.param([R("p", "/api")], b"/apix", None, id="prefix segment boundary"),
    pytest.param([R("p", "/api")], b"/ap", None, id="prefix longer than path"),
    pytest.param([R("p", "/api/")], b"/api", None, id="slash prefix needs the slash"),
    pytest.param([R("p", "/api/")], b"/api/x", "p", id="slash prefix matches below"),
    pytest.param([R("p", "/api/")], b"/api/", "p", id="slash prefix matches itself"),
    pytest.param([R("a", "/api"), R("b", "/api/")], b"/api/x", "b", id="slash prefix longer"),
    pytest.param([R("a", "/api"), R("b", "/api/")], b"/api", "a", id="slash prefix not bare"),
    pytest.param([R("root")], b"/", "root", id="root prefix matches root"),
    pytest.param([R("root")], b"/any/deep/path", "root", id="root prefix matches all"),
    pytest.param([R("root")], b"*", None, id="root prefix not asterisk form"),
    pytest.param([R("root")], b"", None, id="root prefix not empty path"),
    pytest.param([R("p", "/a")], b"/a//b", "p", id="prefix then empty segment"),
    pytest.param([R("p", "/a/b")], b"/a//b", None, id="empty segment is a segment"),
    pytest.param([R("re", "/v[0-9]+/.*", "regex")], b"/v2/x", "re", id="regex fallback"),
    pytest.param([R("re", "/v[0-9]+", "regex")], b"/v2/x", None, id="regex must fullmatch"),
    pytest.param(
        [R("r1", "/a.*", "regex"), R("r2", "/ab.*", "regex")], b"/abc", "r1", id="regex order"
    ),
    pytest.param(
        [R("r1", "/z.*", "regex"), R("r2", "/ab.*", "regex")], b"/abc", "r2", id="regex next"
    ),
    pytest.param([R("re", ".*", "regex"), R("root")], b"/x", "root", id="prefix beats regex"),
    pytest.param([R("re", "\\*", "regex")], b"*", "re", id="regex sees asterisk form"),
    pytest.param([R("re", "/caf\u00e9", "regex")], "/caf\u00e9".encode(), "re", id="regex utf8"),
]

HOST_CASES = [
    pytest.param(
        [R("w", hosts=["*.example.com"]), R("e", hosts=["api.example.com"])],
        b"api.example.com",
        "e",
        id="exact host beats wildcard",
    ),
    pytest.param(
        [R("any"), R("w", hosts=["*.example.com"])], b"a.example.com", "w", id="wildcard beats any"
    ),
    pytest.param([R("w", hosts=["*.example.com"])], b"a.b.example.com", "w", id="wildcard deep"),
    pytest.param([R("w", hosts=["*.example.com"])], b"example.com", None, id="wildcard not apex"),
    pytest.param([R("w", hosts=["*.example.com"])], b"aexample.com", None, id="wildcard label"),
    pytest.param([R("w", hosts=["*.example.com"])], b".example.com", None, id="wildcard empty"),
    pytest.param(
        [R("short", hosts=["*.example.com"]), R("long", hosts=["*.b.example.com"])],
        b"x.b.example.com",
        "long",
        id="longer wildcard suffix wins",
    ),
    pytest.param(
        [R("long", hosts=["*.b.example.com"]), R("short", hosts=["*.example.com"])],
        b"x.c.example.com",
        "short",
        id="shorter wildcard when longer misses",
    ),
    pytest.param(
        [R("long", hosts=["*.b.example.com"]), R("short", hosts=["*.example.com"])],
        b"b.example.com",
        "short",
        id="longer wildcard apex falls to shorter",
    ),
    pytest.param([R("e", hosts=["a.com"])], b"a.com:8443", "e", id="port stripped"),
    pytest.param([R("e", hosts=["a.com"])], b"A.Com", "e", id="request host case"),
    pytest.param([R("e", hosts=["A.COM"])], b"a.com", "e", id="route host case"),
    pytest.param([R("e", hosts=["a.com"])], b"a.com.", "e", id="trailing dot"),
    pytest.param([R("e", hosts=["a.com"])], b"a.com.:80", "e", id="trailing dot and port"),
    pytest.param([R("e", hosts=["a.com"])], b"a.com..", None, id="only one trailing dot"),
    pytest.param([R("e", hosts=["a.com."])], b"a.com", "e", id="route trailing dot"),
    pytest.param([R("e", hosts=["a.com"])], b"b.com", None, id="other host"),
    pytest.param([R("e", hosts=["a.com"])], b"xa.com", None, id="exact not suffix"),
    pytest.param([R("e", hosts=["a.com"])], b"a.com:", "e", id="empty port"),
    pytest.param([R("w", hosts=["*.a.com"])], b"X.A.COM:1", "w", id="wildcard case and port"),
    pytest.param([R("v6", hosts=["[::1]"])], b"[::1]:8080", "v6", id="ipv6 with port"),
    pytest.param([R("v6", hosts=["[::1]"])], b"[::1]", "v6", id="ipv6 without port"),
    pytest.param([R("v6", hosts=["::1"])], b"[::1]:80", "v6", id="ipv6 route without brackets"),
    pytest.param([R("v6", hosts=["[FE80::A]"])], b"[fe80::a]", "v6", id="ipv6 route case"),
    pytest.param([R("v6", hosts=["[fe80::a]"])], b"[FE80::A]:1", "v6", id="ipv6 request case"),
    pytest.param([R("v6", hosts=["[::1]"])], b"[::1", None, id="ipv6 unterminated"),
    pytest.param([R("v6", hosts=["[::1]"])], b"::1", None, id="bare ipv6 is a port split"),
    pytest.param([R("v4", hosts=["10.0.0.1"])], b"10.0.0.1:80", "v4", id="ipv4 with port"),
    pytest.param([R("h", hosts=["a.com"]), R("any")], None, "any", id="no host: any-host route"),
    pytest.param([R("h", hosts=["a.com"])], None, None, id="no host: host routes skip"),
    pytest.param([R("w", hosts=["*.com"])], None, None, id="no host: wildcard skips"),
    pytest.param([R("h", hosts=["a.com"]), R("any")], b"", "any", id="empty host"),
    pytest.param([R("h", hosts=["a.com"]), R("any")], b":80", "any", id="port only"),
    pytest.param([R("m", hosts=["a.com", "*.b.com"])], b"x.b.com", "m", id="second host"),
    pytest.param(
        [R("w", hosts=["*.a.com"]), R("m", hosts=["*.a.com", "x.a.com"])],
        b"x.a.com",
        "m",
        id="best host of a route counts",
    ),
    pytest.param(
        [R("ep", "/api/x", "exact"), R("wild", hosts=["*.a.com"])],
        b"q.a.com",
        "wild",
        id="host rank before path rank",
    ),
    pytest.param(
        [R("w", hosts=["*.example.com"])],
        b"a" * 300 + b".example.com",
        "w",
        id="long host still matches wildcard",
    ),
    pytest.param(
        [R("w", hosts=["*.example.com"])],
        b"a." * 200 + b"example.com:80",
        "w",
        id="many labels",
    ),
]

METHOD_CASES = [
    pytest.param([R("g", methods=["GET"])], b"GET", "g", id="listed method"),
    pytest.param([R("g", methods=["GET"])], b"POST", None, id="unlisted method"),
    pytest.param([R("g", methods=["GET"])], b"HEAD", None, id="HEAD not implied by GET"),
    pytest.param([R("g", methods=["GET"])], b"get", None, id="method case-sensitive"),
    pytest.param([R("g", methods=["GET"])], b"PATCH", None, id="method no route names"),
    pytest.param([R("g", methods=["GET"])], b"", None, id="empty method"),
    pytest.param([R("any"), R("p", methods=["POST"])], b"POST", "any", id="methods add no rank"),
    pytest.param(
        [R("p", "/x", methods=["POST"]), R("any")], b"GET", "any", id="falls to any method"
    ),
    pytest.param(
        [R("g", "/x", "exact", methods=["GET"]), R("p", "/x", "exact", methods=["POST"])],
        b"POST",
        "p",
        id="same path other method",
    ),
    pytest.param(
        [R("gp", methods=["GET", "POST"]), R("x", methods=["PUT"])],
        b"POST",
        "gp",
        id="several methods",
    ),
    pytest.param(
        [R("re", ".*", "regex", methods=["DELETE"]), R("re2", "/.*", "regex")],
        b"GET",
        "re2",
        id="regex method filter",
    ),
    pytest.param(
        [R("many", methods=[f"M{i}" for i in range(70)])], b"M69", "many", id="overflow method"
    ),
    pytest.param(
        [R("many", methods=[f"M{i}" for i in range(70)])], b"M70", None, id="overflow miss"
    ),
    pytest.param(
        [R("lo", methods=[f"M{i}" for i in range(66)]), R("hi", methods=["M65"], priority=1)],
        b"M64",
        "lo",
        id="overflow bit shared exactly",
    ),
]

PRIORITY_CASES = [
    pytest.param(
        [R("exact", "/a", "exact"), R("root", priority=1)], b"/a", "root", id="beats exact path"
    ),
    pytest.param(
        [R("e", "/a", "exact", hosts=["h.com"]), R("any", priority=1)],
        b"/a",
        "any",
        id="beats exact host",
    ),
    pytest.param(
        [R("root"), R("re", ".*", "regex", priority=1)], b"/x", "re", id="regex with priority"
    ),
    pytest.param(
        [R("neg", "/a", "exact", priority=-1), R("root")], b"/a", "root", id="negative priority"
    ),
    pytest.param([R("first", "/a"), R("second", "/a")], b"/a", "first", id="tie: declaration"),
    pytest.param([R("low", "/a"), R("high", "/a", priority=5)], b"/a", "high", id="same key"),
    pytest.param(
        [R("hi", "/a", priority=5, methods=["POST"]), R("lo", "/a")],
        b"/a",
        "lo",
        id="priority route wrong method",
    ),
    pytest.param(
        [R("r1", "/a.*", "regex"), R("r2", "/a.*", "regex", priority=2)],
        b"/ab",
        "r2",
        id="regex priority over order",
    ),
    pytest.param(
        [R("big", priority=2**63 - 1), R("small", "/a", "exact", priority=-(2**63))],
        b"/a",
        "big",
        id="64-bit priorities",
    ),
]


@pytest.mark.parametrize(("specs", "path", "expected"), PATH_CASES)
def test_path_rules(specs, path, expected):
    check(specs, None, path, b"GET", expected)


@pytest.mark.parametrize(("specs", "host", "expected"), HOST_CASES)
def test_host_rules(specs, host, expected):
    check(specs, host, b"/", b"GET", expected)


@pytest.mark.parametrize(("specs", "method", "expected"), METHOD_CASES)
def test_method_rules(specs, method, expected):
    check(specs, None, b"/x", method, expected)


@pytest.mark.parametrize(("specs", "path", "expected"), PRIORITY_CASES)
def test_priorities(specs, path, expected):
    check(specs, b"h.com", path, b"GET", expected)


def test_empty_router():
    router = Router([])
    assert len(router) == 0
    assert router.match(b"a.com", b"/", b"GET") is None
    assert router.match(None, b"", b"GET") is None


def test_len_and_target_identity():
    target = object()
    router = Router([R(target, "/a"), R("x", "/b"), R("y", ".*", "regex")])
    assert len(router) == 3
    assert router.match(None, b"/a/b", b"GET") is target


def test_many_routes_each_found():
    # Exercises table growth and probe chains: every key must be found, every near miss not.
    specs = [R(f"p{i}", f"/svc{i}") for i in range(1500)]
    specs += [R(f"e{i}", f"/svc{i}/exact", "exact") for i in range(0, 1500, 7)]
    specs += [R(f"h{i}", "/", hosts=[f"h{i}.example.com"]) for i in range(300)]
    router = Router(specs)
    for i in range(1500):
        assert router.match(None, f"/svc{i}/x".encode(), b"GET") == f"p{i}"
        want = f"e{i}" if i % 7 == 0 else f"p{i}"
        assert router.match(None, f"/svc{i}/exact".encode(), b"GET") == want
        assert router.match(None, f"/svc{i}x".encode(), b"GET") is None
    for i in range(300):
        assert router.match(f"H{i}.example.com:80".encode(), b"/svc1", b"GET") == f"h{i}"
    assert router.match(b"h300.example.com", b"/svc1", b"GET") == "p1"


def test_match_rejects_non_bytes():
    router = Router([R("x")])
    with pytest.raises(TypeError):
        router.match(None, "/", b"GET")
    with pytest.raises(TypeError):
        router.match("a.com", b"/", b"GET")


def test_router_rejects_non_specs():
    with pytest.raises(TypeError, match="RouteSpec"):
        Router([{"target": "x"}])


def test_router_is_compiled():
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    assert router_module.__file__.endswith(suffixes)


# ---------------------------------------------------------------------------------------------
# RouteSpec validation and normalisation


def test_spec_normalises():
    spec = R("t", hosts=["A.COM.", "[::1]", "*.X.com"], methods=["GET", "POST"])
    assert spec.hosts == ("a.com", "::1", "*.x.com")
    assert spec.methods == ("GET", "POST")
    assert type(spec.hosts) is tuple
    assert (spec.path, spec.path_type, spec.priority) == ("/", "prefix", 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.path = "/x"  # type: ignore[misc]


INVALID_SPECS = [
    pytest.param({"path_type": "glob"}, "path_type", id="unknown path type"),
    pytest.param({"path": "api", "path_type": "exact"}, "start with '/'", id="exact no slash"),
    pytest.param({"path": "api"}, "start with '/'", id="prefix no slash"),
    pytest.param({"path": "/a?b"}, "not allowed", id="query in path"),
    pytest.param({"path": "/a b"}, "not allowed", id="space in path"),
    pytest.param({"path": "/caf\u00e9", "path_type": "exact"}, "not allowed", id="non-ascii"),
    pytest.param({"path": b"/a"}, "must be a string", id="bytes path"),
    pytest.param({"path": "(", "path_type": "regex"}, "invalid regex", id="bad regex"),
    pytest.param({"path": "(?u)x", "path_type": "regex"}, "invalid regex", id="str-only flag"),
    pytest.param({"hosts": ["a.com:80"]}, "IPv6", id="host with port"),
    pytest.param({"hosts": ["*"]}, "leave hosts empty", id="bare star"),
    pytest.param({"hosts": ["a.*.com"]}, "bad character", id="inner star"),
    pytest.param({"hosts": ["*foo.com"]}, "bad character", id="star glued to label"),
    pytest.param({"hosts": ["a b.com"]}, "bad character", id="space in host"),
    pytest.param({"hosts": [""]}, "empty", id="empty host"),
    pytest.param({"hosts": ["*."]}, "leave hosts empty", id="empty wildcard"),
    pytest.param({"hosts": ["*.*.com"]}, "bad character", id="double wildcard"),
    pytest.param({"hosts": [".a.com"]}, "empty label", id="leading dot"),
    pytest.param({"hosts": ["a..com"]}, "empty label", id="double dot"),
    pytest.param({"hosts": ["b\u00fccher.de"]}, "IDNA", id="non-ascii host"),
    pytest.param({"hosts": ["x" * 64 + ".com"]}, "63", id="label too long"),
    pytest.param({"hosts": [("a" * 60 + ".") * 5 + "com"]}, "253", id="name too long"),
    pytest.param({"hosts": ["[::g]"]}, "IPv6", id="bad ipv6"),
    pytest.param({"hosts": ["[::1"]}, "unterminated", id="unterminated bracket"),
    pytest.param({"hosts": ["[fe80::1%eth0]"]}, "zone", id="ipv6 zone"),
    pytest.param({"hosts": "a.com"}, "not a single str", id="hosts as str"),
    pytest.param({"hosts": [b"a.com"]}, "must be a string", id="host as bytes"),
    pytest.param({"hosts": 5}, "sequence", id="hosts not iterable"),
    pytest.param({"methods": ["get"]}, "case-sensitive", id="lowercase method"),
    pytest.param({"methods": ["GE T"]}, "token", id="method with space"),
    pytest.param({"methods": [""]}, "token", id="empty method"),
    pytest.param({"methods": "GET"}, "not a single str", id="methods as str"),
    pytest.param({"priority": True}, "integer", id="bool priority"),
    pytest.param({"priority": 1.5}, "integer", id="float priority"),
    pytest.param({"priority": 2**63}, "64-bit", id="priority too big"),
]


@pytest.mark.parametrize(("fields", "message"), INVALID_SPECS)
def test_invalid_spec(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        R("t", **fields)


def test_none_target_rejected():
    with pytest.raises(ValueError, match="target"):
        R(None)


# ---------------------------------------------------------------------------------------------
# Property: the compiled router equals the oracle on random route sets and requests

HOST_RULES = ["a.com", "b.a.com", "x.b.a.com", "*.a.com", "*.b.a.com", "*.com", "c.org", "[::1]"]
REQUEST_HOSTS = [
    None,
    b"",
    b"a.com",
    b"A.COM:80",
    b"b.a.com",
    b"x.b.a.com.",
    b"y.x.b.a.com",
    b"Q.a.com:8080",
    b"com",
    b"c.org",
    b"d.org",
    b"[::1]:8080",
    b"[::1]",
    b".a.com",
    b"a.com.:1",
    b"ba.com",
]
SEGMENTS = ["api", "v1", "x", "apix"]
REGEXES = ["/api/.*", "/v1(/.*)?", ".*", "/x", "/[a-z]+", "/api/v1/x/?", "/api/[^/]+/x"]
METHODS = ["GET", "POST", "HEAD"]

paths = st.builds(
    lambda segs, slash: "/" + "/".join(segs) + ("/" if slash and segs else ""),
    st.lists(st.sampled_from(SEGMENTS), max_size=3),
    st.booleans(),
)


@st.composite
def route_sets(draw):
    specs = []
    for i in range(draw(st.integers(0, 14))):
        kind = draw(st.sampled_from(["exact", "prefix", "prefix", "regex"]))
        path = draw(st.sampled_from(REGEXES)) if kind == "regex" else draw(paths)
        specs.append(
            RouteSpec(
                target=f"r{i}",
                path=path,
                path_type=kind,
                hosts=draw(st.lists(st.sampled_from(HOST_RULES), max_size=2)),
                methods=draw(st.lists(st.sampled_from(METHODS), max_size=2)),
                priority=draw(st.integers(-1, 2)),
            )
        )
    return specs


EXTRA_PATHS = [b"", b"*", b"/apix/v1", b"//api", b"/api//v1"]


@st.composite
def scenarios(draw):
    """A route set and requests, half of whose paths extend a route's own path."""
    specs = draw(route_sets())
    plain = [s.path for s in specs if s.path_type != "regex"]
    reqs = []
    for _ in range(draw(st.integers(1, 12))):
        if plain and draw(st.booleans()):
            path = draw(st.sampled_from(plain)) + draw(st.sampled_from(["", "/", "/x", "x", "v1"]))
            path_b = path.encode()
        else:
            path_b = draw(st.one_of(paths.map(str.encode), st.sampled_from(EXTRA_PATHS)))
        host = draw(st.sampled_from(REQUEST_HOSTS))
        method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT"]))
        reqs.append((host, path_b, method))
    return specs, reqs


@settings(max_examples=500, deadline=None)
@given(scenarios())
def test_matches_oracle(scenario):
    specs, reqs = scenario
    router = Router(specs)
    assert len(router) == len(specs)
    for host, path, method in reqs:
        want = oracle(specs, host, path, method)
        assert router.match(host, path, method) == want, (host, path, method)
