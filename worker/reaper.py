"""The reaper: finds jobs the system lost and puts them back on track. The job row is the truth.

Each sweep:

1. **Dead workers.** A ``running`` job whose heartbeat is older than ``stale_after_s`` is moved
   back to ``queued`` (``resumes`` + 1) and re-sent; ``run_job`` on the same workdir resumes from
   the newest checkpoint. A ``cancelling`` one becomes ``cancelled``. After ``max_resumes`` the job
   fails with ``worker_lost``. The move is fenced by ``run_token`` and the stale heartbeat, so a
   worker that was only slow keeps its job.
2. **Lost messages.** A ``queued`` job last sent more than ``requeue_after_s`` ago whose message is
   not in the broker (Redis restarted without persistence, an enqueue that failed, a worker killed
   while holding it) is sent again. On Redis the queue lists are read; other brokers cannot be
   inspected, so their queued jobs are re-sent blindly every ``requeue_blind_after_s``.
3. **Interrupted requests.** A job left in ``validating_files`` by an API process that died is
   validated again.

Duplicates are harmless by design: the task's claim (``UPDATE ... WHERE status='queued'``) lets
one delivery run the job; the others return at once. The reaper runs as a thread in each worker's
main process (``reaper_enabled``, started on ``worker_ready`` in ``worker/app.py``); any number of
workers may run it.

That process also forks each job's child (prefork pool, one child per job). A fork copies every lock
as it is at that instant, and a lock the reaper held mid-sweep (the broker pool's, an import's, the
database driver's) would stay held forever in the child, whose only thread then waits on it. (A fresh
clone's CI once hung on a job child with a single thread asleep on a futex, its job never started,
while the reaper re-sent that job; which lock it waited on was not established.) So a sweep runs
under :data:`_SWEEPING`, and a fork of this process waits for the sweep in progress to end
(:func:`install_fork_guard`, ``os.register_at_fork``); between sweeps the thread only waits on its
stop event.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from trinity_service import crud
from trinity_service.admission import admit
from trinity_service.db import session_scope
from trinity_service.settings import Settings, get_settings
from trinity_service.states import JobStatus
from trinity_service import queue

log = logging.getLogger("trinity.reaper")
STALE_UPLOAD_S = 3600.0  # an upload's temp file not written for this long belongs to a dead API process
_SWEEPING = threading.RLock()  # held through a sweep; a fork waits for it (install_fork_guard)
_guard_installed = False


def install_fork_guard() -> None:
    """Make ``os.fork`` in this process wait until no sweep is in progress, so that no child starts with a
    lock the reaper thread held. Re-entrant (a sweep that forked would pass); the child gets a fresh guard."""
    global _guard_installed
    if _guard_installed:
        return
    _guard_installed = True
    os.register_at_fork(before=lambda: _SWEEPING.acquire(), after_in_parent=lambda: _SWEEPING.release(),
                        after_in_child=_fresh_guard)


def _fresh_guard() -> None:
    global _SWEEPING
    _SWEEPING = threading.RLock()


def remove_stale_uploads(tmp_dir: Path, *, before: float) -> int:
    """4. Temp files of uploads cut short by an API process that died (kill -9 mid-upload); a live
    upload writes its file continuously, so only files untouched since ``before`` go."""
    removed = 0
    for path in tmp_dir.glob("upload-*") if tmp_dir.is_dir() else ():
        try:
            if path.stat().st_mtime < before:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed


def sweep(settings: Settings | None = None) -> dict[str, int]:
    with _SWEEPING:
        return _sweep(settings or get_settings())


def _sweep(settings: Settings) -> dict[str, int]:
    counts = {"requeued": 0, "ended": 0, "resent": 0, "admitted": 0}
    now = time.time()
    with session_scope() as session:
        cutoff = now - settings.stale_after_s
        for job in crud.stale_jobs(session=session, heartbeat_before=cutoff):
            moved = crud.requeue_lost(session=session, job=job, heartbeat_before=cutoff,
                                      max_resumes=settings.max_resumes)
            if moved is not None and moved.status == JobStatus.queued:
                counts["requeued"] += 1
                queue.enqueue(session=session, job=moved)
            elif moved is not None:
                counts["ended"] += 1

        for job in crud.stuck_validating(session=session, created_before=now - settings.requeue_after_s):
            moved = admit(session=session, job=job)
            if moved is not None and moved.status == JobStatus.queued:
                counts["admitted"] += 1
                queue.enqueue(session=session, job=moved)

        candidates = crud.unsent_candidates(session=session, enqueued_before=now - settings.requeue_after_s)
        present = queued_task_ids({job.queue for job in candidates}) if candidates else set()
        for job in candidates:
            if present is None and (job.enqueued_at or 0) > now - settings.requeue_blind_after_s:
                continue
            if present is not None and job.task_id in present:
                continue
            crud.add_event(session=session, job_id=job.id, type="message", level="warning",
                           message="the job's message is not in the broker; sending it again",
                           data={"task_id": job.task_id})
            counts["resent"] += queue.enqueue(session=session, job=job)
    counts["temp_removed"] = remove_stale_uploads(settings.datasets_dir / ".tmp", before=now - STALE_UPLOAD_S)
    if any(counts.values()):
        log.info("reaper: %s", counts)
    return counts


def queued_task_ids(queues: set[str]) -> set[str] | None:
    """Task ids waiting in the broker's queues, or None when the broker cannot be inspected."""
    app = queue.producer()
    url = app.conf.broker_url or ""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    with app.connection_for_read() as conn:
        client = conn.default_channel.client
        found: set[str] = set()
        for name in queues:
            for raw in client.lrange(name, 0, -1):
                found.add(_task_id(raw))
    return found


def _task_id(raw: bytes) -> str:
    try:
        message = json.loads(raw)
        return message["headers"]["id"]
    except (ValueError, KeyError, TypeError):
        return ""


def start_thread(settings: Settings | None = None) -> threading.Event:
    """Sweep every ``reaper_interval_s`` in a daemon thread; set the returned event to stop it."""
    settings = settings or get_settings()
    install_fork_guard()
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(settings.reaper_interval_s):
            try:
                sweep(settings)
            except Exception:  # the DB or broker being down for a moment must not kill the reaper
                log.exception("reaper sweep failed")

    threading.Thread(target=loop, name="trinity-reaper", daemon=True).start()
    return stop
