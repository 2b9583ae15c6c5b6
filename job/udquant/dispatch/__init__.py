"""Dispatch the job to a machine with a GPU: Hugging Face Jobs, a local Docker engine, or a
self-hosted GitHub Actions runner. One protocol (base.Backend), one command line (job_command)."""

from udquant.dispatch.base import (
    BACKENDS,
    Backend,
    DispatchError,
    DispatchRequest,
    JobHandle,
    JobStatus,
    make_request,
)
from udquant.dispatch.job_command import build_job_args, build_workflow_inputs, default_image

__all__ = [
    "BACKENDS",
    "Backend",
    "DispatchError",
    "DispatchRequest",
    "JobHandle",
    "JobStatus",
    "build_job_args",
    "build_workflow_inputs",
    "default_image",
    "make_request",
]
