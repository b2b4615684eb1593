"""Stage 4, evaluation: base vs fine-tuned and export fidelity (``run``), the merged weights checked
against the trained model (``merge_check``), caps and per-stage budgets (``budget``), report.md and
the loss plot (``report``)."""
