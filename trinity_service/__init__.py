"""What the API and the worker share, so neither imports the other: settings, the database
(engine, tables, CRUD, the job state machine, the webhook outbox), dataset admission, and the
queue (``queue.enqueue`` sends a job by task name; the worker defines the task)."""
