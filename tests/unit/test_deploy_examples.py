"""The deployment files under deploy/: example configs, systemd unit, container image, Kubernetes.

Rules checked:
- Every config we ship (deploy/examples/*.yaml, the container's baked-in config, the config
  embedded in the Kubernetes ConfigMap) passes `fastgate check` without an error or a
  warning, and the examples the docs promise exist.
- The Kubernetes manifests parse, have the expected kinds, agree with each other (selectors,
  port names, Secret and ConfigMap names, the Redis Service the config names) and with the
  config (probes on the admin listener's port, the entrypoint's port, a grace period longer
  than the drain), and meet the "restricted" Pod Security Standard. `kubectl kustomize`
  renders them when kubectl is installed.
- The systemd unit has its sections and hardening keys, stops later than the drain ends,
  and `systemd-analyze verify` accepts it when that tool is installed.
- The Containerfile builds in two stages, runs as a numeric non-root user, and its
  HEALTHCHECK, EXPOSE and config path match the baked-in config.
- `MemoryDenyWriteExecute=yes` holds: a real gateway (supervisor, worker, the C core, uvloop,
  JWT and rate-limit middlewares) serves under the kernel's W^X lock (PR_SET_MDWE, Linux 6.3+;
  skipped on older kernels).
- The ConfigMap's config runs for real against redis-server: the probe paths answer 200 on
  the admin port and the Redis-backed rate limit admits requests.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import redis_server
from redis_server import RedisServers

from fastgate.cli import main as fastgate_main
from fastgate.config.schema import parse_address
from fastgate.server.supervisor import KILL_GRACE

redis_servers = redis_server.redis_servers  # the fixture

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
EXAMPLES = DEPLOY / "examples"
K8S = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "fastgate.service"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
CONTAINER_CONFIG = DEPLOY / "container" / "fastgate.yaml"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manifest(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def one(name: str, kind: str, metadata_name: str | None = None) -> dict[str, Any]:
    docs = [d for d in manifest(name) if d["kind"] == kind]
    if metadata_name is not None:
        docs = [d for d in docs if d["metadata"]["name"] == metadata_name]
    assert len(docs) == 1, f"{name}: expected one {kind}, got {len(docs)}"
    return docs[0]


def configmap_text() -> str:
    return one("configmap.yaml", "ConfigMap")["data"]["fastgate.yaml"]


def configmap_config() -> dict[str, Any]:
    return yaml.safe_load(configmap_text())


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1
    return found[0]


def port_named(c: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    return ports[name]


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    """The PEM files tls-mtls-upstream.yaml names, issued by two throwaway CAs."""
    import trustme

    public, internal = trustme.CA(), trustme.CA()
    leaf = public.issue_cert("shop.example.com")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "gateway.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "gateway.key"))
    internal.cert_pem.write_to_path(str(tmp_path / "internal-ca.pem"))
    client = internal.issue_cert("fastgate-gateway")
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "gateway-client.pem"))
    client.private_key_pem.write_to_path(str(tmp_path / "gateway-client.key"))
    return tmp_path


# ---- every shipped config passes `fastgate check` --------------------------------------------


def shipped_configs() -> list[Any]:
    params = [pytest.param(p, id=f"examples/{p.name}") for p in sorted(EXAMPLES.glob("*.yaml"))]
    params.append(pytest.param(CONTAINER_CONFIG, id="container/fastgate.yaml"))
    params.append(pytest.param(None, id="kubernetes ConfigMap"))
    return params


@pytest.mark.parametrize("path", shipped_configs())
def test_config_passes_check(
    path: Path | None,
    tmp_path: Path,
    tls_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if path is None:
        path = tmp_path / "configmap.yaml"
        path.write_text(configmap_text())
    for var in [k for k in os.environ if k.startswith("FASTGATE_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("REDIS_PASSWORD", "0123456789abcdef")
    monkeypatch.setenv("TLS_DIR", str(tls_dir))
    status = fastgate_main(["check", "-c", str(path)])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out.rstrip().splitlines()[-1] == "ok"
    assert "warning:" not in err and "error:" not in err, err


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("minimal.yaml", id="minimal"),
        pytest.param("jwt-rate-limit-redis.yaml", id="jwt and redis rate limit"),
        pytest.param("tls-mtls-upstream.yaml", id="TLS termination, mTLS upstream"),
        pytest.param("services-health-retries.yaml", id="health checks and retries"),
    ],
)
def test_example_exists(name: str) -> None:
    assert (EXAMPLES / name).is_file()
    assert (EXAMPLES / name).read_text().startswith("# fastgate — ")  # says what it shows


def test_examples_keep_secrets_out() -> None:
    """A password in an example is always a ${VAR}, never a literal."""
    for path in [*EXAMPLES.glob("*.yaml"), CONTAINER_CONFIG]:
        for line in path.read_text().splitlines():
            m = re.match(r"\s*(password|secret)\s*:\s*(\S+)", line)
            if m:
                assert m.group(2).strip("\"'").startswith("${"), f"{path.name}: {line}"
    redis = configmap_config()["providers"]["redis"]
    assert all(p["password"].startswith("${") for p in redis.values())


# ---- Kubernetes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kinds",
    [
        pytest.param("namespace.yaml", ["Namespace"], id="namespace"),
        pytest.param("configmap.yaml", ["ConfigMap"], id="configmap"),
        pytest.param("deployment.yaml", ["Deployment"], id="deployment"),
        pytest.param("service.yaml", ["Service"], id="service"),
        pytest.param("hpa.yaml", ["HorizontalPodAutoscaler"], id="hpa"),
        pytest.param("pdb.yaml", ["PodDisruptionBudget"], id="pdb"),
        pytest.param("networkpolicy.yaml", ["NetworkPolicy", "NetworkPolicy"], id="netpol"),
        pytest.param("redis.yaml", ["Deployment", "Service"], id="redis"),
        pytest.param("kustomization.yaml", ["Kustomization"], id="kustomization"),
    ],
)
def test_manifest_kinds(name: str, kinds: list[str]) -> None:
    docs = manifest(name)
    assert [d["kind"] for d in docs] == kinds
    for d in docs:
        assert d["apiVersion"]
        if d["kind"] != "Kustomization":
            assert d["metadata"]["name"]
            assert "namespace" not in d["metadata"]  # kustomization.yaml sets it


def test_kustomization_lists_every_manifest() -> None:
    kust = manifest("kustomization.yaml")[0]
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kust["resources"]) == sorted(files)
    namespace = one("namespace.yaml", "Namespace")["metadata"]["name"]
    assert kust["namespace"] == namespace
    image = container(one("deployment.yaml", "Deployment"), "fastgate")["image"]
    assert image.split(":")[0] in {i["name"] for i in kust["images"]}


def test_kubectl_kustomize_renders() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (optional: the manifests are checked above)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            *("Namespace", "ConfigMap", "Deployment", "Deployment", "Service", "Service"),
            *("HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "NetworkPolicy"),
        ]
    )
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
        "fastgate"
    }


def test_probes_use_the_admin_listener() -> None:
    config = configmap_config()
    host, admin_port = parse_address(config["admin"]["address"])
    # The kubelet probes the pod's IP: loopback would fail every probe.
    assert host == "0.0.0.0"
    assert not config.get("zero_trust", False)
    c = container(one("deployment.yaml", "Deployment"), "fastgate")
    assert port_named(c, "admin") == admin_port
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert c["startupProbe"]["httpGet"]["port"] == "admin"
    annotations = one("deployment.yaml", "Deployment")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations["prometheus.io/port"] == str(admin_port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_entrypoint_port_and_service() -> None:
    config = configmap_config()
    [entrypoint] = config["entrypoints"].values()
    deployment = one("deployment.yaml", "Deployment")
    c = container(deployment, "fastgate")
    assert port_named(c, "http") == parse_address(entrypoint["address"])[1]
    service = one("service.yaml", "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]  # admin unpublished
    assert service["spec"]["externalTrafficPolicy"] == "Local"  # client addresses kept


def test_config_mount_and_reload() -> None:
    deployment = one("deployment.yaml", "Deployment")
    c = container(deployment, "fastgate")
    config_path = Path(c["args"][c["args"].index("-c") + 1])
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["config"]["mountPath"] == str(config_path.parent)
    assert "subPath" not in mounts["config"]  # a subPath mount never sees ConfigMap updates
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    configmap = one("configmap.yaml", "ConfigMap")
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.name in configmap["data"]


def test_grace_period_outlasts_the_drain() -> None:
    config = configmap_config()
    spec = one("deployment.yaml", "Deployment")["spec"]
    c = container(one("deployment.yaml", "Deployment"), "fastgate")
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop >= 3  # endpoint removal propagates before SIGTERM
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop + config["drain_timeout"] + KILL_GRACE
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def pod_specs() -> list[Any]:
    return [
        pytest.param(one(f, "Deployment", n)["spec"]["template"]["spec"], id=n)
        for f, n in (("deployment.yaml", "fastgate"), ("redis.yaml", "redis"))
    ]


@pytest.mark.parametrize("pod", pod_specs())
def test_pods_meet_restricted_pod_security(pod: dict[str, Any]) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    labels = one("namespace.yaml", "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_workers_follow_the_cpu_limit() -> None:
    c = container(one("deployment.yaml", "Deployment"), "fastgate")
    env = {e["name"]: e for e in c["env"]}
    ref = env["FASTGATE_WORKERS"]["valueFrom"]["resourceFieldRef"]
    assert ref == {"resource": "limits.cpu", "divisor": "1"}
    assert c["resources"]["limits"]["cpu"]


def test_redis_provider_matches_the_redis_manifest() -> None:
    config = configmap_config()
    [provider] = config["providers"]["redis"].values()
    host, port = parse_address(provider["address"])
    service = one("redis.yaml", "Service")
    assert service["metadata"]["name"] == host
    assert [p["port"] for p in service["spec"]["ports"]] == [port]
    redis = one("redis.yaml", "Deployment")
    assert service["spec"]["selector"].items() <= (
        redis["spec"]["template"]["metadata"]["labels"].items()
    )
    rc = container(redis, "redis")
    assert port_named(rc, service["spec"]["ports"][0]["targetPort"]) == port
    # The gateway and Redis read the same Secret, and every ${VAR} of the config is set.
    gw = container(one("deployment.yaml", "Deployment"), "fastgate")
    gw_env = {e["name"]: e for e in gw["env"]}
    for var in re.findall(r"\$\{(\w+)\}", configmap_text()):
        assert var in gw_env, f"${{{var}}} is not set in the pod"
    secret = gw_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    redis_env = {e["name"]: e for e in rc["env"]}
    assert redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret
    # The password reaches redis-server through a file, not its command line.
    script = " ".join(rc["args"])
    assert "requirepass" in script and "exec redis-server /data/auth.conf" in script
    assert "--requirepass" not in script
    # Rate limits are shared: every rate_limit middleware uses a Redis store.
    stores = [m["store"] for m in config["middlewares"].values() if m["type"] == "rate_limit"]
    assert stores and set(stores) <= {"redis", "hybrid"}


def test_hpa_scales_the_gateway_on_cpu() -> None:
    hpa = one("hpa.yaml", "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "fastgate")
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_network_policy_ports_exist() -> None:
    policies = {p["metadata"]["name"]: p for p in manifest("networkpolicy.yaml")}
    gw = container(one("deployment.yaml", "Deployment"), "fastgate")
    rc = container(one("redis.yaml", "Deployment"), "redis")
    for name, c in (("fastgate", gw), ("redis", rc)):
        names = {p["name"] for p in c["ports"]}
        used = {p["port"] for rule in policies[name]["spec"]["ingress"] for p in rule["ports"]}
        assert used <= names
    # The admin port is only open to a namespace selector (Prometheus), never to everyone.
    for rule in policies["fastgate"]["spec"]["ingress"]:
        if any(p["port"] == "admin" for p in rule["ports"]):
            assert rule["from"]


# ---- systemd ---------------------------------------------------------------------------------


def unit_sections() -> dict[str, list[tuple[str, str]]]:
    """The unit file as {section: [(key, value), ...]} (keys may repeat, as systemd allows)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not key=value: {line}"
        sections[current].append((key, value))
    return sections


def test_unit_structure() -> None:
    sections = unit_sections()
    assert list(sections) == ["Unit", "Service", "Install"]
    service = dict(sections["Service"])
    required = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "MemoryDenyWriteExecute": "yes",
        "LockPersonality": "yes",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "User": "fastgate",
        "KillSignal": "SIGTERM",
        "ExecReload": "/bin/kill -HUP $MAINPID",
    }
    for key, value in required.items():
        assert service.get(key) == value, key
    assert "AmbientCapabilities" not in service  # only when a port < 1024 is configured
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    filters = [v for k, v in sections["Service"] if k == "SystemCallFilter"]
    assert "@system-service" in filters
    writable = service["ReadWritePaths"].split()
    assert {"-/var/lib/fastgate", "-/var/log/fastgate"} <= set(writable)
    assert int(service["LimitNOFILE"]) >= 65536
    default_drain = yaml.safe_load((REPO / "fastgate/config/default.yaml").read_text())[
        "drain_timeout"
    ]
    assert int(service["TimeoutStopSec"]) > default_drain + KILL_GRACE
    assert service["ExecStart"].split()[1:] == ["run"]
    assert service["ExecStartPre"].split() == [service["ExecStart"].split()[0], "check"]
    assert service["Environment"]  # FASTGATE_CONFIG is among the Environment lines
    env = [v for k, v in sections["Service"] if k == "Environment"]
    assert "FASTGATE_CONFIG=/etc/fastgate/fastgate.yaml" in env
    assert dict(sections["Install"])["WantedBy"] == "multi-user.target"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (optional: the structure is checked above)")
    # verify wants ExecStart's program to exist: point it at this Python.
    unit = tmp_path / "fastgate.service"
    unit.write_text(UNIT.read_text().replace("/opt/fastgate/bin/fastgate", sys.executable))
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Unknown key" not in result.stderr and "Unknown section" not in result.stderr


# ---- the container image ---------------------------------------------------------------------


def containerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Containerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_containerfile() -> None:
    steps = containerfile()
    args = {k: v for k, v in steps if k == "ARG"}
    base = dict(a.split("=", 1) for a in [args["ARG"]])["PYTHON_IMAGE"]
    assert base == "python:3.11-slim"
    froms = [v for k, v in steps if k == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]  # multi-stage
    build_end = [k for k, _ in steps].index("FROM", 2)
    assert any("gcc" in v for k, v in steps[:build_end] if k == "RUN")
    assert not any("gcc" in v for k, v in steps[build_end:] if k == "RUN")
    [user] = [v for k, v in steps if k == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0
    for k, v in steps:
        if k == "COPY" and "--from" not in v:
            for source in v.split()[:-1]:
                assert (REPO / source).exists(), source
    env = " ".join(v for k, v in steps if k == "ENV")
    config = yaml.safe_load(CONTAINER_CONFIG.read_text())
    assert "FASTGATE_CONFIG=/etc/fastgate/fastgate.yaml" in env
    assert f"COPY deploy/container/fastgate.yaml {'/etc/fastgate/fastgate.yaml'}" in [
        f"{k} {v}" for k, v in steps
    ]
    [expose] = [v for k, v in steps if k == "EXPOSE"]
    [entry] = config["entrypoints"].values()
    assert expose.split() == [str(parse_address(entry["address"])[1])]
    [health] = [v for k, v in steps if k == "HEALTHCHECK"]
    admin_port = parse_address(config["admin"]["address"])[1]
    assert f"http://127.0.0.1:{admin_port}/healthz" in health
    [entrypoint] = [v for k, v in steps if k == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["fastgate", "run"]
    [stop] = [v for k, v in steps if k == "STOPSIGNAL"]
    assert stop == "SIGTERM"


def test_container_ignore_file() -> None:
    """BuildKit reads <Containerfile>.dockerignore: no compiled objects or C files go in, so
    the build stage compiles the core for the image's own Python."""
    ignored = (DEPLOY / "container" / "Containerfile.dockerignore").read_text().split()
    for pattern in ("**/*.so", "fastgate/_core/*.c", ".git", "build", "**/__pycache__"):
        assert pattern in ignored
    for needed in ("fastgate", "pyproject.toml", "setup.py", "README.md"):
        assert needed not in ignored


def test_healthcheck_command_is_valid_python() -> None:
    [health] = [v for k, v in containerfile() if k == "HEALTHCHECK"]
    command = json.loads(health.split("CMD", 1)[1])
    assert command[:2] == ["python", "-c"]
    compile(command[2], "<healthcheck>", "exec")


# ---- real gateways ---------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTGATE_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _http(port: int, path: str, host: str = "gw.test") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host, "Connection": "close"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@contextlib.contextmanager
def running_gateway(
    command: list[str], config: dict[str, Any], directory: Path, env: dict[str, str]
) -> Iterator[int]:
    """Run `command + [config file]`, wait for /readyz, yield the admin port; then SIGTERM and
    require a clean exit (status 0, no traceback)."""
    path = directory / "fastgate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = directory / "gateway.log"
    admin_port = parse_address(config["admin"]["address"])[1]
    with log.open("wb") as err:
        proc = subprocess.Popen([*command, str(path)], stderr=err, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert proc.poll() is None, f"gateway exited:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(OSError):
                if _http(admin_port, "/readyz")[0] == 200:
                    break
            assert time.monotonic() < deadline, f"not ready:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        yield admin_port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    text = log.read_text(errors="replace")
    assert status == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
# Sets the kernel's W^X lock (what MemoryDenyWriteExecute=yes enforces with seccomp), then
# becomes `python ARGS...`; the lock is inherited by every child, across exec.
MDWE_WRAPPER = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    f"if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:\n"
    "    sys.exit(77)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
)
WX_MAP = (
    "import mmap, subprocess, sys\n"
    "code = 'import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ|mmap.PROT_WRITE|mmap.PROT_EXEC)'"
    "\nsys.exit(subprocess.run([sys.executable, '-c', code]).returncode)\n"
)


def require_mdwe() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    # PR_GET_MDWE (66) is unknown (EINVAL) before Linux 6.3.
    if libc.prctl(66, 0, 0, 0, 0) < 0:
        pytest.skip("the kernel has no PR_SET_MDWE (Linux 6.3+) to enforce W^X with")


def test_mdwe_wrapper_refuses_wx_memory_in_children() -> None:
    """The lock the next test relies on is real: a grandchild cannot map W+X memory."""
    require_mdwe()
    result = subprocess.run(
        [sys.executable, "-c", MDWE_WRAPPER, "-c", WX_MAP],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "PermissionError" in result.stderr


def test_gateway_serves_under_memory_deny_write_execute(tmp_path: Path) -> None:
    require_mdwe()
    config = yaml.safe_load((EXAMPLES / "minimal.yaml").read_text())
    port, origin = free_port(), free_port()
    config.update(
        workers=1,
        drain_timeout=2,
        entrypoints={"web": {"address": f"127.0.0.1:{port}"}},
        admin={"address": f"127.0.0.1:{free_port()}"},
        demo_origin={"enabled": True, "address": f"127.0.0.1:{origin}"},
        access_log={"enabled": False},
        services={"app": {"servers": [{"url": f"http://127.0.0.1:{origin}"}]}},
        middlewares={
            "limit": {"type": "rate_limit", "rate": "100/s"},
            "jwt": {
                "type": "jwt_auth",
                "algorithms": ["HS256"],
                "secret": "s" * 40,
                "optional": True,
            },
        },
    )
    config["routes"][0]["middlewares"] = ["limit", "jwt"]
    command = [sys.executable, "-c", MDWE_WRAPPER, "-m", "fastgate", "run", "-c"]
    with running_gateway(command, config, tmp_path, _env()) as admin_port:
        status, _, body = _http(port, "/")
        assert status == 200, body
        assert _http(port, "/?x=1")[0] == 200
        assert _http(admin_port, "/healthz")[0] == 200
        assert b"fastgate_requests_total" in _http(admin_port, "/metrics")[2]


def test_configmap_config_runs_with_redis(tmp_path: Path, redis_servers: RedisServers) -> None:
    """The Kubernetes config, on loopback ports, with a real Redis: the probes' paths answer
    on the admin port, and requests pass the Redis-backed limit to the service."""
    password = "0123456789abcdef0123456789abcdef"
    redis = redis_servers.start(password=password)
    config = configmap_config()
    port, origin = free_port(), free_port()
    config["workers"] = 1
    config["drain_timeout"] = 2
    config["entrypoints"]["web"]["address"] = f"127.0.0.1:{port}"
    config["admin"]["address"] = f"127.0.0.1:{free_port()}"  # tests bind loopback only
    config["demo_origin"] = {"enabled": True, "address": f"127.0.0.1:{origin}"}
    config["services"]["api"]["servers"] = [{"url": f"http://127.0.0.1:{origin}"}]
    config["services"]["api"]["health_check"]["interval"] = 0.2
    config["access_log"]["enabled"] = False
    [provider] = config["providers"]["redis"].values()
    provider["address"] = f"127.0.0.1:{redis.port}"
    assert provider["password"] == "${REDIS_PASSWORD}"  # read from the environment, as in k8s
    probes = container(one("deployment.yaml", "Deployment"), "fastgate")
    paths = [probes[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")]
    command = [sys.executable, "-m", "fastgate", "run", "-c"]
    env = _env(REDIS_PASSWORD=password)
    with running_gateway(command, config, tmp_path, env) as admin_port:
        for path in paths:
            status, _, body = _http(admin_port, path)
            assert status == 200, (path, body)
        deadline = time.monotonic() + 10
        while (status := _http(port, "/api/x")[0]) == 503 and time.monotonic() < deadline:
            time.sleep(0.2)  # the first health checks of the service
        assert status == 200
        for _ in range(5):
            assert _http(port, "/api/x")[0] == 200
        # The hybrid store synced this client's bucket into Redis.
        deadline = time.monotonic() + 10
        while not (keys := redis.command("KEYS", "fg:rl:*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert keys, "no rate-limit key reached Redis"
