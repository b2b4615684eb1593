"""The Celery worker: a thin shell that claims a job row and calls ``trinity_core.run_job``."""
