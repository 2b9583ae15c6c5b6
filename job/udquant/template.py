"""Read the tensor layout of a template GGUF (local or on the Hub) from its headers only.

A 27B template is ~19 GB, its header a few MB: remote headers are read with HTTP range
requests through huggingface_hub, growing the range until the header parses. Split
templates (`-00001-of-00003.gguf`) are read shard by shard.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from udquant.errors import InputError
from udquant.gguf_header import (
    GGUFFormatError,
    GGUFHeader,
    NeedMoreBytes,
    TensorInfo,
    parse_gguf_header,
    read_gguf_header,
)

logger = logging.getLogger(__name__)

SPLIT = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
FIRST_READ = 1 << 20
GROW_LIMIT = 1 << 20


@dataclass(frozen=True)
class TemplateLayout:
    source: str  # path, or repo_id:file
    revision: str | None
    files: tuple[str, ...]
    metadata: dict[str, Any]  # of the first shard
    tensors: tuple[TensorInfo, ...]  # of all shards, in file order
    bytes_fetched: int
    bytes_total: int

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def block_count(self) -> int:
        return int(self.metadata.get(f"{self.arch}.block_count", 0))

    @property
    def nextn_layers(self) -> int:
        return int(self.metadata.get(f"{self.arch}.nextn_predict_layers", 0))


def shard_names(first: str) -> list[str]:
    """All shard file names of a split GGUF, from the name of any shard; [first] if not split."""
    match = SPLIT.match(first)
    if not match:
        return [first]
    count = int(match.group("count"))
    return [f"{match.group('prefix')}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def read_template_file(path: Path) -> TemplateLayout:
    if not path.is_file():
        raise InputError(f"template not found: {path}")
    headers: list[GGUFHeader] = []
    names = shard_names(path.name)
    for name in names:
        shard = path.with_name(name)
        if not shard.is_file():
            raise InputError(f"{path.name} is split in {len(names)} files; {name} is missing next to it")
        headers.append(read_gguf_header(shard, check_data=False))
    fetched = sum(h.data_offset for h in headers)
    total = sum(path.with_name(n).stat().st_size for n in names)
    return TemplateLayout(str(path), None, tuple(names), headers[0].metadata,
                          tuple(t for h in headers for t in h.tensors), fetched, total)


def _read_remote_header(fs: Any, path: str, size: int) -> tuple[GGUFHeader, int]:
    """Read just enough of path's head to parse its header; return it and the bytes fetched."""
    with fs.open(path, "rb", block_size=1 << 20, cache_type="none") as f:
        buf = f.read(min(FIRST_READ, size))
        while True:
            try:
                return parse_gguf_header(buf), len(buf)
            except NeedMoreBytes as need:
                if len(buf) >= size:
                    raise InputError(f"{path}: header is cut short") from None
                # Grow by half again (few requests for a long header), but by at most GROW_LIMIT
                # past what is needed, so the overshoot stays small.
                want = min(size, max(need.needed, len(buf) + min(len(buf) // 2, GROW_LIMIT)))
                more = f.read(want - len(buf))
                if not more:  # the file is shorter than the size the Hub gave
                    raise InputError(f"{path}: header is cut short (the file ends after {len(buf)} bytes)") from None
                buf += more
            except GGUFFormatError as err:
                raise InputError(f"{path}: not a GGUF file ({err})") from None


def read_template_remote(repo_id: str, file_glob: str, *, revision: str | None = None,
                         token: str | None = None) -> TemplateLayout:
    from huggingface_hub import HfApi, HfFileSystem

    from udquant.hub import HUB_ERRORS, hub_error

    api = HfApi(token=token)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except HUB_ERRORS as err:
        raise hub_error(repo_id, err) from None
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    matches = sorted(n for n in sizes if n.endswith(".gguf") and fnmatch.fnmatch(n, file_glob))
    firsts = sorted({shard_names(n)[0] for n in matches})
    if not firsts:
        raise InputError(f"{repo_id}: no .gguf file matches {file_glob!r}",
                         hint=f"files there: {', '.join(sorted(n for n in sizes if n.endswith('.gguf'))[:12])}")
    if len(firsts) > 1:
        raise InputError(f"{repo_id}: {file_glob!r} matches several quants: {', '.join(firsts)}",
                         hint="narrow --file so it names one quant")
    names = shard_names(firsts[0])
    missing = [n for n in names if n not in sizes]
    if missing:
        raise InputError(f"{repo_id}: split template lacks {', '.join(missing)}")
    fs = HfFileSystem(token=token)
    headers, fetched = [], 0
    for name in names:
        try:
            header, count = _read_remote_header(fs, f"{repo_id}@{info.sha}/{name}", sizes[name])
        except HUB_ERRORS as err:
            raise hub_error(repo_id, err) from None
        headers.append(header)
        fetched += count
    return TemplateLayout(f"{repo_id}:{firsts[0]}", info.sha, tuple(names), headers[0].metadata,
                          tuple(t for h in headers for t in h.tensors), fetched, sum(sizes[n] for n in names))
