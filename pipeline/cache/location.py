"""Where a teacher cache lives: a local folder or an object-store URL, opened as one of zarr's own stores.

    location = StoreLocation.parse("s3://feats/nuscenes/cp.zarr", {"endpoint_url": "http://127.0.0.1:8333"})
    group = location.open_group(mode="r")        # zarr.open_group on location.zarr_store(read_only=True)
    raw = location.get("distillbev_cache.json")  # bytes or None, any backend

A location is plain data (the URL and its storage options), so it pickles into DataLoader workers and every
process opens its own store on first use (`zarr_store` caches one per process id: obstore and s3fs clients do not
survive a fork).

Backends, all zarr's: `LocalStore` for a path (or `file://` URL); for `s3://bucket/prefix`, `ObjectStore` over
obstore's `S3Store` (the default) or `FsspecStore` over s3fs (`--storage-option backend=fsspec`); every other
fsspec URL (`gs://`, `az://`, `memory://`, ...) through `FsspecStore.from_url` with the options passed through.
S3 credentials, endpoint and region come from the usual AWS environment (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ENDPOINT_URL`, `AWS_REGION` / `AWS_DEFAULT_REGION`), then from
the storage options, which win: `key`, `secret`, `token`, `endpoint_url`, `region` (s3fs's names; through fsspec
also `username` / `password`). An s3:// URL's user info (`s3://KEY:SECRET@bucket/prefix`, percent-encoded) is a key
and secret between the two. A plain-http endpoint is allowed.

Credentials are never written or shown: a location's `url` (its str, what errors and logs name) is the URL without
user info, its repr names its options but shows no value, and what is recorded (the manifest's command, the lease
and lock files) keeps only the storage options of `RECORDED_OPTIONS`, an allow-list of settings that are not
secrets (`recorded_options`, `redact_command`).
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import unquote, urlsplit

from ..errors import CacheError
from .durable import write_file_durably

S3_OPTIONS = ("key", "secret", "token", "endpoint_url", "region", "backend")
AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION",
                 "AWS_DEFAULT_REGION")
BACKENDS = ("obstore", "fsspec")
# storage options that are settings, not secrets: the only ones ever recorded (every other option, known or not,
# may carry a credential: password, username, account_key, sas_token, connection_string, ...)
RECORDED_OPTIONS = ("backend", "endpoint", "endpoint_url", "region", "region_name", "anon", "use_ssl",
                    "requester_pays", "version_aware", "project")
# Request limits of the S3 clients. A writer asks its lease right before each batch of writes (lease.py), and a
# PUT must land before the lease's margin (ttl / 4, 30 s at the default ttl) is used up. Through obstore one request
# with all its retries takes at most about REQUEST_TIMEOUT + MAX_BACKOFF + RETRY_TIMEOUT (no retry starts after
# RETRY_TIMEOUT; each attempt ends within REQUEST_TIMEOUT) = REQUEST_SECONDS_MAX. Through s3fs the timeouts bound
# connecting and each socket read (botocore has no overall one), with no botocore retry; s3fs itself tries up to
# 5 times on connection errors (its class setting, not an option).
REQUEST_TIMEOUT = 10.0  # seconds, one attempt from connecting to the end of the response (a chunk is a few MB)
CONNECT_TIMEOUT = 5.0
RETRY_TIMEOUT = 10.0
MAX_RETRIES = 3
MAX_BACKOFF = 2.0
REQUEST_SECONDS_MAX = REQUEST_TIMEOUT + MAX_BACKOFF + RETRY_TIMEOUT  # 22 s
_USER_INFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s]*@")
_OBSTORE_USED_BY: int | None = None  # pid of the process that opened an obstore client (kept across a fork)


def parse_storage_options(pairs: Iterable[str]) -> dict[str, str]:
    """`--storage-option KEY=VALUE` arguments -> a dict (CacheError naming a malformed one)."""
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            # a value typed without its name may be a secret: only a known option name is echoed
            shown = repr(pair) if pair in (*S3_OPTIONS, *RECORDED_OPTIONS) else "(not shown: it may hold a secret)"
            raise CacheError(f"--storage-option {shown}: expected KEY=VALUE, e.g. endpoint_url=http://127.0.0.1:8333")
        options[key.strip()] = value
    return options


def strip_user_info(text: str) -> str:
    """`text` with the user info of every URL in it removed: "s3://key:secret@bucket/p" -> "s3://bucket/p"; an '@'
    after the first '/' of a URL's path is left alone."""
    return _USER_INFO.sub(r"\g<scheme>", text)


def recorded_options(options: Mapping[str, str]) -> dict[str, str]:
    """The storage options that may be recorded: those of `RECORDED_OPTIONS`, URL values without user info."""
    return {name: strip_user_info(value) for name, value in sorted(options.items()) if name in RECORDED_OPTIONS}


def redact_command(command: str) -> str:
    """A command line as it may be recorded or shown: every `--storage-option NAME=VALUE` whose NAME is not in
    `RECORDED_OPTIONS` dropped, user info stripped from every URL. A command that does not split is replaced by a
    placeholder (it cannot be checked)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return "(command not shown: it does not parse as a shell command line)"
    kept: list[str] = []
    position = 0
    while position < len(words):
        word = words[position]
        option = word.partition("=")[2] if word.startswith("--storage-option=") else None
        if word == "--storage-option" and position + 1 < len(words):
            option, position = words[position + 1], position + 1
        if option is not None:
            if option.partition("=")[0] in RECORDED_OPTIONS:
                kept += ["--storage-option", strip_user_info(option)]
        else:
            kept.append(strip_user_info(word))
        position += 1
    return shlex.join(kept)


def store_exists(location: "StoreLocation | str | Path") -> bool:
    """Whether a zarr group is at `location` (a local folder that exists, or a URL with a zarr.json under it)."""
    location = StoreLocation.parse(location)
    if location.is_local:
        return location.path.exists()
    return location.get("zarr.json") is not None


def remote_error(location: "StoreLocation", exc: BaseException, action: str) -> CacheError:
    """A one-line CacheError for a failed request to an object store."""
    text = location.redact(str(exc)).splitlines()[0][:200] if str(exc) else ""
    return CacheError(f"{location}: cannot {action} the object store ({type(exc).__name__}: {text}); check the "
                      f"bucket, the endpoint and the credentials (AWS_* environment or --storage-option)")


@dataclass(frozen=True, repr=False)
class StoreLocation:
    """A cache store's address: `url` (a local path or a URL without user info) and its storage options (sorted
    key/value pairs). Its str is the URL; its repr names the options, never their values or the environment's."""

    url: str
    options: tuple[tuple[str, str], ...] = ()
    # the AWS_* environment when the location was made: DataLoader workers started by a forkserver inherit the
    # server's environment, not this process's, so the settings travel with the location
    environment: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    # the URL's user info ("user:password", as written), kept out of `url` so that nothing naming the location
    # shows it; used only to connect
    user_info: str = field(default="", compare=False)
    _stores: dict = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def parse(cls, where: "str | Path | StoreLocation", storage_options: dict[str, str] | None = None,
              ) -> "StoreLocation":
        """A location from a path, a URL or a location (whose options the given ones extend)."""
        if isinstance(where, StoreLocation):
            if not storage_options:
                return where
            return cls(where.url, tuple(sorted({**dict(where.options), **storage_options}.items())),
                       where.environment, where.user_info)
        text = str(where)
        scheme = urlsplit(text).scheme if "://" in text else ""
        user_info = ""
        if scheme == "file":
            text = urlsplit(text).path
        elif scheme:
            parts = urlsplit(text)
            user_info, _, host = parts.netloc.rpartition("@")
            if not host:
                raise CacheError(f"{strip_user_info(text)}: a store URL needs a bucket (or host), e.g. "
                                 f"s3://bucket/prefix/cache.zarr")
            port = host.rpartition(":")[2] if ":" in host and not host.endswith("]") else ""
            if (scheme == "s3" and ":" in host) or (port and not port.isdigit()):
                # "s3://key:se/cret@bucket" splits at the '/': the "bucket" would be "key:se"; not echoed
                raise CacheError(f"{scheme}://...: the bucket (or host:port) of this store URL is not valid; a "
                                 f"secret holding '/', '@' or ':' must be percent-encoded in a URL, or better given "
                                 f"in the environment or as --storage-option")
            text = f"{scheme}://{host}/{parts.path.strip('/')}".rstrip("/")
        options = tuple(sorted((storage_options or {}).items()))
        environment = () if not scheme else tuple(sorted((k, v) for k, v in os.environ.items() if k in AWS_VARIABLES))
        location = cls(text, options, environment, user_info)
        location._check_options()
        return location

    # -- what it is ------------------------------------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme if "://" in self.url else ""

    @property
    def is_local(self) -> bool:
        return not self.scheme

    @property
    def path(self) -> Path:
        """The local folder (only for local locations)."""
        if not self.is_local:
            raise CacheError(f"{self.url}: an object-store location has no local path")
        return Path(self.url)

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"StoreLocation({self.url!r}, options={[name for name, _ in self.options]!r})"

    def redact(self, text: str) -> str:
        """`text` (e.g. a driver's error message) with this location's secrets replaced by "***": its user info,
        the values of its storage options outside `RECORDED_OPTIONS`, and its AWS secret and session token (values
        of fewer than 4 characters, such as "1", are left: replacing them would garble the text, not hide one)."""
        environment = dict(self.environment)
        secrets = [self.user_info, unquote(self.user_info.partition(":")[2]),
                   *(value for name, value in self.options if name not in RECORDED_OPTIONS),
                   environment.get("AWS_SECRET_ACCESS_KEY", ""), environment.get("AWS_SESSION_TOKEN", "")]
        for secret in sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True):
            text = text.replace(secret, "***")
        return strip_user_info(text)

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "options": self.options, "environment": self.environment,
                "user_info": self.user_info}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "url", state["url"])
        object.__setattr__(self, "options", state["options"])
        object.__setattr__(self, "environment", state.get("environment", ()))
        object.__setattr__(self, "user_info", state.get("user_info", ""))
        object.__setattr__(self, "_stores", {})

    def resolved(self) -> "StoreLocation":
        """A local location as an absolute path with symbolic links resolved; a URL unchanged."""
        if not self.is_local:
            return self
        path = Path(self.url)
        return StoreLocation(str(path.resolve() if path.is_symlink() else path.absolute()), self.options,
                             self.environment, self.user_info)

    @property
    def backend(self) -> str:
        """"local", "obstore" or "fsspec"."""
        if self.is_local:
            return "local"
        if self.scheme != "s3":
            return "fsspec"
        return dict(self.options).get("backend", "obstore")

    def _check_options(self) -> None:
        options = dict(self.options)
        if self.is_local and options:
            raise CacheError(f"{self.url}: --storage-option {sorted(options)} given for a local path; storage options "
                             f"apply to object-store URLs (s3://...)")
        if self.scheme == "s3":
            unknown = sorted(set(options) - set(S3_OPTIONS))
            if unknown and options.get("backend") != "fsspec":
                raise CacheError(f"{self.url}: unknown storage option(s) {unknown} for s3://; expected "
                                 f"{list(S3_OPTIONS)} (or backend=fsspec to pass s3fs options through)")
            if options.get("backend", "obstore") not in BACKENDS:
                raise CacheError(f"{self.url}: storage option backend={options['backend']!r}; expected one of "
                                 f"{list(BACKENDS)}")

    # -- zarr stores -------------------------------------------------------------------------------------------------
    @property
    def worker_start_method(self) -> str | None:
        """The multiprocessing start method for DataLoader workers that read this location: None (the default,
        fork) for a local folder; "forkserver" for an object store, whose clients do not survive a fork."""
        return None if self.is_local else "forkserver"

    def zarr_store(self, read_only: bool = False) -> Any:
        """zarr's store for this location, one per process and mode (opened on first use)."""
        key = (os.getpid(), read_only)
        if key not in self._stores:
            self._stores.clear()  # stores of a parent process are not used after a fork
            self._stores[key] = self._open_store(read_only)
        return self._stores[key]

    def _open_store(self, read_only: bool) -> Any:
        if self.is_local:
            from zarr.storage import LocalStore

            return LocalStore(self.url, read_only=read_only)
        if self.backend == "obstore":
            return self._obstore(read_only)
        from zarr.storage import FsspecStore

        options = self._fsspec_options()
        # s3fs takes no user info from a URL (it is in the options); other drivers read it there (ftp, sftp, ...)
        url = self.url if self.scheme == "s3" or not self.user_info else self.url.replace(
            "://", f"://{self.user_info}@", 1)
        if self.scheme == "s3":  # the request limits above, unless the options set their own
            options["config_kwargs"] = {"connect_timeout": CONNECT_TIMEOUT, "read_timeout": REQUEST_TIMEOUT,
                                        "retries": {"total_max_attempts": 1}, **options.get("config_kwargs", {})}
        try:
            return FsspecStore.from_url(url, storage_options=options, read_only=read_only)
        except (ImportError, ValueError) as exc:
            raise CacheError(f"{self.url}: cannot open this URL through fsspec ({type(exc).__name__}: "
                             f"{self.redact(str(exc))}); install the fsspec driver of {self.scheme}:// (e.g. s3fs, "
                             f"gcsfs, adlfs)") from None

    def s3_settings(self) -> dict[str, str]:
        """The S3 connection settings: the AWS environment (as it was when the location was made), the URL's user
        info over it (key:secret), storage options over both (s3fs's names; `username` / `password` are s3fs's
        other names of `key` / `secret`)."""
        env = dict(self.environment)
        settings = {"key": env.get("AWS_ACCESS_KEY_ID", ""), "secret": env.get("AWS_SECRET_ACCESS_KEY", ""),
                    "token": env.get("AWS_SESSION_TOKEN", ""), "endpoint_url": env.get("AWS_ENDPOINT_URL", ""),
                    "region": env.get("AWS_REGION", env.get("AWS_DEFAULT_REGION", ""))}
        if self.user_info:
            user, has_secret, secret = self.user_info.partition(":")
            settings.update(key=unquote(user), **({"secret": unquote(secret)} if has_secret else {}))
        aliases = {"username": "key", "password": "secret"}
        settings.update({aliases.get(k, k): v for k, v in self.options if aliases.get(k, k) in settings})
        return {k: v for k, v in settings.items() if v}

    def bucket_and_prefix(self) -> tuple[str, str]:
        parts = urlsplit(self.url)
        return parts.netloc, parts.path.strip("/")

    def _obstore(self, read_only: bool) -> Any:
        global _OBSTORE_USED_BY
        if _OBSTORE_USED_BY is not None and _OBSTORE_USED_BY != os.getpid():
            # obstore's runtime threads are gone in a forked child: its first request would hang for ever
            raise CacheError(f"{self.url}: this process was forked from one that had opened an obstore client "
                             f"(pid {_OBSTORE_USED_BY}), and obstore does not survive a fork; start such processes "
                             f"with multiprocessing's 'forkserver' or 'spawn' method (DataLoader "
                             f"multiprocessing_context), or use --storage-option backend=fsspec")
        try:
            from obstore.store import S3Store
        except ImportError:
            raise CacheError(f"{self.url}: the obstore package is not installed; `pip install obstore` or pass "
                             f"--storage-option backend=fsspec (needs s3fs)") from None
        from zarr.storage import ObjectStore

        bucket, prefix = self.bucket_and_prefix()
        s3 = self.s3_settings()
        kwargs: dict[str, Any] = {"region": s3.get("region", "us-east-1"), "virtual_hosted_style_request": False}
        for ours, theirs in (("key", "access_key_id"), ("secret", "secret_access_key"), ("token", "session_token"),
                             ("endpoint_url", "endpoint")):
            if ours in s3:
                kwargs[theirs] = s3[ours]
        kwargs["client_options"] = {"timeout": timedelta(seconds=REQUEST_TIMEOUT),
                                    "connect_timeout": timedelta(seconds=CONNECT_TIMEOUT)}
        kwargs["retry_config"] = {"max_retries": MAX_RETRIES, "retry_timeout": timedelta(seconds=RETRY_TIMEOUT),
                                  "backoff": {"max_backoff": timedelta(seconds=MAX_BACKOFF)}}
        if s3.get("endpoint_url", "").startswith("http://"):
            kwargs["client_options"]["allow_http"] = True
        if "key" not in s3:
            kwargs["skip_signature"] = True  # anonymous access to a public bucket
        _OBSTORE_USED_BY = os.getpid()
        return ObjectStore(S3Store(bucket, prefix=prefix or None, **kwargs), read_only=read_only)

    def _fsspec_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {k: v for k, v in self.options if k != "backend"}
        if self.scheme != "s3":
            return options
        options.pop("username", None)  # in s3_settings' key and secret: s3fs refuses both names at once
        options.pop("password", None)
        s3 = self.s3_settings()
        for name in ("key", "secret", "token", "endpoint_url"):
            if name in s3:
                options[name] = s3[name]
        options.pop("region", None)
        if "region" in s3:
            options.setdefault("client_kwargs", {})["region_name"] = s3["region"]
        if "key" not in s3:
            options.setdefault("anon", True)
        return options

    def open_group(self, mode: str = "r") -> Any:
        """zarr.open_group on this location ("r" opens the store read-only)."""
        import zarr

        return zarr.open_group(store=self.zarr_store(read_only=mode == "r"), mode=mode,
                               **({"zarr_format": 3} if mode in ("a", "w", "w-") else {}))

    # -- plain keys ----------------------------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        """The bytes stored under `key` (None when absent)."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        buffer = sync(self.zarr_store(read_only=True).get(key, prototype=default_buffer_prototype()))
        return None if buffer is None else buffer.to_bytes()

    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key` (a local file is written through a temporary file and fsync'ed)."""
        if self.is_local:
            target = self.path / key
            target.parent.mkdir(parents=True, exist_ok=True)
            write_file_durably(target, data)
            return
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        sync(self.zarr_store().set(key, default_buffer_prototype().buffer.from_bytes(data)))

    def delete(self, key: str) -> None:
        from zarr.core.sync import sync

        sync(self.zarr_store().delete(key))

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under `prefix` (recursively), sorted."""
        from zarr.core.sync import sync

        async def collect() -> list[str]:
            store = self.zarr_store(read_only=True)
            return [key async for key in (store.list_prefix(prefix) if prefix else store.list())]

        return sorted(sync(collect()))

    def entries(self) -> list[str]:
        """The names directly under the store's root (keys and "folders")."""
        from zarr.core.sync import sync

        async def collect() -> list[str]:
            return [key async for key in self.zarr_store(read_only=True).list_dir("")]

        return sorted(sync(collect()))
