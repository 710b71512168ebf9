"""docker-compose.yml and the Dockerfile, checked without Docker (no engine runs here or in CI):
the compose file against the Compose Specification's JSON schema, every variable the services set
against what textadapt and Prefect read, and the Dockerfile's inputs against the repository."""

import ast
import copy
import json
import os
import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"


def interpolate(value, env: dict[str, str] | None = None):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and $$, as `docker compose` resolves them
    from ``env`` (default: nothing set, so every default applies)."""
    env = env or {}

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group("name"), m.group("op"), m.group("default") or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    pattern = r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}"
    if isinstance(value, str):
        return re.sub(pattern, one, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw):
    return interpolate(raw)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the list form: ["NAME=value", ...]
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def all_env(compose: dict) -> dict[str, dict[str, str]]:
    return {name: environment(s) for name, s in compose["services"].items()}


def test_compose_file_validates_against_the_compose_spec(raw, compose):
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    for doc in (raw, compose):  # as written, and as `docker compose` sees it after interpolation
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, "\n".join(errors)

    # The schema is strict enough to catch a misspelt key where compose would fail.
    broken = copy.deepcopy(compose)
    broken["services"]["vllm"]["deploy"]["resources"]["reservation"] = broken["services"]["vllm"]["deploy"]["resources"].pop("reservations")
    assert not validator.is_valid(broken)


def test_services_volumes_and_dependencies_fit_together(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "vllm", "worker"} <= set(services)
    for name, s in services.items():
        for dep in s.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for v in s.get("volumes", []):
            source = v["source"] if isinstance(v, dict) else v.split(":", 1)[0]
            kind = v.get("type", "volume") if isinstance(v, dict) else ("bind" if source.startswith((".", "/")) else "volume")
            if kind == "volume":
                assert source in compose["volumes"], f"{name} mounts undeclared volume {source}"
    # The GPU goes to vLLM (and to the worker's CLIP backbone).
    for name in ("vllm", "worker"):
        [device] = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    # The UI is published; the database and the LLM stay on compose's network.
    assert services["prefect-server"]["ports"] and "ports" not in services["postgres"] and "ports" not in services["vllm"]


def _settings_env_names() -> set[str]:
    """Every TEXTADAPT_* variable textadapt reads: Settings' fields under its env prefix, plus the
    names the code looks up in os.environ itself (TEXTADAPT_CONFIG, ...)."""
    from textadapt.config import Settings

    prefix = Settings.model_config["env_prefix"]
    names = {f"{prefix}{field}".upper() for field in Settings.model_fields}
    for path in (REPO / "textadapt").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            arg = None
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("get", "getenv"):
                arg = node.args[0] if node.args else None
            elif isinstance(node, ast.Subscript) and "environ" in ast.unparse(node.value):
                arg = node.slice
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith(prefix):
                names.add(arg.value)
    return names


def _dockerfile_env() -> dict[str, str]:
    env = {}
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


def test_every_textadapt_variable_is_one_the_code_reads(compose, monkeypatch):
    from textadapt.config import Settings

    known = _settings_env_names()
    assert {"TEXTADAPT_HOME", "TEXTADAPT_LLM", "TEXTADAPT_LLM_BASE_URL", "TEXTADAPT_CONFIG"} <= known  # the scan works
    used = {(where, k) for where, env in [*all_env(compose).items(), ("Dockerfile", _dockerfile_env())] for k in env
            if k.startswith("TEXTADAPT_")}
    assert used, "no TEXTADAPT_* variable set: the worker could not reach vLLM"
    unknown = sorted(f"{where}: {k}" for where, k in used if k not in known)
    assert not unknown, f"set but never read by textadapt: {unknown}"

    # And their values parse: the worker's environment gives valid Settings.
    worker = {**_dockerfile_env(), **all_env(compose)["worker"]}
    for k in [k for k in os.environ if k.startswith("TEXTADAPT_")]:
        monkeypatch.delenv(k)
    for k, v in worker.items():
        if k.startswith("TEXTADAPT_"):
            monkeypatch.setenv(k, v)
    s = Settings()
    assert str(s.home) == worker["TEXTADAPT_HOME"] and s.reports_dir == s.home / "reports"
    assert s.llm_concurrency == int(worker["TEXTADAPT_LLM_CONCURRENCY"]) and s.datasets_dirs == [Path("/datasets")]


def test_every_prefect_variable_is_a_prefect_setting(compose, monkeypatch):
    """Each PREFECT_* variable, set alone, changes the setting it names (a typo would change nothing)."""
    from prefect.settings import Settings

    for k in [k for k in os.environ if k.startswith("PREFECT_")]:
        monkeypatch.delenv(k)
    baseline = Settings().to_environment_variables(exclude_unset=True)
    checked = 0
    for service, env in all_env(compose).items():
        for name, value in env.items():
            if not name.startswith("PREFECT_"):
                continue
            monkeypatch.setenv(name, value)
            changed = {k: v for k, v in Settings().to_environment_variables(exclude_unset=True).items() if baseline.get(k) != v}
            monkeypatch.delenv(name)
            assert changed, f"{service}: {name} is not a Prefect setting"
            assert any(str(v).lower() == value.lower() for v in changed.values()), f"{service}: {name}={value} read as {changed}"
            checked += 1
    assert checked >= 5


def test_the_worker_reaches_vllm_and_the_prefect_server(compose, monkeypatch):
    from textadapt.config import Settings
    from textadapt.llm import OpenAIBackend, make_backend

    services = compose["services"]
    worker = environment(services["worker"])
    args = services["vllm"]["command"]
    served, port = args[args.index("--served-model-name") + 1], args[args.index("--port") + 1]

    url = urlsplit(worker["TEXTADAPT_LLM_BASE_URL"])
    assert (url.hostname, str(url.port), url.path) == ("vllm", port, "/v1")
    for k, v in worker.items():
        if k.startswith("TEXTADAPT_"):
            monkeypatch.setenv(k, v)
    backend = make_backend(Settings().llm, Settings())
    assert isinstance(backend, OpenAIBackend) and backend.identity == f"openai:{served}@http://vllm:{port}/v1"

    api = urlsplit(worker["PREFECT_API_URL"])
    server = services["prefect-server"]
    assert api.hostname == "prefect-server" and api.path == "/api"
    assert str(api.port) == environment(server)["PREFECT_SERVER_API_PORT"]
    assert any(str(p).endswith(f":{api.port}") for p in server["ports"])
    db = urlsplit(environment(server)["PREFECT_API_DATABASE_CONNECTION_URL"])
    pg = environment(services["postgres"])
    assert (db.hostname, db.username, db.password, db.path) == ("postgres", pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], f"/{pg['POSTGRES_DB']}")


def test_images_match_the_pinned_versions(compose):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = dict(re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line).groups()
                for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line and not line.startswith("#"))
    image = compose["services"]["prefect-server"]["image"]
    assert image.startswith(f"prefecthq/prefect:{pins['prefect']}-python"), "the server must run the Prefect the worker's client is"
    python = re.search(r"python:(\d+\.\d+)", DOCKERFILE.read_text()).group(1)
    assert image.endswith(f"python{python}")
    assert project["requires-python"] == f">={python}"

    worker = compose["services"]["worker"]
    pool = worker["command"][worker["command"].index("--pool") + 1]
    if (REPO / "prefect.yaml").exists():  # the deployments the worker runs must be in its pool
        deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
        assert {d["work_pool"]["name"] for d in deployments} == {pool}


def _ignored(path: str, rules: list[str]) -> bool:
    """Whether .dockerignore leaves ``path`` out of the build context (last matching rule wins)."""
    import fnmatch

    out = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule[1:] if negate else rule
        parts = path.split("/")
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts))):
            out = not negate
    return out


def test_dockerfile_copies_files_that_exist_and_are_in_the_context():
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    rules = [r.strip() for r in (REPO / ".dockerignore").read_text().splitlines() if r.strip() and not r.startswith("#")]
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", text, re.M))
    copies = 0
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] not in ("COPY", "ADD"):
            continue
        flags = [w for w in words[1:] if w.startswith("--")]
        sources = [w for w in words[1:] if not w.startswith("--")][:-1]
        if any(f.startswith("--from=") for f in flags):
            assert {f.split("=", 1)[1] for f in flags if f.startswith("--from=")} <= stages
            continue
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
            if src != ".":
                assert not _ignored(src, rules), f"Dockerfile copies {src}, which .dockerignore leaves out"
            copies += 1
    assert copies >= 2
    for mount in re.findall(r"--mount=\S*from=(\w+)", text):
        assert mount in stages
    # What the image installs from "." must be in the context: the package, its flows and assets.
    for needed in ("pyproject.toml", "README.md", "textadapt/config.py", "textadapt/flows/adapt.py", "prompts/targeted",
                   "data/datasets"):
        assert (REPO / needed).exists() and not _ignored(needed, rules), needed
    assert _ignored(".venv", rules) and _ignored("tests/test_compose.py", rules)
