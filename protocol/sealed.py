"""Sealed telemetry envelopes: HPKE (RFC 9180) to the fleet, signed inside by the device.

A metrics record is encrypted to the fleet's X25519 public key with HPKE base mode, suite
DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / ChaCha20-Poly1305, using `cryptography`'s own HPKE
(`cryptography.hazmat.primitives.hpke`, 50.x). Base mode alone is anonymous (anyone holding the
fleet's public key can seal) and has no replay protection, so:

- the record is signed with the device's own Ed25519 key before it is sealed, and the signature
  covers the envelope header (version, fleet key id, device id, seq) and the fleet public key it
  is sealed to, so a signed record can be neither moved to another device id or seq nor
  re-sealed to a different recipient (surreptitious forwarding);
- the header is also the HPKE `info`, so any change to it makes decryption fail;
- the fleet drops a (device id, seq) it has already accepted, only after `open_sealed`
  succeeded, so forged envelopes cannot move its window. The fleet's store does this with a unique
  (device, seq) constraint, which also holds across workers; `ReplayGuard` is the in-memory form
  for a consumer without such a store.

Framing (binary, all integers big-endian):

    offset  size  field
    0       4     magic b"EFS1"
    4       1     version (1)
    5       1     n = length of key_id (1..64, ASCII [A-Za-z0-9._-])
    6       n     key_id of the fleet key it was sealed to
    6+n     1     m = length of device_id (1..63, a topic-safe device id)
    7+n     m     device_id
    7+n+m   8     seq (u64)
    15+n+m  32    enc, the HPKE encapsulated key (X25519 Nenc)
    47+n+m  rest  ciphertext = HPKE Seal(Ed25519 signature (64) || record), with a 16-byte tag

`header` is bytes [0, 15+n+m). The HPKE info is `INFO_LABEL || header`; the signed message is
`SIGN_LABEL || header || fleet X25519 public key (32 raw bytes) || record`.
The whole envelope is capped at `MAX_ENVELOPE` and its size is checked before anything is parsed.
"""

import hashlib
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from protocol.errors import ProtocolError
from protocol.topics import is_valid_device_id

MAGIC = b"EFS1"
VERSION = 1
MAX_ENVELOPE = 256 * 1024
ENC_LEN = 32  # X25519 public key
SIG_LEN = 64  # Ed25519
TAG_LEN = 16  # ChaCha20-Poly1305
MAX_SEQ = 2**64 - 1
INFO_LABEL = b"edgefleet sealed telemetry v1\x00"
SIGN_LABEL = b"edgefleet sealed record v1\x00"
SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)

_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SEQ = struct.Struct(">Q")
_MIN_HEADER = len(MAGIC) + 1 + 1 + 1 + 1 + 1 + _SEQ.size
# The largest record that still fits: envelope minus the largest header, enc, signature and tag.
MAX_RECORD = MAX_ENVELOPE - (len(MAGIC) + 1 + 1 + 64 + 1 + 63 + _SEQ.size) - ENC_LEN - SIG_LEN - TAG_LEN


class SealError(ProtocolError):
    """An envelope that cannot be sealed or opened; `reason` says why."""


class MalformedEnvelopeError(SealError):
    """Too large, truncated, wrong magic or version, or a header field out of bounds."""


class UnknownKeyError(SealError):
    """Sealed to a fleet key id this side does not hold (rotated away, or never ours)."""


class TamperedError(SealError):
    """HPKE decryption failed: the ciphertext, enc or header was altered, or the key is wrong."""


class ForgedSenderError(SealError):
    """The device is unknown, or its signature over the record does not verify."""


@dataclass(frozen=True)
class OpenedRecord:
    device_id: str
    seq: int
    record: bytes


def fleet_key_id(public: X25519PublicKey) -> str:
    """The id a fleet X25519 key is known by: the first 16 hex digits of sha256 of its raw bytes."""
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _header(key_id: str, device_id: str, seq: int) -> bytes:
    kid, dev = key_id.encode("ascii"), device_id.encode("ascii")
    return MAGIC + bytes([VERSION, len(kid)]) + kid + bytes([len(dev)]) + dev + _SEQ.pack(seq)


def seal(
    record: bytes,
    *,
    device_id: str,
    seq: int,
    device_key: Ed25519PrivateKey,
    fleet_public: X25519PublicKey,
    fleet_key_id: str,
) -> bytes:
    """Sign `record` as `device_id`/`seq` and seal it to the fleet key; return the envelope bytes."""
    if not is_valid_device_id(device_id):
        raise MalformedEnvelopeError(f"device id {device_id!r} is not a valid device id")
    if not _KEY_ID.match(fleet_key_id):
        raise MalformedEnvelopeError(f"fleet key id {fleet_key_id!r} is not 1-64 characters [A-Za-z0-9._-]")
    if not 0 <= seq <= MAX_SEQ:
        raise MalformedEnvelopeError(f"seq {seq} is outside 0..2**64-1")
    if len(record) > MAX_RECORD:
        raise MalformedEnvelopeError(f"record of {len(record)} bytes exceeds {MAX_RECORD}")
    header = _header(fleet_key_id, device_id, seq)
    signature = device_key.sign(SIGN_LABEL + header + _raw(fleet_public) + record)
    sealed = SUITE.encrypt(signature + record, fleet_public, info=INFO_LABEL + header)
    return header + sealed


def _parse(envelope: bytes) -> tuple[bytes, str, str, int, bytes]:
    """Split an envelope into (header, key_id, device_id, seq, enc || ciphertext) or refuse it."""
    if len(envelope) > MAX_ENVELOPE:
        raise MalformedEnvelopeError(f"envelope of {len(envelope)} bytes exceeds {MAX_ENVELOPE}")
    if len(envelope) < _MIN_HEADER:
        raise MalformedEnvelopeError(f"envelope of {len(envelope)} bytes is shorter than any header")
    if envelope[:4] != MAGIC:
        raise MalformedEnvelopeError(f"envelope has magic {envelope[:4]!r}, expected {MAGIC!r}")
    if envelope[4] != VERSION:
        raise MalformedEnvelopeError(f"envelope version {envelope[4]} is not supported (want {VERSION})")
    pos = 5
    fields = []
    for _ in range(2):
        n = envelope[pos]
        if pos + 1 + n > len(envelope):
            raise MalformedEnvelopeError("envelope is truncated inside its header")
        try:
            fields.append(envelope[pos + 1 : pos + 1 + n].decode("ascii"))
        except UnicodeDecodeError as e:
            raise MalformedEnvelopeError("envelope header field is not ASCII") from e
        pos += 1 + n
    key_id, device_id = fields
    if not _KEY_ID.match(key_id):
        raise MalformedEnvelopeError(f"key id {key_id!r} is not valid")
    if not is_valid_device_id(device_id):
        raise MalformedEnvelopeError(f"device id {device_id!r} is not valid")
    if pos + _SEQ.size + ENC_LEN + SIG_LEN + TAG_LEN > len(envelope):
        raise MalformedEnvelopeError("envelope is too short for its seq, enc, signature and tag")
    (seq,) = _SEQ.unpack_from(envelope, pos)
    pos += _SEQ.size
    return envelope[:pos], key_id, device_id, seq, envelope[pos:]


def peek_header(envelope: bytes) -> tuple[str, str, int]:
    """(key_id, device_id, seq) of an envelope, unauthenticated: for routing and cheap dedupe only."""
    _, key_id, device_id, seq, _ = _parse(envelope)
    return key_id, device_id, seq


def open_sealed(
    envelope: bytes,
    *,
    fleet_keys: Mapping[str, X25519PrivateKey],
    device_keys: Callable[[str], Ed25519PublicKey | None],
) -> OpenedRecord:
    """Decrypt and authenticate an envelope; raise a SealError subclass naming what was wrong.

    Replays are not detected here: feed the result's (device_id, seq) to a `ReplayGuard`.
    """
    header, key_id, device_id, seq, sealed = _parse(envelope)
    fleet_key = fleet_keys.get(key_id)
    if fleet_key is None:
        raise UnknownKeyError(f"envelope is sealed to unknown fleet key {key_id!r}")
    device_public = device_keys(device_id)
    if device_public is None:
        raise ForgedSenderError(f"envelope names unknown device {device_id!r}")
    try:
        plaintext = SUITE.decrypt(sealed, fleet_key, info=INFO_LABEL + header)
    except InvalidTag as e:
        raise TamperedError(
            f"envelope from {device_id!r} seq {seq} does not decrypt: ciphertext or header altered"
        ) from e
    if len(plaintext) < SIG_LEN:
        raise ForgedSenderError(f"envelope from {device_id!r} seq {seq} carries no signature")
    signature, record = plaintext[:SIG_LEN], plaintext[SIG_LEN:]
    try:
        device_public.verify(signature, SIGN_LABEL + header + _raw(fleet_key.public_key()) + record)
    except InvalidSignature as e:
        raise ForgedSenderError(f"record signature for device {device_id!r} seq {seq} does not verify") from e
    return OpenedRecord(device_id=device_id, seq=seq, record=record)


class ReplayGuard:
    """Says whether an authenticated (device id, seq) is new, in O(1) memory per device.

    Per device it keeps the highest seq accepted and a bitmap of the `window` seqs below it
    (the IPsec anti-replay window, RFC 4303 3.4.3). A seq at or below `highest - window` is too
    old to tell and counts as a replay. Call `accept` only after `open_sealed` succeeded.
    After a fleet restart, seed it with each device's persisted highest seq: everything at or
    below it then counts as seen (safe; a late out-of-order record from before the restart is
    dropped). Not thread-safe: one owner, or a lock around it.
    """

    def __init__(self, window: int = 1024, highest: Mapping[str, int] | None = None) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self._full = (1 << window) - 1
        # device -> (highest seq, bitmap: bit i set <=> highest - i was accepted)
        self._state: dict[str, tuple[int, int]] = {d: (h, self._full) for d, h in (highest or {}).items()}

    def highest(self, device_id: str) -> int | None:
        state = self._state.get(device_id)
        return state[0] if state else None

    def is_new(self, device_id: str, seq: int) -> bool:
        state = self._state.get(device_id)
        if state is None:
            return True
        top, bits = state
        if seq > top:
            return True
        offset = top - seq
        return offset < self.window and not (bits >> offset) & 1

    def accept(self, device_id: str, seq: int) -> bool:
        """Record (device_id, seq) and return True if it was new; False for a replay or a too-old seq."""
        if not self.is_new(device_id, seq):
            return False
        state = self._state.get(device_id)
        if state is None:
            self._state[device_id] = (seq, 1)
            return True
        top, bits = state
        if seq - top >= self.window:  # a jump past the whole window: shift without a huge int
            self._state[device_id] = (seq, 1)
        elif seq > top:
            self._state[device_id] = (seq, ((bits << (seq - top)) | 1) & self._full)
        else:
            self._state[device_id] = (top, bits | (1 << (top - seq)))
        return True
