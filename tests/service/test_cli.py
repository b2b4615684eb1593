"""`trinity keys ...`, the broker choice of `trinity serve`, and the settings' production guard."""

from __future__ import annotations

import os
import socket

import pytest

from trinity_service.settings import Settings
from cli import main, service


def test_keys_create_list_revoke(settings, capsys):
    assert main(["keys", "create", "--tenant", "cli-tenant"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("trn_") and "shown only now" in err
    from trinity_service import crud
    from trinity_service.db import session_scope

    with session_scope() as s:
        assert crud.authenticate(session=s, key=key) == "cli-tenant"
        key_id = [k.id for k in crud.list_api_keys(session=s, tenant="cli-tenant")][-1]
    assert main(["keys", "list", "--tenant", "cli-tenant"]) == 0
    listing = capsys.readouterr().out
    assert key[:12] in listing and key not in listing and "active" in listing
    assert main(["keys", "revoke", str(key_id)]) == 0
    assert main(["keys", "revoke", str(key_id)]) == 1
    with session_scope() as s:
        assert crud.authenticate(session=s, key=key) is None


def test_serve_uses_the_embedded_broker_without_redis(monkeypatch, tmp_path):
    monkeypatch.delenv("TRINITY_BROKER_URL", raising=False)
    monkeypatch.setenv("TRINITY_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(service, "redis_answers", lambda url: False)
    assert service.choose_broker() == f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    assert "TRINITY_BROKER_URL" not in os.environ  # a choice, returned: the environment is not written
    monkeypatch.setattr(service, "redis_answers", lambda url: True)
    assert service.choose_broker() == "redis://127.0.0.1:6379/0"
    monkeypatch.setenv("TRINITY_BROKER_URL", "redis://elsewhere:6379/3")
    assert service.choose_broker() == "redis://elsewhere:6379/3"  # an explicit choice is kept


def test_redis_answers(redis_client):
    assert service.redis_answers("redis://127.0.0.1:6379/0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert not service.redis_answers(f"redis://127.0.0.1:{closed}/0")


def test_worker_command_runs_one_task_at_a_time():
    cmd = service.WorkerProcess(["gpu.default", "gpu.t4"]).command()
    assert cmd[cmd.index("--concurrency") + 1] == "1" and cmd[cmd.index("-Q") + 1] == "gpu.default,gpu.t4"


def test_settings_lists_and_derived_values(monkeypatch, tmp_path):
    monkeypatch.setenv("TRINITY_GPU_QUEUES", "gpu.a100, gpu.t4")
    monkeypatch.setenv("TRINITY_MODEL_DIRS", f"{tmp_path}/a,{tmp_path}/b")
    monkeypatch.setenv("TRINITY_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("TRINITY_DATABASE_URL", raising=False)
    s = Settings()
    assert s.gpu_queues == ["gpu.a100", "gpu.t4"] and s.default_queue == "gpu.a100"
    assert s.worker_queues == ["gpu.a100", "gpu.t4"] and len(s.model_dirs) == 2
    assert s.database_url == f"sqlite:///{tmp_path / 'trinity.db'}" and s.expose_errors is True


@pytest.mark.parametrize("env,problem", [
    ({}, "TRINITY_DATA_DIR must be an absolute path"),
    ({"TRINITY_DATA_DIR": "/srv/trinity", "TRINITY_EXPOSE_ERRORS": "true"}, "leaks internals"),
    ({"TRINITY_DATA_DIR": "/srv/trinity", "TRINITY_BROKER_URL": "redis://10.0.0.5:6379/0"}, "without a password"),
    ({"TRINITY_DATA_DIR": "/srv/trinity", "TRINITY_DATABASE_URL": "postgresql://trinity@db.internal/t"},
     "without a password"),
])
def test_production_refuses_insecure_settings(monkeypatch, env, problem):
    for name in ("TRINITY_DATA_DIR", "TRINITY_DATABASE_URL", "TRINITY_BROKER_URL", "TRINITY_EXPOSE_ERRORS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRINITY_ENV", "production")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=problem):
        Settings()


def test_production_accepts_a_careful_setup(monkeypatch):
    monkeypatch.setenv("TRINITY_ENV", "production")
    monkeypatch.setenv("TRINITY_DATA_DIR", "/srv/trinity")
    monkeypatch.setenv("TRINITY_BROKER_URL", "redis://:s3cret@10.0.0.5:6379/0")
    monkeypatch.setenv("TRINITY_DATABASE_URL", "postgresql://trinity:pw@db.internal/t")
    monkeypatch.delenv("TRINITY_EXPOSE_ERRORS", raising=False)
    assert Settings().expose_errors is False
