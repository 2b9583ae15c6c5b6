"""Upload verified results to the Hub in one commit; a rerun with identical files uploads nothing.

GGUF files larger than the split size are split with llama-gguf-split first (the Hub
refuses files over 50 GB).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError

from udquant.errors import InputError
from udquant.hub import HUB_ERRORS, hub_error, whoami
from udquant.out_dir import RESULT_NAME
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
    # The udquant-result.json udquant left in the repo before, if any, and the repo's files:
    # levels published before and not made again stay in the card.
    previous: dict[str, Any] | None = field(default=None, repr=False)
    remote_files: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Publication:
    repo_id: str
    url: str
    commit: str | None  # None when nothing changed
    uploaded: tuple[str, ...]
    deleted: tuple[str, ...] = ()


KEEP_LOCAL = "pass --no-upload to keep the results local"


def plan_target(model_name: str, source: str, *, output_repo: str | None, private: bool,
                token: str | None, otherwise: str | None = KEEP_LOCAL) -> Target:
    """Where results go; checks the token, the namespace and the repo before any heavy work is done.

    source names the model being quantized: a repo that udquant filled with another model's
    quants is never written to, nor a repo of the default name that udquant did not make.
    otherwise: what the user can do instead of uploading, in the hints (a dispatcher has no --no-upload).
    """
    alternative = f", or {otherwise}" if otherwise else ""
    if not token:
        raise InputError("uploading needs a Hugging Face token with write access in HF_TOKEN",
                         hint=f"set HF_TOKEN{alternative}")
    if output_repo is not None:
        validate_repo_id(output_repo, "--output-repo")  # the user's input, checked before any request
    api = HfApi(token=token)
    me = whoami(api, purpose="uploading", otherwise=otherwise)
    if me.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise InputError("the token in HF_TOKEN is read-only: uploading needs write access",
                         hint=f"use a token with the write role{alternative}")
    repo_id = validate_repo_id(output_repo or f"{me['name']}/{model_name}-UD-GGUF")
    grant = write_grant(me)
    namespace = repo_id.split("/")[0]
    if namespace not in grant.namespaces and repo_id not in grant.repos:
        raise grant.refusal(me["name"], repo_id)
    try:
        info = api.model_info(repo_id)
    except RepositoryNotFoundError:
        if namespace not in grant.namespaces:  # a token scoped to one repo writes it but cannot create it
            raise InputError(f"the fine-grained token in HF_TOKEN may write {repo_id}, which does not exist, "
                             f"but not create repos in {namespace}",
                             hint=f"create {repo_id} on the Hub first, or give the token write access to "
                                  f"{namespace}'s repos") from None
        return Target(repo_id, private)
    except HUB_ERRORS as err:
        raise hub_error(repo_id, err) from None
    # create_repo(private=True) leaves an existing repo as it is: never publish into a public one.
    if private and not info.private:
        raise InputError(f"--private, but {repo_id} already exists and is public",
                         hint="make it private in its settings on the Hub, or choose another --output-repo")
    files = {s.rfilename for s in info.siblings or []}
    previous = _previous_result(api, repo_id) if RESULT_NAME in files else None
    if previous is not None:
        made_from = (previous.get("inputs") or {}).get("source")
        if made_from != source:
            raise InputError(f"{repo_id} holds udquant's quants of {made_from}, not of {source}",
                             hint="choose another --output-repo")
    elif files - {".gitattributes"}:
        if output_repo is None:
            raise InputError(f"{repo_id} already exists and was not made by udquant",
                             hint=f"name it with --output-repo {repo_id} to publish into it anyway, "
                                  "or choose another --output-repo")
        if "README.md" in files:
            logger.warning("%s was not made by udquant: its README.md will be replaced by udquant's card "
                           "(the repo's history keeps the old one)", repo_id)
    return Target(repo_id, private, previous, frozenset(files))


@dataclass(frozen=True)
class WriteGrant:
    """Where a token may write: namespaces it may create repos in, and single repos (fine-grained scopes)."""

    namespaces: tuple[str, ...]
    repos: frozenset[str] = frozenset()
    fine_grained: bool = False

    def refusal(self, user: str, repo_id: str) -> InputError:
        if not self.fine_grained:
            return InputError(f"the token in HF_TOKEN belongs to {user}, who cannot create or write {repo_id} "
                              f"(namespaces: {', '.join(self.namespaces)})",
                              hint="choose an --output-repo in one of those namespaces")
        scopes = [*(f"{n}/*" for n in self.namespaces), *sorted(self.repos)]
        return InputError(f"the fine-grained token in HF_TOKEN may not write {repo_id}: it has write access "
                          f"(repo.write) to {', '.join(scopes) or 'no repos'}",
                          hint=f"give it write access to {repo_id.split('/')[0]}'s repos in its settings on the "
                               "Hub (Access Tokens), or choose an --output-repo it may write")


def write_grant(me: dict[str, Any]) -> WriteGrant:
    """Read the Hub's whoami answer: the user's namespace and the organizations where it has more than
    the read role; for a fine-grained token, only those of them (or single model repos) it may write."""
    members = (str(me["name"]), *(str(org.get("name")) for org in me.get("orgs") or []
                                  if org.get("roleInOrg") != "read"))
    token = me.get("auth", {}).get("accessToken", {})
    if token.get("role") != "fineGrained":
        return WriteGrant(members)
    writes = [scope.get("entity") or {} for scope in (token.get("fineGrained") or {}).get("scoped") or []
              if "repo.write" in (scope.get("permissions") or [])]
    if any(not entity.get("name") for entity in writes):
        return WriteGrant(members)  # a scope named only by id: the Hub decides when we write
    names = {(entity.get("type"), entity["name"]) for entity in writes}
    return WriteGrant(tuple(n for n in members if ("user", n) in names or ("org", n) in names),
                      frozenset(name for kind, name in names if kind == "model"), fine_grained=True)


def _previous_result(api: HfApi, repo_id: str) -> dict[str, Any] | None:
    try:
        path = hf_hub_download(repo_id, RESULT_NAME, token=api.token)
        data = json.loads(Path(path).read_text())
    except HUB_ERRORS as err:
        raise hub_error(repo_id, err) from None
    except ValueError:
        return None  # not udquant's JSON after all: treated as a file udquant did not make
    return data if isinstance(data, dict) else None


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


def stale_files(remote: set[str], files: dict[str, Path], gguf_stems: list[str]) -> list[str]:
    """Remote GGUFs of the levels being published (whole or split) that this upload does not hold."""
    of_level = [re.compile(re.escape(stem) + r"(-\d{5}-of-\d{5})?\.gguf") for stem in gguf_stems]
    return sorted(name for name in remote - set(files) if any(p.fullmatch(name) for p in of_level))


def publish(target: Target, files: dict[str, Path], *, token: str, message: str,
            volatile: frozenset[str] = frozenset(), gguf_stems: list[str] | None = None) -> Publication:
    """Create the repo if needed and upload the changed files (repo path -> local file) in ONE commit.

    Files in volatile (the result JSON: it holds timings) are uploaded only along with a real change.
    The same commit deletes the repo's GGUFs of the published levels (gguf_stems) that it replaces:
    a level once split and now whole, or the other way round.
    """
    api = HfApi(token=token)
    try:
        url = str(api.create_repo(target.repo_id, private=target.private, exist_ok=True, repo_type="model"))
        changed = changed_files(api, target.repo_id, files)
        stale = stale_files(set(api.list_repo_files(target.repo_id)), files, gguf_stems or [])
        if not set(changed) - volatile and not stale:
            logger.info("publish: %s already holds these exact files; nothing uploaded", target.repo_id)
            return Publication(target.repo_id, url, None, ())
        upload = sorted(set(changed) | (volatile & set(files)))
        operations: list[CommitOperationAdd | CommitOperationDelete] = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(files[name])) for name in upload]
        operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
        commit = api.create_commit(target.repo_id, operations=operations, commit_message=message)
    except HUB_ERRORS as err:
        raise hub_error(target.repo_id, err) from None
    if stale:
        logger.info("publish: removed %s, replaced by this upload", ", ".join(stale))
    return Publication(target.repo_id, url, commit.oid, tuple(upload), tuple(stale))
