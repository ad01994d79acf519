"""The writer lock of a store on object storage: a lease object that its holder keeps renewing.

    with LeaseLock(location, command="distillbev extract-teacher ...") as lock:
        ...                          # a background thread renews the lease every ttl / 4
        if not lock.still_held(): ...  # lost: taken, or its deadline passed (renewals failed, process paused)

An object store has no flock, so the lock is the object `distillbev.lock`: JSON naming the holder (host, pid,
command, a random owner id) and `expires_at` (UTC seconds). Acquiring creates it only if absent (a conditional
PUT, `If-None-Match: *`); a lease whose `expires_at` has passed belongs to a killed or hung run and is replaced
only if it is still the object that was read (`If-Match` on its ETag), so of two processes racing for a dead lease
exactly one wins. Renewal is the same compare-and-swap on the ETag of the holder's last write. Releasing deletes
it. With obstore (the default S3 backend) every step is atomic on servers with conditional writes (AWS S3 since
2024, SeaweedFS, MinIO); through fsspec the create is a check-then-write and the takeover a delete-then-create,
which is safe against a dead holder but not against two live racers starting within the same second.

The lease fences its holder with a deadline on this process's monotonic clock: before each renewing request the
holder reads the clock (t0), and a successful request makes the lease valid until t0 + ttl - margin
(`lease_margin`). `still_held()` is False once the clock passes that deadline, whatever the renew thread did: a
process paused past it (SIGSTOP, a frozen VM, a suspended machine) finds its lease lost as soon as it runs again, and
from then on it never renews it. Writers ask `still_held()` right before every batch of chunk writes and every done
marker (`writer.py`); the extraction's status writes ask `confirm()` first, a renewal conditional on the lease
object still being the one this holder last wrote (`If-Match` on its ETag).

A killed holder's lease blocks new writers until it expires (`ttl`, 120 s by default, or the environment variable
`DISTILLBEV_LEASE_SECONDS`); the error a second writer gets says until when. Expiry compares the writer's clock
with the holder's: keep the nodes' clocks synchronised (NTP) to well under the ttl. A lease object that is not
such JSON (`parse_lease`) is an error naming it, never an expiry: nothing says that its holder is gone.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from ...cache_schemas import v2
from ..errors import CacheError
from .location import StoreLocation, redact_command, remote_error

logger = logging.getLogger(__name__)
DEFAULT_TTL = 120.0


def monotonic() -> float:
    """Seconds on a clock that never goes back and keeps counting while the machine sleeps (CLOCK_BOOTTIME on Linux;
    time.monotonic, which stops during a suspend, elsewhere): a suspended holder must find its deadline passed."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


def lease_margin(ttl: float) -> float:
    """How long before its expiry (ttl after the renewing request started) a holder stops counting its lease as held.

    Another process may take the lease once its own wall clock passes `expires_at`, so a write that passed the
    check must land before then. The margin covers (1) the longest a request that passed the check can still take,
    retries included: location.py caps it at `REQUEST_SECONDS_MAX` (22 s) for obstore; and (2) the difference between
    the holder's and the taker's clocks (NTP keeps it to milliseconds; the rest of the margin, 8 s at the default ttl,
    is for it). A quarter of the ttl is 30 s at the default ttl of 120 s; renewals every ttl / 4 (ttl / 16 after a
    failed one) leave several attempts between a renewal and its deadline. A ttl under 4 x 22 s (tests use 2 s on
    a loopback server) still fences a paused holder, but no longer covers a request stalled for the whole client
    timeout.
    """
    return ttl / 4


def lease_seconds() -> float:
    raw = os.environ.get("DISTILLBEV_LEASE_SECONDS")
    if not raw:
        return DEFAULT_TTL
    try:
        value = float(raw)
    except ValueError:
        raise CacheError(f"DISTILLBEV_LEASE_SECONDS={raw!r}: expected a number of seconds, e.g. 120") from None
    if value < 2:
        raise CacheError(f"DISTILLBEV_LEASE_SECONDS={raw!r}: a lease shorter than 2 s cannot be renewed in time")
    return value


def parse_lease(raw: bytes, where: str) -> dict[str, Any]:
    """The lease stored at `where` (the lease object's URL, for the message): a JSON object with an `owner` string
    and a numeric `expires_at`.

    Anything else is a CacheError, never an expired lease: a lease that cannot be read does not say that its
    holder is gone, and taking it over could put two writers in one store.
    """
    problem = None
    try:
        data = json.loads(raw)
    except ValueError:
        data, problem = None, "not JSON"  # its text is not shown: it could hold anything, a credential too
    if problem is None and not isinstance(data, dict):
        problem = f"a JSON {type(data).__name__}, not an object"
    elif problem is None and not isinstance(data.get("owner"), str):
        problem = "no 'owner' string"
    elif problem is None and (isinstance(data.get("expires_at"), bool)
                              or not isinstance(data.get("expires_at"), (int, float))):
        problem = f"'expires_at' is {data.get('expires_at')!r}, not a number of UTC seconds"
    if problem is not None:
        raise CacheError(f"{where}: the writer lease is unreadable ({len(raw)} bytes, {problem}), so whether an "
                         f"extraction still writes this store is unknown and the lease is not taken over; once you "
                         f"are sure that no extraction writes this store, delete it by hand (on S3: `aws s3 rm "
                         f"{where}`) and rerun the command")
    return data


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


class _Objects:
    """Conditional reads and writes of one key: through obstore when the store is an ObjectStore, else zarr's API."""

    def __init__(self, location: StoreLocation, key: str) -> None:
        self.location, self.key = location, key
        store = location.zarr_store()
        inner = getattr(store, "store", None)
        self.obstore = inner if inner is not None and type(inner).__module__.startswith("obstore") else None

    def read(self) -> tuple[dict[str, Any] | None, str | None]:
        """(the lease's JSON or None when absent, its ETag when known)."""
        if self.obstore is not None:
            import obstore

            try:
                result = obstore.get(self.obstore, self.key)
            except FileNotFoundError:
                return None, None
            raw, etag = bytes(result.bytes()), result.meta.get("e_tag")
        else:
            raw, etag = self.location.get(self.key), None
            if raw is None:
                return None, None
        return parse_lease(raw, f"{self.location}/{self.key}"), etag

    def create(self, data: bytes) -> str | None | bool:
        """Write `data` only if the key is absent: its ETag (obstore), True (fsspec), False when it exists."""
        if self.obstore is not None:
            import obstore
            from obstore.exceptions import AlreadyExistsError, PreconditionError

            try:
                return obstore.put(self.obstore, self.key, data, mode="create")["e_tag"] or True
            except (AlreadyExistsError, PreconditionError):
                return False
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        sync(self.location.zarr_store().set_if_not_exists(
            self.key, default_buffer_prototype().buffer.from_bytes(data)))
        stored, _ = self.read()
        return True if stored is not None and stored.get("owner") == json.loads(data)["owner"] else False

    def replace(self, etag: str | None, data: bytes) -> str | None | bool:
        """Replace the object only if it is still the one read with `etag`; its new ETag / True, or False."""
        if self.obstore is not None and etag is not None:
            import obstore
            from obstore.exceptions import AlreadyExistsError, PreconditionError

            try:
                return obstore.put(self.obstore, self.key, data, mode={"e_tag": etag})["e_tag"] or True
            except (PreconditionError, AlreadyExistsError, FileNotFoundError):
                return False
        self.location.delete(self.key)
        return self.create(data)

    def delete(self) -> None:
        self.location.delete(self.key)


class LeaseLock:
    """An exclusive writer lease on an object-store location (context manager; `acquire` / `release` also work)."""

    def __init__(self, location: StoreLocation, command: str = "", ttl: float | None = None) -> None:
        self.location = location
        self.command = redact_command(command)  # written into the lease, so without any credential
        self.ttl = lease_seconds() if ttl is None else float(ttl)
        self.margin = lease_margin(self.ttl)
        self.owner = uuid.uuid4().hex
        self._objects: _Objects | None = None
        self._etag: str | None | bool = None
        self._held = False
        self._lost: str | None = None
        self._deadline = 0.0  # on `monotonic()`: the lease counts as held until then (t0 + ttl - margin)
        self._renewed_at = 0.0  # on `monotonic()`: when the last successful renewing request started (t0)
        self._renewing = threading.Lock()  # the renew thread and `confirm` renew one at a time
        self._losing = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> StoreLocation:
        return self.location

    def _info(self) -> bytes:
        now = time.time()
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "owner": self.owner,
                           "since": _iso(now), "expires_at": now + self.ttl, "command": self.command}).encode()

    def acquire(self) -> "LeaseLock":
        self._objects = _Objects(self.location, v2.LOCK_FILE)
        try:
            for _ in range(5):
                started = monotonic()  # before any request: the lease written below lasts ttl from about now
                current, etag = self._objects.read()
                if current is None:
                    result = self._objects.create(self._info())
                else:
                    expires = float(current["expires_at"])
                    if expires > time.time():
                        raise CacheError(f"{self.location}: another extraction is writing this store "
                                         f"({describe(current)}); its lease runs until {_iso(expires)} and is renewed "
                                         f"while it runs: wait for it to finish, or stop it and rerun this command "
                                         f"after {_iso(expires)}")
                    logger.info("%s: taking over the expired lease of %s", self.location, describe(current))
                    result = self._objects.replace(etag, self._info())
                if result is not False:
                    self._etag, self._held, self._lost = result, True, None
                    self._renewed(started)
                    break
            else:
                raise CacheError(f"{self.location}: could not take the writer lease (other processes kept taking "
                                 f"it); rerun this command")
        except CacheError:
            raise
        except Exception as exc:
            raise remote_error(self.location, exc, "lock") from exc
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="cache-lease", daemon=True)
        self._thread.start()
        return self

    def _renewed(self, started: float) -> None:
        """A renewing request that started at `started` (on `monotonic()`) succeeded."""
        self._renewed_at, self._deadline = started, started + self.ttl - self.margin

    def _renew_loop(self) -> None:
        wait = self.ttl / 4
        while not self._stop.wait(wait):
            renewed = self._renew()
            if self._lost is not None:
                return
            wait = self.ttl / 4 if renewed else self.ttl / 16  # after a failure, retry sooner: the deadline nears

    def _renew(self) -> bool:
        """One conditional renewal: True when it succeeded, False when it failed (a network error: the lease is
        lost by its deadline, unless a later try succeeds) or the lease is lost."""
        with self._renewing:
            if not self.still_held():  # past the deadline the lease may be another's: never renewed again
                return False
            started = monotonic()  # before the request: the lease it writes expires ttl after about now
            try:
                etag = self._etag if isinstance(self._etag, str) else None
                if etag is None:  # fsspec: no ETag to compare, so check the owner first
                    current, _ = self._objects.read()
                    if current is None or current.get("owner") != self.owner:
                        self._lose(f"the lease now names {describe(current) if current else 'nobody'}")
                        return False
                result = self._objects.replace(etag, self._info()) if etag else self._overwrite()
                if result is False:
                    current, _ = self._objects.read()
                    self._lose(f"the lease was taken by {describe(current) if current else 'nobody'}")
                    return False
                self._etag = result
                self._renewed(started)
                return True
            except CacheError as exc:  # the lease object was overwritten with something that is no lease
                self._lose(str(exc))
                return False
            except Exception as exc:  # a network error: tried again until the deadline
                logger.warning("%s: renewing the writer lease failed (%s); retrying until %.0f s after the last "
                               "renewal", self.location, exc, self.ttl - self.margin)
                return False

    def _overwrite(self) -> bool:
        self.location.put(v2.LOCK_FILE, self._info())
        return True

    def _lose(self, why: str) -> None:
        with self._losing:
            if self._lost is not None:  # lost once, logged once
                return
            logger.error("%s: lost the writer lease: %s; this process stops writing", self.location, why)
            self._lost = why  # after the log line: once `still_held()` is False, the reason has been logged

    def still_held(self) -> bool:
        """Whether the lease is still this process's: taken, not lost, and the deadline of its last renewal
        (monotonic, t0 + ttl - margin) not passed. Cheap (no request): writers ask it before every write."""
        if not self._held or self._lost is not None:
            return False
        now = monotonic()
        if now >= self._deadline:
            self._lose(f"no renewal succeeded in the {self.ttl - self.margin:.1f} s after the last one "
                       f"({now - self._renewed_at:.1f} s ago: this process was paused, or its renewals failed), so "
                       f"another process may have taken the lease")
            return False
        return True

    def confirm(self) -> bool:
        """Renew the lease now and say whether it is still this process's: the check before a status write.

        True only when this renewal succeeded, i.e. the lease object was still the one this holder last wrote
        (`If-Match` on its ETag through obstore; an owner check then a write through fsspec), so the status write
        that follows starts a whole ttl - margin before anyone may take the lease. A network error is False too:
        nothing proves the lease is still held.
        """
        return self._held and self._renew() and self.still_held()

    def holder(self) -> dict[str, Any] | None:
        objects = self._objects or _Objects(self.location, v2.LOCK_FILE)
        return objects.read()[0]

    def release(self) -> None:
        if not self._held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            current, _ = self._objects.read()
            # past the deadline, the lease may be another's by the time the delete lands: it is left to expire
            if current is not None and current.get("owner") == self.owner and self.still_held():
                self._objects.delete()
        except Exception as exc:  # the lease then expires by itself
            logger.warning("%s: could not delete the writer lease (%s); it expires at its own time",
                           self.location, exc)
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def __enter__(self) -> "LeaseLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def status_check(lock: Any) -> Callable[[], bool]:
    """The check to ask right before a status write under `lock` (a `LeaseLock` or store.py's `StoreLock`): a
    lease's `confirm` (a conditional renewal: the status follows a proof that the lease object is still this
    holder's), a local lock's `still_held` (the locked file is still the one at the lock's path)."""
    return lock.confirm if isinstance(lock, LeaseLock) else lock.still_held


def describe(info: dict[str, Any]) -> str:
    # a lease written by an older version may hold credentials in its command: never shown
    command = f", running `{redact_command(str(info['command']))}`" if info.get("command") else ""
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}{command}"
