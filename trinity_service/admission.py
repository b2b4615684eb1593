"""``validating_files``: a new job's dataset file is checked on the server before it is queued.

The dataset was validated row by row at upload; here the stored file must still be there,
unchanged in size. Called by POST /jobs and by the reaper for a job an API process left behind.
"""

from __future__ import annotations

from pathlib import Path

from sqlmodel import Session

from trinity_service import crud
from trinity_service.models import Dataset, Job
from trinity_service.states import IllegalTransition, JobStatus


def admit(*, session: Session, job: Job) -> Job | None:
    """validating_files → queued, or → failed with ``invalid_dataset``. None if the job moved on."""
    problem = dataset_problem(session=session, job=job)
    try:
        if problem:
            error = {"code": "invalid_dataset", "message": problem, "param": "data.dataset_id"}
            return crud.transition(session=session, job_id=job.id, to=JobStatus.failed, level="error",
                                   only_from={JobStatus.validating_files}, values={"error": error},
                                   message=problem, event_data={"error": error})
        return crud.transition(session=session, job_id=job.id, to=JobStatus.queued,
                               only_from={JobStatus.validating_files},
                               message=f"files validated; queued on {job.queue}")
    except IllegalTransition:  # another process (the reaper, under load) admitted it first
        return None


def dataset_problem(*, session: Session, job: Job) -> str | None:
    """Why the job's training or eval dataset (``data.eval_dataset_id``) cannot be used, or None."""
    for dataset_id in (job.dataset_id, (job.spec.get("data") or {}).get("eval_dataset_id")):
        if not dataset_id:
            continue
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.tenant != job.tenant:
            return f"dataset {dataset_id} no longer exists"
        path = Path(dataset.path)
        if not path.is_file() or path.stat().st_size != dataset.size_bytes:
            return f"the stored file of dataset {dataset_id} is missing or changed"
    return None
