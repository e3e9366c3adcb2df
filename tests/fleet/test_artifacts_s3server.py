"""A real S3-compatible server for the artifact-store tests: s3rver, as its own process over HTTP.

Why s3rver (npm `s3rver@3.7.1`, Node): no MinIO, Ceph or Garage server is installable here (not on
PyPI, not in Debian, not on npm), and s3rver is an independent S3 implementation, a separate
process speaking the S3 REST protocol over a socket (buckets, multipart uploads, ranged GETs,
404s), unlike moto, which is AWS's own model in Python. Its limits, which the tests respect: one
account (access key `S3RVER`, secret `S3RVER`); an unknown access key is refused
(InvalidAccessKeyId, 403), but SigV4 signatures are not checked, so "wrong credentials" is tested
with a wrong key id. `make s3rver` installs it into `.s3rver/`; EDGEFLEET_S3RVER may name another
binary. Without it (or without boto3) these tests skip and say why.
"""

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgefleet.procs import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
ACCESS_KEY = SECRET_KEY = "S3RVER"  # s3rver's one account


def find_s3rver() -> Path | None:
    named = os.environ.get("EDGEFLEET_S3RVER")
    candidates = [Path(named)] if named else []
    candidates.append(REPO / ".s3rver" / "node_modules" / ".bin" / "s3rver")
    on_path = shutil.which("s3rver")
    if on_path:
        candidates.append(Path(on_path))
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen[bytes]
    log: Path

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def new_bucket(self) -> str:
        name = f"edgefleet-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str) -> dict[str, int]:
        """Key -> size of everything in `bucket`."""
        listed = self.client().list_objects_v2(Bucket=bucket).get("Contents", [])
        return {o["Key"]: int(o["Size"]) for o in listed}

    def get(self, bucket: str, key: str) -> bytes:
        data: bytes = self.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        return data


@contextmanager
def running_s3_server(folder: Path) -> Iterator[S3Server]:
    """s3rver on a free loopback port, its data under `folder`; stopped at the end."""
    pytest.importorskip("boto3", reason="boto3 is not installed: pip install -e '.[dev]' (or '.[s3]')")
    binary = find_s3rver()
    if binary is None or shutil.which("node") is None:
        pytest.skip("no S3-compatible server: run `make s3rver` (npm s3rver@3.7.1 into .s3rver/, needs node)")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = folder / "s3rver.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(binary),
                "-d",
                str(folder / "data"),
                "-a",
                "127.0.0.1",
                "-p",
                str(port),
                "--no-vhost-buckets",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = S3Server(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_for("s3rver to listen", lambda: _listening(process, port, log), 30)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _listening(process: subprocess.Popen[bytes], port: int, log: Path) -> bool:
    if process.poll() is not None:
        raise RuntimeError(f"s3rver exited ({process.returncode}): {log.read_text(errors='replace')[-2000:]}")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3_server(tmp_path_factory.mktemp("s3rver")) as server:
        yield server


def test_the_server_stores_objects_and_refuses_an_unknown_key(s3_server: S3Server) -> None:
    """What the other tests rely on the server for, checked against it directly."""
    from botocore.exceptions import ClientError

    bucket = s3_server.new_bucket()
    s3_server.client().put_object(Bucket=bucket, Key="a/b", Body=b"0123456789")
    ranged = s3_server.client().get_object(Bucket=bucket, Key="a/b", Range="bytes=2-4")
    assert ranged["Body"].read() == b"234"
    with pytest.raises(ClientError, match="InvalidAccessKeyId"):
        s3_server.client(access_key="NOT-A-KEY").get_object(Bucket=bucket, Key="a/b")
