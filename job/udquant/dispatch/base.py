"""What every dispatch backend takes and returns: a validated request, a handle, a status.

A DispatchRequest is checked when it is made, so a backend can trust every field it puts
into a command line, a container spec or a workflow input.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from huggingface_hub import constants

from udquant import __version__
from udquant.errors import InputError, UdquantError
from udquant.library import recipes_dir
from udquant.recipe import DEFAULT_LEVEL, LEVEL_NAME, RECIPE_ID, load_recipe
from udquant.resolve import validate_repo_id

BACKENDS = ("hf-jobs", "docker", "github")
IMATRIX_CHOICES = ("auto", "compute", "none")
IMAGE_REPOSITORY = "ghcr.io/udquant/udquant-job"
OUTPUT_SUFFIX = "-UD-GGUF"
# registry[:port]/path[:tag][@digest], lower-case path components as OCI references require.
_IMAGE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)+"
                    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")
_URL = re.compile(r"https?://\S+")

State = Literal["queued", "running", "completed", "failed", "canceled"]
TERMINAL_STATES: tuple[State, ...] = ("completed", "failed", "canceled")


class DispatchError(UdquantError):
    """A dispatch backend (HF Jobs, Docker, GitHub) refused or failed a request."""

    exit_code = 10

    def __init__(self, backend: str, message: str, *, status_code: int | None = None,
                 hint: str | None = None) -> None:
        super().__init__(f"{backend}: {message}", hint=hint)
        self.backend = backend
        self.status_code = status_code


def default_image() -> str:
    """The job image of this release: the dispatcher and the job always have the same version."""
    return f"{IMAGE_REPOSITORY}:{__version__}"


def repo_url(repo_id: str) -> str:
    """The Hub page of a repo (HF_ENDPOINT's host): the result link of a job that uploaded there."""
    return f"{constants.ENDPOINT}/{repo_id}"


def library_levels() -> tuple[str, ...]:
    return tuple(sorted({path.stem for path in recipes_dir().glob("*/*.yaml")}))


def output_repo_for(repo_id: str, namespace: str) -> str:
    """Where the job uploads: <namespace>/<Name>-UD-GGUF."""
    return validate_repo_id(f"{namespace}/{repo_id.split('/', 1)[1]}{OUTPUT_SUFFIX}")


def _check_levels(levels: tuple[str, ...]) -> None:
    if not levels:
        raise InputError("choose at least one level")
    known = library_levels()
    for level in levels:
        if not LEVEL_NAME.fullmatch(level) or level not in known:
            raise InputError(f"unknown level {level!r}; levels in the library: {', '.join(known)}")
    if len(set(levels)) != len(levels):
        raise InputError("a level is named twice")


def recipe_level(recipe: str) -> str:
    """The level a library recipe makes (its file names and the job's --quant)."""
    # Only library ids: a path on this machine means nothing on the machine that runs the job.
    if not RECIPE_ID.fullmatch(recipe) or not (recipes_dir() / f"{recipe}.yaml").is_file():
        raise InputError(f"recipe {recipe!r} is not in the library",
                         hint="use 'auto' or a library id such as generic/UD-Q5_K_XL")
    return load_recipe(recipes_dir() / f"{recipe}.yaml").level


def _check_recipe(recipe: str, levels: tuple[str, ...]) -> None:
    """A named recipe makes its own level, and only that: the job refuses any other --quant with it."""
    if recipe == "auto":
        return
    level = recipe_level(recipe)
    if levels != (level,):
        raise InputError(f"recipe {recipe} makes {level}, and --quant asks for {', '.join(levels)}",
                         hint=f"give --recipe alone, or with --quant {level}")


@dataclass(frozen=True)
class DispatchRequest:
    """One job to run somewhere else. Every field is validated on creation."""

    repo_id: str
    output_repo: str | None = None  # None: the job's default, <token's namespace>/<Name>-UD-GGUF
    # Named by the user: the job publishes there even into a repo udquant did not make. The default
    # name, known to the dispatcher for the result link, is left to the job, which refuses such a repo.
    output_repo_named: bool = False
    levels: tuple[str, ...] = (DEFAULT_LEVEL,)
    recipe: str = "auto"
    imatrix: str = "auto"
    private: bool = False
    evaluate: bool = False  # the job's --eval: KLD vs BF16 of every level in the card
    image: str = field(default_factory=default_image)

    def __post_init__(self) -> None:
        validate_repo_id(self.repo_id)
        if self.output_repo is not None:
            validate_repo_id(self.output_repo)
        elif self.output_repo_named:
            raise InputError("output_repo_named needs an output_repo")
        _check_levels(self.levels)
        _check_recipe(self.recipe, self.levels)
        if self.imatrix not in IMATRIX_CHOICES:
            raise InputError(f"imatrix must be one of {', '.join(IMATRIX_CHOICES)}, not {self.imatrix!r}")
        if not _IMAGE.fullmatch(self.image):
            raise InputError(f"{self.image!r} is not an image reference (registry/name:tag)")


def make_request(repo_id: str, namespace: str | None, *, levels: Iterable[str] | None = None, recipe: str = "auto",
                 imatrix: str = "auto", private: bool = False, output_repo: str | None = None,
                 image: str | None = None, evaluate: bool = False) -> DispatchRequest:
    """A request whose output repo defaults to <namespace>/<Name>-UD-GGUF when the namespace is known.

    levels None means none given: the named recipe's level, else DEFAULT_LEVEL.
    """
    validate_repo_id(repo_id)
    if levels is None:
        levels = (DEFAULT_LEVEL,) if recipe == "auto" else (recipe_level(recipe),)
    named = output_repo is not None
    if output_repo is None and namespace is not None:
        output_repo = output_repo_for(repo_id, namespace)
    return DispatchRequest(repo_id=repo_id, output_repo=output_repo, output_repo_named=named,
                           levels=tuple(levels), recipe=recipe, imatrix=imatrix, private=private,
                           evaluate=evaluate, image=image or default_image())


def check_upload_target(request: DispatchRequest, token: str) -> None:
    """Refuse here, before anything starts or is billed, an output repo the job would refuse at its start:
    one the token may not write, a public repo for --private, a repo of another model or not udquant's."""
    from udquant.publish import plan_target

    plan_target(request.repo_id.split("/")[1], request.repo_id,
                output_repo=request.output_repo if request.output_repo_named else None,
                private=request.private, token=token, otherwise=None)


@dataclass(frozen=True)
class JobHandle:
    """What identifies a started job; holds no credential, so it may be shown and stored."""

    backend: str
    job_id: str
    location: str  # HF namespace, GitHub owner/repo, or the Docker host
    output_repo: str | None
    url: str | None = None


@dataclass(frozen=True)
class JobStatus:
    state: State
    detail: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class Backend(Protocol):
    name: str

    def start(self, request: DispatchRequest) -> JobHandle: ...

    def status(self, handle: JobHandle) -> JobStatus: ...

    def logs(self, handle: JobHandle, tail: int = 50) -> list[str]: ...

    def cancel(self, handle: JobHandle) -> None: ...

    def result_link(self, handle: JobHandle) -> str | None: ...

    def release(self, handle: JobHandle) -> None:
        """Free what an ended job still holds once its result has been read (Docker: the container)."""
        ...


def known_result(handle: JobHandle) -> str | None:
    """Where a completed job's result is when its backend cannot tell (no log to read): its output repo's page."""
    return repo_url(handle.output_repo) if handle.output_repo else None


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Text with every secret replaced, for anything that is shown or logged."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def link_from_logs(lines: Iterable[str]) -> str | None:
    """The URL on the job's last output line: the job prints the uploaded repo's URL last."""
    last = ""
    for line in lines:
        if line.strip():
            last = line
    match = _URL.search(last)
    return match.group(0).rstrip(".,;)") if match else None


def output_link_in_logs(lines: Iterable[str]) -> str | None:
    """The last <namespace>/<Name>-UD-GGUF URL anywhere in a log that goes on after the job (CI steps)."""
    found = None
    for line in lines:
        for url in _URL.findall(line):
            if url.rstrip("/.,;)").endswith(OUTPUT_SUFFIX):
                found = url.rstrip("/.,;)")
    return found
