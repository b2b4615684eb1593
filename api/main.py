"""Assembles the app: routers, error handlers, and a lifespan that creates tables and runs the
SSE event hub (``api/event_hub.py``) and the webhook sender thread (``api/webhook_sender.py``; the reaper runs in the worker). Run with ``uvicorn api.main:app`` or ``trinity serve``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from api import auth, errors
from api.event_hub import EventHub
from trinity_service.db import init_db
from api.deps import get_tenant
from api.routes import (artifacts, dashboard, datasets, estimate, events, health, jobs, openai_files, openai_jobs,
                        webhooks)
from trinity_service.settings import get_settings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    logging.getLogger("trinity").setLevel(logging.INFO)
    init_db()
    auth.forget()  # a cache from another app of this process (tests) must not outlive it
    app.state.event_hub = EventHub(settings)  # SSE fan-out: one Redis subscriber for every follower
    await app.state.event_hub.start()
    stops = []  # the reaper runs in the worker (worker/app.py), not here
    if settings.webhooks_enabled:
        from api import webhook_sender

        stops.append(webhook_sender.start_thread(settings))
    yield
    await app.state.event_hub.stop()
    for stop in stops:
        stop.set()


def create_app() -> FastAPI:
    app = FastAPI(title="Trinity", version="0.1.0", lifespan=lifespan,
                  description="Self-hosted fine-tuning jobs. Every route but /livez and /health needs "
                              "`Authorization: Bearer <key>` (`trinity keys create --tenant NAME`).")
    errors.install(app)
    app.include_router(health.router)
    app.include_router(jobs.poll_router)  # GET /jobs/{id}: checks the key itself (api/routes/jobs.py)
    authed = [Depends(get_tenant)]
    for module in (datasets, estimate, jobs, events, artifacts, webhooks, openai_files, openai_jobs):
        app.include_router(module.router, dependencies=authed, responses=errors.AUTHED_RESPONSES)
    app.include_router(dashboard.router)  # static pages; their script calls the API above with the key
    app.mount("/ui/static", dashboard.static_files, name="ui-static")
    return app


app = create_app()
