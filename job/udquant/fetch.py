"""Get the model's files onto local disk, after checking there is room for the whole job."""

from __future__ import annotations

import shutil
from pathlib import Path

from udquant.errors import DiskSpaceError
from udquant.resolve import ModelInfo


def free_bytes(path: Path) -> int:
    """Free space on the file system that holds path (or its nearest existing parent)."""
    probe = path.resolve()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_disk_space(path: Path, needed: int, *, reserve: int = 0) -> None:
    free = free_bytes(path)
    if needed + reserve > free:
        raise DiskSpaceError(path, needed + reserve, free)


def model_dir_for(model: ModelInfo, download_root: Path) -> Path:
    """Where the model's files are: the user's own folder, or where its Hub download goes."""
    if model.local_dir is not None:
        return model.local_dir
    assert model.repo_id is not None and model.revision is not None
    return download_root / model.repo_id.replace("/", "--") / model.revision


def fetch_model(model: ModelInfo, download_root: Path, *, token: str | None = None) -> Path:
    """The local directory holding the model's files: the user's own, or a Hub download."""
    dest = model_dir_for(model, download_root)
    if model.local_dir is not None:
        return dest
    from udquant.hub import download_model

    return download_model(model, dest, token=token)


def bytes_in(folder: Path) -> int:
    """What the files under folder take (0 when it does not exist): a resumed job needs no room for them."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
