"""`udquant dispatch --backend hf-jobs|docker|github REPO ...`: start the job elsewhere, optionally follow it.

Tokens come only from the environment (HF_TOKEN, GITHUB_TOKEN), never from the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import time

from huggingface_hub import HfApi

from udquant.arguments import finite_number, whole_number
from udquant.dispatch.base import (
    BACKENDS,
    IMATRIX_CHOICES,
    Backend,
    DispatchError,
    DispatchRequest,
    JobHandle,
    JobStatus,
    check_upload_target,
    known_result,
    make_request,
    output_repo_for,
)
from udquant.dispatch.job_command import default_image
from udquant.errors import InputError
from udquant.hub import whoami
from udquant.recipe import DEFAULT_LEVEL
from udquant.resolve import validate_repo_id

logger = logging.getLogger(__name__)

POLL_RETRIES = 5  # failed status looks in a row that --wait tolerates (network, 429, 5xx)
EXIT_INTERRUPTED = 130
TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _env_token(name: str, backend: str) -> str:
    token = os.environ.get(name, "").strip()
    if not token:
        raise InputError(f"--backend {backend} needs {name} in the environment",
                         hint=f"export {name}=...; tokens are never taken from the command line")
    return token


def _namespace(token: str) -> str:
    """The token's user name: the namespace of the default output repo."""
    return str(whoami(HfApi(token=token), purpose="dispatching")["name"])


def make_backend(args: argparse.Namespace) -> Backend:
    if args.backend == "github":
        from udquant.dispatch.github import GitHubBackend

        if not args.github_repo:
            raise InputError("--backend github needs --github-repo owner/repo")
        return GitHubBackend(_env_token("GITHUB_TOKEN", "github"), args.github_repo, workflow=args.workflow,
                             ref=args.ref, api_url=args.github_api)
    token = _env_token("HF_TOKEN", args.backend)
    if args.backend == "docker":
        from udquant.dispatch.docker_backend import DockerBackend

        # Not followed here (auto-remove), the job is labelled with the token's user, so that a Space on this
        # engine follows it; one that --wait follows is this command's to read and remove, so it has no such label.
        return DockerBackend(token, followed=args.wait, user=None if args.wait else _namespace(token))
    from udquant.dispatch.hf_jobs import HfJobsBackend

    return HfJobsBackend(token, flavor=args.flavor, timeout=args.timeout)


def request_from_args(args: argparse.Namespace) -> DispatchRequest:
    """The validated request; all input (repo, levels, recipe, imatrix, image, token) is checked before the
    one Hub request here, the whoami that names the default output repo."""
    validate_repo_id(args.repo)
    if args.backend == "github" and args.output_repo:
        raise InputError("--output-repo is not available with --backend github: the workflow uploads to the "
                         "runner token's <namespace>/<Name>-UD-GGUF")
    # No --quant is not the default level: with --recipe it is the recipe's level.
    request = make_request(args.repo, None, levels=args.levels, recipe=args.recipe, imatrix=args.imatrix,
                           private=args.private, output_repo=args.output_repo, image=args.image,
                           evaluate=args.evaluate)
    if args.backend == "github" or args.output_repo:
        return request
    namespace = _namespace(_env_token("HF_TOKEN", args.backend))
    return dataclasses.replace(request, output_repo=output_repo_for(args.repo, namespace))


def _job_timeout(text: str) -> str:
    """An HF Jobs time limit as huggingface_hub reads it: whole seconds, or a number with s, m, h or d, which
    it turns into int(number * unit) seconds: at least one, since 0.5s would be sent as 0."""
    if not re.fullmatch(r"\d+|\d+(\.\d+)?[smhd]", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a time limit such as 8h, 90m or 3600")
    unit = TIME_UNITS.get(text[-1], 1)
    if int(float(text.rstrip("smhd")) * unit) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time limit such as 8h, 90m or 3600: "
                                         "the shortest is 1 second (the Hub counts whole seconds)")
    return text


def _passing(err: DispatchError) -> bool:
    """A failure that may be gone at the next look: no answer, rate limited, or a server error."""
    return err.status_code is None or err.status_code == 429 or err.status_code >= 500


def _watch(backend: Backend, handle: JobHandle, poll: float, timeout_minutes: float | None) -> JobStatus:
    """The job's final status; passing failures of the backend are retried, a few in a row at most."""
    deadline = time.monotonic() + timeout_minutes * 60 if timeout_minutes else None
    last, failures = "", 0
    while True:
        try:
            status = backend.status(handle)
            failures = 0
        except DispatchError as err:
            failures += 1
            if not _passing(err) or failures > POLL_RETRIES:
                raise
            logger.warning("%s (looking again, %d of %d)", err, failures, POLL_RETRIES)
        else:
            if status.state != last:
                print(f"{handle.job_id}: {status.state} {status.detail}".rstrip(), file=sys.stderr)
                last = status.state
            if status.terminal:
                return status
        if deadline is not None and time.monotonic() >= deadline:
            raise DispatchError(backend.name, f"job {handle.job_id} has not ended after --wait-timeout "
                                              f"{timeout_minutes:g} min; it goes on running",
                                hint=handle.url or _unfollowed_hint(handle))
        time.sleep(poll)


def _unfollowed_hint(handle: JobHandle) -> str:
    if handle.backend == "docker":
        short = handle.job_id[:12]
        return (f"`docker logs -f {short}` follows it, `docker stop {short}` cancels it; remove it with "
                f"`docker rm {short}` once it has ended (the engine stores HF_TOKEN with the container)")
    return "cancel it where it runs if it is stuck"


def _stopped_following(handle: JobHandle, interrupt: KeyboardInterrupt) -> int:
    """Ctrl-C or SIGTERM once the job has started stops following, not the job: say how to reach it, since
    running the same command again would start a second one."""
    from udquant.cli import EXIT_TERMINATED, Terminated  # the entry point, loaded already: no cycle

    print(f"stopped following {handle.backend} job {handle.job_id}, which goes on running (the same command "
          f"would start another job): " + (f"{handle.url}; " if handle.url else "") + _unfollowed_hint(handle),
          file=sys.stderr)
    return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED


def follow(backend: Backend, handle: JobHandle, args: argparse.Namespace) -> int:
    """Poll until the job ends; the link of the uploaded repo is the last stdout line. Ctrl-C stops
    following, not the job."""
    try:
        return _follow(backend, handle, args)
    except KeyboardInterrupt as interrupt:
        return _stopped_following(handle, interrupt)


def _follow(backend: Backend, handle: JobHandle, args: argparse.Namespace) -> int:
    status = _watch(backend, handle, args.poll, args.wait_timeout)
    # Whatever cannot be read now, the ended job is released: a Docker container holds the token.
    try:
        for line in _log_tail(backend, handle, args.tail):
            print(line, file=sys.stderr)
        link = _result_link(backend, handle) if status.state == "completed" else None
    finally:
        _release(backend, handle)
    if status.state != "completed":
        raise DispatchError(backend.name, f"job {handle.job_id} ended {status.state}: {status.detail}")
    if link:
        print(link)
    else:
        print("the job printed no repo URL" + (f"; its run: {handle.url}" if handle.url else ""), file=sys.stderr)
    return 0


def _release(backend: Backend, handle: JobHandle) -> None:
    """Free what the ended job holds; a failure to do so must not hide its result."""
    try:
        backend.release(handle)
    except DispatchError as err:
        gone = " (removed elsewhere)" if err.status_code == 404 else ""
        logger.warning("cannot release %s job %s%s: %s", handle.backend, handle.job_id, gone, err)


def _log_tail(backend: Backend, handle: JobHandle, tail: int) -> list[str]:
    try:
        return backend.logs(handle, tail=tail)
    except DispatchError as err:
        logger.warning("the job's log cannot be read: %s", err)
        return []


def _result_link(backend: Backend, handle: JobHandle) -> str | None:
    """The backend's link of the result; the output repo's page when it cannot tell."""
    known = known_result(handle)
    try:
        return backend.result_link(handle) or known
    except DispatchError as err:
        logger.warning("the job's result link cannot be read (%s); it uploads to %s", err, known or "its output repo")
        return known


def dispatch_command(args: argparse.Namespace) -> int:
    request = request_from_args(args)
    if args.backend != "github":  # the runner's own token uploads there: nothing to check from here
        check_upload_target(request, _env_token("HF_TOKEN", args.backend))
    backend = make_backend(args)
    handle = backend.start(request)
    try:  # from here on the job runs whatever happens to this command
        print(f"started {handle.backend} job {handle.job_id}" + (f": {handle.url}" if handle.url else ""),
              file=sys.stderr)
        if args.wait:
            return follow(backend, handle, args)
        if handle.backend == "docker":  # started with auto-remove: nobody releases it
            print(f"follow it with `docker logs -f {handle.job_id[:12]}`; the container removes itself when the "
                  "job ends (the engine stores HF_TOKEN with it), and each stage's log stays in the udquant-data "
                  "volume", file=sys.stderr)
        print(handle.job_id)
        return 0
    except KeyboardInterrupt as interrupt:
        return _stopped_following(handle, interrupt)


def add_dispatch_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "dispatch", help="run the job on HF Jobs, local Docker or a self-hosted GitHub runner",
        description="Start udquant-job elsewhere. HF_TOKEN (hf-jobs, docker) and GITHUB_TOKEN (github) "
                    "are read from the environment.")
    parser.add_argument("repo", help="Hub repo id of the distill (owner/name)")
    parser.add_argument("--backend", required=True, choices=BACKENDS)
    parser.add_argument("--quant", dest="levels", action="append", metavar="LEVEL",
                        help=f"level to make, repeatable (default: the --recipe's level, else {DEFAULT_LEVEL})")
    parser.add_argument("--recipe", default="auto", metavar="auto|ID", help="auto or a library recipe id")
    parser.add_argument("--imatrix", default="auto", choices=IMATRIX_CHOICES,
                        help="auto: the distill's own published imatrix, else computed on the GPU (default)")
    parser.add_argument("--private", action="store_true", help="make the output repo private")
    parser.add_argument("--eval", dest="evaluate", action="store_true",
                        help="the job measures KL divergence vs BF16 of every level (card table; adds time)")
    parser.add_argument("--output-repo", help="where to upload (default: <your namespace>/<Name>-UD-GGUF)")
    parser.add_argument("--image", default=default_image(), help="job image (default: this release's)")
    parser.add_argument("--flavor", default="a10g-large",
                        help="hf-jobs hardware flavor, one HF Jobs offers with a GPU of compute capability 8.0 or "
                             "newer (checked before the start; default: a10g-large)")
    parser.add_argument("--timeout", default="8h", type=_job_timeout,
                        help="hf-jobs time limit: seconds, or a number with s, m, h or d, at least 1 s (default: 8h)")
    parser.add_argument("--github-repo", metavar="OWNER/REPO", help="github: the repository with quantize.yml")
    parser.add_argument("--workflow", default="quantize.yml", help="github: workflow file (default: quantize.yml)")
    parser.add_argument("--ref", default="main", help="github: branch or tag to run the workflow from")
    parser.add_argument("--github-api", default=os.environ.get("GITHUB_API_URL", "https://api.github.com"),
                        help="github: API base URL (default: $GITHUB_API_URL or https://api.github.com)")
    parser.add_argument("--wait", action="store_true", help="follow the job; print the output repo's URL at the end")
    parser.add_argument("--poll", type=finite_number("a number of seconds", above=0), default=15.0,
                        help="seconds between status checks with --wait")
    parser.add_argument("--wait-timeout", type=finite_number("a number of minutes", above=0), metavar="MINUTES",
                        help="with --wait: give up following after this long (the job goes on); default: no limit")
    parser.add_argument("--tail", type=whole_number("a number of lines", at_least=1), default=40,
                        help="log lines shown at the end with --wait")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.set_defaults(func=dispatch_command)
    return parser
