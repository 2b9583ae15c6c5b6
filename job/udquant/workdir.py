"""Stage directories keyed by their inputs, so a rerun skips what is already done.

A stage writes into work/<stage>-<key>/ under temporary names and renames when complete;
then done.json records the output's name and size. A stage counts as done only when
done.json and an output of that size are both there. Jobs for models of one name take turns in a
work dir: each holds its model's lock file in work/locks/ while it runs, and writes the logs of
steps not keyed by their inputs in work/logs/<name>-<step>.log.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from udquant.errors import InputError

logger = logging.getLogger(__name__)

DONE = "done.json"
LOCKS = "locks"
LOGS = "logs"
LOCK_NAME_CHARS = 100  # a local folder's name may be far longer than a file name may be


@dataclass(frozen=True)
class StageDir:
    path: Path
    stage: str
    key: str

    def log(self, name: str | None = None) -> Path:
        return self.path / f"{name or self.stage}.log"

    def done_output(self) -> Path | None:
        """The finished output, or None when the stage must (re)run."""
        marker = self.path / DONE
        try:
            record = json.loads(marker.read_text())
            output = self.path / str(record["output"])
            if output.is_file() and output.stat().st_size == record["size"]:
                return output
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def mark_done(self, output: Path, seconds: float, **extra: Any) -> None:
        record = {"output": output.name, "size": output.stat().st_size, "seconds": round(seconds, 3), **extra}
        write_text_atomic(self.path / DONE, json.dumps(record, indent=2))

    def record(self) -> dict[str, Any]:
        return dict(json.loads((self.path / DONE).read_text()))


def input_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def partial_path(output: Path) -> Path:
    """Where output is written before it is complete: same folder and suffix, the writer's pid in the name."""
    return output.with_name(f"{output.stem}.partial-{os.getpid()}{output.suffix}")


@contextmanager
def atomic_output(output: Path) -> Iterator[Path]:
    """Yield the partial path to write; rename it to output when the block succeeds, else delete it.

    A reader never sees a half-written output under its real name, and a failed or interrupted
    write leaves nothing behind (a killed one leaves a partial that remove_stale_partials clears).
    """
    partial = partial_path(output)
    partial.unlink(missing_ok=True)
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(output)


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """atomic_output for a folder: fill the yielded staging folder; it replaces dest only when complete."""
    staging = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_output(path) as partial:
        partial.write_text(text)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(path: Path) -> None:
    """Delete what killed runs left half-written (names carry the writer's pid)."""
    for partial in path.glob("*.partial-*"):
        pid = partial.name.rsplit(".partial-", 1)[1].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            if partial.is_dir() and not partial.is_symlink():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                partial.unlink(missing_ok=True)


def file_in_the_way(folder: Path) -> Path | None:
    """The file (not a folder) at folder or at the nearest of its parents that exists: mkdir would fail on it."""
    for path in (folder, *folder.parents):
        if path.exists():
            return None if path.is_dir() else path
    return None


def check_work_dir(work_root: Path) -> None:
    """Refuse a work folder that cannot be made, before any work would need it."""
    if (blocking := file_in_the_way(work_root)) is not None:
        raise InputError(f"--work-dir {work_root}: {blocking} is a file, not a folder",
                         hint="give a folder, or a path where one can be made")


def find_stage(work_root: Path, stage: str, inputs: dict[str, Any]) -> StageDir:
    """The stage folder for these inputs, without creating it."""
    key = input_key(inputs)
    return StageDir(work_root / f"{stage}-{key}", stage, key)


def open_stage(work_root: Path, stage: str, inputs: dict[str, Any]) -> StageDir:
    found = find_stage(work_root, stage, inputs)
    key, path = found.key, found.path
    path.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    (path / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True, default=str))
    return StageDir(path, stage, key)


def _safe_name(model_name: str) -> str:
    """model_name made a file name on any file system."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", model_name)[:LOCK_NAME_CHARS] or "_"


def model_lock_path(work_root: Path, model_name: str) -> Path:
    """The lock file of the jobs for models named model_name."""
    return work_root / LOCKS / f"{_safe_name(model_name)}.lock"


def model_log_path(work_root: Path, model_name: str, what: str) -> Path:
    """The log of a step not keyed by its inputs (a check, the upload's split) for models named model_name:
    jobs for one name take turns (hold_model_lock), so no two running jobs write one log."""
    return work_root / LOGS / f"{_safe_name(model_name)}-{what}.log"


@contextmanager
def hold_model_lock(work_root: Path, model_name: str, shown_as: str) -> Iterator[bool]:
    """Hold the work dir's lock for models named model_name while the block runs; while another job
    holds it, say so once and wait for it to finish. Yields whether it waited; shown_as names the
    model in messages.

    Such jobs share stage folders and the default output folder udquant-out/<name>: they take turns,
    and the later one reuses the stages the earlier one finished. The pids in partial names cannot
    keep them apart: each container has its own pids, so a job sees neither whether another
    container's job is alive nor that a partial of the same pid is not its own. An flock is the
    kernel's, across the containers that share a volume on one host, and ends with its holder
    however that ends.
    """
    path = model_lock_path(work_root, model_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    # "a+": the holder's record stays readable until this job owns the lock. Python's files are not
    # inherited by the tools a job runs (PEP 446): a tool left running cannot keep the lock.
    with path.open("a+", encoding="utf-8") as lock:
        locked = _lock_at_once(lock)
        if locked is None:
            yield False
            return
        if not locked:
            logger.warning("%s", _waiting_line(lock, work_root, shown_as))
            # A signal handler that raises (Ctrl-C, the CLI's SIGTERM) ends the wait: fcntl.flock
            # retries after EINTR only when the handler returns (PEP 475).
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.seek(0)
        lock.truncate()
        lock.write(json.dumps({"model": shown_as, "pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        lock.flush()
        yield not locked


def _lock_at_once(lock: TextIO) -> bool | None:
    """flock the file unless another job holds it: whether it is locked now; None where the file system
    has no locks."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:  # NFS without a lock daemon, some FUSE file systems
        logger.warning("%s cannot be locked (%s): running unlocked, so do not start a second job for this "
                       "model in this work dir until this one ends", lock.name, err.strerror or err)
        return None
    return True


def _waiting_line(lock: TextIO, work_root: Path, shown_as: str) -> str:
    """Who holds the lock and on what, from the holder's record; why we wait when its model is another."""
    lock.seek(0)
    try:
        record = json.loads(lock.read())
        holder = f" (pid {int(record['pid'])} on host {record['host']})"
        model = str(record["model"])
    except (ValueError, KeyError, TypeError):  # written by nobody yet, or being written
        holder, model = "", shown_as
    why = "" if model == shown_as else f" ({shown_as} has the same name: such jobs take turns)"
    return f"another udquant job{holder} is working on {model} in {work_root}; waiting for it to finish{why}"
