"""The udquant-job command line for a DispatchRequest: the one source every backend uses.

HF Jobs runs it as the container command, Docker splits it into entrypoint and arguments,
and the GitHub workflow receives the same values as its inputs. No token is ever part of it:
each backend hands the token over as a secret or an environment variable.
"""

from __future__ import annotations

from udquant.dispatch.base import DispatchRequest, default_image

JOB_PROGRAM = "udquant-job"
# The job's plain settings wherever it is started (HF Jobs, local Docker); never a credential.
JOB_ENV = {"UDQUANT_NO_PROGRESS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
LEVELS_SEPARATOR = " "  # quantize.yml splits its levels input on spaces

__all__ = ["JOB_PROGRAM", "build_job_args", "build_workflow_inputs", "default_image", "image_name", "image_tag"]


def build_job_args(request: DispatchRequest) -> list[str]:
    """argv of the job: udquant-job REPO --quant L ... --recipe R --imatrix I --upload [--output-repo O] [--private]
    [--eval]; --output-repo only when the user named one."""
    args = [JOB_PROGRAM, request.repo_id]
    for level in request.levels:
        args += ["--quant", level]
    args += ["--recipe", request.recipe, "--imatrix", request.imatrix, "--upload"]
    if request.output_repo_named and request.output_repo is not None:
        args += ["--output-repo", request.output_repo]
    if request.private:
        args.append("--private")
    if request.evaluate:
        args.append("--eval")
    return args


def image_name(image: str) -> str:
    """An image reference without its tag and digest: registry[:port]/path."""
    name = image.split("@", 1)[0]
    head, _, last = name.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def image_tag(image: str) -> str:
    """The tag of an image reference (registry:port/name:tag@digest), 'latest' when it has none."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else "latest"


def build_workflow_inputs(request: DispatchRequest) -> dict[str, str]:
    """workflow_dispatch inputs of quantize.yml; GitHub takes every input as a string.

    image-tag pins the runner to the image of this release, as the other backends are.
    """
    return {
        "repo": request.repo_id,
        "levels": LEVELS_SEPARATOR.join(request.levels),
        "recipe": request.recipe,
        "imatrix": request.imatrix,
        "private": "true" if request.private else "false",
        "eval": "true" if request.evaluate else "false",
        "image-tag": image_tag(request.image),
    }
