"""An older database gains the columns added since (``db.add_missing_columns``): the service
starts on it instead of failing every job query with "no such column". SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import inspect, text


def test_init_db_adds_a_missing_nullable_column(settings):
    from trinity_service import crud, db

    engine = db.get_engine()
    with engine.begin() as conn:  # the job table as the release before routing had it
        conn.execute(text("ALTER TABLE job DROP COLUMN routing"))
    assert "routing" not in {c["name"] for c in inspect(engine).get_columns("job")}
    db.init_db()
    assert "routing" in {c["name"] for c in inspect(engine).get_columns("job")}
    assert db.add_missing_columns(engine) == []  # a second start (or another process) adds nothing
    with db.session_scope() as session:
        job, _ = crud.create_job(session=session, tenant="t", spec={}, queue="gpu.default", dataset_id=None,
                                 routing={"rule": "default"})
        assert crud.get_job(session=session, tenant="t", job_id=job.id).routing == {"rule": "default"}

