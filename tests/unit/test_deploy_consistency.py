"""deploy/ stays in step with the code.

The compose file, the Prometheus configs and the Dockerfile name settings, ports, hosts and
commands that the code defines. Each check is a function returning a list of problems (empty:
consistent); the tests run them on the real files and on deliberately broken copies, so a check
that cannot fail is itself caught.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, get_args
from unittest import mock
from urllib.parse import urlsplit

import pytest
import typer
import yaml
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from typer.core import TyperGroup
from typer.testing import CliRunner

from handtrace.cli import app
from handtrace.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
PROMETHEUS_LOCAL = DEPLOY / "prometheus" / "prometheus.local.yml"
DOCKERFILE = DEPLOY / "Dockerfile"

PREFIX: str = Settings.model_config.get("env_prefix", "")
DELIM: str = Settings.model_config.get("env_nested_delimiter") or "__"
DONE = "service_completed_successfully"
CLICKHOUSE_HTTP_PORTS = {"http": 8123, "https": 8443}
BIND_ALL = {"0.0.0.0", "::"}  # noqa: S104 -- containers must listen beyond loopback

Compose = dict[str, Any]
Problems = list[str]


# --- settings ------------------------------------------------------------------------------


def settings_env_vars(
    model: type[BaseModel] = Settings, prefix: str = PREFIX
) -> dict[str, FieldInfo]:
    """Map every environment variable Settings reads to its field (nested models via ``__``).

    Args:
        model: The model to walk.
        prefix: Variable-name prefix of this model's fields.

    Returns:
        Upper-case variable names, e.g. ``HANDTRACE_KAFKA__BOOTSTRAP_SERVERS``.
    """
    names: dict[str, FieldInfo] = {}
    for name, field in model.model_fields.items():
        env = f"{prefix}{name}".upper()
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names.update(settings_env_vars(ann, env + DELIM))
        else:
            names[env] = field
    return names


def unknown_env_vars(env: Mapping[str, Any]) -> list[str]:
    """The ``HANDTRACE_*`` names in ``env`` that are no Settings field (Settings ignores them)."""
    known = settings_env_vars()
    return sorted(k for k in env if k.upper().startswith(PREFIX) and k not in known)


def is_secret(field: FieldInfo) -> bool:
    """True for SecretStr fields (optional or not)."""
    ann = field.annotation
    return any(isinstance(a, type) and issubclass(a, SecretStr) for a in (ann, *get_args(ann)))


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """Settings as a container with exactly these ``HANDTRACE_*`` variables would load them."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith(PREFIX)}
    clean.update({k: v for k, v in env.items() if k.upper().startswith(PREFIX)})
    with mock.patch.dict(os.environ, clean, clear=True):
        return Settings()


# --- compose -------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")
REQUIRED_VAR = re.compile(r"\$\{\w+:?\?[^}]*\}")  # ${VAR:?message}: compose refuses to run unset


def dummy_for(var: str) -> str:
    """A valid stand-in for a required host variable: URL-safe, 32+ bytes, unique per name; for
    a key list, a JSON object of one well-formed (all-zero) Ed25519 public key."""
    if var.endswith("PUBLIC_KEYS"):
        return '{"cp1": "' + "A" * 43 + '="}'
    return f"{var.lower()}-dummy-0123456789abcdef0123456789abcdef"


def interpolate(value: str) -> str:
    """Resolve compose interpolation as ``docker compose`` would with no host variables set.

    ``${VAR:-x}``/``${VAR-x}`` give ``x``; ``${VAR}``, ``$VAR`` and ``${VAR:+x}`` give ``""``;
    required ``${VAR:?msg}``/``${VAR?msg}`` (compose refuses to start without them) give
    ``dummy_for(VAR)``; ``$$`` gives ``$``.
    """

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        expr = m.group("braced") if m.group("braced") is not None else m.group("plain")
        var = re.match(r"[A-Za-z_][A-Za-z0-9_]*", expr)
        assert var, f"bad interpolation {m.group(0)!r}"
        op = expr[var.end():]
        if op.startswith((":-", "-")):
            return op.split("-", 1)[1]
        if op.startswith((":?", "?")):
            return dummy_for(var.group(0))
        return ""

    return _INTERPOLATION.sub(sub, value)


def load_yaml(path: Path) -> Any:
    """Parse a YAML file (merge keys resolved)."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def service_env(svc: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as raw (uninterpolated) strings; list or mapping form."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    out: dict[str, str] = {}
    for k, v in env.items():
        if v is None:
            continue  # passed through from the host: nothing to check here
        out[k] = ("true" if v else "false") if isinstance(v, bool) else str(v)
    return out


def resolved_env(svc: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment after interpolation."""
    return {k: interpolate(v) for k, v in service_env(svc).items()}


def command_of(svc: Mapping[str, Any]) -> list[str]:
    """The service's command as a token list."""
    cmd = svc.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def is_handtrace(svc: Mapping[str, Any]) -> bool:
    """Services built from deploy/Dockerfile (entrypoint ``handtrace``)."""
    return "build" in svc or str(svc.get("image", "")).startswith("handtrace")


def handtrace_services(compose: Compose) -> dict[str, dict[str, Any]]:
    """The compose services that run the handtrace image."""
    return {n: s for n, s in compose["services"].items() if is_handtrace(s)}


def services_with_image(compose: Compose, image: str) -> dict[str, dict[str, Any]]:
    """Services whose image starts with ``image`` (e.g. ``apache/kafka``)."""
    return {n: s for n, s in compose["services"].items()
            if str(s.get("image", "")).split(":")[0] == image}


def metrics_section(svc: Mapping[str, Any]) -> str | None:
    """``stream``/``sink`` when the service runs that component (it serves /metrics), else None."""
    cmd = command_of(svc)
    field = Settings.model_fields.get(cmd[0]) if is_handtrace(svc) and cmd else None
    section = field.annotation if field else None
    if isinstance(section, type) and issubclass(section, BaseModel) and (
            "metrics_port" in section.model_fields):
        return cmd[0]
    return None


def metrics_port(svc: Mapping[str, Any]) -> int:
    """The metrics port the service's settings put in force (its env, else the default)."""
    section = metrics_section(svc)
    assert section is not None
    return int(getattr(settings_from_env(resolved_env(svc)), section).metrics_port)


def container_ports(svc: Mapping[str, Any]) -> set[int]:
    """Container-side ports a service exposes or publishes."""
    ports = {int(str(p).split("/")[0]) for p in svc.get("expose", [])}
    for p in svc.get("ports", []):
        if isinstance(p, dict):
            ports.add(int(p["target"]))
        else:
            ports.add(int(str(p).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def healthcheck_ports(svc: Mapping[str, Any], path: str) -> set[int]:
    """Ports of ``http://host:port<path>`` URLs in the service's healthcheck."""
    test = (svc.get("healthcheck") or {}).get("test") or []
    text = test if isinstance(test, str) else " ".join(str(t) for t in test)
    return {int(p) for p in re.findall(rf"https?://[^/:\s'\"]+:(\d+){re.escape(path)}", text)}


# --- checks --------------------------------------------------------------------------------


def env_name_problems(compose: Compose) -> Problems:
    """Every HANDTRACE_* variable of every service is a Settings field."""
    return [f"{name}: {var} is not a Settings field (Settings would silently ignore it)"
            for name, svc in compose["services"].items()
            for var in unknown_env_vars(service_env(svc))]


def env_value_problems(compose: Compose) -> Problems:
    """Values validate; secrets come from required host variables and are not empty."""
    problems: Problems = []
    fields = settings_env_vars()
    for name, svc in compose["services"].items():
        raw, env = service_env(svc), resolved_env(svc)
        if not any(k.startswith(PREFIX) for k in env):
            continue
        try:
            settings_from_env(env)
        except ValidationError as e:
            problems += [f"{name}: {PREFIX}{DELIM.join(map(str, err['loc'])).upper()}: {err['msg']}"
                         for err in e.errors()]
        for var, value in raw.items():
            if var in fields and is_secret(fields[var]) and not REQUIRED_VAR.fullmatch(value):
                problems.append(f"{name}: {var} must be a required host variable ${{VAR:?...}}, "
                                "not a literal or optional value")
    return problems


def metrics_problems(compose: Compose) -> Problems:
    """Stream/sink metrics ports: on, bound beyond loopback, exposed and health-checked."""
    problems: Problems = []
    for name, svc in handtrace_services(compose).items():
        if metrics_section(svc) is None:
            continue
        port = metrics_port(svc)
        host = settings_from_env(resolved_env(svc)).metrics_host
        if port == 0:
            problems.append(f"{name}: metrics are off (metrics_port 0) but Prometheus scrapes it")
        if host not in BIND_ALL:
            problems.append(f"{name}: HANDTRACE_METRICS_HOST is {host!r}; /metrics is unreachable "
                            "from other containers (use 0.0.0.0)")
        exposed = container_ports(svc)
        if exposed != {port}:
            problems.append(f"{name}: exposes {sorted(exposed)} but its metrics port is {port}")
        for hc in healthcheck_ports(svc, "/metrics"):
            if hc != port:
                problems.append(f"{name}: healthcheck probes :{hc}/metrics, metrics port is {port}")
    return problems


def _targets(prom: Mapping[str, Any]) -> dict[str, list[str]]:
    jobs: dict[str, list[str]] = {}
    for job in prom.get("scrape_configs", []):
        jobs[job["job_name"]] = [t for sc in job.get("static_configs", []) for t in sc["targets"]]
    return jobs


def prometheus_problems(compose: Compose, prom: Mapping[str, Any]) -> Problems:
    """prometheus.yml scrapes every stream/sink service by service name on its metrics port."""
    problems: Problems = []
    services = compose["services"]
    jobs = _targets(prom)
    for job in prom.get("scrape_configs", []):
        if job.get("metrics_path", "/metrics") != "/metrics":
            problems.append(f"job {job['job_name']}: metrics_path must be /metrics")
    for job, targets in jobs.items():
        for target in targets:
            host, _, port = target.rpartition(":")
            if host not in services:
                problems.append(f"job {job}: target {target} is not a compose service")
                continue
            section = metrics_section(services[host])
            if not job.startswith("handtrace-"):
                continue
            if section != job.removeprefix("handtrace-"):
                problems.append(f"job {job}: target {target} does not run "
                                f"`{job.removeprefix('handtrace-')}` "
                                f"(command {command_of(services[host])})")
            elif int(port) != metrics_port(services[host]):
                problems.append(f"job {job}: target {target} but {host} serves metrics on "
                                f"{metrics_port(services[host])}")
    for name, svc in handtrace_services(compose).items():
        section = metrics_section(svc)
        if section and f"{name}:{metrics_port(svc)}" not in jobs.get(f"handtrace-{section}", []):
            problems.append(f"{name}: not scraped by job handtrace-{section}")
    return problems


def prometheus_local_problems(prom: Mapping[str, Any]) -> Problems:
    """prometheus.local.yml scrapes 127.0.0.1 at the default metrics ports."""
    defaults = settings_from_env({})
    jobs = _targets(prom)
    problems: Problems = []
    for section in ("stream", "sink"):
        want = [f"127.0.0.1:{getattr(defaults, section).metrics_port}"]
        if jobs.get(f"handtrace-{section}") != want:
            problems.append(f"job handtrace-{section}: targets {jobs.get(f'handtrace-{section}')}, "
                            f"want {want}")
    return problems


def kafka_listeners(svc: Mapping[str, Any]) -> dict[str, tuple[str, int]]:
    """Advertised listeners of an apache/kafka service: name -> (host, port)."""
    env = resolved_env(svc)
    out: dict[str, tuple[str, int]] = {}
    for item in env.get("KAFKA_ADVERTISED_LISTENERS", "").split(","):
        if item:
            listener, _, hostport = item.partition("://")
            host, _, port = hostport.rpartition(":")
            out[listener] = (host, int(port))
    return out


def kafka_problems(compose: Compose) -> Problems:
    """Handtrace services bootstrap from the kafka service's in-network listener."""
    problems: Problems = []
    brokers = services_with_image(compose, "apache/kafka")
    if not brokers:
        return ["no apache/kafka service"]
    internal: dict[str, set[int]] = {}
    for name, svc in brokers.items():
        env = resolved_env(svc)
        listeners = kafka_listeners(svc)
        bound = {int(x.rsplit(":", 1)[1]) for x in env.get("KAFKA_LISTENERS", "").split(",") if x}
        internal[name] = {p for host, p in listeners.values() if host == name and p in bound}
        inter = env.get("KAFKA_INTER_BROKER_LISTENER_NAME", "PLAINTEXT")
        if listeners.get(inter, ("", 0))[0] != name:
            problems.append(f"{name}: inter-broker listener {inter} is not advertised as "
                            f"{name}:<port>")
    for name, svc in handtrace_services(compose).items():
        bootstrap = resolved_env(svc).get(f"{PREFIX}KAFKA{DELIM}BOOTSTRAP_SERVERS")
        if not bootstrap:
            problems.append(f"{name}: no {PREFIX}KAFKA{DELIM}BOOTSTRAP_SERVERS (it would use the "
                            "local dev broker at 127.0.0.1)")
            continue
        for hostport in bootstrap.split(","):
            host, _, port = hostport.strip().rpartition(":")
            if host not in brokers:
                problems.append(f"{name}: bootstrap {hostport} is not a kafka service "
                                f"{sorted(brokers)}")
            elif int(port) not in internal[host]:
                problems.append(f"{name}: bootstrap {hostport} is not an in-network listener of "
                                f"{host} (ports {sorted(internal[host])})")
    return problems


def clickhouse_problems(compose: Compose) -> Problems:
    """The sink's DSN names the clickhouse service, its HTTP port and its user/password."""
    problems: Problems = []
    servers = services_with_image(compose, "clickhouse/clickhouse-server")
    dsn_var = f"{PREFIX}CLICKHOUSE{DELIM}DSN"
    for name, svc in handtrace_services(compose).items():
        dsn = resolved_env(svc).get(dsn_var)
        raw = service_env(svc).get(dsn_var, "")
        if dsn is not None and not re.search(rf"://[^@/]*:{REQUIRED_VAR.pattern}@", raw):
            problems.append(f"{name}: the DSN password must be a required host variable "
                            "${VAR:?...}")
        if dsn is None:
            if command_of(svc)[:1] == ["sink"]:
                problems.append(f"{name}: no {dsn_var} (the sink would use an embedded engine "
                                "inside its container)")
            continue
        url = urlsplit(dsn)
        if url.hostname not in servers:
            problems.append(f"{name}: DSN host {url.hostname} is not a clickhouse service "
                            f"{sorted(servers)}")
            continue
        server_env = resolved_env(servers[url.hostname])
        if url.port != CLICKHOUSE_HTTP_PORTS.get(url.scheme):
            problems.append(f"{name}: DSN port {url.port} is not ClickHouse's {url.scheme} port "
                            f"{CLICKHOUSE_HTTP_PORTS.get(url.scheme)}")
        if url.username != server_env.get("CLICKHOUSE_USER", "default"):
            problems.append(f"{name}: DSN user {url.username} != CLICKHOUSE_USER of {url.hostname}")
        if not url.password or url.password != server_env.get("CLICKHOUSE_PASSWORD"):
            problems.append(f"{name}: DSN password is empty or not CLICKHOUSE_PASSWORD of "
                            f"{url.hostname}")
    return problems


def resolve_command(tokens: list[str]) -> tuple[Any, str]:
    """Resolve a ``handtrace`` argument list to its leaf command and parse its options.

    Returns:
        (command, "") when ``tokens`` is a runnable command line, else (None, the reason).
    """
    cmd: Any = typer.main.get_command(app)
    ctx = typer.Context(cmd, info_name="handtrace")
    rest = list(tokens)
    while isinstance(cmd, TyperGroup):
        if not rest or rest[0].startswith("-"):
            return None, f"`handtrace {shlex.join(tokens)}` names a group, not a command"
        sub = cmd.get_command(ctx, rest[0])
        if sub is None:
            return None, f"`handtrace {shlex.join(tokens)}`: no subcommand {rest[0]!r}"
        ctx = typer.Context(sub, info_name=rest.pop(0), parent=ctx)
        cmd = sub
    try:
        cmd.make_context(ctx.info_name, rest, parent=ctx.parent)
    except typer.TyperException as e:
        return None, f"`handtrace {shlex.join(tokens)}`: {e.format_message()}"
    return cmd, ""


def command_problems(compose: Compose) -> Problems:
    """Every handtrace service runs a real ``handtrace`` subcommand with valid options."""
    problems: Problems = []
    runner = CliRunner()
    for name, svc in handtrace_services(compose).items():
        entry = svc.get("entrypoint")
        if entry not in (None, ["handtrace"], "handtrace"):
            problems.append(f"{name}: entrypoint {entry!r} is not handtrace")
        tokens = command_of(svc)
        result = runner.invoke(app, [*tokens, "--help"])
        if result.exit_code != 0:
            problems.append(f"{name}: `handtrace {shlex.join(tokens)} --help` exited "
                            f"{result.exit_code}")
        _, reason = resolve_command(tokens)
        if reason:
            problems.append(f"{name}: {reason}")
    return problems


def dependency_problems(compose: Compose) -> Problems:
    """Start order: kafka healthy -> topics created -> stream/sink; clickhouse healthy -> sink."""
    problems: Problems = []
    services = compose["services"]
    ht = handtrace_services(compose)
    init = [n for n, s in ht.items() if command_of(s)[:2] == ["topics", "create"]]
    if len(init) != 1:
        return [f"want one `topics create` service, found {init}"]
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, spec in deps.items():
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep}")
            elif spec.get("condition") == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{name}: waits for {dep} healthy but {dep} has no healthcheck")
        if name == init[0]:
            for broker in services_with_image(compose, "apache/kafka"):
                if deps.get(broker, {}).get("condition") != "service_healthy":
                    problems.append(f"{name}: must wait for {broker} to be healthy")
            if svc.get("restart", "no") != "no":
                problems.append(f"{name}: a one-shot job needs restart: \"no\"")
        elif name in ht and deps.get(init[0], {}).get("condition") != DONE:
            problems.append(f"{name}: must wait for {init[0]} ({DONE})")
        dsn = resolved_env(svc).get(f"{PREFIX}CLICKHOUSE{DELIM}DSN")
        host = urlsplit(dsn).hostname if dsn else None
        if host in services and deps.get(host, {}).get("condition") != "service_healthy":
            problems.append(f"{name}: must wait for {host} to be healthy")
    return problems


def prometheus_mount_problems(compose: Compose) -> Problems:
    """The prometheus service mounts deploy/prometheus/prometheus.yml as its config."""
    for svc in services_with_image(compose, "prom/prometheus").values():
        for vol in svc.get("volumes", []):
            src, _, dst = str(vol).partition(":")
            if dst.split(":")[0] == "/etc/prometheus/prometheus.yml":
                if (COMPOSE.parent / src).resolve() == PROMETHEUS.resolve():
                    return []
                return [f"prometheus mounts {src}, not {PROMETHEUS.relative_to(ROOT)}"]
    return ["no prom/prometheus service mounts /etc/prometheus/prometheus.yml"]


CHECKS: dict[str, Callable[[Compose], Problems]] = {
    "env_names": env_name_problems,
    "env_values": env_value_problems,
    "metrics": metrics_problems,
    "prometheus": lambda c: prometheus_problems(c, load_yaml(PROMETHEUS)),
    "kafka": kafka_problems,
    "clickhouse": clickhouse_problems,
    "commands": command_problems,
    "dependencies": dependency_problems,
    "prometheus_mount": prometheus_mount_problems,
}


# --- tests: the real files -----------------------------------------------------------------


@pytest.fixture
def compose() -> Compose:
    """A fresh parse of deploy/docker-compose.yml (tests may mutate it)."""
    return load_yaml(COMPOSE)


def test_compose_has_the_services(compose: Compose) -> None:
    """The stack the docs promise."""
    assert {"kafka", "clickhouse", "topics-init", "stream", "sink", "prometheus", "grafana"} <= set(
        compose["services"])
    assert compose["services"]["kafka"]["image"] == "apache/kafka:4.1.1"
    assert set(handtrace_services(compose)) >= {"topics-init", "stream", "sink"}


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_compose_is_consistent(compose: Compose, check: str) -> None:
    """Each consistency check passes on the committed files."""
    assert CHECKS[check](compose) == []


def test_compose_env_loads_settings(compose: Compose, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each handtrace service's environment yields the Settings it is meant to."""
    for var in [k for k in os.environ if k.upper().startswith(PREFIX)]:
        monkeypatch.delenv(var)
    for name, svc in handtrace_services(compose).items():
        with monkeypatch.context() as m:
            for var, value in resolved_env(svc).items():
                m.setenv(var, value)
            s = Settings()
        assert s.kafka.bootstrap() == "kafka:9092", name
        assert s.metrics_host == "0.0.0.0", name  # noqa: S104
        if name == "stream":
            assert s.stream.pseudonym_key is not None
            assert s.stream.pseudonym_key.get_secret_value() == dummy_for("HANDTRACE_PSEUDONYM_KEY")
        if name == "sink":
            dsn = s.clickhouse_dsn()
            assert dsn.startswith("http://") and dsn.endswith("@clickhouse:8123"), name


def test_prometheus_local_targets_default_ports() -> None:
    """The local-dev Prometheus config matches the default metrics ports."""
    assert prometheus_local_problems(load_yaml(PROMETHEUS_LOCAL)) == []


def test_dockerfile() -> None:
    """Base image, constraints, entrypoint, and only real HANDTRACE_* variables."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"pip install -c constraints\.txt \.", text)
    assert "COPY pyproject.toml README.md constraints.txt" in text
    assert re.search(r'^ENTRYPOINT \["handtrace"\]$', text, re.M)
    env = dict(re.findall(rf"\b({PREFIX}\w+)=(\S+)", text))
    assert env, "the image sets HANDTRACE_STATE_DIR"
    assert unknown_env_vars(env) == []
    settings_from_env(env)


def test_compose_builds_deploy_dockerfile(compose: Compose) -> None:
    """Every handtrace service builds (or reuses) the image from deploy/Dockerfile."""
    for name, svc in handtrace_services(compose).items():
        build = svc["build"]
        dockerfile = COMPOSE.parent / build["context"] / build["dockerfile"]
        assert dockerfile.resolve() == DOCKERFILE, name


# --- tests: the helpers and checks can fail ------------------------------------------------


@pytest.mark.parametrize("var", [
    "HANDTRACE_KAFKA__BOOTSTRAP_SERVER",   # singular
    "HANDTRACE_KAFKA_BOOTSTRAP_SERVERS",   # one underscore: not nested
    "HANDTRACE_STREAM__METRICSPORT",
    "HANDTRACE_PSEUDONYM_KEY",             # the compose host variable, not a setting
    "HANDTRACE_SINK__METRICS_PORT__X",
])
def test_unknown_env_vars_catches_misspellings(var: str) -> None:
    """A misspelt variable is reported; the real names are not."""
    assert unknown_env_vars({var: "1", "HANDTRACE_SINK__METRICS_PORT": "9102"}) == [var]


def test_settings_env_vars_walks_nested_models() -> None:
    """Nested sections appear with the ``__`` delimiter; sections themselves do not."""
    names = settings_env_vars()
    assert {"HANDTRACE_STATE_DIR", "HANDTRACE_KAFKA__BOOTSTRAP_SERVERS",
            "HANDTRACE_STREAM__PSEUDONYM_KEY", "HANDTRACE_CLICKHOUSE__DSN"} <= set(names)
    assert "HANDTRACE_KAFKA" not in names
    assert is_secret(names["HANDTRACE_STREAM__PSEUDONYM_KEY"])
    assert not is_secret(names["HANDTRACE_STREAM__METRICS_PORT"])


@pytest.mark.parametrize(("raw", "want"), [
    ("kafka:9092", "kafka:9092"),
    ("${A:-x}", "x"),
    ("${A-x}", "x"),
    ("${A}", ""),
    ("$A/b", "/b"),
    ("${A:+x}", ""),
    ("$${A}", "${A}"),
    ("u:${PW:?set it}@h", f"u:{dummy_for('PW')}@h"),
])
def test_interpolate(raw: str, want: str) -> None:
    """Compose interpolation as compose resolves it with no host variables set."""
    assert interpolate(raw) == want


def _env(compose: Compose, service: str) -> dict[str, Any]:
    svc = compose["services"][service]
    svc["environment"] = dict(svc["environment"])  # unshare the YAML anchor
    return svc["environment"]


def _set_env(service: str, **env: str) -> Callable[[Compose], None]:
    return lambda c: _env(c, service).update(env)


def _drop_env(service: str, var: str) -> Callable[[Compose], None]:
    def mutate(c: Compose) -> None:
        del _env(c, service)[var]

    return mutate


def _rename_env(service: str, old: str, new: str) -> Callable[[Compose], None]:
    def mutate(c: Compose) -> None:
        env = _env(c, service)
        env[new] = env.pop(old)

    return mutate


def _set(service: str, **fields: Any) -> Callable[[Compose], None]:
    return lambda c: c["services"][service].update(fields)


def _rename_service(old: str, new: str) -> Callable[[Compose], None]:
    return lambda c: c["services"].update({new: c["services"].pop(old)})


def _both(*mutations: Callable[[Compose], None]) -> Callable[[Compose], None]:
    def mutate(c: Compose) -> None:
        for m in mutations:
            m(c)

    return mutate


def _drop_dependency(service: str, dep: str) -> Callable[[Compose], None]:
    def mutate(c: Compose) -> None:
        del c["services"][service]["depends_on"][dep]

    return mutate


DSN = "HANDTRACE_CLICKHOUSE__DSN"
KEY = "HANDTRACE_STREAM__PSEUDONYM_KEY"
BOOT = "HANDTRACE_KAFKA__BOOTSTRAP_SERVERS"
PW = "${CLICKHOUSE_PASSWORD:?x}"

# (check, what is broken, mutation of the parsed compose file, text expected in a problem)
BREAKAGES: list[tuple[str, str, Callable[[Compose], None], str]] = [
    ("env_names", "misspelt variable",
     _rename_env("stream", "HANDTRACE_STREAM__METRICS_PORT", "HANDTRACE_STREAM_METRICS_PORT"),
     "HANDTRACE_STREAM_METRICS_PORT is not a Settings field"),
    ("env_values", "port not a number",
     _set_env("sink", HANDTRACE_SINK__METRICS_PORT="ninety"), "HANDTRACE_SINK__METRICS_PORT"),
    ("env_values", "bad enum value",
     _set_env("stream", HANDTRACE_STREAM__LOG_LEVEL="verbose"), "HANDTRACE_STREAM__LOG_LEVEL"),
    ("env_values", "secret literal in the file",
     _set_env("stream", **{KEY: "x" * 40}), "required host variable"),
    ("env_values", "secret may be empty",
     _set_env("stream", **{KEY: "${HANDTRACE_PSEUDONYM_KEY}"}), "required host variable"),
    ("metrics", "exposes another port", _set("stream", expose=["9999"]), "exposes [9999]"),
    ("metrics", "port changed in env only",
     _set_env("sink", HANDTRACE_SINK__METRICS_PORT="9200"), "metrics port is 9200"),
    ("metrics", "loopback bind", _set_env("stream", HANDTRACE_METRICS_HOST="127.0.0.1"),
     "unreachable"),
    ("metrics", "metrics off", _set_env("stream", HANDTRACE_STREAM__METRICS_PORT="0"),
     "metrics are off"),
    ("prometheus", "port changed in env only",
     _set_env("sink", HANDTRACE_SINK__METRICS_PORT="9200"), "serves metrics on 9200"),
    ("prometheus", "service renamed", _rename_service("stream", "stream-worker"),
     "stream:9101 is not a compose service"),
    ("kafka", "host listener port", _set_env("sink", **{BOOT: "kafka:29092"}),
     "not an in-network listener"),
    ("kafka", "unknown host", _set_env("stream", **{BOOT: "broker:9092"}), "not a kafka service"),
    ("kafka", "bootstrap missing", _drop_env("topics-init", BOOT), "local dev broker"),
    ("kafka", "advertised as localhost",
     _set_env("kafka", KAFKA_ADVERTISED_LISTENERS="PLAINTEXT://localhost:9092"),
     "not an in-network listener"),
    ("clickhouse", "native port",
     _set_env("sink", **{DSN: f"http://handtrace:{PW}@clickhouse:9000"}), "http port 8123"),
    ("clickhouse", "wrong host",
     _set_env("sink", **{DSN: f"http://handtrace:{PW}@localhost:8123"}),
     "not a clickhouse service"),
    ("clickhouse", "password variable mismatch",
     _set_env("sink", **{DSN: "http://handtrace:${CH_PASSWORD:?x}@clickhouse:8123"}), "password"),
    ("clickhouse", "literal password",
     _both(_set_env("sink", **{DSN: "http://handtrace:pw@clickhouse:8123"}),
           _set_env("clickhouse", CLICKHOUSE_PASSWORD="pw")),  # noqa: S106
     "must be a required host variable"),
    ("clickhouse", "sink without DSN", _drop_env("sink", DSN), "embedded engine"),
    ("commands", "typo in subcommand", _set("stream", command=["stream", "wokrer"]),
     "no subcommand 'wokrer'"),
    ("commands", "group only", _set("sink", command="sink"), "names a group"),
    ("commands", "invalid option value",
     _set("simulator", command=["agent", "simulate", "--agents", "0"]), "--agents"),
    ("commands", "unknown option",
     _set("simulator", command=["agent", "simulate", "--agentz", "5"]), "No such option"),
    ("dependencies", "stream starts before topics exist",
     _set("stream", depends_on=["topics-init"]), DONE),
    ("dependencies", "sink starts before clickhouse is up",
     _drop_dependency("sink", "clickhouse"), "clickhouse to be healthy"),
]


@pytest.mark.parametrize(("check", "mutate", "expected"),
                         [pytest.param(c, m, e, id=f"{c}: {why}") for c, why, m, e in BREAKAGES])
def test_checks_catch_breakage(
    compose: Compose, check: str, mutate: Callable[[Compose], None], expected: str
) -> None:
    """A deliberately broken copy of the compose file fails the check, naming the problem."""
    assert CHECKS[check](compose) == []
    broken = copy.deepcopy(compose)
    mutate(broken)
    problems = CHECKS[check](broken)
    assert any(expected in p for p in problems), problems


def test_prometheus_checks_catch_breakage(compose: Compose) -> None:
    """Wrong ports or hosts in prometheus.yml and prometheus.local.yml are reported."""
    prom = load_yaml(PROMETHEUS)
    prom["scrape_configs"][0]["static_configs"][0]["targets"] = ["stream:9102"]
    assert any("serves metrics on 9101" in p for p in prometheus_problems(compose, prom))
    prom["scrape_configs"][0]["static_configs"][0]["targets"] = ["sink:9102"]
    assert any("does not run `stream`" in p for p in prometheus_problems(compose, prom))
    assert any("stream: not scraped" in p for p in prometheus_problems(compose, prom))
    local = load_yaml(PROMETHEUS_LOCAL)
    local["scrape_configs"][1]["static_configs"][0]["targets"] = ["127.0.0.1:9101"]
    assert prometheus_local_problems(local) != []
