"""Upload verified results to the Hub in one commit; a rerun with identical files uploads nothing.

GGUF files larger than the split size are split with llama-gguf-split first (the Hub
refuses files over 50 GB).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import RepositoryNotFoundError

from udquant.errors import HubError, InputError
from udquant.hub import HUB_ERRORS, hub_error
from udquant.output import sha256_file
from udquant.resolve import validate_repo_id
from udquant.runner import run_tool
from udquant.toolchain import Toolchain
from udquant.workdir import atomic_dir

logger = logging.getLogger(__name__)

DEFAULT_SPLIT_BYTES = 45 * 1000**3  # under the Hub's 50 GB per-file limit


@dataclass(frozen=True)
class Target:
    repo_id: str
    private: bool


@dataclass(frozen=True)
class Publication:
    repo_id: str
    url: str
    commit: str | None  # None when nothing changed
    uploaded: tuple[str, ...]


def plan_target(model_name: str, *, output_repo: str | None, private: bool, token: str | None) -> Target:
    """Where results go; checks the token and the repo before any heavy work is done."""
    if not token:
        raise InputError("uploading needs a Hugging Face token with write access in HF_TOKEN",
                         hint="set HF_TOKEN, or pass --no-upload to keep the results local")
    api = HfApi(token=token)
    try:
        me = api.whoami()
    except HUB_ERRORS as err:
        raise HubError("the Hub refused the token in HF_TOKEN", hint=f"check it has write access ({err})") from None
    # Fine-grained tokens say "fineGrained": their scopes are checked by the Hub when we write.
    if me.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise InputError("the token in HF_TOKEN is read-only: uploading needs write access",
                         hint="use a token with the write role, or pass --no-upload to keep the results local")
    repo_id = validate_repo_id(output_repo or f"{me['name']}/{model_name}-UD-GGUF")
    if private:
        # create_repo(private=True) leaves an existing repo as it is: never publish into a public one.
        try:
            public = not api.repo_info(repo_id).private
        except RepositoryNotFoundError:
            public = False
        except HUB_ERRORS as err:
            raise hub_error(repo_id, err) from None
        if public:
            raise InputError(f"--private, but {repo_id} already exists and is public",
                             hint="make it private in its settings on the Hub, or choose another --output-repo")
    return Target(repo_id, private)


def git_blob_id(path: Path) -> str:
    """The id git (and the Hub) gives a file's content: sha1 of 'blob <size>\\0' + content."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_for_upload(toolchain: Toolchain, gguf: Path, dest: Path, split_bytes: int, *, log_path: Path) -> list[Path]:
    """[gguf] when small enough, else its shards, made in dest and reused only for the same file and size.

    The shards live in dest/<stem>/<key>, key from the file's size and mtime (the output stage
    replaces it whole) and the split size; a split that was cut short never gets that folder.
    """
    if gguf.stat().st_size <= split_bytes:
        return [gguf]
    stat = gguf.stat()
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:{split_bytes}".encode()).hexdigest()[:12]
    folder = dest / gguf.stem / key
    if not folder.is_dir():
        # Shards of an earlier file or split size, or of a split that was killed: a model's size each.
        shutil.rmtree(folder.parent, ignore_errors=True)
        megabytes = max(1, split_bytes // 1_000_000)
        with atomic_dir(folder) as staging:
            run_tool([toolchain.tool("llama-gguf-split"), "--split", "--split-max-size", f"{megabytes}M", gguf,
                      staging / gguf.stem], stage="publish", log_path=log_path)
    return sorted(folder.glob(f"{gguf.stem}-*-of-*.gguf"))


def _matches(path: Path, entry: object) -> bool:
    if getattr(entry, "size", None) != path.stat().st_size:
        return False
    lfs = getattr(entry, "lfs", None)
    if lfs is not None:
        return bool(lfs.sha256 == sha256_file(path))
    return getattr(entry, "blob_id", None) == git_blob_id(path)


def changed_files(api: HfApi, repo_id: str, files: dict[str, Path]) -> list[str]:
    """The repo paths whose remote content differs from the local file (or is missing)."""
    try:
        remote = {entry.path: entry for entry in api.get_paths_info(repo_id, list(files))}
    except HUB_ERRORS:
        return list(files)
    return [name for name, path in files.items() if name not in remote or not _matches(path, remote[name])]


def publish(target: Target, files: dict[str, Path], *, token: str, message: str,
            volatile: frozenset[str] = frozenset()) -> Publication:
    """Create the repo if needed and upload the changed files (repo path -> local file) in ONE commit.

    Files in volatile (the result JSON: it holds timings) are uploaded only along with a real change.
    """
    api = HfApi(token=token)
    try:
        url = str(api.create_repo(target.repo_id, private=target.private, exist_ok=True, repo_type="model"))
        changed = changed_files(api, target.repo_id, files)
        if not set(changed) - volatile:
            logger.info("publish: %s already holds these exact files; nothing uploaded", target.repo_id)
            return Publication(target.repo_id, url, None, ())
        upload = sorted(set(changed) | (volatile & set(files)))
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(files[name])) for name in upload]
        commit = api.create_commit(target.repo_id, operations=operations, commit_message=message)
    except HUB_ERRORS as err:
        raise hub_error(target.repo_id, err) from None
    return Publication(target.repo_id, url, commit.oid, tuple(upload))
