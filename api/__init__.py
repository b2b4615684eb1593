"""The HTTP service: FastAPI + SQLModel around ``trinity_core`` (no training code here)."""
