"""Queue limits of a shared front end: one running job per user, checked and claimed atomically."""

from __future__ import annotations

import threading
from collections.abc import Callable

from udquant.dispatch.base import DispatchError, JobHandle
from udquant.errors import InputError


class QueueLimitError(InputError):
    """The user already has a job running (or a submission in flight)."""

    def __init__(self, user: str, running: JobHandle | None) -> None:
        what = f"job {running.job_id} ({running.backend}) is still running" if running else "a submission is in flight"
        super().__init__(f"{user}: {what}; one running job per user",
                         hint="wait for it to finish, or cancel it first")
        self.user = user
        self.running = running


class JobRegistry:
    """Who runs what. A user's slot is held while their submission starts, so two clicks start one job."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, JobHandle] = {}
        self._submitting: set[str] = set()

    def active(self, user: str) -> JobHandle | None:
        with self._lock:
            return self._active.get(user)

    def submit(self, user: str, is_running: Callable[[JobHandle], bool], start: Callable[[], JobHandle]) -> JobHandle:
        """Start a job for user unless one of theirs still runs; is_running asks the backend."""
        with self._lock:
            if user in self._submitting:
                raise QueueLimitError(user, None)
            self._submitting.add(user)
            previous = self._active.get(user)
        try:
            if previous is not None and _still_running(previous, is_running):
                raise QueueLimitError(user, previous)
            handle = start()
            with self._lock:
                self._active[user] = handle
            return handle
        finally:
            with self._lock:
                self._submitting.discard(user)

    def adopt(self, user: str, handle: JobHandle) -> JobHandle:
        """Hold user's slot for a job found running elsewhere (started before a restart); returns the job the
        slot holds, which is the one already there if any."""
        with self._lock:
            return self._active.setdefault(user, handle)

    def finish(self, user: str, handle: JobHandle) -> None:
        """Free the user's slot once their job has ended."""
        with self._lock:
            if self._active.get(user) == handle:
                del self._active[user]


def _still_running(handle: JobHandle, is_running: Callable[[JobHandle], bool]) -> bool:
    """Whether the user's previous job still runs; one its backend no longer knows (404) does not."""
    try:
        return is_running(handle)
    except DispatchError as err:
        if err.status_code == 404:
            return False
        raise DispatchError(err.backend, f"cannot tell whether your previous job {handle.job_id} still runs, so no "
                                         f"new one is started: {err.message.removeprefix(err.backend + ': ')}",
                            status_code=err.status_code, hint=err.hint or "try again in a moment") from None
