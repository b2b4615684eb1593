"""The dashboard: ``/`` redirects to ``/ui`` (the tenant's jobs), ``/ui/jobs/{id}`` is one job.

The pages are static files from ``api/static/`` (plain HTML, vanilla JS, no build step, nothing
fetched from the internet). They carry no data and need no key: the page's script reads the API
key from the browser's storage (``sessionStorage``, or ``localStorage`` when "remember" is ticked),
never from the URL, and calls the JSON API with ``Authorization: Bearer``. So tenant isolation is
the JSON API's: another tenant's job answers 404 there and the page says "not found".
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[1] / "static"
# The pages are the same for everyone; forbid framing and third-party resources outright.
HEADERS = {"Cache-Control": "no-cache", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
           "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                                      "script-src 'self'; connect-src 'self'; frame-ancestors 'none'"}

router = APIRouter(include_in_schema=False)
static_files = StaticFiles(directory=STATIC)


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type="text/html", headers=HEADERS)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui")
def jobs_page() -> FileResponse:
    return _page("index.html")


@router.get("/ui/jobs/{job_id}")
def job_page(job_id: str) -> FileResponse:  # noqa: ARG001 (the script reads the id from the path)
    return _page("job.html")
