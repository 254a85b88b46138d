"""sample.py's pieces: tasks that build a Job from user inputs, the batched sampling loop, run records."""

from ldm.sampling.job import Job, check_supported, supported_tasks
from ldm.sampling.records import make_record, write_outputs
from ldm.sampling.runner import Result, Settings, prepare, resolve_device, run_job

__all__ = [
    "Job",
    "Result",
    "Settings",
    "check_supported",
    "make_record",
    "prepare",
    "resolve_device",
    "run_job",
    "supported_tasks",
    "write_outputs",
]
