"""The wire between a device's TUF client and the fleet's repository, and an attacker's tools.

`Wire` is the in-process transport: it answers from a real `TufRepository` unless an attacker has
put other bytes on a path. `RepoHttpServer` serves the same repository on a real socket and can
stall or drip chosen files, for the slow-retrieval cases. The attacker signs with real Ed25519 keys:
fresh ones, or the repository's own key files when a test plays out a compromised key.
"""

from __future__ import annotations

import hashlib
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata

from device.tuf_client import FetchFn
from fleet.tuf_repository import MetadataNotFound, TufRepository

METADATA_PREFIX = "tuf/metadata/"
TARGETS_PREFIX = "tuf/targets/"


def target_url(name: str, data: bytes) -> str:
    """Where a consistent-snapshot client asks for a target: its sha256 before the file name."""
    parent, sep, base = name.rpartition("/")
    return f"{TARGETS_PREFIX}{parent}{sep}{hashlib.sha256(data).hexdigest()}.{base}"


@dataclass
class Wire:
    """Device <-> fleet transport in one process; `overrides` is what a man in the middle sends."""

    repo: TufRepository
    targets: dict[str, bytes] = field(default_factory=dict)
    overrides: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, int]] = field(default_factory=list)

    def put_target(self, name: str, data: bytes) -> None:
        self.targets[target_url(name, data)] = data

    def __call__(self, url: str, max_length: int, deadline_s: float) -> bytes:
        self.requests.append((url, max_length))
        if url in self.overrides:
            return self.overrides[url]
        if url.startswith(METADATA_PREFIX):
            try:
                return self.repo.serve_metadata(url.removeprefix(METADATA_PREFIX))
            except MetadataNotFound as e:
                raise FileNotFoundError(str(e)) from e
        if url in self.targets:
            return self.targets[url]
        raise FileNotFoundError(url)

    def asked(self, url: str) -> int:
        return sum(1 for u, _ in self.requests if u == url)


def repo_signers(repo: TufRepository, role: str) -> list[CryptoSigner]:
    """The repository's own private keys for `role`: what an attacker holds after stealing them."""
    signers = []
    for path in sorted((repo.keys_dir / role).glob("*.pem")):
        private = load_pem_private_key(path.read_bytes(), password=None)
        signers.append(CryptoSigner(private, SSlibKey.from_crypto(private.public_key())))  # type: ignore[arg-type]
    return signers


def forge(data: bytes, signers: list[CryptoSigner], mutate: Callable[[Any], None] | None = None) -> bytes:
    """Re-sign (a changed copy of) published metadata with `signers` only."""
    md: Metadata[Any] = Metadata.from_bytes(data)
    if mutate is not None:
        mutate(md.signed)
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)
    return md.to_bytes()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        owner = self.server.owner
        path = self.path.lstrip("/")
        owner.requests.append(path)
        try:
            data = owner.wire(path, 1 << 30, 60.0)
        except FileNotFoundError:
            self.send_error(404)
            return
        stall = owner.stalls.get(path, 0)
        if stall:
            owner.stalls[path] = stall - 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not stall:
            self.wfile.write(data)
            return
        # A slow drip: always some progress, so no socket timeout on the client ever fires.
        for i in range(len(data)):
            if owner.stopping.wait(owner.drip_s):
                return
            try:
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
            except OSError:
                return

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: RepoHttpServer


class RepoHttpServer:
    """The repository over HTTP on 127.0.0.1; `stalls[path] = n` drips the next n answers for path."""

    def __init__(self, wire: Wire, drip_s: float = 0.2) -> None:
        self.wire = wire
        self.drip_s = drip_s
        self.stalls: dict[str, int] = {}
        self.requests: list[str] = []
        self.stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def __enter__(self) -> RepoHttpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def fetch(self) -> FetchFn:
        return http_fetch(self.base)


def http_fetch(base: str) -> FetchFn:
    """A FetchFn over plain HTTP: the socket timeout is the deadline; reads stop at max_length + 1."""

    def fetch(url: str, max_length: int, deadline_s: float) -> bytes:
        try:
            with urllib.request.urlopen(base + url, timeout=deadline_s) as response:
                data: bytes = response.read(max_length + 1)
                return data
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise FileNotFoundError(url) from e
            raise ConnectionError(f"{url}: HTTP {e.code}") from e

    return fetch


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(0.05)
