"""The post-quantum hybrid (ML-KEM-768 + X25519) envelope, version 2, and the telemetry key API
both KEMs share: generate, identify, serialize, load, and every refusal."""

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import sealed
from protocol.errors import ProtocolError
from protocol.sealed import (
    KEM_MLKEM768_X25519,
    KEM_X25519,
    KEMS,
    MAX_ENVELOPE,
    BadKeyError,
    ForgedSenderError,
    HybridPrivateKey,
    HybridPublicKey,
    MalformedEnvelopeError,
    ReplayGuard,
    SealError,
    TamperedError,
    TelemetryPrivateKey,
    UnknownKeyError,
    fleet_key_id,
    generate_telemetry_key,
    kem_of,
    max_record,
    open_sealed,
    peek_header,
    peek_kem,
    private_from_bytes,
    private_to_bytes,
    public_from_raw,
    public_raw,
    seal,
)
from tests.conftest import FUZZ_SCALE

pytestmark = pytest.mark.skipif(
    not sealed.hybrid_supported(), reason="this cryptography build has no ML-KEM (needs OpenSSL 3.5+/AWS-LC)"
)

ENC = 1120  # ML-KEM-768 ciphertext (1088) + X25519 share (32)
DEVICE = "line1-cam"


@pytest.fixture(scope="module")
def hybrid() -> HybridPrivateKey:
    key = generate_telemetry_key(KEM_MLKEM768_X25519)
    assert isinstance(key, HybridPrivateKey)
    return key


@pytest.fixture(scope="module")
def classic() -> X25519PrivateKey:
    key = generate_telemetry_key(KEM_X25519)
    assert isinstance(key, X25519PrivateKey)
    return key


@pytest.fixture(scope="module")
def devices() -> dict[str, Ed25519PrivateKey]:
    return {DEVICE: Ed25519PrivateKey.generate(), "line2-cam": Ed25519PrivateKey.generate()}


def seal_to(
    fleet: TelemetryPrivateKey,
    device_key: Ed25519PrivateKey,
    record: bytes = b"rec",
    *,
    device: str = DEVICE,
    seq: int = 7,
    key_id: str | None = None,
) -> bytes:
    public = fleet.public_key()
    return seal(
        record,
        device_id=device,
        seq=seq,
        device_key=device_key,
        fleet_public=public,
        fleet_key_id=key_id or fleet_key_id(public),
    )


def open_with(
    keys: dict[str, TelemetryPrivateKey], devices: dict[str, Ed25519PrivateKey], envelope: bytes
) -> sealed.OpenedRecord:
    publics: dict[str, Ed25519PublicKey] = {d: k.public_key() for d, k in devices.items()}
    return open_sealed(envelope, fleet_keys=keys, device_keys=publics.get)


def keyed(*keys: TelemetryPrivateKey) -> dict[str, TelemetryPrivateKey]:
    return {fleet_key_id(k.public_key()): k for k in keys}


def header_len(envelope: bytes, record_len: int) -> int:
    return len(envelope) - (ENC + 64 + record_len + 16)


# --- keys ---


def test_key_kinds_sizes_and_ids(hybrid: HybridPrivateKey, classic: X25519PrivateKey) -> None:
    assert KEMS == ("x25519", "mlkem768-x25519")
    assert kem_of(hybrid) == kem_of(hybrid.public_key()) == KEM_MLKEM768_X25519
    assert kem_of(classic) == kem_of(classic.public_key()) == KEM_X25519
    raw = public_raw(hybrid.public_key())
    assert len(raw) == 1216 and len(public_raw(classic.public_key())) == 32
    # The hybrid's raw form is its parts, ML-KEM first: what a device is told and what is signed.
    assert raw == hybrid.mlkem.public_key().public_bytes_raw() + hybrid.x25519.public_key().public_bytes_raw()
    # X25519 ids are what they always were; hybrid ids say so.
    assert (
        fleet_key_id(classic.public_key())
        == hashlib.sha256(public_raw(classic.public_key())).hexdigest()[:16]
    )
    hybrid_id = fleet_key_id(hybrid.public_key())
    assert hybrid_id == "pq-" + hashlib.sha256(raw).hexdigest()[:16]
    assert fleet_key_id(generate_telemetry_key(KEM_MLKEM768_X25519).public_key()) != hybrid_id
    assert max_record(KEM_X25519) == sealed.MAX_RECORD == MAX_ENVELOPE - 142 - 32 - 64 - 16
    assert max_record(KEM_MLKEM768_X25519) == MAX_ENVELOPE - 143 - ENC - 64 - 16


def test_public_keys_round_trip_through_raw_bytes(
    hybrid: HybridPrivateKey, classic: X25519PrivateKey
) -> None:
    for key in (hybrid, classic):
        public = key.public_key()
        again = public_from_raw(kem_of(key), public_raw(public))
        assert again == public and fleet_key_id(again) == fleet_key_id(public)
        assert isinstance(again, HybridPublicKey) == (key is hybrid)
    assert hash(public_from_raw(KEM_MLKEM768_X25519, public_raw(hybrid.public_key()))) == hash(
        hybrid.public_key()
    )
    # A device given the raw key seals; the fleet opens with the private key.
    parsed = public_from_raw(KEM_MLKEM768_X25519, public_raw(hybrid.public_key()))
    device = Ed25519PrivateKey.generate()
    envelope = seal(
        b"r",
        device_id=DEVICE,
        seq=1,
        device_key=device,
        fleet_public=parsed,
        fleet_key_id=fleet_key_id(parsed),
    )
    assert open_with(keyed(hybrid), {DEVICE: device}, envelope).record == b"r"


def test_public_from_raw_refuses_bad_input(hybrid: HybridPrivateKey, classic: X25519PrivateKey) -> None:
    raw = public_raw(hybrid.public_key())
    cases: list[tuple[str, object, str]] = [
        ("kyber", raw, "unknown telemetry KEM"),
        (KEM_MLKEM768_X25519, raw[:-1], "1216 bytes, not 1215"),
        (KEM_MLKEM768_X25519, raw + b"\x00", "1216 bytes, not 1217"),
        (KEM_MLKEM768_X25519, public_raw(classic.public_key()), "1216 bytes, not 32"),
        (KEM_X25519, raw, "32 bytes, not 1216"),
        (KEM_MLKEM768_X25519, b"\xff" * 1184 + raw[1184:], "not a valid"),  # ML-KEM modulus check
        (KEM_X25519, bytes(32), "not a valid"),  # a low-order X25519 point: no shared secret
        (KEM_MLKEM768_X25519, raw[:1184] + bytes(32), "not a valid"),
        (KEM_X25519, "a string", "must be bytes"),
    ]
    for kem, data, reason in cases:
        with pytest.raises(BadKeyError, match=reason) as info:
            public_from_raw(kem, data)  # type: ignore[arg-type]
        assert isinstance(info.value, SealError) and isinstance(info.value, ProtocolError)


def test_private_keys_round_trip_as_pem(hybrid: HybridPrivateKey, classic: X25519PrivateKey) -> None:
    pem = private_to_bytes(hybrid)
    assert pem.count(b"-----BEGIN PRIVATE KEY-----") == 2
    # Each block is plain PKCS#8 that other tools read: ML-KEM-768 first, then X25519.
    first, second = (b"-----BEGIN" + block for block in pem.split(b"-----BEGIN")[1:])
    assert (
        serialization.load_pem_private_key(first, None).private_bytes_raw()
        == hybrid.mlkem.private_bytes_raw()
    )  # type: ignore[union-attr]
    assert isinstance(serialization.load_pem_private_key(second, None), X25519PrivateKey)
    loaded = private_from_bytes(KEM_MLKEM768_X25519, pem)
    assert isinstance(loaded, HybridPrivateKey)
    assert loaded.public_key() == hybrid.public_key()
    device = Ed25519PrivateKey.generate()
    envelope = seal_to(hybrid, device, b"kept")
    assert open_with(keyed(loaded), {DEVICE: device}, envelope).record == b"kept", "the reloaded key opens"
    # X25519: one PKCS#8 block, the format fleet/store.py has always written.
    legacy = classic.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert private_to_bytes(classic) == legacy
    again = private_from_bytes(KEM_X25519, legacy)
    assert isinstance(again, X25519PrivateKey) and public_raw(again.public_key()) == public_raw(
        classic.public_key()
    )


def test_private_from_bytes_refuses_bad_input(hybrid: HybridPrivateKey, classic: X25519PrivateKey) -> None:
    hybrid_pem, classic_pem = private_to_bytes(hybrid), private_to_bytes(classic)
    mlkem_pem, x_pem = (b"-----BEGIN" + block for block in hybrid_pem.split(b"-----BEGIN")[1:])
    ed_pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cases: list[tuple[str, object, str]] = [
        ("kyber", classic_pem, "unknown telemetry KEM"),
        (KEM_MLKEM768_X25519, classic_pem, "2 unencrypted PKCS#8 PEM block"),
        (KEM_X25519, hybrid_pem, "1 unencrypted PKCS#8 PEM block"),
        (KEM_X25519, b"", "found 0"),
        (KEM_X25519, "not bytes", "found 0"),
        (KEM_MLKEM768_X25519, x_pem + mlkem_pem, "ML-KEM-768 key then an X25519 key"),  # parts swapped
        (KEM_X25519, mlkem_pem, "is an X25519 key, not"),
        (KEM_X25519, ed_pem, "is an X25519 key, not Ed25519"),
        (KEM_X25519, classic_pem.replace(b"MC4C", b"MC4D"), "does not load"),  # corrupt DER
    ]
    for kem, data, reason in cases:
        with pytest.raises(BadKeyError, match=reason):
            private_from_bytes(kem, data)  # type: ignore[arg-type]


def test_non_telemetry_keys_are_refused_clearly() -> None:
    ed = Ed25519PrivateKey.generate()
    with pytest.raises(BadKeyError, match="Ed25519PrivateKey is not a telemetry key"):
        kem_of(ed)  # type: ignore[arg-type]
    with pytest.raises(BadKeyError, match="not a telemetry"):
        public_raw(ed.public_key())  # type: ignore[arg-type]
    with pytest.raises(BadKeyError, match="not a telemetry private key"):
        private_to_bytes(ed)  # type: ignore[arg-type]
    with pytest.raises(BadKeyError, match="unknown telemetry KEM 'rsa'"):
        generate_telemetry_key("rsa")
    with pytest.raises(BadKeyError, match="not a telemetry"):
        seal(b"x", device_id=DEVICE, seq=1, device_key=ed, fleet_public=ed.public_key(), fleet_key_id="k")  # type: ignore[arg-type]


# --- version 2 envelopes ---


def test_hybrid_round_trip(hybrid: HybridPrivateKey, devices: dict[str, Ed25519PrivateKey]) -> None:
    kid = fleet_key_id(hybrid.public_key())
    envelope = seal_to(hybrid, devices[DEVICE], b'{"t": 1}')
    assert envelope[:6] == b"EFS1\x02\x01", "magic, version 2, KEM 1 = mlkem768-x25519"
    assert envelope[6] == len(kid) and envelope[7 : 7 + len(kid)] == kid.encode()
    assert len(envelope) == 6 + 1 + len(kid) + 1 + len(DEVICE) + 8 + ENC + 64 + len(b'{"t": 1}') + 16
    assert open_with(keyed(hybrid), devices, envelope) == sealed.OpenedRecord(DEVICE, 7, b'{"t": 1}')
    assert peek_header(envelope) == (kid, DEVICE, 7) and peek_kem(envelope) == KEM_MLKEM768_X25519
    assert b'{"t": 1}' not in envelope
    assert open_with(keyed(hybrid), devices, seal_to(hybrid, devices[DEVICE], b"")).record == b""
    assert envelope != seal_to(hybrid, devices[DEVICE], b'{"t": 1}'), "fresh encapsulation every seal"


def test_both_kems_open_from_one_keyring(
    hybrid: HybridPrivateKey, classic: X25519PrivateKey, devices: dict[str, Ed25519PrivateKey]
) -> None:
    """During a rotation the fleet holds keys of both kinds; each envelope finds its own."""
    keys = keyed(hybrid, classic)
    old, new = (
        seal_to(classic, devices[DEVICE], b"old", seq=1),
        seal_to(hybrid, devices[DEVICE], b"new", seq=2),
    )
    assert old[4] == 1 and peek_kem(old) == KEM_X25519
    assert open_with(keys, devices, old).record == b"old"
    assert open_with(keys, devices, new).record == b"new"


def test_hybrid_layer_is_plain_hpke_with_the_documented_info_and_signature(
    hybrid: HybridPrivateKey, devices: dict[str, Ed25519PrivateKey]
) -> None:
    envelope = seal_to(hybrid, devices[DEVICE], b"payload")
    n = header_len(envelope, len(b"payload"))
    header = envelope[:n]
    plaintext = sealed.HYBRID_SUITE.decrypt(envelope[n:], hybrid.hpke_key, info=sealed.INFO_LABEL + header)
    signature, record = plaintext[:64], plaintext[64:]
    assert record == b"payload"
    devices[DEVICE].public_key().verify(
        signature, sealed.SIGN_LABEL + header + public_raw(hybrid.public_key()) + record
    )


def test_every_header_field_and_the_body_are_bound(
    hybrid: HybridPrivateKey, devices: dict[str, Ed25519PrivateKey]
) -> None:
    keys = keyed(hybrid)
    kid = fleet_key_id(hybrid.public_key())
    envelope = seal_to(hybrid, devices[DEVICE], b"x" * 100)
    n = header_len(envelope, 100)

    def expect(bad: bytes, error: type[SealError], reason: str | None = None) -> None:
        with pytest.raises(error, match=reason):
            open_with(keys, devices, bad)

    def at(index: int, value: bytes) -> bytes:
        return envelope[:index] + value + envelope[index + len(value) :]

    expect(at(0, b"EFS2"), MalformedEnvelopeError, "magic")
    expect(at(4, b"\x03"), MalformedEnvelopeError, "version 3 is not supported")
    expect(at(4, b"\x01"), MalformedEnvelopeError)  # read as version 1: the KEM byte becomes a length
    expect(at(5, b"\x02"), MalformedEnvelopeError, "unknown KEM 2")
    expect(at(5, b"\x00"), MalformedEnvelopeError, "unknown KEM 0")
    expect(at(7, b"qq-"), UnknownKeyError, "unknown fleet key 'qq-")
    expect(at(6, bytes([len(kid) - 1])), MalformedEnvelopeError)  # the lengths no longer frame it
    dev_at = 7 + len(kid) + 1
    expect(at(dev_at, b"line2-cam"), TamperedError, "does not decrypt")  # same length: still parses
    expect(at(dev_at + len(DEVICE), struct.pack(">Q", 8)), TamperedError)  # seq
    for index in (n, n + ENC - 1, n + ENC, len(envelope) - 50, len(envelope) - 1):  # enc, body, tag
        flipped = bytearray(envelope)
        flipped[index] ^= 0x01
        expect(bytes(flipped), TamperedError, "does not decrypt")
    # The same bytes under a different, held hybrid key id: the wrong key cannot decrypt.
    other = generate_telemetry_key(KEM_MLKEM768_X25519)
    swapped = at(7, fleet_key_id(other.public_key()).encode())
    with pytest.raises(TamperedError):
        open_with(keyed(hybrid, other), devices, swapped)


def test_wrong_or_unknown_key_id(hybrid: HybridPrivateKey, devices: dict[str, Ed25519PrivateKey]) -> None:
    other = generate_telemetry_key(KEM_MLKEM768_X25519)
    envelope = seal_to(other, devices[DEVICE])
    with pytest.raises(UnknownKeyError, match="unknown fleet key 'pq-"):
        open_with(keyed(hybrid), devices, envelope)
    # Sealed to our key but naming an id we do not hold (e.g. a device with a stale id).
    stale = seal_to(hybrid, devices[DEVICE], key_id="pq-0000000000000000")
    with pytest.raises(UnknownKeyError):
        open_with(keyed(hybrid), devices, stale)


def test_a_key_of_the_other_kem_under_the_same_id_fails_cleanly(
    hybrid: HybridPrivateKey, classic: X25519PrivateKey, devices: dict[str, Ed25519PrivateKey]
) -> None:
    """A keyring that maps an id to the wrong kind of key gets an UnknownKeyError, not a TypeError
    from the HPKE library or a decryption attempt with the wrong KEM."""
    pq = seal_to(hybrid, devices[DEVICE], key_id="shared-id")
    with pytest.raises(UnknownKeyError, match=r"sealed with mlkem768-x25519 .* is x25519"):
        open_with({"shared-id": classic}, devices, pq)
    v1 = seal_to(classic, devices[DEVICE], key_id="shared-id")
    with pytest.raises(UnknownKeyError, match=r"sealed with x25519 .* is mlkem768-x25519"):
        open_with({"shared-id": hybrid}, devices, v1)
    with pytest.raises(BadKeyError, match="not a telemetry key"):
        open_with({"shared-id": Ed25519PrivateKey.generate()}, devices, pq)  # type: ignore[dict-item]


def test_forged_sender_and_forwarding_across_kems(
    hybrid: HybridPrivateKey, classic: X25519PrivateKey, devices: dict[str, Ed25519PrivateKey]
) -> None:
    with pytest.raises(ForgedSenderError, match="does not verify"):
        open_with(keyed(hybrid), devices, seal_to(hybrid, Ed25519PrivateKey.generate()))
    with pytest.raises(ForgedSenderError, match="unknown device"):
        open_with(keyed(hybrid), devices, seal_to(hybrid, devices[DEVICE], device="ghost"))
    # A holder of the hybrid key re-seals the device's signed record to an X25519 key (a downgrade
    # to a quantum-breakable envelope): the signature names the hybrid header and key, so it fails.
    envelope = seal_to(hybrid, devices[DEVICE], b"secret")
    n = header_len(envelope, len(b"secret"))
    plaintext = sealed.HYBRID_SUITE.decrypt(
        envelope[n:], hybrid.hpke_key, info=sealed.INFO_LABEL + envelope[:n]
    )
    kid = fleet_key_id(classic.public_key())
    v1_header = sealed._header(kid, DEVICE, 7)
    downgraded = v1_header + sealed.SUITE.encrypt(
        plaintext, classic.public_key(), info=sealed.INFO_LABEL + v1_header
    )
    with pytest.raises(ForgedSenderError, match="does not verify"):
        open_with(keyed(classic), devices, downgraded)
    # And the other way round.
    envelope = seal_to(classic, devices[DEVICE], b"secret")
    n = len(envelope) - (32 + 64 + len(b"secret") + 16)
    plaintext = sealed.SUITE.decrypt(envelope[n:], classic, info=sealed.INFO_LABEL + envelope[:n])
    v2_header = sealed._header(fleet_key_id(hybrid.public_key()), DEVICE, 7, KEM_MLKEM768_X25519)
    upgraded = v2_header + sealed.HYBRID_SUITE.encrypt(
        plaintext, hybrid.public_key().hpke_key, info=sealed.INFO_LABEL + v2_header
    )
    with pytest.raises(ForgedSenderError):
        open_with(keyed(hybrid), devices, upgraded)


def test_truncated_enc_and_body(hybrid: HybridPrivateKey, devices: dict[str, Ed25519PrivateKey]) -> None:
    envelope = seal_to(hybrid, devices[DEVICE], b"")
    n = header_len(envelope, 0)
    for cut in (n, n + 32, n + ENC - 1, n + ENC, len(envelope) - 1):
        with pytest.raises(MalformedEnvelopeError, match="too short for its seq, mlkem768-x25519 enc"):
            open_with(keyed(hybrid), devices, envelope[:cut])
    # Long enough for the frame, but the enc is cut and the body shifted into it.
    padded = envelope[: n + ENC - 16] + envelope[n + ENC :] + bytes(16)
    with pytest.raises(TamperedError):
        open_with(keyed(hybrid), devices, padded)


def test_replay_guard_is_unchanged_for_hybrid_envelopes(
    hybrid: HybridPrivateKey, devices: dict[str, Ed25519PrivateKey]
) -> None:
    guard = ReplayGuard(window=8)
    envelopes = [seal_to(hybrid, devices[DEVICE], seq=s) for s in (1, 2, 3)]
    opened = [open_with(keyed(hybrid), devices, e) for e in envelopes]
    assert [guard.accept(o.device_id, o.seq) for o in opened] == [True, True, True]
    replay = open_with(keyed(hybrid), devices, envelopes[1])  # the same bytes again still open...
    assert not guard.accept(replay.device_id, replay.seq)  # ...and the guard drops them


def test_largest_hybrid_record_fits_the_cap(hybrid: HybridPrivateKey) -> None:
    key, device, kid = Ed25519PrivateKey.generate(), "d" * 63, "k" * 64
    biggest = max_record(KEM_MLKEM768_X25519)
    envelope = seal(
        b"\x00" * biggest,
        device_id=device,
        seq=2**64 - 1,
        device_key=key,
        fleet_public=hybrid.public_key(),
        fleet_key_id=kid,
    )
    assert len(envelope) == MAX_ENVELOPE
    opened = open_sealed(envelope, fleet_keys={kid: hybrid}, device_keys={device: key.public_key()}.get)
    assert len(opened.record) == biggest
    with pytest.raises(MalformedEnvelopeError, match="the most a mlkem768-x25519 envelope holds"):
        seal(
            b"\x00" * (biggest + 1),
            device_id=device,
            seq=1,
            device_key=key,
            fleet_public=hybrid.public_key(),
            fleet_key_id=kid,
        )
    assert biggest < max_record(KEM_X25519), "the bigger enc leaves less room"


def test_header_truncated_right_after_the_key_id() -> None:
    """A frame that ends exactly after its key id (found by the fuzz below): refused, not an IndexError."""
    for frame in (b"EFS1\x01\x0b" + b"k" * 11, b"EFS1\x02\x01\x0b" + b"k" * 11):
        with pytest.raises(MalformedEnvelopeError, match="truncated"):
            peek_header(frame)


# --- fuzz: whatever arrives, opening answers with a record or a SealError ---

_FUZZ_KEYS: dict[str, TelemetryPrivateKey] = {}
_FUZZ_DEVICE = Ed25519PrivateKey.generate()


def _fuzz_keys() -> dict[str, TelemetryPrivateKey]:
    if not _FUZZ_KEYS:
        hybrid = generate_telemetry_key(KEM_MLKEM768_X25519)
        _FUZZ_KEYS.update(keyed(hybrid, generate_telemetry_key(KEM_X25519)))
        _FUZZ_KEYS["k"] = hybrid  # the id the structured frames below name
    return _FUZZ_KEYS


def _open_any(envelope: bytes) -> None:
    try:
        open_sealed(envelope, fleet_keys=_fuzz_keys(), device_keys=lambda d: _FUZZ_DEVICE.public_key())
    except SealError as e:
        assert e.reason
    else:
        raise AssertionError("random bytes opened as a signed record")


@settings(max_examples=300 * FUZZ_SCALE)
@given(tail=st.binary(max_size=2048))
def test_fuzz_v2_prefix_then_random_bytes(tail: bytes) -> None:
    _open_any(b"EFS1\x02\x01" + tail)


@settings(max_examples=300 * FUZZ_SCALE)
@given(
    kem=st.integers(0, 255),
    key_id=st.sampled_from([b"k", b"pq-0123456789abcdef", b"", b"k" * 65, b"bad id"]),
    device=st.sampled_from([b"dev", b"", b"A/B", b"d" * 64]),
    rest=st.integers(0, ENC + 100),
    filler=st.binary(min_size=1, max_size=8),
)
def test_fuzz_v2_structured_frames(kem: int, key_id: bytes, device: bytes, rest: int, filler: bytes) -> None:
    frame = b"EFS1\x02" + bytes([kem, len(key_id) % 256]) + key_id + bytes([len(device)]) + device
    _open_any(frame + (filler * (rest // len(filler) + 1))[:rest])


@settings(max_examples=200 * FUZZ_SCALE)
@given(data=st.data())
def test_fuzz_mutated_real_v2_envelopes(data: st.DataObject) -> None:
    keys = _fuzz_keys()
    original = seal(
        b"r" * 40,
        device_id="dev",
        seq=3,
        device_key=_FUZZ_DEVICE,
        fleet_public=keys["k"].public_key(),
        fleet_key_id="k",
    )
    envelope = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(0, len(envelope) - 1)))
        if op == "flip" and envelope:
            envelope[at] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del envelope[at : at + data.draw(st.integers(1, 64))]
        else:
            envelope[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    if bytes(envelope) != original:  # two mutations can undo each other
        _open_any(bytes(envelope))


@settings(max_examples=300 * FUZZ_SCALE)
@given(tail=st.binary(max_size=64))
def test_fuzz_short_frames_of_any_version(tail: bytes) -> None:
    _open_any(b"EFS1" + tail)
