"""deploy/ stays true to the code: example config, systemd unit, container, Kubernetes, HAProxy.

Each artifact is checked by the real tool where it is installed (`smtpbalancer
check-config`, `systemd-analyze verify` and `security`, `haproxy -c`,
kubernetes-validate's bundled OpenAPI schemas) and, always, by structural checks that
tie it to the code: every config key config.py reads appears in the example, ports,
paths, probes and grace periods agree between the manifests and the configs they
carry, and the container's HEALTHCHECK command really answers against a live instance.
Files that need secrets (certificates, users, passwords) are checked with stand-ins
written under tmp_path at the same relative paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import trustme
import yaml
from support.haproxy import CONFIG as HAPROXY_CFG
from support.haproxy import haproxy_binary
from support.proxy import config_mapping, to_toml

from smtpbalancer import config, passwords
from smtpbalancer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
EXAMPLE = DEPLOY / "smtpbalancer.example.toml"
UNIT = DEPLOY / "systemd" / "smtpbalancer.service"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
KUBE = DEPLOY / "kubernetes"
DELIVERY_FINISH_S = 10  # app.DELIVERY_FINISH_S: deliveries in flight after the drain
K8S_VERSIONS = ("1.28.0", kubernetes_validate.utils.latest_version())


# --- helpers: configs with stand-in secrets -------------------------------------------


def materialize(text: str, tmp: Path) -> Path:
    """Write `text` as a config whose secret files exist: each absolute path it names for
    a certificate, key, CA, users, token or password file is recreated under tmp."""
    raw = tomllib.loads(text)
    ca = trustme.CA()
    cert = ca.issue_cert("relay.example.com")
    writers = {
        "tls_cert": lambda p: cert.cert_chain_pems[0].write_to_path(str(p)),
        "tls_key": lambda p: cert.private_key_pem.write_to_path(str(p)),
        "tls_ca": lambda p: ca.cert_pem.write_to_path(str(p)),
        "users_file": lambda p: p.write_text(f"esp:{passwords.hash_password(b'pw')}\n"),
    }
    tables = [raw.get("server", {}), raw.get("metrics", {}), *raw.get("upstream", [])]
    for table in tables:
        for key, value in table.items():
            if not (isinstance(value, str) and value.startswith("/")):
                continue
            if key not in writers and not key.endswith("_file"):
                continue
            stand_in = tmp / value.lstrip("/")
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            writers.get(key, lambda p: p.write_text("stand-in-secret\n"))(stand_in)
            text = text.replace(f'"{value}"', f'"{stand_in}"')
    path = tmp / "config.toml"
    path.write_text(text)
    return path


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smtpbalancer", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def known_keys(monkeypatch: pytest.MonkeyPatch) -> set[tuple[str, str]]:
    """Every (section, key) config.py reads, recorded while it parses a minimal config."""
    seen: set[tuple[str, str]] = set()

    class Recording(Mapping[str, object]):
        def __init__(self, raw: Mapping[str, object], section: str) -> None:
            self._raw, self._section = raw, section

        def __getitem__(self, key: str) -> object:
            seen.add((self._section, key))
            return self._raw[key]

        def get(self, key: str, default: object = None) -> object:
            seen.add((self._section, key))
            return self._raw.get(key, default)

        def __iter__(self) -> Iterator[str]:
            return iter(self._raw)

        def __len__(self) -> int:
            return len(self._raw)

    original = config._Keys.__init__

    def recording_init(self: Any, raw: object, where: str, problems: list[str]) -> None:
        original(self, raw, where, problems)
        self._raw = Recording(self._raw, where.split("[", 1)[0].split(".", 1)[0])

    monkeypatch.setattr(config._Keys, "__init__", recording_init)
    minimal = {"upstream": [{"name": "a", "address": "127.0.0.1:25", "username": "u"}]}
    route = {"pool": "default", "header": {"name": "X", "value": "v"}, "keep_header": True}
    for extra in (
        {},
        {"server": {"proxy_protocol": True}},
        {"route": [{**route, "user": "u", "sender": "s", "recipient_domain": "d"}]},
        {"pool": {"default": {"spill": "other"}}},
    ):
        with contextlib.suppress(ConfigError):  # missing secrets: only the reads matter
            config.from_mapping({**minimal, **extra})
    monkeypatch.undo()
    assert {s for s, _ in seen} == set(config._SECTIONS), "a section is not read through _Keys"
    return seen


def documented_keys(text: str) -> set[tuple[str, str]]:
    """(section, key) for `key = …` lines, commented out or not, and `key` in backquotes."""
    found: set[tuple[str, str]] = set()
    section = ""
    for line in text.splitlines():
        header = re.match(r"^#?\s*\[\[?([a-z_]+)(\.[A-Za-z0-9_-]+)?\]\]?\s*(#.*)?$", line)
        if header:
            section = header.group(1)
            continue
        assignment = re.match(r"^\s*#?\s*([a-z_]+)\s*=", line)
        if assignment and section:
            found.add((section, assignment.group(1)))
        if section:
            found.update((section, k) for k in re.findall(r"`([a-z_]+)`", line))
    return found


# --- the example config ---------------------------------------------------------------


def test_example_config_passes_check_config(tmp_path: Path) -> None:
    result = check_config(materialize(EXAMPLE.read_text(), tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: "), result.stdout


def test_example_config_lists_every_key_config_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = known_keys(monkeypatch) - documented_keys(EXAMPLE.read_text())
    assert not missing, f"add these keys to {EXAMPLE.name} (commented if optional): {missing}"


def test_example_config_has_safe_defaults() -> None:
    cfg = tomllib.loads(EXAMPLE.read_text())
    server = cfg["server"]
    assert server["tls_cert"] and server["tls_key"] and server["users_file"]
    assert all(net.startswith(("127.", "::1")) for net in server["allow_networks"])
    assert cfg["metrics"]["listen"].startswith("127.0.0.1:")
    for up in cfg["upstream"]:
        assert "password" not in up
        if "username" in up:
            assert up["tls"] in ("starttls", "implicit")


def test_key_inventory_would_catch_a_missing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    text = EXAMPLE.read_text().replace("greet_pause", "greet_paws")
    assert ("server", "greet_pause") in known_keys(monkeypatch) - documented_keys(text)


# --- systemd ----------------------------------------------------------------------------


def unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
        else:
            key, _, value = line.partition("=")
            sections[current].append((key.strip(), value.strip()))
    return sections


def seconds(value: str) -> float:
    return config.parse_duration(value.replace("min", "m"))


def test_systemd_unit_structure() -> None:
    service = dict(unit_entries(UNIT.read_text())["Service"])
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecReload"].endswith("kill -HUP $MAINPID")
    assert service["Restart"] == "on-failure"
    assert service["User"] not in ("", "root", "0")
    assert " serve --config " in service["ExecStart"]
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert service[key] == value, key
    cfg = tomllib.loads(EXAMPLE.read_text())
    spool = Path(cfg["spool"]["directory"])
    assert spool.is_relative_to(Path("/var/lib") / service["StateDirectory"])
    drain = config.parse_duration(cfg["server"]["drain_timeout"])
    assert seconds(service["TimeoutStopSec"]) >= drain + DELIVERY_FINISH_S + 5


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's smtpbalancer (verify checks it runs)."""
    here = Path(sys.executable).parent / "smtpbalancer"
    text = UNIT.read_text().replace("/opt/smtpbalancer/bin/smtpbalancer", str(here))
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    unit = unit_for_this_machine(tmp_path)
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 even for unknown keys: any line about our file is a failure.
    complaints = [line for line in verify.stderr.splitlines() if unit.name in line]
    assert verify.returncode == 0 and not complaints, verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "offline" in security.stderr and "unrecognized" in security.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    assert security.returncode == 0, security.stdout[-2000:]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verify_catches_a_typo(tmp_path: Path) -> None:
    unit = unit_for_this_machine(tmp_path)
    unit.write_text(unit.read_text().replace("ProtectSystem=", "ProtectSystm="))
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert "ProtectSystm" in verify.stderr


# --- container ----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def test_dockerfile_structure() -> None:
    instructions = dockerfile_instructions()
    assert all(
        re.match(r"python:\S+-slim\b", rest) for word, rest in instructions if word == "FROM"
    )
    stage = dict(final_stage())
    user = stage["USER"].split(":")[0]
    assert user not in ("root", "0")
    uid_arg = next(rest for word, rest in final_stage() if word == "ARG")
    if user.startswith("${"):
        assert uid_arg.split("=")[1] != "0"
    spool = tomllib.loads(EXAMPLE.read_text())["spool"]["directory"]
    assert json.loads(stage["VOLUME"]) == [spool]
    assert stage["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(stage["ENTRYPOINT"]) == ["smtpbalancer"]
    assert json.loads(stage["CMD"])[0] == "serve"
    assert "/healthz" in stage["HEALTHCHECK"] and ":9465/" in stage["HEALTHCHECK"]
    ignore = DOCKERFILE.with_name("Dockerfile.dockerignore").read_text().splitlines()
    let_through = {line.removeprefix("!").rstrip("/") for line in ignore if line.startswith("!")}
    for word, rest in instructions:
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _ = rest.split()
            assert all((ROOT / s).exists() for s in sources), rest
            assert {s.rstrip("/") for s in sources} <= let_through, rest


def healthcheck_command() -> list[str]:
    rest = dict(final_stage())["HEALTHCHECK"]
    return list(json.loads(rest.split(" CMD ", 1)[1]))


async def test_dockerfile_healthcheck_answers_against_a_live_instance(
    tmp_path: Path, sinks, proxies
) -> None:
    relay = await sinks("relay")
    raw = config_mapping(tmp_path / "spool", [("relay", relay.address, 1)])
    raw["metrics"] = {"listen": "127.0.0.1:0"}
    path = tmp_path / "proxy.toml"
    path.write_text(to_toml(raw))
    proxy = await proxies(path)
    found = re.search(r"metrics=127\.0\.0\.1:(\d+)", proxy.log())
    assert found, proxy.log()
    argv = healthcheck_command()
    assert argv[0] == "/opt/smtpbalancer/bin/python"
    argv[0] = sys.executable
    live = [arg.replace(":9465/", f":{found.group(1)}/") for arg in argv]

    async def healthcheck() -> tuple[int, bytes]:
        proc = await asyncio.create_subprocess_exec(*live, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        return proc.returncode or 0, err

    code, err = await healthcheck()
    assert code == 0, err
    await proxy.kill()
    code, _ = await healthcheck()
    assert code != 0


def test_compose_demo_structure(tmp_path: Path) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    proxy = services["smtpbalancer"]
    sink_names = [n for n, s in services.items() if s["command"][0] == "sink"]
    assert len(sink_names) >= 2
    context = (COMPOSE.parent / proxy["build"]["context"]).resolve()
    assert (context / "pyproject.toml").exists()
    assert (context / proxy["build"]["dockerfile"]).resolve() == DOCKERFILE
    mounted = {v.split(":")[1]: v.split(":")[0] for v in proxy["volumes"]}
    config_path = proxy["command"][proxy["command"].index("--config") + 1]
    demo = COMPOSE.parent / mounted[config_path]
    cfg = tomllib.loads(demo.read_text())
    assert mounted[cfg["spool"]["directory"]] in compose["volumes"]
    listeners = {n: services[n]["command"][2].rsplit(":", 1)[1] for n in sink_names}
    assert {u["address"] for u in cfg["upstream"]} == {f"{n}:{p}" for n, p in listeners.items()}
    listen_port = cfg["server"]["listen"].rsplit(":", 1)[1]
    assert any(p.endswith(f":{listen_port}") for p in proxy["ports"])
    drain = config.parse_duration(cfg["server"]["drain_timeout"])
    assert config.parse_duration(proxy["stop_grace_period"]) >= drain + DELIVERY_FINISH_S
    result = check_config(materialize(demo.read_text(), tmp_path))
    assert result.returncode == 0, result.stderr


def test_compose_config_with_docker_if_available() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# --- Kubernetes ---------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    """kind/name -> document, from every manifest kustomization.yaml lists."""
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, "kustomization.yaml must list every manifest"
    docs: dict[str, dict[str, Any]] = {}
    for name in sorted(listed):
        for doc in yaml.safe_load_all((KUBE / name).read_text()):
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def kube_defs(version: str) -> referencing.Resource[Any]:
    path = f"kubernetes-json-schema/v{version}-local-strict/_definitions.json"
    return referencing.Resource.from_contents(
        kubernetes_validate.utils.schema_contents(path, version)
    )


_META = "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1."
_DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
# The part of prometheus-operator's ServiceMonitor CRD (monitoring.coreos.com/v1) that this
# file uses, closed to other fields; metadata and selector use Kubernetes' own schemas.
SERVICE_MONITOR_SCHEMA = {
    "$id": "https://kubernetes.io/api/servicemonitor.json",  # where the /api/… refs resolve
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"$ref": _META + "ObjectMeta"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"$ref": _META + "LabelSelector"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


def validate(doc: dict[str, Any], version: str) -> None:
    if doc["kind"] == "ServiceMonitor":
        registry: referencing.Registry[Any] = kube_defs(version) @ referencing.Registry()
        jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA, registry=registry).validate(doc)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate(version: str) -> None:
    for key, doc in manifests().items():
        try:
            validate(doc, version)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            pytest.fail(f"{key} (Kubernetes {version}): {exc}")


@pytest.mark.parametrize(
    ("key", "path"),
    [
        ("StatefulSet/smtpbalancer", ("spec", "template", "spec", "containers", 0, "probe")),
        ("Service/smtpbalancer", ("spec", "externalTraficPolicy")),
        ("ServiceMonitor/smtpbalancer", ("spec", "endpoints", 0, "intervall")),
    ],
)
def test_kubernetes_validation_rejects_a_misspelt_field(key: str, path: tuple[Any, ...]) -> None:
    doc = copy.deepcopy(manifests()[key])
    node: Any = doc
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = "x"
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(doc, K8S_VERSIONS[-1])


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_kubernetes_manifests_agree_with_each_other_and_the_config(tmp_path: Path) -> None:
    docs = manifests()
    sts = docs["StatefulSet/smtpbalancer"]
    pod = sts["spec"]["template"]
    container = pod["spec"]["containers"][0]
    labels = pod["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert selects(sts["spec"]["selector"]["matchLabels"], labels)

    # The config: in the ConfigMap, mounted where the args point, valid, and consistent.
    config_arg = Path(container["args"][container["args"].index("--config") + 1])
    configmap = volumes[mounts[str(config_arg.parent)]]["configMap"]["name"]
    text = docs[f"ConfigMap/{configmap}"]["data"][config_arg.name]
    result = check_config(materialize(text, tmp_path))
    assert result.returncode == 0, result.stderr
    cfg = tomllib.loads(text)
    assert int(cfg["server"]["listen"].rsplit(":", 1)[1]) == ports["smtp"]
    assert int(cfg["metrics"]["listen"].rsplit(":", 1)[1]) == ports["admin"]
    assert cfg["server"]["proxy_protocol"] is True and cfg["server"]["trusted_proxies"]

    # Every file the config names comes from a mounted Secret that has that key.
    named = [
        cfg["server"]["tls_cert"],
        cfg["server"]["tls_key"],
        cfg["server"]["users_file"],
        cfg["metrics"]["admin_token_file"],
        *(u["password_file"] for u in cfg["upstream"] if "password_file" in u),
    ]
    for file in map(Path, named):
        secret = volumes[mounts[str(file.parent)]]["secret"]["secretName"]
        assert file.name in docs[f"Secret/{secret}"]["stringData"], file
    assert docs[f"Secret/{volumes[mounts['/etc/smtpbalancer/tls']]['secret']['secretName']}"][
        "type"
    ] == ("kubernetes.io/tls")

    # The spool is the pod's own claim, never a shared volume.
    spool_volume = mounts[cfg["spool"]["directory"]]
    assert spool_volume not in volumes
    claims = sts["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == [spool_volume]
    assert claims[0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"

    # Probes, drain and the grace period.
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    sleep_s = float(re.search(r"sleep (\d+)", pre_stop).group(1))  # type: ignore[union-attr]
    drain = config.parse_duration(cfg["server"]["drain_timeout"])
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace >= sleep_s + drain + DELIVERY_FINISH_S + 10, (grace, sleep_s, drain)
    security = container["securityContext"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # The image's user and volume are the ones the pod runs with and mounts.
    image_uid = next(r for w, r in final_stage() if w == "ARG" and r.startswith("UID="))
    assert pod["spec"]["securityContext"]["runAsUser"] == int(image_uid.split("=")[1])
    assert json.loads(dict(final_stage())["VOLUME"]) == [cfg["spool"]["directory"]]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False

    # Services: the balancer one keeps client addresses; the headless one is the
    # StatefulSet's and the only one the ServiceMonitor scrapes.
    front = docs["Service/smtpbalancer"]
    assert front["spec"]["externalTrafficPolicy"] == "Local"
    assert selects(front["spec"]["selector"], labels)
    assert all(p["targetPort"] in ports for p in front["spec"]["ports"])
    headless = docs[f"Service/{sts['spec']['serviceName']}"]
    assert headless["spec"]["clusterIP"] == "None"
    assert selects(headless["spec"]["selector"], labels)
    monitor = docs["ServiceMonitor/smtpbalancer"]["spec"]
    services = [d for d in docs.values() if d["kind"] == "Service"]
    scraped = [
        s for s in services if selects(monitor["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert scraped == [headless]
    service_ports = {p["name"]: p["targetPort"] for p in headless["spec"]["ports"]}
    for endpoint in monitor["endpoints"]:
        assert service_ports[endpoint["port"]] == "admin"
        assert endpoint["path"] == "/metrics"

    pdb = docs["PodDisruptionBudget/smtpbalancer"]["spec"]
    assert selects(pdb["selector"]["matchLabels"], labels)
    assert pdb["maxUnavailable"] == 1


# --- HAProxy ------------------------------------------------------------------------------


def test_haproxy_config_structure() -> None:
    text = HAPROXY_CFG.read_text()
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    assert "mode tcp" in lines
    assert any(line.startswith("option smtpchk") for line in lines)
    default_server = next(line for line in lines if line.startswith("default-server"))
    assert {"send-proxy-v2", "check", "maxconn"} <= set(default_server.split())
    servers = [line for line in lines if line.startswith("server ")]
    assert [s.split()[2] for s in servers] == ['"${SMTPB_INSTANCE_1}"', '"${SMTPB_INSTANCE_2}"']
    assert any(line.startswith("maxconn") for line in lines)


@pytest.mark.skipif(haproxy_binary() is None, reason="haproxy is not installed")
def test_haproxy_config_is_valid_for_haproxy(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "SMTPB_INSTANCE_1": "127.0.0.1:2601",
        "SMTPB_INSTANCE_2": "127.0.0.1:2602",
        "SMTPB_SOURCE": "127.0.0.9",
        "SMTPB_RUNTIME_SOCKET": str(tmp_path / "haproxy.sock"),
    }
    binary = haproxy_binary()
    assert binary is not None
    result = subprocess.run(
        [binary, "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    del env["SMTPB_INSTANCE_2"]  # a required address that is missing is an error
    result = subprocess.run(
        [binary, "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
