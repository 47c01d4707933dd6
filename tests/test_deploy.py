"""Static checks of the deployment files in deploy/.

No container engine or cluster is needed: every file is parsed and its invariants checked
(one replica, probe paths and ports, volume vs HEADROOM_DB, torch pin, non-root user, ...).
"""

from __future__ import annotations

import configparser
import functools
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from headroom.proxy.keys import default_key_db
from headroom.proxy.keys_postgres import KEY_MIGRATIONS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
UNIT = DEPLOY / "headroom.service"
README = DEPLOY / "README.md"

TORCH_PIN = "2.13.0"


# ------------------------------------------------------------------ helpers --


def _load_all(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


@functools.cache
def _k8s_docs() -> tuple[dict[str, Any], ...]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(_load_all(path))
    return tuple(docs)


def _one(kind: str) -> dict[str, Any]:
    found = [d for d in _k8s_docs() if d.get("kind") == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def _container() -> dict[str, Any]:
    containers = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _container_port(port: int | str) -> int:
    """Resolve a probe/targetPort (number or port name) to the container's port number."""
    ports = _container()["ports"]
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in ports], f"{port} is not a container port"
        return port
    by_name = {p.get("name"): p["containerPort"] for p in ports}
    assert port in by_name, f"port name {port!r} not declared by the container"
    return by_name[port]


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment inside a continuation
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            instr, _, args = buf.strip().partition(" ")
            out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "dangling line continuation at end of Dockerfile"
    return out


def _dockerfile() -> list[tuple[str, str]]:
    return _dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser


def _unit_env() -> dict[str, str]:
    """Environment= assignments of the unit (every line, later ones win like systemd)."""
    env: dict[str, str] = {}
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        if raw.startswith("Environment="):
            for item in shlex.split(raw.partition("=")[2]):
                key, _, value = item.partition("=")
                env[key] = value
    return env


# -------------------------------------------------------------- every YAML --


ALL_YAML = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))


def test_yaml_files_found() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in ALL_YAML}
    assert {"compose.yaml", "k8s/kustomization.yaml", "k8s/deployment.yaml"} <= names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path: Path) -> None:
    docs = _load_all(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs)


# --------------------------------------------------------------- kubernetes --


def test_k8s_kinds() -> None:
    kinds = sorted(d["kind"] for d in _k8s_docs())
    assert kinds == ["Deployment", "PersistentVolumeClaim", "Secret", "Service"]
    for doc in _k8s_docs():
        assert "namespace" not in doc["metadata"], "manifests must stay namespace-less"
        assert doc.get("apiVersion")


def test_k8s_single_replica_recreate() -> None:
    spec = _one("Deployment")["spec"]
    assert spec["replicas"] == 1, "SQLite file storage allows exactly one replica"
    assert spec["strategy"]["type"] == "Recreate", "RollingUpdate would run two writers"


def test_k8s_selector_matches_pod_labels() -> None:
    dep = _one("Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    for key, value in dep["spec"]["selector"]["matchLabels"].items():
        assert pod_labels.get(key) == value
    for key, value in _one("Service")["spec"]["selector"].items():
        assert pod_labels.get(key) == value


def test_k8s_probes() -> None:
    c = _container()
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/healthz"
    # torch import + model load takes 10+ s: give the startup probe at least a minute.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_k8s_ports_agree() -> None:
    c = _container()
    env_port = int(_env(c)["HEADROOM_PORT"])
    svc_ports = _one("Service")["spec"]["ports"]
    assert len(svc_ports) == 1
    target = _container_port(svc_ports[0]["targetPort"])
    assert svc_ports[0]["port"] == 8787
    assert _one("Service")["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert target == env_port == 8787
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert _container_port(c[probe]["httpGet"]["port"]) == target, probe


def test_k8s_no_service_link_env_collision() -> None:
    # A Service named "headroom" would inject HEADROOM_PORT=tcp://... into the pod.
    pod = _one("Deployment")["spec"]["template"]["spec"]
    assert pod.get("enableServiceLinks") is False
    assert "HEADROOM_PORT" in _env(_container())


def test_k8s_pvc_mounted_where_db_lives() -> None:
    pvc = _one("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"]

    pod = _one("Deployment")["spec"]["template"]["spec"]
    vols = [
        v["name"]
        for v in pod["volumes"]
        if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
    ]
    assert len(vols) == 1, "the PVC must be used by exactly one pod volume"
    mounts = [m["mountPath"] for m in _container()["volumeMounts"] if m["name"] == vols[0]]
    assert len(mounts) == 1

    db = PurePosixPath(_env(_container())["HEADROOM_DB"])
    assert db.is_absolute()
    assert db.parent == PurePosixPath(mounts[0]), "HEADROOM_DB must live on the PVC"


def test_k8s_security_and_shutdown() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 30
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 10001
    csc = _container()["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False
    if csc.get("readOnlyRootFilesystem"):
        mounts = {m["mountPath"] for m in _container()["volumeMounts"]}
        assert "/tmp" in mounts, "read-only root needs a writable /tmp"


def test_k8s_resources() -> None:
    res = _container()["resources"]
    assert res["limits"]["memory"] == "1Gi"
    assert res["requests"]["memory"]
    assert res["requests"]["cpu"]


def test_k8s_secret_matches_reference() -> None:
    secret = _one("Secret")
    refs = [
        e["valueFrom"]["secretKeyRef"]
        for e in _container()["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    ]
    assert refs, "the upstream key should come from the Secret"
    for ref in refs:
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    # Only a placeholder may be committed.
    assert not any(
        str(v).startswith("sk-") and len(str(v)) > 10 for v in secret["stringData"].values()
    )


def test_kustomization_resources_exist() -> None:
    (kust,) = _load_all(K8S / "kustomization.yaml")
    assert kust["kind"] == "Kustomization"
    resources = kust["resources"]
    assert resources
    for res in resources:
        assert (K8S / res).is_file(), f"kustomization lists missing file {res}"
    listed = {(K8S / r).resolve() for r in resources}
    manifests = {p.resolve() for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert manifests <= listed, "a manifest is not listed in kustomization.yaml"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(out.stdout) if d)
    assert kinds == ["Deployment", "PersistentVolumeClaim", "Secret", "Service"]


# ------------------------------------------------------------------ compose --


def _compose_service() -> dict[str, Any]:
    (compose,) = _load_all(COMPOSE)
    services = compose["services"]
    assert list(services) == ["headroom"]
    return services["headroom"]


def test_compose_volume_is_declared_and_holds_db() -> None:
    (compose,) = _load_all(COMPOSE)
    svc = _compose_service()
    declared = compose.get("volumes") or {}
    mounts = {}
    for vol in svc["volumes"]:
        source, target = vol.split(":")[:2]
        mounts[target] = source
    assert mounts.get("/data") == "headroom-data"
    assert "headroom-data" in declared
    for source in mounts.values():
        assert source in declared, f"volume {source!r} is not a declared named volume"
    db = PurePosixPath(svc["environment"]["HEADROOM_DB"])
    assert str(db.parent) in mounts


def test_compose_healthcheck_and_lifecycle() -> None:
    svc = _compose_service()
    test = svc["healthcheck"]["test"]
    joined = " ".join(test) if isinstance(test, list) else test
    assert "/healthz" in joined
    assert svc["restart"] == "unless-stopped"
    assert svc["stop_grace_period"] == "30s"
    assert any(str(p).endswith(":8787:8787") or str(p) == "8787:8787" for p in svc["ports"])
    assert "HEADROOM_UPSTREAM_KEY" in svc["environment"]
    assert "replicas" not in svc.get("deploy", {}) or svc["deploy"]["replicas"] == 1


def test_compose_build_dockerfile_exists() -> None:
    build = _compose_service()["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT, "build context must be the repo root"
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
    assert DOCKERFILE.is_file()


# --------------------------------------------------------------- Dockerfile --


def test_dockerfile_from_and_user() -> None:
    instrs = _dockerfile()
    froms = [a for i, a in instrs if i == "FROM"]
    assert froms, "no FROM"
    assert all(a.split()[0].startswith("python:3.11-slim") for a in froms)
    # The USER in force in the final stage must not be root.
    last_from = max(n for n, (i, _) in enumerate(instrs) if i == "FROM")
    users = [a for i, a in instrs[last_from:] if i == "USER"]
    assert users, "final stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user == "10001"


def test_dockerfile_torch_pinned_before_install() -> None:
    runs = [(n, a) for n, (i, a) in enumerate(_dockerfile()) if i == "RUN"]
    torch_runs = [(n, a) for n, a in runs if re.search(r"\btorch\b", a)]
    assert torch_runs, "torch is not installed explicitly"
    for _, args in torch_runs:
        assert re.search(rf"\btorch=={re.escape(TORCH_PIN)}(\s|$)", args), args
        assert "download.pytorch.org/whl/cpu" in args, "torch must come from the CPU index"
    pkg_runs = [n for n, a in runs if "pip install" in a and not re.search(r"\btorch\b", a)]
    assert pkg_runs, "the package itself is never pip-installed"
    assert max(n for n, _ in torch_runs) < min(pkg_runs), "torch must be installed first"


def test_dockerfile_torch_pin_is_allowed_by_pyproject() -> None:
    """The library asks for a lower bound only; the image (like the README) installs the CPU pin."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "dependencies"
    ]
    (torch,) = [d for d in deps if re.match(r"torch\b", d)]
    match = re.fullmatch(r"torch\s*>=\s*([\d.]+)", torch)
    assert match, f"torch must be a lower bound, not {torch!r}"
    floor = tuple(int(x) for x in match.group(1).split("."))
    assert tuple(int(x) for x in TORCH_PIN.split(".")) >= floor


def test_dockerfile_runtime_settings() -> None:
    instrs = _dockerfile()
    healthchecks = [a for i, a in instrs if i == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/healthz" in healthchecks[0]
    assert "curl" not in healthchecks[0] and "wget" not in healthchecks[0]
    assert any(i == "EXPOSE" and "8787" in a.split() for i, a in instrs)
    env: dict[str, str] = {}
    for i, a in instrs:
        if i == "ENV":
            for item in shlex.split(a):
                key, _, value = item.partition("=")
                env[key] = value
    assert env["HEADROOM_DB"] == "/data/memory.db"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert any(i == "VOLUME" and "/data" in a for i, a in instrs)
    (cmd,) = [a for i, a in instrs if i == "CMD"]
    argv = json.loads(cmd)  # exec form, so python is PID 1 and receives SIGTERM
    assert argv[:2] == ["headroom", "serve"]
    assert "0.0.0.0" in argv


def test_dockerfile_copy_sources_exist() -> None:
    copies = [a for i, a in _dockerfile() if i in {"COPY", "ADD"}]
    assert copies
    for args in copies:
        tokens = shlex.split(args)
        if any(t.startswith("--from") for t in tokens):
            continue  # copies from another stage, not from the context
        tokens = [t for t in tokens if not t.startswith("--")]
        *sources, _dest = tokens
        assert sources
        for src in sources:
            assert (ROOT / src).exists(), f"COPY source {src!r} missing from the repo root"


# ------------------------------------------------------------------ systemd --


def test_systemd_unit() -> None:
    unit = _unit()
    svc = unit["Service"]
    exec_start = shlex.split(svc["ExecStart"])
    assert Path(exec_start[0]).name == "headroom" and exec_start[1] == "serve"
    assert svc["Type"] == "simple"
    assert svc["KillSignal"] == "SIGTERM"
    assert int(svc["TimeoutStopSec"]) >= 30
    assert svc["Restart"] == "on-failure"
    assert svc["User"] not in {"root", "0"}
    assert svc["EnvironmentFile"] == "-/etc/headroom/headroom.env"
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["ProtectSystem"] == "strict"
    assert svc["StateDirectory"] == "headroom"
    assert "Install" in unit and unit["Install"]["WantedBy"]


def test_systemd_db_is_writable() -> None:
    env = _unit_env()
    db = PurePosixPath(env["HEADROOM_DB"])
    state = PurePosixPath("/var/lib") / _unit()["Service"]["StateDirectory"]
    assert db == state / "memory.db"
    writable = [PurePosixPath(p) for p in _unit()["Service"]["ReadWritePaths"].split()]
    assert any(db.is_relative_to(p) for p in writable)


def test_systemd_env_example_keys() -> None:
    example = (DEPLOY / "headroom.env.example").read_text(encoding="utf-8")
    keys = set(re.findall(r"^#?(HEADROOM_[A-Z_]+)=", example, flags=re.MULTILINE))
    assert {
        "HEADROOM_HOST",
        "HEADROOM_PORT",
        "HEADROOM_UPSTREAM",
        "HEADROOM_UPSTREAM_KEY",
        "HEADROOM_DB",
        "HEADROOM_EMBEDDER",
    } <= keys
    db_lines = re.findall(r"^HEADROOM_DB=(.+)$", example, flags=re.MULTILINE)
    assert db_lines == [_unit_env()["HEADROOM_DB"]]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart's binary exists: point it at one that does.
    text = re.sub(
        r"^ExecStart=\S+",
        "ExecStart=/bin/true",
        UNIT.read_text(encoding="utf-8"),
        flags=re.MULTILINE,
    )
    unit = tmp_path / "headroom.service"
    unit.write_text(text, encoding="utf-8")
    out = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [ln for ln in (out.stderr + out.stdout).splitlines() if str(unit) in ln]
    assert out.returncode == 0 and not problems, out.stderr


# ------------------------------------------------------------------- README --


def test_readme_paths_exist() -> None:
    text = README.read_text(encoding="utf-8")
    paths = set(re.findall(r"(?<![\w./-])deploy/[\w./-]*[\w/-]", text))
    assert len(paths) >= 5
    missing = sorted(p for p in paths if not (ROOT / p.rstrip("/")).exists())
    assert not missing, f"README mentions missing paths: {missing}"


def test_readme_covers_essentials() -> None:
    text = README.read_text(encoding="utf-8")
    for needle in (
        "OPENAI_BASE_URL",
        "X-Headroom-User-Id",
        ".dockerignore",
        "VACUUM INTO",
        ".backup",
        "-wal",
        "Postgres",
        "replicas: 1",
    ):
        assert needle in text, needle


# ------------------------------------------------- PostgreSQL + 3 replicas --

COMPOSE_PG = DEPLOY / "compose.postgres.yaml"
K8S_PG = DEPLOY / "k8s-postgres"
MAIN_README = ROOT / "README.md"
PG_SCHEMA = ROOT / "memory" / "adapters" / "postgres" / "schema.py"

# A value compose takes from the shell or an --env-file: ${VAR}, ${VAR:-x}, ${VAR:?message}.
_INTERPOLATED = re.compile(r"\$\{[A-Z_][A-Z0-9_]*(?::?[-?][^}]*)?\}")
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY$")


def _compose_pg() -> dict[str, Any]:
    (compose,) = _load_all(COMPOSE_PG)
    return compose


def _pg_services() -> dict[str, dict[str, Any]]:
    return _compose_pg()["services"]


def _proxy_services() -> dict[str, dict[str, Any]]:
    """The headroom replicas' services: those built from the repo's Dockerfile."""
    return {n: s for n, s in _pg_services().items() if "build" in s}


def _replica_count(svc: dict[str, Any]) -> int:
    return int(svc.get("deploy", {}).get("replicas", 1))


def _named_mounts(svc: dict[str, Any]) -> dict[str, str]:
    """target -> source of a service's short-syntax volumes."""
    mounts: dict[str, str] = {}
    for vol in svc.get("volumes", []):
        source, target = vol.split(":")[:2]
        mounts[target] = source
    return mounts


def test_compose_pg_three_replicas_on_postgres() -> None:
    proxies = _proxy_services()
    assert sum(_replica_count(s) for s in proxies.values()) == 3
    for svc in proxies.values():
        url = svc["environment"]["HEADROOM_DB"]
        assert url.startswith("postgresql://")
        parts = urlsplit(url)
        assert parts.hostname in _pg_services(), "HEADROOM_DB must name the compose database"
        assert parts.password is None, "the password goes in PGPASSWORD, not the URL"
        assert svc["depends_on"][parts.hostname]["condition"] == "service_healthy"
        assert "ports" not in svc, "replicas are reached only through the balancer"


def test_compose_pg_database_service() -> None:
    (name,) = [n for n, s in _pg_services().items() if str(s.get("image", "")).startswith("pg")]
    db = _pg_services()[name]
    assert db["image"] == "pgvector/pgvector:pg16"
    test = db["healthcheck"]["test"]
    assert "pg_isready" in (" ".join(test) if isinstance(test, list) else test)
    data = _named_mounts(db).get("/var/lib/postgresql/data")
    assert data in (_compose_pg().get("volumes") or {}), "the data must be on a named volume"
    assert "ports" not in db, "the database is not published"
    # Sized by the operator (the image's 128 MB default is far below a 1M-memory store's need).
    assert any(re.search(r"shared_buffers=\$\{POSTGRES_SHARED_BUFFERS:-\w+\}", arg)
               for arg in db["command"])
    # The replicas log in as the user the image creates, on the database it creates.
    url = urlsplit(next(iter(_proxy_services().values()))["environment"]["HEADROOM_DB"])
    assert url.username == db["environment"]["POSTGRES_USER"]
    assert url.path.lstrip("/") == db["environment"]["POSTGRES_DB"]


def test_compose_pg_no_literal_secrets() -> None:
    for name, svc in _pg_services().items():
        for key, value in (svc.get("environment") or {}).items():
            if _SECRET_NAME.search(key):
                assert value in (None, "") or _INTERPOLATED.fullmatch(str(value)), (
                    f"{name}.{key} holds a literal secret"
                )
    db_env = _pg_services()["postgres"]["environment"]
    # Without a password compose must refuse to start, not run with an empty one.
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:\?[^}]+\}", db_env["POSTGRES_PASSWORD"])
    for svc in _proxy_services().values():
        assert svc["environment"]["PGPASSWORD"] == db_env["POSTGRES_PASSWORD"]
    example = (DEPLOY / "postgres.env.example").read_text(encoding="utf-8")
    assert re.findall(r"^POSTGRES_PASSWORD=(.*)$", example, flags=re.MULTILINE) == [""]


def test_compose_pg_keys_live_in_the_database_not_on_a_shared_volume() -> None:
    """Every replica's key store is the one database: no key file, no volume to share."""
    for svc in _proxy_services().values():
        env = svc["environment"]
        key_db = env.get("HEADROOM_KEY_DB") or default_key_db(env["HEADROOM_DB"])
        assert key_db == env["HEADROOM_DB"], "the keys must be in the replicas' database"
        assert not svc.get("volumes"), "a stateless replica mounts no volume"
    assert set(_compose_pg().get("volumes") or {}) == {"postgres-data"}
    assert "future work" not in COMPOSE_PG.read_text(encoding="utf-8")


def test_compose_pg_one_port_through_the_balancer() -> None:
    published = {n: s["ports"] for n, s in _pg_services().items() if s.get("ports")}
    assert len(published) == 1
    ((lb_name, ports),) = published.items()
    assert len(ports) == 1 and str(ports[0]).endswith(":8787:8787")
    lb = _pg_services()[lb_name]
    conf_mounts = [v for v in lb["volumes"] if v.split(":")[1].startswith("/etc/nginx/")]
    assert len(conf_mounts) == 1
    conf_path = (COMPOSE_PG.parent / conf_mounts[0].split(":")[0]).resolve()
    assert conf_path.is_file()
    conf = conf_path.read_text(encoding="utf-8")
    assert re.search(r"^\s*listen 8787;", conf, flags=re.MULTILINE)
    servers = re.findall(r"^\s*server (\S+):(\d+)\b", conf, flags=re.MULTILINE)
    assert servers
    for host, port in servers:
        assert host in _proxy_services(), f"nginx balances to unknown service {host!r}"
        assert port == _proxy_services()[host]["environment"]["HEADROOM_PORT"]
    (upstream,) = re.findall(r"^\s*upstream (\w+)", conf, flags=re.MULTILINE)
    assert f"proxy_pass http://{upstream};" in conf
    # Streaming answers must not be held back by the balancer.
    assert "proxy_buffering off;" in conf
    # A POST that reached one replica must never be replayed on another.
    assert "non_idempotent" not in re.sub(r"#.*", "", conf)


def test_compose_pg_replica_lifecycle() -> None:
    for svc in _proxy_services().values():
        build = svc["build"]
        assert (COMPOSE_PG.parent / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
        test = " ".join(svc["healthcheck"]["test"])
        assert "/readyz" in test or "/healthz" in test
        assert svc["stop_grace_period"] == "30s"
        assert svc["read_only"] is True and "/tmp" in svc["tmpfs"]


def _k8s_pg_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S_PG.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs.extend(_load_all(path))
    return docs


def _k8s_pg(kind: str) -> list[dict[str, Any]]:
    return [d for d in _k8s_pg_docs() if d["kind"] == kind]


def _k8s_pg_container() -> dict[str, Any]:
    (dep,) = _k8s_pg("Deployment")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return container


def test_k8s_pg_kinds_and_kustomization() -> None:
    kinds = sorted(d["kind"] for d in _k8s_pg_docs())
    assert kinds == ["Deployment", "PodDisruptionBudget", "Secret", "Secret", "Service"]
    for doc in _k8s_pg_docs():
        assert "namespace" not in doc["metadata"]
    (kust,) = _load_all(K8S_PG / "kustomization.yaml")
    listed = {(K8S_PG / r).resolve() for r in kust["resources"]}
    assert all(p.is_file() for p in listed)
    assert {p.resolve() for p in K8S_PG.glob("*.yaml") if p.name != "kustomization.yaml"} == listed


def test_k8s_pg_three_replicas_rolling() -> None:
    (dep,) = _k8s_pg("Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod_labels = spec["template"]["metadata"]["labels"]
    (svc,) = _k8s_pg("Service")
    (pdb,) = _k8s_pg("PodDisruptionBudget")
    for selector in (spec["selector"]["matchLabels"], svc["spec"]["selector"],
                     pdb["spec"]["selector"]["matchLabels"]):
        assert all(pod_labels.get(k) == v for k, v in selector.items())
    assert 0 < pdb["spec"]["minAvailable"] < spec["replicas"]
    assert spec["template"]["spec"]["enableServiceLinks"] is False


def test_k8s_pg_db_url_from_secret() -> None:
    env = {e["name"]: e for e in _k8s_pg_container()["env"]}
    ref = env["HEADROOM_DB"]["valueFrom"]["secretKeyRef"]
    assert "value" not in env["HEADROOM_DB"]
    assert not ref.get("optional", False), "the pods must not start without the URL"
    secrets = {s["metadata"]["name"]: s for s in _k8s_pg("Secret")}
    assert ref["key"] in secrets[ref["name"]]["stringData"]
    for e in env.values():
        if "secretKeyRef" in e.get("valueFrom", {}):
            r = e["valueFrom"]["secretKeyRef"]
            assert r["key"] in secrets[r["name"]]["stringData"]
    # The committed example holds placeholders only.
    for secret in secrets.values():
        assert all(v == "" for v in secret["stringData"].values()), secret["metadata"]["name"]


def test_k8s_pg_probes() -> None:
    c = _k8s_pg_container()
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = {e["name"]: e.get("value") for e in c["env"]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert named[c[probe]["httpGet"]["port"]] == int(env["HEADROOM_PORT"])
    (svc,) = _k8s_pg("Service")
    assert named[svc["spec"]["ports"][0]["targetPort"]] == 8787


def test_k8s_pg_keys_live_in_the_database_with_no_claim() -> None:
    """HEADROOM_KEY_DB unset: the pods' keys default to HEADROOM_DB's database."""
    env = {e["name"]: e for e in _k8s_pg_container()["env"]}
    assert "HEADROOM_KEY_DB" not in env
    url = "postgresql://headroom@db-host:5432/headroom"  # what the Secret holds, in shape
    assert default_key_db(url) == url
    (dep,) = _k8s_pg("Deployment")
    volumes = dep["spec"]["template"]["spec"]["volumes"]
    assert [v["name"] for v in volumes] == ["tmp"] and "emptyDir" in volumes[0]
    assert _k8s_pg("PersistentVolumeClaim") == []


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
@pytest.mark.parametrize(
    ("url", "starts"),
    [("postgresql://h@db/h", True), ("postgres://h@db/h", True), ("", False),
     ("/data/memory.db", False)],
)
def test_k8s_pg_command_refuses_a_non_postgres_url(url: str, starts: bool) -> None:
    command = _k8s_pg_container()["command"]
    assert command[:2] == ["sh", "-c"]
    script = command[2]
    assert script.count("exec headroom serve --host 0.0.0.0") == 1
    # Run the real guard, with the server replaced by a marker.
    probe = script.replace("exec headroom serve --host 0.0.0.0", "exec echo serving")
    out = subprocess.run(
        ["sh", "-c", probe], capture_output=True, text=True, timeout=10,
        env={"PATH": "/usr/bin:/bin", "HEADROOM_DB": url},
    )
    assert (out.returncode == 0 and out.stdout.strip() == "serving") is starts, out
    if not starts:
        assert out.returncode == 1 and "postgresql://" in out.stderr


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_pg_renders() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S_PG)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    (dep,) = [d for d in rendered if d["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 3


def _key_store_tables() -> set[str]:
    """The tables the PostgreSQL key store creates (its migrations and their bookkeeping)."""
    tables = {
        m.group(1) for _, statements in KEY_MIGRATIONS for sql in statements
        if (m := re.match(r"CREATE TABLE (\w+)", sql))
    }
    source = (ROOT / "proxy" / "keys_postgres.py").read_text(encoding="utf-8")
    (version,) = re.findall(r'_VERSION_TABLE = "(\w+)"', source)
    return tables | {version}


def _user_keyed_tables() -> tuple[set[str], set[str]]:
    """(tables with a user_id column, the others) from the PostgreSQL schema's DDL."""
    source = PG_SCHEMA.read_text(encoding="utf-8")
    keyed: set[str] = set()
    other: set[str] = set()
    for match in re.finditer(r'CREATE TABLE (?:IF NOT EXISTS )?(\w+)["\s]*\(', source):
        columns = source[match.end():].split(')"', 1)[0]
        (keyed if re.search(r"\buser_id text\b", columns) else other).add(match.group(1))
    return keyed, other


def test_main_readme_postgres_section_matches_schema() -> None:
    text = MAIN_README.read_text(encoding="utf-8")
    start = text.index("## Moving from SQLite to PostgreSQL")
    assert text.index("\n## ", start + 1) == text.index("\n## Other APIs")
    section = text[start:text.index("\n## Other APIs")]
    assert "headroom memories export all.jsonl" in section
    assert re.search(r"headroom memories import all\.jsonl --db postgresql://", section)
    # "When" quotes the scale bench's measured numbers, each of which RESULTS.md holds.
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    quoted = re.findall(r"\b\d[\d,]*(?:\.\d+)?(?= ms|/s| memories/s)", section.split("**How.**")[0])
    assert len(quoted) >= 4, quoted
    for number in quoted:
        assert number in results, f"README quotes {number} which RESULTS.md does not hold"
    keyed, other = _user_keyed_tables()
    assert {"memories", "memory_vectors", "memory_text"} <= keyed
    distributed = set(re.findall(r"create_distributed_table\('(\w+)', 'user_id'", section))
    reference = set(re.findall(r"create_reference_table\('(\w+)'\)", section))
    local = {t for t in keyed - distributed if re.search(rf"\b{t}\b[^\n]*stay", section)}
    assert distributed | local == keyed, "a user-keyed table is not placed"
    keys = _key_store_tables()
    assert "headroom_keys" in keys
    # Small, read by primary key on every request, from any shard's work: replicated.
    assert reference == other | keys, "every other table should be a reference table"
    assert distributed.isdisjoint(local)


def test_readme_covers_postgres_deploy() -> None:
    text = README.read_text(encoding="utf-8")
    for needle in ("compose.postgres.yaml", "k8s-postgres", "replicas: 3", "secretKeyRef",
                   "headroom_keys", "key_store_unavailable", "headroom keys copy"):
        assert needle in text, needle
    assert "key store in PostgreSQL is future work" not in text
