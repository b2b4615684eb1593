"""GET /livez (the process answers) and GET /health (the process and its database answer): the
only routes without an API key besides the API docs and the dashboard's static pages."""

from fastapi import APIRouter, Response
from sqlalchemy import text

from api.deps import SessionDep

router = APIRouter(tags=["health"])

_ALIVE = b'{"status":"ok"}'


@router.get("/livez", responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}})
async def livez() -> Response:
    """Liveness: a constant answer from the event loop, no database, no thread. For a liveness
    probe (restart the process when it stops answering) and as the trivial endpoint that
    ``bench/api_load.py`` measures beside GET /jobs/{id}."""
    return Response(_ALIVE, media_type="application/json")


@router.get("/health")
def health(session: SessionDep) -> dict[str, str]:
    """Readiness: the process and its database answer (``SELECT 1``). A sync route with a sync
    dependency, so FastAPI makes four threadpool hops (the session's enter and exit, the route,
    its response's validation) besides the session, the pool checkout and the query: several
    times the price of /livez, which is why the benchmark's trivial endpoint is /livez."""
    session.execute(text("SELECT 1"))
    return {"status": "ok"}
