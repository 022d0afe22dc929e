"""The TLS benchmark targets' pure helpers (benchmarks/tls_targets.py) and run.py's TLS bits.

- The run's certificate verifies against its CA for 127.0.0.1 and localhost, made with
  trustme and with the cryptography fallback (trustme hidden), and its key file is 0600.
- fastgate-tls's generated config passes `fastgate check` (a real subprocess), and the check
  really reads the TLS files: a key of another certificate is refused.
- nginx-tls's template renders to the plain nginx proxy's config plus the TLS lines only.
- Scenario names and --handshake parsing; the TLS report's ratios come from each round.
"""

from __future__ import annotations

import json
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import run as bench_run  # noqa: E402
import tls_targets  # noqa: E402


@pytest.fixture(params=["trustme", "cryptography"])
def tls_files(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tls_targets.TlsFiles:
    """The run's certificate, made each way (None in sys.modules makes `import trustme` fail)."""
    if request.param == "cryptography":
        monkeypatch.setitem(sys.modules, "trustme", None)
    files = tls_targets.make_certificates(tmp_path / "tls")
    assert files.made_with == request.param
    return files


def _handshake(files: tls_targets.TlsFiles, server_name: str) -> str:
    """An in-memory TLS handshake between a client trusting only the run's CA and a server
    with the run's certificate; the negotiated version."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.cert_file, files.key_file)
    client_ctx = ssl.create_default_context(cafile=str(files.ca_file))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_name)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for side, obj in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values()), done
    return client.version() or ""


@pytest.mark.parametrize("server_name", [pytest.param(n, id=n) for n in tls_targets.SERVER_NAMES])
def test_certificate_verifies_for_the_server_names(
    tls_files: tls_targets.TlsFiles, server_name: str
) -> None:
    assert _handshake(tls_files, server_name) in ("TLSv1.2", "TLSv1.3")
    cert = x509.load_pem_x509_certificate(tls_files.cert_file.read_bytes())
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert stat.S_IMODE(tls_files.key_file.stat().st_mode) == 0o600


def test_certificate_refused_for_another_name(tls_files: tls_targets.TlsFiles) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tls_files, "example.com")


def _fastgate_check(config: dict, path: Path) -> subprocess.CompletedProcess[str]:
    path.write_text(json.dumps(config))
    return subprocess.run(
        [sys.executable, "-m", "fastgate", "check", "-c", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("other_key", "ok"),
    [pytest.param(False, True, id="own-key"), pytest.param(True, False, id="key-of-another")],
)
def test_fastgate_config_passes_check(
    tls_files: tls_targets.TlsFiles, tmp_path: Path, other_key: bool, ok: bool
) -> None:
    config = tls_targets.fastgate_tls_config(18443, 18080, tls_files)
    assert config["entrypoints"]["web"]["tls"]["min_version"] == "1.2"
    assert "ciphers" not in config["entrypoints"]["web"]["tls"]  # the default: intermediate
    if other_key:
        other = tls_targets.make_certificates(tmp_path / "other")
        config["entrypoints"]["web"]["tls"]["certificates"][0]["key_file"] = str(other.key_file)
    done = _fastgate_check(config, tmp_path / "fastgate-tls.yaml")
    assert (done.returncode == 0) is ok, done.stdout + done.stderr
    if not ok:
        assert "entrypoints.web.tls.certificates[0].key_file" in done.stdout + done.stderr


def test_nginx_template_is_the_plain_proxy_plus_tls(
    tls_files: tls_targets.TlsFiles, tmp_path: Path
) -> None:
    common = {"prefix": tmp_path, "user": ""}
    values = tls_targets.nginx_tls_values(18443, 18080, tls_files)
    tls_conf = bench_run.render("proxy-tls.nginx.conf", tmp_path / "tls.conf", common | values)
    plain_values = {"port": 18443, "origin_port": 18080}
    plain = bench_run.render("proxy.nginx.conf", tmp_path / "plain.conf", common | plain_values)

    def directives(path: Path) -> list[str]:
        lines = (line.strip() for line in path.read_text().splitlines())
        return [line for line in lines if line and not line.startswith("#")]

    tls_lines = directives(tls_conf)
    extra = [line for line in tls_lines if line.startswith("ssl_")]
    assert extra == [
        f"ssl_certificate {tls_files.cert_file};",
        f"ssl_certificate_key {tls_files.key_file};",
        "ssl_protocols TLSv1.2 TLSv1.3;",
        "ssl_session_cache shared:SSL:10m;",
        "ssl_session_tickets on;",
    ]
    rest = [line.replace(" ssl;", ";") for line in tls_lines if not line.startswith("ssl_")]
    assert rest == directives(plain)


SMALL = bench_run.SIZES["small"]


@pytest.mark.parametrize(
    ("handshake", "name", "in_title"),
    [
        pytest.param("keep-alive", "small c50", "keep-alive", id="keep-alive"),
        pytest.param("close", "small c50 close", "Connection: close", id="close"),
    ],
)
def test_scenario_names(handshake: str, name: str, in_title: str) -> None:
    scenario = bench_run.Scenario(SMALL, 50, handshake)
    assert scenario.name == name
    assert in_title in scenario.title


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        pytest.param(None, ["keep-alive"], id="default"),
        pytest.param("keep-alive,close", ["keep-alive", "close"], id="both"),
        pytest.param("close", ["close"], id="close"),
        pytest.param("open", None, id="unknown"),
        pytest.param("close,close", None, id="repeat"),
    ],
)
def test_handshake_option(arg: str | None, expected: list[str] | None) -> None:
    argv = ["--targets", "nginx-tls,fastgate-tls"] + (["--handshake", arg] if arg else [])
    if expected is None:
        with pytest.raises(SystemExit):
            bench_run.parse_args(argv)
    else:
        assert bench_run.parse_args(argv).handshake == expected


def _run(round_no: int, target: str, rps: float, cpu: float) -> bench_run.Run:
    return bench_run.Run(
        round=round_no, scenario="small c50", size="small", connections=50, target=target,
        valid=True, errors=[], requests=int(rps), seconds=1.0, rps=rps,
        latency_us={"p50": 100.0, "p99": 900.0}, cpu_us_per_req=cpu,
        origin_cpu_us_per_req=5.0, other_load_pct={"core0": 0.0, "core1": 0.0, "steal": 0.0},
        proxy_pids=[1], wrk_output="",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("fastgate_tls_rps", "ratio", "verdict"),
    [
        pytest.param((10_000.0, 24_000.0), 0.55, "met", id="met"),
        pytest.param((8_000.0, 16_000.0), 0.4, "**not met**", id="not-met"),
    ],
)
def test_tls_ratios_are_per_round(
    fastgate_tls_rps: tuple[float, float], ratio: float, verdict: str
) -> None:
    # Round 2 is twice as fast for everyone: the ratios within each round stay comparable.
    targets = ["nginx", "fastgate", "nginx-tls", "fastgate-tls"]
    runs = []
    for rnd, scale in ((1, 1.0), (2, 2.0)):
        runs += [
            _run(rnd, "nginx", 60_000 * scale, 10.0),
            _run(rnd, "fastgate", 40_000 * scale, 20.0),
            _run(rnd, "nginx-tls", 20_000 * scale, 20.0),
            _run(rnd, "fastgate-tls", fastgate_tls_rps[rnd - 1], 30.0),
        ]
    summary = bench_run.summarize(runs, [bench_run.Scenario(SMALL, 50)], targets)["small c50"]
    tls = summary["fastgate-tls"]["tls"]
    expected = [fastgate_tls_rps[0] / 20_000, fastgate_tls_rps[1] / 40_000]
    assert tls["rps_ratio_nginx_tls"]["min"] == pytest.approx(min(expected))
    assert tls["rps_ratio_nginx_tls"]["max"] == pytest.approx(max(expected))
    assert tls["cpu_ratio_nginx_tls"]["median"] == pytest.approx(1.5)
    assert tls["plain"] == "fastgate"
    assert summary["nginx-tls"]["tls"]["rps_ratio_plain"]["median"] == pytest.approx(1 / 3)
    assert summary["nginx-tls"]["tls"]["cpu_ratio_plain"]["median"] == pytest.approx(2.0)
    assert summary["nginx"]["tls"] is None
    lines = bench_run.tls_table(summary, targets, True, "keep-alive")
    assert any(verdict in line and "0.5x" in line for line in lines), lines
    median = tls["rps_ratio_nginx_tls"]["median"]
    assert median == pytest.approx(ratio)
    close_lines = bench_run.tls_table(summary, targets, True, "close")
    assert not any("target ≥" in line for line in close_lines)


def test_target_url_and_connection(tls_files: tls_targets.TlsFiles) -> None:
    target = bench_run.Target(
        "fastgate-tls", 18443, None, Path("log"), proxied=True,  # type: ignore[arg-type]
        scheme="https", ca_file=tls_files.ca_file,
    )  # fmt: skip
    assert target.url("/16k.bin") == "https://127.0.0.1:18443/16k.bin"
    conn = target.connection()
    assert conn.__class__.__name__ == "HTTPSConnection"
    assert target.client_context().verify_mode == ssl.CERT_REQUIRED
