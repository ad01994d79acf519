"""No secret is written: storage options are recorded by an allow-list, URLs lose their user info, and a canary
password given to the real commands appears in no object of the store, no lease or lock, no log, no run file and
no output.

The S3 tests run against a loopback SeaweedFS server of their own whose access key and secret are canaries, so the
credentials the commands really use are the ones searched for.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import pytest
from test_cache_contract_cli import _student_argv, error_line, run, world  # noqa: F401 (fixture)

from distillbev.cache_schemas import v2
from distillbev.pipeline.cache import location as location_module
from distillbev.pipeline.cache.lease import LeaseLock, describe
from distillbev.pipeline.cache.location import StoreLocation
from distillbev.pipeline.cache.store import StoreLock
from distillbev.stages.options import recorded_storage_options

USER = "CANARY-user-9d2c"
SECRET = "CANARY-secret-5b1e"
CANARY = b"CANARY"  # every secret below starts with it
CREDENTIAL_OPTIONS = {"username": USER, "password": SECRET, "account_key": "CANARY-account-key",
                      "sas_token": "CANARY-sas-token", "connection_string": "CANARY-connection-string",
                      "mystery": "CANARY-unknown-option"}


def assert_no_canary(where: str, data: bytes | str) -> None:
    data = data.encode() if isinstance(data, str) else data
    at = data.find(CANARY)
    assert at < 0, f"{where}: a secret was written: ...{data[max(at - 80, 0):at + 40]!r}..."


# --------------------------------------------------------------------------------------------------- the policy
def test_only_allow_listed_storage_options_are_recorded():
    options = {**CREDENTIAL_OPTIONS, "key": "CANARY-key", "secret": "CANARY-secret", "token": "CANARY-token",
               "backend": "fsspec", "region": "eu-west-1", "endpoint_url": "http://CANARY-u:CANARY-p@host:8333"}
    assert recorded_storage_options(options) == [
        "--storage-option", "backend=fsspec", "--storage-option", "endpoint_url=http://host:8333",
        "--storage-option", "region=eu-west-1"]


@pytest.mark.parametrize(("url", "stripped"), [
    ("s3://AKIA:CANARY-p@feats/runs/c.zarr", "s3://feats/runs/c.zarr"),
    ("sftp://user:CANARY-p@ss@host:22/data/c.zarr", "sftp://host:22/data/c.zarr"),  # an '@' inside the password
    ("http://CANARY-token@host:8333", "http://host:8333"),
    ("s3://feats/run@3/c.zarr", "s3://feats/run@3/c.zarr"),  # an '@' in the path is not user info
    ("/data/run@3/c.zarr", "/data/run@3/c.zarr"),
    ("--cache=gs://u:CANARY-p@bucket/c.zarr and http://h/x", "--cache=gs://bucket/c.zarr and http://h/x"),
])
def test_user_info_is_stripped_from_every_url(url, stripped):
    assert location_module.strip_user_info(url) == stripped


def test_a_location_keeps_the_user_info_out_of_its_url_repr_and_str(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "CANARY-env-secret")
    location = StoreLocation.parse(f"s3://{USER}:{SECRET.replace('-', '%2D')}@feats/runs/c.zarr",
                                   {"backend": "fsspec", "password": SECRET})
    assert location.url == str(location) == "s3://feats/runs/c.zarr"
    assert location.bucket_and_prefix() == ("feats", "runs/c.zarr")
    assert_no_canary("repr", repr(location))
    assert_no_canary("repr of the resolved location", repr(location.resolved()))
    assert "password" in repr(location)  # the option's name is shown, never its value
    # a driver's error message that quotes a secret is shown without it
    driver_error = PermissionError(f"denied: password {SECRET} for s3://{USER}:{SECRET}@feats (CANARY-env-secret)")
    assert_no_canary("an object-store error", str(location_module.remote_error(location, driver_error, "read")))
    # the URL's user info is the access key and (percent-decoded) secret; options win over it
    assert StoreLocation.parse(f"s3://{USER}:a%2Fb@feats/c.zarr").s3_settings()["secret"] == "a/b"
    assert location.s3_settings()["key"] == USER and location.s3_settings()["secret"] == SECRET
    # a secret holding an unescaped '/' would read as a bucket "user:secret": refused without echoing it
    with pytest.raises(location_module.CacheError) as refused:
        StoreLocation.parse(f"s3://{USER}:CANARY/x@feats/c.zarr")
    assert "percent-encode" in str(refused.value)
    assert_no_canary("the refusal", str(refused.value))


def test_a_malformed_storage_option_is_not_echoed_unless_it_is_a_known_name():
    with pytest.raises(location_module.CacheError, match="not shown") as refused:
        location_module.parse_storage_options(["CANARY-a-secret-typed-without-its-name"])
    assert_no_canary("the error", str(refused.value))
    with pytest.raises(location_module.CacheError, match="'region': expected KEY=VALUE"):
        location_module.parse_storage_options(["region"])


def test_lock_and_lease_records_keep_no_secret_even_when_handed_a_raw_command(tmp_path):
    raw = shlex.join(["distillbev", "extract-teacher", "--cache", f"s3://{USER}:{SECRET}@feats/c.zarr",
                      "--storage-option", f"password={SECRET}", "--storage-option", "region=eu-west-1",
                      "--split", "train"])
    expected = ("distillbev extract-teacher --cache s3://feats/c.zarr --storage-option region=eu-west-1 "
                "--split train")
    lock = StoreLock(tmp_path / "c.zarr", command=raw).acquire()
    try:
        written = (tmp_path / "c.zarr" / v2.LOCK_FILE).read_bytes()
        assert json.loads(written)["command"] == expected
        assert_no_canary("the lock file", written)
        assert_no_canary("the lock's holder", lock.describe_holder())
        # a lock file written by an older version, with the secret in it, is shown without it
        (tmp_path / "c.zarr" / v2.LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "h", "command": raw}))
        assert expected in lock.describe_holder()
    finally:
        lock.release()
    lease = LeaseLock(StoreLocation.parse("s3://feats/c.zarr"), command=raw)
    assert json.loads(lease._info())["command"] == expected
    assert expected in describe({"pid": 1, "host": "h", "command": raw})


def test_run_info_records_the_cache_url_without_user_info():
    from types import SimpleNamespace

    from distillbev.pipeline.distill.config import StudentExperimentConfig
    from distillbev.pipeline.distill.run import run_info

    targets = SimpleNamespace(mode="cache", teacher_data=None)
    for cache in (f"s3://{USER}:{SECRET}@feats/c.zarr", StoreLocation.parse(f"s3://{USER}:{SECRET}@feats/c.zarr")):
        info = run_info(StudentExperimentConfig(), targets, cache)
        assert info["cache"] == "s3://feats/c.zarr"


# ------------------------------------------------------------------------------------ the commands, end to end
@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A loopback SeaweedFS server whose only identity is (USER, SECRET)."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import s3_server as server_module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server_module, "ACCESS_KEY", USER)
        patch.setattr(server_module, "SECRET_KEY", SECRET)
        with server_module.SeaweedS3(tmp_path_factory.mktemp("s3-canary")) as server:
            yield server


@pytest.fixture
def endpoint_only(s3_server, monkeypatch):
    """The server's endpoint and region in the environment, but no credentials there: the commands get them from
    the URL or the storage options only."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return s3_server


def bucket_objects(server) -> dict[str, bytes]:
    """Every object of the server's bucket (read with the canary credentials, past our own code)."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(server.bucket, endpoint=server.endpoint, access_key_id=USER, secret_access_key=SECRET,
                    region="us-east-1", virtual_hosted_style_request=False, client_options={"allow_http": True})
    keys = [meta["path"] for batch in obstore.list(store) for meta in batch]
    return {key: bytes(obstore.get(store, key).bytes()) for key in keys}


@pytest.fixture
def lock_records(monkeypatch) -> list[bytes]:
    """What every lease and lock held during the test said, read just before it was given back."""
    records: list[bytes] = []
    lease_release, lock_release = LeaseLock.release, StoreLock.release

    def release_lease(self):
        if self.held:
            records.append(self.location.get(v2.LOCK_FILE) or b"")
        lease_release(self)

    def release_lock(self):
        if self.held:
            records.append(self.lock_path.read_bytes())
        lock_release(self)

    monkeypatch.setattr(LeaseLock, "release", release_lease)
    monkeypatch.setattr(StoreLock, "release", release_lock)
    return records


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="distillbev")
    return caplog


def assert_logs_clean(logs, left_out: str | None = None) -> None:
    messages = [record.getMessage() for record in logs.records]
    assert any(message.startswith("pre-flight: ") for message in messages)  # the commands' logs were captured
    if left_out is not None:  # the extraction said which credentials it did not record
        assert any(f"the recorded command leaves out the credentials given ({left_out})" in m for m in messages)
    assert_no_canary("logs", "\n".join(messages))


def assert_locks_clean(records: list[bytes]) -> None:
    assert records and all(b'"command": "distillbev extract-teacher' in record for record in records), records
    for record in records:
        assert_no_canary("a lease or lock", record)


@pytest.mark.slow
def test_a_password_in_the_url_reaches_no_store_lease_log_run_file_or_output(world, endpoint_only, lock_records,
                                                                             logs, tmp_path, capsys):
    tiny, argv, _ = world
    url = f"s3://{USER}:{SECRET}@feats/in-url.zarr"  # default backend (obstore), credentials only in the URL
    outputs: list[str] = []
    code, out, err = run([*argv, "--cache", url], capsys)
    outputs += [out, *err]
    assert code == 0 and "s3://feats/in-url.zarr: complete: 2 sample-views" in out, err
    manifest = json.loads(bucket_objects(endpoint_only)["in-url.zarr/zarr.json"])["attributes"]
    assert "--cache s3://feats/in-url.zarr --split" in manifest["extraction"]["command"]

    code, out, err = run(["inspect-cache", url, "--verify"], capsys)
    outputs += [out, *err]
    assert code == 0 and "verify: OK, 2 sample-views" in out, err

    student = _student_argv(tiny, tmp_path, url)  # one DataLoader worker: the credentials travel with the location
    code, out, err = run(student, capsys)
    outputs += [out, *err]
    assert code == 0, err[-20:]
    run_files = [p for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()]
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["cache"] == "s3://feats/in-url.zarr"

    assert_locks_clean(lock_records)
    for key, data in bucket_objects(endpoint_only).items():
        assert_no_canary(f"object {key}", data)
    for path in run_files:
        assert_no_canary(str(path), path.read_bytes())
    for text in outputs:
        assert_no_canary("output", text)
    assert_logs_clean(logs, "the URL's user info")


@pytest.mark.slow
def test_a_password_storage_option_reaches_no_store_lease_error_or_repair_command(world, endpoint_only, lock_records,
                                                                                logs, capsys):
    _, argv, _ = world
    url = endpoint_only.url("in-options.zarr")
    # s3fs's names for the key and secret (it refuses options it does not know)
    credentials = ["--storage-option", f"username={USER}", "--storage-option", f"password={SECRET}"]
    given = ["--storage-option", "backend=fsspec", *credentials]
    outputs: list[str] = []
    code, out, err = run([*argv, "--cache", url, *given], capsys)
    outputs += [out, *err]
    assert code == 0 and f"{url}: complete: 2 sample-views" in out, err
    objects = bucket_objects(endpoint_only)
    command = json.loads(objects["in-options.zarr/zarr.json"])["attributes"]["extraction"]["command"]
    assert f"--cache {url} --storage-option backend=fsspec --split" in command

    # a second writer meets the first one's lease, as it was written: the error names the holder, not its secrets
    lease = json.loads(lock_records[-1])
    lease["expires_at"] = time.time() + 600
    location = StoreLocation.parse(url, {"backend": "fsspec", "username": USER, "password": SECRET})
    location.put(v2.LOCK_FILE, json.dumps(lease).encode())
    code, _, err = run([*argv, "--cache", url, *given], capsys)
    outputs += err
    assert code == 1 and "another extraction is writing this store" in error_line(err)
    location.delete(v2.LOCK_FILE)

    # a damaged store: --verify prints the repair command, which runs once the credentials are given again
    chunk = next(key for key in sorted(objects) if key.startswith("in-options.zarr/heatmap/c/"))
    location.delete(chunk.removeprefix("in-options.zarr/"))
    code, out, err = run(["inspect-cache", url, *given, "--verify"], capsys)
    outputs += [out, *err]
    line = error_line(err)
    assert code == 1 and "--repair" in line
    repair = shlex.split(line.split("`")[1])
    code, out, err = run([*repair[1:], *credentials], capsys)
    outputs += [out, *err]
    assert code == 0 and "re-extracted 1 damaged sample-views" in out, err

    assert_locks_clean(lock_records)
    for key, data in bucket_objects(endpoint_only).items():
        assert_no_canary(f"object {key}", data)
    for text in outputs:
        assert_no_canary("output", text)
    assert_logs_clean(logs, "--storage-option password, --storage-option username")


@pytest.mark.slow
def test_a_local_store_named_by_a_url_with_user_info_keeps_it_out_of_the_lock_and_output(world, lock_records, logs,
                                                                                       tmp_path, capsys,
                                                                                       monkeypatch):
    _, argv, _ = world
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "CANARY-environment-secret")
    store = tmp_path / "local.zarr"
    url = f"file://{USER}:{SECRET}@localhost{store}"
    outputs: list[str] = []
    code, out, err = run([*argv, "--cache", url], capsys)
    outputs += [out, *err]
    assert code == 0 and f"{store}: complete: 2 sample-views" in out, err

    # a second writer while the lock is held (the lock file as the first writer wrote it)
    lock_path = store / v2.LOCK_FILE
    lock_path.write_bytes(lock_records[-1])
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = run([*argv, "--cache", url], capsys)
    finally:
        os.close(fd)
    outputs += err
    assert code == 1 and "another extraction is writing this store" in error_line(err)

    assert_locks_clean(lock_records)
    for path in sorted(store.rglob("*")):
        if path.is_file():
            assert_no_canary(str(path), path.read_bytes())
    for text in outputs:
        assert_no_canary("output", text)
    assert_logs_clean(logs)


@pytest.mark.slow
def test_options_of_any_fsspec_scheme_are_recorded_by_the_allow_list_only(world, lock_records, logs, capsys):
    import fsspec

    _, argv, _ = world
    url = "memory://secrets-test/cache.zarr"  # fsspec's in-process file system takes any option
    given = [arg for name, value in CREDENTIAL_OPTIONS.items() for arg in ("--storage-option", f"{name}={value}")]
    outputs: list[str] = []
    try:
        code, out, err = run([*argv, "--cache", url, *given], capsys)
        outputs += [out, *err]
        assert code == 0 and f"{url}: complete: 2 sample-views" in out, err
        memory = fsspec.filesystem("memory")
        files = {path: memory.cat_file(path) for path in memory.find("/secrets-test")}
    finally:
        fsspec.filesystem("memory").rm("/secrets-test", recursive=True)
    command = json.loads(files["/secrets-test/cache.zarr/zarr.json"])["attributes"]["extraction"]["command"]
    assert f"--cache {url} --split" in command

    assert_locks_clean(lock_records)
    for path, data in files.items():
        assert_no_canary(path, data)
    for text in outputs:
        assert_no_canary("output", text)
    assert_logs_clean(logs, ", ".join(f"--storage-option {name}" for name in sorted(CREDENTIAL_OPTIONS)))
