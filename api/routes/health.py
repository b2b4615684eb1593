from fastapi import APIRouter
from sqlalchemy import text

from api.deps import SessionDep

router = APIRouter(tags=["health"])


@router.get("/health")
def health(session: SessionDep) -> dict[str, str]:
    """Liveness and database reachability; the only route without an API key."""
    session.execute(text("SELECT 1"))
    return {"status": "ok"}
