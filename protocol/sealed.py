"""Sealed telemetry envelopes: HPKE (RFC 9180) to the fleet, signed inside by the device.

A metrics record is encrypted to the fleet's telemetry public key with HPKE base mode, using
`cryptography`'s own HPKE (`cryptography.hazmat.primitives.hpke`, 50.x), KDF HKDF-SHA256 and AEAD
ChaCha20-Poly1305, and one of two KEMs. The fleet key's type decides which:

- "x25519": DHKEM(X25519, HKDF-SHA256); envelope version 1, byte for byte what devices sent
  before the hybrid existed;
- "mlkem768-x25519": the post-quantum hybrid ML-KEM-768 + X25519 (HPKE KEM MLKEM768-X25519);
  envelope version 2. Records stay secret as long as either part holds: ML-KEM against a
  quantum computer that decrypts today's recorded traffic later, X25519 should ML-KEM fall.
  It costs about 1.1 KiB more per envelope and more CPU (bench/telemetry/RESULTS_seal.md).

Base mode alone is anonymous (anyone holding the fleet's public key can seal) and has no replay
protection, so:

- the record is signed with the device's own Ed25519 key before it is sealed, and the signature
  covers the envelope header (version, KEM, fleet key id, device id, seq) and the exact fleet public
  key it is sealed to, so a signed record can be neither moved to another device id or seq nor
  re-sealed to a different recipient (surreptitious forwarding);
- the header is also the HPKE `info`, so any change to it makes decryption fail;
- an envelope is opened only with a key of the KEM its header names, so a key id that names a key
  of the other type fails as an unknown key, never as a confused decryption;
- the fleet drops a (device id, seq) it has already accepted, only after `open_sealed`
  succeeded, so forged envelopes cannot move its window. The fleet's store does this with a unique
  (device, seq) constraint, which also holds across workers; `ReplayGuard` is the in-memory form
  for a consumer without such a store.

Framing (binary, all integers big-endian). Version 1, X25519:

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

Version 2, a KEM named in the header (today only 1 = mlkem768-x25519):

    0       4     magic b"EFS1"
    4       1     version (2)
    5       1     kem (1 = mlkem768-x25519)
    6       1+n   key_id, as above
    7+n     1+m   device_id, as above
    8+n+m   8     seq (u64)
    16+n+m  Nenc  enc (1120 for mlkem768-x25519: ML-KEM-768 ciphertext 1088, X25519 share 32)
    ...     rest  ciphertext, as above

`header` is every byte before enc. The HPKE info is `INFO_LABEL || header`; the signed message is
`SIGN_LABEL || header || public_raw(fleet public key) || record`, where `public_raw` is the 32 raw
bytes of an X25519 key, or for the hybrid the ML-KEM-768 encapsulation key (1184) followed by the
X25519 key (32). The whole envelope is capped at `MAX_ENVELOPE` and its size is checked before
anything is parsed; the largest record depends on the KEM (`max_record`).

Keys: `generate_telemetry_key`, `kem_of`, `public_raw` / `public_from_raw` (what devices are told),
`private_to_bytes` / `private_from_bytes` (what the fleet stores: unencrypted PKCS#8 PEM, one block
for X25519, two for the hybrid: ML-KEM-768 then X25519) and `fleet_key_id` (16 hex digits of the
raw public key's SHA-256; "pq-" before them for a hybrid key).
"""

import functools
import hashlib
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeAlias

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from protocol.errors import ProtocolError
from protocol.topics import is_valid_device_id

MAGIC = b"EFS1"
VERSION = 1  # the X25519 envelope; the hybrid's is VERSION_KEM
VERSION_KEM = 2
MAX_ENVELOPE = 256 * 1024
ENC_LEN = 32  # X25519 public key
SIG_LEN = 64  # Ed25519
TAG_LEN = 16  # ChaCha20-Poly1305
MAX_SEQ = 2**64 - 1
INFO_LABEL = b"edgefleet sealed telemetry v1\x00"
SIGN_LABEL = b"edgefleet sealed record v1\x00"
SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
HYBRID_SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)

KEM_X25519 = "x25519"
KEM_MLKEM768_X25519 = "mlkem768-x25519"
KEMS = (KEM_X25519, KEM_MLKEM768_X25519)
HYBRID_KEY_ID_PREFIX = "pq-"
MLKEM768_PUBLIC_LEN = 1184
X25519_LEN = 32

_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SEQ = struct.Struct(">Q")
_MIN_HEADER = len(MAGIC) + 1 + 1 + 1 + 1 + 1 + _SEQ.size
_PEM_BLOCK = re.compile(rb"-----BEGIN PRIVATE KEY-----.*?-----END PRIVATE KEY-----\r?\n?", re.DOTALL)


class SealError(ProtocolError):
    """An envelope that cannot be sealed or opened; `reason` says why."""


class MalformedEnvelopeError(SealError):
    """Too large, truncated, wrong magic or version, or a header field out of bounds."""


class UnknownKeyError(SealError):
    """Sealed to a fleet key id this side does not hold (rotated away, or never ours), or the key
    held under that id is of another KEM than the envelope names."""


class TamperedError(SealError):
    """HPKE decryption failed: the ciphertext, enc or header was altered, or the key is wrong."""


class ForgedSenderError(SealError):
    """The device is unknown, or its signature over the record does not verify."""


class BadKeyError(SealError):
    """A telemetry key of an unknown KEM, or of the wrong type, length or encoding."""


class HybridPublicKey:
    """An ML-KEM-768 + X25519 public key. `cryptography`'s own `hpke.MLKEM768X25519PublicKey`
    can be neither serialized nor compared, so this keeps the two parts (and builds that key once:
    it costs about as much as a seal)."""

    __slots__ = ("_hpke", "_raw", "mlkem", "x25519")

    def __init__(self, mlkem: MLKEM768PublicKey, x25519: X25519PublicKey) -> None:
        self.mlkem = mlkem
        self.x25519 = x25519
        self._raw = mlkem.public_bytes_raw() + x25519.public_bytes_raw()
        self._hpke = hpke.MLKEM768X25519PublicKey(mlkem, x25519)

    def public_bytes_raw(self) -> bytes:
        """ML-KEM-768 encapsulation key (1184 bytes) || X25519 public key (32)."""
        return self._raw

    @property
    def hpke_key(self) -> hpke.MLKEM768X25519PublicKey:
        return self._hpke

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HybridPublicKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"<HybridPublicKey {fleet_key_id(self)}>"


class HybridPrivateKey:
    """An ML-KEM-768 + X25519 private key, kept as its parts (see `HybridPublicKey`)."""

    __slots__ = ("_hpke", "_public", "mlkem", "x25519")

    def __init__(self, mlkem: MLKEM768PrivateKey, x25519: X25519PrivateKey) -> None:
        self.mlkem = mlkem
        self.x25519 = x25519
        self._public = HybridPublicKey(mlkem.public_key(), x25519.public_key())
        self._hpke = hpke.MLKEM768X25519PrivateKey(mlkem, x25519)

    @classmethod
    def generate(cls) -> "HybridPrivateKey":
        return cls(MLKEM768PrivateKey.generate(), X25519PrivateKey.generate())

    def public_key(self) -> HybridPublicKey:
        return self._public

    @property
    def hpke_key(self) -> hpke.MLKEM768X25519PrivateKey:
        return self._hpke

    def __repr__(self) -> str:
        return f"<HybridPrivateKey for {fleet_key_id(self._public)}>"


TelemetryPrivateKey: TypeAlias = X25519PrivateKey | HybridPrivateKey
TelemetryPublicKey: TypeAlias = X25519PublicKey | HybridPublicKey


@dataclass(frozen=True)
class _Kem:
    """What differs between the KEMs: the envelope version (and KEM byte), suite and sizes."""

    name: str
    version: int
    code: bytes  # the KEM byte after the version (version 2); empty for version 1
    suite: hpke.Suite
    public_len: int
    enc_len: int

    @property
    def max_header(self) -> int:
        return len(MAGIC) + 1 + len(self.code) + 1 + 64 + 1 + 63 + _SEQ.size

    @property
    def max_record(self) -> int:
        """The largest record that still fits: envelope minus the largest header, enc, signature, tag."""
        return MAX_ENVELOPE - self.max_header - self.enc_len - SIG_LEN - TAG_LEN


_X25519 = _Kem(KEM_X25519, VERSION, b"", SUITE, X25519_LEN, ENC_LEN)
_HYBRID = _Kem(
    KEM_MLKEM768_X25519,
    VERSION_KEM,
    b"\x01",
    HYBRID_SUITE,
    MLKEM768_PUBLIC_LEN + X25519_LEN,
    hpke.KEM.MLKEM768_X25519.enc_length(),
)
_BY_NAME = {k.name: k for k in (_X25519, _HYBRID)}
_BY_CODE = {k.code[0]: k for k in (_HYBRID,)}  # the version-2 KEM byte
MAX_RECORD = _X25519.max_record  # kept for version-1 callers; `max_record(kem)` for either


@dataclass(frozen=True)
class OpenedRecord:
    device_id: str
    seq: int
    record: bytes


# -- keys ----------------------------------------------------------------------------------------


def _kem(name: str) -> _Kem:
    spec = _BY_NAME.get(name) if isinstance(name, str) else None
    if spec is None:
        raise BadKeyError(f"unknown telemetry KEM {name!r}; use one of {', '.join(KEMS)}")
    return spec


def max_record(kem: str) -> int:
    """The largest record `seal` takes for a fleet key of this KEM."""
    return _kem(kem).max_record


@functools.cache
def hybrid_supported() -> bool:
    """Whether this `cryptography` build has ML-KEM (it needs OpenSSL 3.5+, AWS-LC or BoringSSL)."""
    try:
        MLKEM768PrivateKey.generate()
    except UnsupportedAlgorithm:
        return False
    return True


def _need_hybrid() -> None:
    if not hybrid_supported():
        raise BadKeyError(
            f"this cryptography build has no ML-KEM, so {KEM_MLKEM768_X25519} keys cannot be used: "
            "install a cryptography wheel from PyPI (>= 47, with its bundled OpenSSL) or use 'x25519'"
        )


def generate_telemetry_key(kem: str) -> TelemetryPrivateKey:
    """A new fleet telemetry key of `kem` ("x25519" or "mlkem768-x25519")."""
    if _kem(kem) is _HYBRID:
        _need_hybrid()
        return HybridPrivateKey.generate()
    return X25519PrivateKey.generate()


def kem_of(key: TelemetryPrivateKey | TelemetryPublicKey) -> str:
    """The KEM a telemetry key (private or public) is for: one of `KEMS`."""
    if isinstance(key, X25519PrivateKey | X25519PublicKey):
        return KEM_X25519
    if isinstance(key, HybridPrivateKey | HybridPublicKey):
        return KEM_MLKEM768_X25519
    raise BadKeyError(
        f"a {type(key).__name__} is not a telemetry key: use an X25519 key or a hybrid key from "
        "generate_telemetry_key / public_from_raw / private_from_bytes"
    )


def public_raw(public: TelemetryPublicKey) -> bytes:
    """The raw public key: 32 bytes for X25519, 1216 for the hybrid (ML-KEM-768 1184 || X25519 32)."""
    kem_of(public)  # refuses anything else with a BadKeyError
    return public.public_bytes_raw()


def public_from_raw(kem: str, raw: bytes) -> TelemetryPublicKey:
    """The public key `public_raw` gave, checked: its length, and that a record can be sealed to it
    (ML-KEM's modulus check; an X25519 point of low order fails here, not at the first seal)."""
    spec = _kem(kem)
    if not isinstance(raw, bytes | bytearray):
        raise BadKeyError(f"a {kem} public key must be bytes, not {type(raw).__name__}")
    if len(raw) != spec.public_len:
        raise BadKeyError(f"a {kem} public key is {spec.public_len} bytes, not {len(raw)}")
    raw = bytes(raw)
    public: TelemetryPublicKey
    try:
        if spec is _HYBRID:
            _need_hybrid()
            public = HybridPublicKey(
                MLKEM768PublicKey.from_public_bytes(raw[:MLKEM768_PUBLIC_LEN]),
                X25519PublicKey.from_public_bytes(raw[MLKEM768_PUBLIC_LEN:]),
            )
        else:
            public = X25519PublicKey.from_public_bytes(raw)
        _hpke_suite_encrypt(spec, b"", public, b"")
    except ValueError as e:
        raise BadKeyError(f"not a valid {kem} public key ({e}): ask the fleet for its current key") from e
    return public


def _pem(part: X25519PrivateKey | MLKEM768PrivateKey) -> bytes:
    return part.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def private_to_bytes(private: TelemetryPrivateKey) -> bytes:
    """The key for the fleet's keyring file (keep it 0600): unencrypted PKCS#8 PEM, one block for
    X25519 (what fleet/store.py wrote before), two for the hybrid (ML-KEM-768 seed, then X25519)."""
    if isinstance(private, HybridPrivateKey):
        return _pem(private.mlkem) + _pem(private.x25519)
    if isinstance(private, X25519PrivateKey):
        return _pem(private)
    raise BadKeyError(f"a {type(private).__name__} is not a telemetry private key: use X25519 or hybrid")


def private_from_bytes(kem: str, data: bytes) -> TelemetryPrivateKey:
    """A key `private_to_bytes` wrote, checked against the KEM the keyring lists it under."""
    spec = _kem(kem)
    blocks = _PEM_BLOCK.findall(data) if isinstance(data, bytes | bytearray) else []
    want = 2 if spec is _HYBRID else 1
    if len(blocks) != want:
        raise BadKeyError(
            f"a {kem} private key is {want} unencrypted PKCS#8 PEM block(s) "
            f"('-----BEGIN PRIVATE KEY-----'), found {len(blocks)}: restore the key file from backup"
        )
    if spec is _HYBRID:
        _need_hybrid()
    loaded = []
    for block in blocks:
        try:
            loaded.append(serialization.load_pem_private_key(block, password=None))
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise BadKeyError(f"a {kem} private key block does not load ({e}): restore it from backup") from e
    if spec is _HYBRID:
        mlkem, x25519 = loaded
        if isinstance(mlkem, MLKEM768PrivateKey) and isinstance(x25519, X25519PrivateKey):
            return HybridPrivateKey(mlkem, x25519)
        found = f"{type(mlkem).__name__} and {type(x25519).__name__}"
        raise BadKeyError(f"a {kem} private key is an ML-KEM-768 key then an X25519 key, not {found}")
    (only,) = loaded
    if isinstance(only, X25519PrivateKey):
        return only
    raise BadKeyError(f"a {kem} private key is an X25519 key, not {type(only).__name__}")


def fleet_key_id(public: TelemetryPublicKey) -> str:
    """The id a fleet telemetry key is known by: the first 16 hex digits of sha256 of its raw public
    key; with "pq-" before them for a hybrid key, so the kind shows in logs and configs."""
    digest = hashlib.sha256(public_raw(public)).hexdigest()[:16]
    return HYBRID_KEY_ID_PREFIX + digest if isinstance(public, HybridPublicKey) else digest


# -- envelopes -----------------------------------------------------------------------------------


def _hpke_suite_encrypt(spec: _Kem, plaintext: bytes, public: TelemetryPublicKey, info: bytes) -> bytes:
    target = public.hpke_key if isinstance(public, HybridPublicKey) else public
    return spec.suite.encrypt(plaintext, target, info=info)


def _header(key_id: str, device_id: str, seq: int, kem: str = KEM_X25519) -> bytes:
    spec = _kem(kem)
    kid, dev = key_id.encode("ascii"), device_id.encode("ascii")
    return (
        MAGIC
        + bytes([spec.version])
        + spec.code
        + bytes([len(kid)])
        + kid
        + bytes([len(dev)])
        + dev
        + _SEQ.pack(seq)
    )


def seal(
    record: bytes,
    *,
    device_id: str,
    seq: int,
    device_key: Ed25519PrivateKey,
    fleet_public: TelemetryPublicKey,
    fleet_key_id: str,
) -> bytes:
    """Sign `record` as `device_id`/`seq` and seal it to the fleet key (version 1 for an X25519 key,
    2 for a hybrid one); return the envelope bytes."""
    spec = _kem(kem_of(fleet_public))
    if not is_valid_device_id(device_id):
        raise MalformedEnvelopeError(f"device id {device_id!r} is not a valid device id")
    if not _KEY_ID.match(fleet_key_id):
        raise MalformedEnvelopeError(f"fleet key id {fleet_key_id!r} is not 1-64 characters [A-Za-z0-9._-]")
    if not 0 <= seq <= MAX_SEQ:
        raise MalformedEnvelopeError(f"seq {seq} is outside 0..2**64-1")
    if len(record) > spec.max_record:
        raise MalformedEnvelopeError(
            f"record of {len(record)} bytes exceeds {spec.max_record} (the most a {spec.name} envelope holds)"
        )
    header = _header(fleet_key_id, device_id, seq, spec.name)
    signature = device_key.sign(SIGN_LABEL + header + public_raw(fleet_public) + record)
    try:
        sealed = _hpke_suite_encrypt(spec, signature + record, fleet_public, INFO_LABEL + header)
    except ValueError as e:  # an X25519 point of low order: no shared secret
        raise BadKeyError(
            f"cannot seal to fleet key {fleet_key_id!r} ({e}): get the fleet's key again"
        ) from e
    return header + sealed


def _parse(envelope: bytes) -> tuple[_Kem, bytes, str, str, int, bytes]:
    """Split an envelope into (KEM, header, key_id, device_id, seq, enc || ciphertext) or refuse it."""
    if len(envelope) > MAX_ENVELOPE:
        raise MalformedEnvelopeError(f"envelope of {len(envelope)} bytes exceeds {MAX_ENVELOPE}")
    if len(envelope) < _MIN_HEADER:
        raise MalformedEnvelopeError(f"envelope of {len(envelope)} bytes is shorter than any header")
    if envelope[:4] != MAGIC:
        raise MalformedEnvelopeError(f"envelope has magic {envelope[:4]!r}, expected {MAGIC!r}")
    version = envelope[4]
    if version == VERSION:
        spec, pos = _X25519, 5
    elif version == VERSION_KEM:
        found = _BY_CODE.get(envelope[5])
        if found is None:
            known = ", ".join(f"{k.code[0]} = {k.name}" for k in _BY_CODE.values())
            raise MalformedEnvelopeError(
                f"envelope version 2 names unknown KEM {envelope[5]} (known: {known})"
            )
        spec, pos = found, 6
    else:
        raise MalformedEnvelopeError(
            f"envelope version {version} is not supported (want {VERSION} or {VERSION_KEM})"
        )
    fields = []
    for _ in range(2):
        if pos >= len(envelope):
            raise MalformedEnvelopeError("envelope is truncated inside its header")
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
    if pos + _SEQ.size + spec.enc_len + SIG_LEN + TAG_LEN > len(envelope):
        raise MalformedEnvelopeError(
            f"envelope is too short for its seq, {spec.name} enc ({spec.enc_len} bytes), signature and tag"
        )
    (seq,) = _SEQ.unpack_from(envelope, pos)
    pos += _SEQ.size
    return spec, envelope[:pos], key_id, device_id, seq, envelope[pos:]


def peek_header(envelope: bytes) -> tuple[str, str, int]:
    """(key_id, device_id, seq) of an envelope, unauthenticated: for routing and cheap dedupe only."""
    _, _, key_id, device_id, seq, _ = _parse(envelope)
    return key_id, device_id, seq


def peek_kem(envelope: bytes) -> str:
    """The KEM an envelope says it was sealed with, unauthenticated: for counting, not for trust."""
    return _parse(envelope)[0].name


def open_sealed(
    envelope: bytes,
    *,
    fleet_keys: Mapping[str, TelemetryPrivateKey],
    device_keys: Callable[[str], Ed25519PublicKey | None],
) -> OpenedRecord:
    """Decrypt and authenticate an envelope; raise a SealError subclass naming what was wrong.

    `fleet_keys` maps key ids to the fleet's private keys, of either KEM (during a rotation, the
    current key and those still in grace). Replays are not detected here: feed the result's
    (device_id, seq) to a `ReplayGuard`.
    """
    spec, header, key_id, device_id, seq, sealed = _parse(envelope)
    fleet_key = fleet_keys.get(key_id)
    if fleet_key is None:
        raise UnknownKeyError(f"envelope is sealed to unknown fleet key {key_id!r}")
    held = kem_of(fleet_key)
    if held != spec.name:
        raise UnknownKeyError(
            f"envelope is sealed with {spec.name} to fleet key {key_id!r}, but the key held under that id "
            f"is {held}: the keyring maps this id to the wrong key"
        )
    device_public = device_keys(device_id)
    if device_public is None:
        raise ForgedSenderError(f"envelope names unknown device {device_id!r}")
    target = fleet_key.hpke_key if isinstance(fleet_key, HybridPrivateKey) else fleet_key
    try:
        plaintext = spec.suite.decrypt(sealed, target, info=INFO_LABEL + header)
    except (InvalidTag, ValueError) as e:
        raise TamperedError(
            f"envelope from {device_id!r} seq {seq} does not decrypt: ciphertext or header altered"
        ) from e
    if len(plaintext) < SIG_LEN:
        raise ForgedSenderError(f"envelope from {device_id!r} seq {seq} carries no signature")
    signature, record = plaintext[:SIG_LEN], plaintext[SIG_LEN:]
    if not verify_ed25519(
        device_public, signature, SIGN_LABEL + header + public_raw(fleet_key.public_key()) + record
    ):
        raise ForgedSenderError(f"record signature for device {device_id!r} seq {seq} does not verify")
    return OpenedRecord(device_id=device_id, seq=seq, record=record)


def _sodium_verifier() -> Callable[[bytes, bytes], bytes] | None:
    try:
        from nacl.bindings import crypto_sign_open
    except ImportError:
        return None
    return crypto_sign_open


_SODIUM_OPEN = _sodium_verifier()


def verify_ed25519(public: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """Whether `signature` is `public`'s over `message`.

    With PyNaCl installed (the fleet extra has it) libsodium checks it, in about half the CPU of
    OpenSSL's Ed25519 here (60 vs 120 µs: this is the largest part of opening an envelope, see
    bench/telemetry/RESULTS_seal.md). libsodium is the stricter of the two (it also refuses
    non-canonical and small-order encodings), so it accepts no signature OpenSSL would refuse;
    every signature a device makes with `cryptography` passes both.
    """
    if len(signature) != SIG_LEN:
        return False
    if _SODIUM_OPEN is not None:
        try:
            _SODIUM_OPEN(signature + message, public.public_bytes_raw())
        except Exception:  # nacl.exceptions.BadSignatureError, or a malformed key or signature
            return False
        return True
    try:
        public.verify(signature, message)
    except InvalidSignature:
        return False
    return True


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
