"""The one task. It takes a job id, never an object; the job row is the truth."""

from __future__ import annotations

from trinity_service.settings import get_settings
from trinity_core.errors import GpuMemoryNotReleased, JobCancelled, TrinityError
from worker import runner
from trinity_service.queue import TASK_NAME
from worker.app import app


@app.task(bind=True, name=TASK_NAME)
def run_training(self, job_id: str) -> str:
    """Claim the job (only one delivery wins), run it, record how it ended."""
    job = runner.claim(job_id, worker=self.request.hostname or "worker")
    if job is None:
        return "skipped"  # cancelled while queued, finished, or already running: a duplicate message
    try:
        result = runner.run(job)
    except JobCancelled as stopped:
        return runner.cancelled(job, stopped)
    except GpuMemoryNotReleased as error:
        # The ladder's next rung needs a fresh process (worker_max_tasks_per_child=1): re-queue now.
        # Bounded by the ladder: each such run starts one rung further down.
        attempt = self.request.retries + 1
        if runner.requeue(job, error, task_id=self.request.id, countdown=0.0, attempt=attempt):
            raise self.retry(countdown=0, max_retries=None) from None
        return runner.fail(job, error)
    except TrinityError as error:
        settings, attempt = get_settings(), self.request.retries + 1
        if error.retryable and attempt <= settings.max_retries:
            countdown = settings.retry_backoff_s * 2 ** (attempt - 1)
            if runner.requeue(job, error, task_id=self.request.id, countdown=countdown, attempt=attempt):
                raise self.retry(countdown=countdown, max_retries=settings.max_retries) from None
        return runner.fail(job, error)
    except Exception as error:  # a bug or the soft time limit: the row says failed, with the reason
        return runner.fail(job, error)
    return runner.succeed(job, result)
