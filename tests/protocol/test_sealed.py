"""Sealed envelopes: round trip, every refusal, the RFC 9180 vector, and the replay guard."""

import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from protocol import sealed
from protocol.errors import ProtocolError
from protocol.sealed import (
    MAX_ENVELOPE,
    MAX_RECORD,
    ForgedSenderError,
    MalformedEnvelopeError,
    ReplayGuard,
    TamperedError,
    UnknownKeyError,
    fleet_key_id,
    open_sealed,
    peek_header,
    seal,
)

# --- RFC 9180 Appendix A.2.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305, Base ---
A21 = {
    "info": "4f6465206f6e2061204772656369616e2055726e",
    "skEm": "f4ec9b33b792c372c1d2c2063507b684ef925b8c75a42dbcbf57d63ccd381600",
    "pkEm": "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a",
    "skRm": "8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb",
    "pkRm": "4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a",
    "enc": "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a",
    "shared_secret": "0bbe78490412b4bbea4812666f7916932b828bba79942424abb65244930d69a7",
    "key_schedule_context": "00431df6cd95e11ff49d7013563baf7f11588c75a6611ee2a4404a49306ae4cfc5"
    "b69c5718a60cc5876c358d3f7fc31ddb598503f67be58ea1e798c0bb19eb9796",
    "secret": "5b9cd775e64b437a2335cf499361b2e0d5e444d5cb41a8a53336d8fe402282c6",
    "key": "ad2744de8e17f4ebba575b3f5f5a8fa1f69c2a07f6e7500bc60ca6e3e3ec1c91",
    "base_nonce": "5c4d98150661b848853b547f",
    "pt": "4265617574792069732074727574682c20747275746820626561757479",
    "aad0": "436f756e742d30",
    "ct0": "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28",
    "aad1": "436f756e742d31",
    "ct1": "6b53c051e4199c518de79594e1c4ab18b96f081549d45ce015be002090bb119e85285337cc95ba5f59992dc98c",
}
V = {k: bytes.fromhex(v) for k, v in A21.items()}

# A reference RFC 9180 base mode (single-shot, 2-stage KDF), written from the RFC's pseudocode.
KEM_SUITE = b"KEM" + struct.pack(">H", 0x0020)
HPKE_SUITE = b"HPKE" + struct.pack(">HHH", 0x0020, 0x0001, 0x0003)


def _extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out, i = out + block, i + 1
    return out[:length]


def labeled_extract(suite: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _extract(salt, b"HPKE-v1" + suite + label + ikm)


def labeled_expand(suite: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    return _expand(prk, struct.pack(">H", length) + b"HPKE-v1" + suite + label + info, length)


def raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes_raw()


def ref_shared_secret(dh: bytes, enc: bytes, pk_r: bytes) -> bytes:
    eae_prk = labeled_extract(KEM_SUITE, b"", b"eae_prk", dh)
    return labeled_expand(KEM_SUITE, eae_prk, b"shared_secret", enc + pk_r, 32)


def ref_key_schedule(shared_secret: bytes, info: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    psk_id_hash = labeled_extract(HPKE_SUITE, b"", b"psk_id_hash", b"")
    info_hash = labeled_extract(HPKE_SUITE, b"", b"info_hash", info)
    context = b"\x00" + psk_id_hash + info_hash
    secret = labeled_extract(HPKE_SUITE, shared_secret, b"secret", b"")
    key = labeled_expand(HPKE_SUITE, secret, b"key", context, 32)
    nonce = labeled_expand(HPKE_SUITE, secret, b"base_nonce", context, 12)
    return context, secret, key, nonce


def ref_seal(sk_e: X25519PrivateKey, pk_r: X25519PublicKey, info: bytes, aad: bytes, pt: bytes) -> bytes:
    enc = raw(sk_e.public_key())
    shared = ref_shared_secret(sk_e.exchange(pk_r), enc, raw(pk_r))
    _, _, key, nonce = ref_key_schedule(shared, info)
    return enc + ChaCha20Poly1305(key).encrypt(nonce, pt, aad)


def ref_open(sk_r: X25519PrivateKey, info: bytes, aad: bytes, enc_ct: bytes) -> bytes:
    enc, ct = enc_ct[:32], enc_ct[32:]
    shared = ref_shared_secret(
        sk_r.exchange(X25519PublicKey.from_public_bytes(enc)), enc, raw(sk_r.public_key())
    )
    _, _, key, nonce = ref_key_schedule(shared, info)
    return ChaCha20Poly1305(key).decrypt(nonce, ct, aad)


def test_reference_hpke_reproduces_rfc9180_a21() -> None:
    sk_e = X25519PrivateKey.from_private_bytes(V["skEm"])
    sk_r = X25519PrivateKey.from_private_bytes(V["skRm"])
    assert raw(sk_e.public_key()) == V["pkEm"] == V["enc"]
    assert raw(sk_r.public_key()) == V["pkRm"]
    shared = ref_shared_secret(sk_e.exchange(sk_r.public_key()), V["enc"], V["pkRm"])
    assert shared == V["shared_secret"]
    context, secret, key, nonce = ref_key_schedule(shared, V["info"])
    assert (context, secret, key, nonce) == (
        V["key_schedule_context"],
        V["secret"],
        V["key"],
        V["base_nonce"],
    )
    assert ref_seal(sk_e, sk_r.public_key(), V["info"], V["aad0"], V["pt"]) == V["enc"] + V["ct0"]
    nonce1 = (int.from_bytes(nonce, "big") ^ 1).to_bytes(12, "big")  # sequence number 1
    assert ChaCha20Poly1305(key).encrypt(nonce1, V["pt"], V["aad1"]) == V["ct1"]


def test_library_hpke_interoperates_with_the_vector_keys() -> None:
    """cryptography's Suite opens what the reference seals with the RFC's keys, and vice versa."""
    sk_e = X25519PrivateKey.from_private_bytes(V["skEm"])
    sk_r = X25519PrivateKey.from_private_bytes(V["skRm"])
    ours = ref_seal(sk_e, sk_r.public_key(), V["info"], b"", V["pt"])
    assert sealed.SUITE.decrypt(ours, sk_r, info=V["info"]) == V["pt"]
    theirs = sealed.SUITE.encrypt(V["pt"], sk_r.public_key(), info=V["info"])
    assert ref_open(sk_r, V["info"], b"", theirs) == V["pt"]


def test_library_decrypts_the_rfc_ciphertext_itself() -> None:
    """The exact vector ciphertext (it has AAD, which only the private hook accepts)."""
    from cryptography.hazmat.bindings._rust import openssl as rust_openssl

    decrypt_with_aad = getattr(rust_openssl.hpke, "_decrypt_with_aad", None)
    if decrypt_with_aad is None:
        pytest.skip("this cryptography has no AAD hook for HPKE")
    sk_r = X25519PrivateKey.from_private_bytes(V["skRm"])
    pt = decrypt_with_aad(sealed.SUITE, V["enc"] + V["ct0"], sk_r, info=V["info"], aad=V["aad0"])
    assert pt == V["pt"]


# --- envelopes ---


@pytest.fixture(scope="module")
def fleet() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


@pytest.fixture(scope="module")
def devices() -> dict[str, Ed25519PrivateKey]:
    return {"line1-cam": Ed25519PrivateKey.generate(), "line2-cam": Ed25519PrivateKey.generate()}


def seal_as(
    fleet: X25519PrivateKey,
    device_key: Ed25519PrivateKey,
    record: bytes = b"rec",
    *,
    device: str = "line1-cam",
) -> bytes:
    return seal(
        record,
        device_id=device,
        seq=7,
        device_key=device_key,
        fleet_public=fleet.public_key(),
        fleet_key_id=fleet_key_id(fleet.public_key()),
    )


def open_with(
    fleet: X25519PrivateKey, devices: dict[str, Ed25519PrivateKey], envelope: bytes
) -> sealed.OpenedRecord:
    publics: dict[str, Ed25519PublicKey] = {d: k.public_key() for d, k in devices.items()}
    return open_sealed(
        envelope, fleet_keys={fleet_key_id(fleet.public_key()): fleet}, device_keys=publics.get
    )


def test_round_trip(fleet: X25519PrivateKey, devices: dict[str, Ed25519PrivateKey]) -> None:
    envelope = seal_as(fleet, devices["line1-cam"], b'{"t": 1}')
    opened = open_with(fleet, devices, envelope)
    assert opened == sealed.OpenedRecord(device_id="line1-cam", seq=7, record=b'{"t": 1}')
    assert peek_header(envelope) == (fleet_key_id(fleet.public_key()), "line1-cam", 7)
    assert b'{"t": 1}' not in envelope
    empty = seal_as(fleet, devices["line1-cam"], b"")
    assert open_with(fleet, devices, empty).record == b""


def test_hpke_layer_is_plain_rfc9180(fleet: X25519PrivateKey, devices: dict[str, Ed25519PrivateKey]) -> None:
    """The reference implementation opens an envelope's HPKE part with the documented info."""
    envelope = seal_as(fleet, devices["line1-cam"], b"payload")
    header_len = len(envelope) - (32 + 64 + len(b"payload") + 16)
    header = envelope[:header_len]
    plaintext = ref_open(fleet, sealed.INFO_LABEL + header, b"", envelope[header_len:])
    assert plaintext[64:] == b"payload"


def test_flipped_ciphertext_or_header_is_tampered(
    fleet: X25519PrivateKey, devices: dict[str, Ed25519PrivateKey]
) -> None:
    envelope = seal_as(fleet, devices["line1-cam"], b"x" * 100)
    for index in (len(envelope) - 1, len(envelope) - 60, len(envelope) - 150):  # tag, body, enc
        forged = bytearray(envelope)
        forged[index] ^= 0x01
        with pytest.raises(TamperedError, match="does not decrypt"):
            open_with(fleet, devices, bytes(forged))
    # Same length device id, so the frame still parses: the header is bound into the HPKE info.
    moved = envelope.replace(b"line1-cam", b"line2-cam")
    with pytest.raises(TamperedError):
        open_with(fleet, devices, moved)
    seq_at = envelope.index(b"line1-cam") + len(b"line1-cam")
    reseq = envelope[:seq_at] + struct.pack(">Q", 8) + envelope[seq_at + 8 :]
    with pytest.raises(TamperedError):
        open_with(fleet, devices, reseq)


def test_unknown_fleet_key(fleet: X25519PrivateKey, devices: dict[str, Ed25519PrivateKey]) -> None:
    other = X25519PrivateKey.generate()
    envelope = seal_as(other, devices["line1-cam"])
    with pytest.raises(UnknownKeyError, match="unknown fleet key"):
        open_with(fleet, devices, envelope)


def test_forged_sender(fleet: X25519PrivateKey, devices: dict[str, Ed25519PrivateKey]) -> None:
    # Anyone with the fleet's public key can seal; only the device's key makes it verify.
    impostor = seal_as(fleet, Ed25519PrivateKey.generate())
    with pytest.raises(ForgedSenderError, match="does not verify"):
        open_with(fleet, devices, impostor)
    # A real device's key claiming to be another device.
    cross = seal_as(fleet, devices["line2-cam"], device="line1-cam")
    with pytest.raises(ForgedSenderError, match="does not verify"):
        open_with(fleet, devices, cross)
    stranger = seal_as(fleet, devices["line1-cam"], device="ghost")
    with pytest.raises(ForgedSenderError, match="unknown device"):
        open_with(fleet, devices, stranger)


def test_signed_record_cannot_be_resealed_to_another_recipient(
    fleet: X25519PrivateKey, devices: dict[str, Ed25519PrivateKey]
) -> None:
    """A recipient who decrypts cannot forward the signed record to another fleet key as the device."""
    envelope = seal_as(fleet, devices["line1-cam"], b"secret")
    header_len = len(envelope) - (32 + 64 + len(b"secret") + 16)
    plaintext = sealed.SUITE.decrypt(
        envelope[header_len:], fleet, info=sealed.INFO_LABEL + envelope[:header_len]
    )
    victim = X25519PrivateKey.generate()
    new_header = sealed._header(fleet_key_id(victim.public_key()), "line1-cam", 7)
    forwarded = new_header + sealed.SUITE.encrypt(
        plaintext, victim.public_key(), info=sealed.INFO_LABEL + new_header
    )
    with pytest.raises(ForgedSenderError):
        open_with(victim, devices, forwarded)


def test_malformed_envelopes(fleet: X25519PrivateKey, devices: dict[str, Ed25519PrivateKey]) -> None:
    envelope = seal_as(fleet, devices["line1-cam"])
    cases = {
        b"": "shorter",
        b"XXXX" + envelope[4:]: "magic",
        envelope[:4] + b"\x02" + envelope[5:]: "version",
        envelope[:40]: "too short",
        envelope[:5] + b"\xff" + envelope[6:]: "truncated",
        envelope[:6] + b"!" + envelope[7:]: "key id",
        envelope.replace(b"line1-cam", b"LINE1-CAM"): "device id",
        envelope.replace(b"line1-cam", b"line1-c\xffm"): "ASCII",
        b"\x00" * (MAX_ENVELOPE + 1): "exceeds",
    }
    for bad, reason in cases.items():
        with pytest.raises(MalformedEnvelopeError, match=reason) as info:
            open_with(fleet, devices, bad)
        assert isinstance(info.value, ProtocolError)


def test_seal_refuses_bad_arguments(fleet: X25519PrivateKey, devices: dict[str, Ed25519PrivateKey]) -> None:
    key = devices["line1-cam"]
    kid = fleet_key_id(fleet.public_key())
    good = {"device_id": "line1-cam", "seq": 1, "device_key": key, "fleet_public": fleet.public_key()}
    with pytest.raises(MalformedEnvelopeError, match="exceeds"):
        seal(b"x" * (MAX_RECORD + 1), fleet_key_id=kid, **good)  # type: ignore[arg-type]
    with pytest.raises(MalformedEnvelopeError, match="device id"):
        seal(b"x", fleet_key_id=kid, **{**good, "device_id": "a/b"})  # type: ignore[arg-type]
    with pytest.raises(MalformedEnvelopeError, match="seq"):
        seal(b"x", fleet_key_id=kid, **{**good, "seq": -1})  # type: ignore[arg-type]
    with pytest.raises(MalformedEnvelopeError, match="fleet key id"):
        seal(b"x", fleet_key_id="", **good)  # type: ignore[arg-type]


def test_largest_record_fits_the_cap(fleet: X25519PrivateKey) -> None:
    key = Ed25519PrivateKey.generate()
    device = "d" * 63
    kid = "k" * 64
    envelope = seal(
        b"\x00" * MAX_RECORD,
        device_id=device,
        seq=2**64 - 1,
        device_key=key,
        fleet_public=fleet.public_key(),
        fleet_key_id=kid,
    )
    assert len(envelope) == MAX_ENVELOPE
    opened = open_sealed(envelope, fleet_keys={kid: fleet}, device_keys={device: key.public_key()}.get)
    assert opened.seq == 2**64 - 1 and len(opened.record) == MAX_RECORD


# --- replay guard ---


def test_replay_guard_in_order_and_duplicates() -> None:
    guard = ReplayGuard(window=8)
    assert [guard.accept("a", s) for s in (1, 2, 3)] == [True, True, True]
    assert not guard.accept("a", 2)
    assert not guard.accept("a", 3)
    assert guard.accept("b", 2)  # devices are independent
    assert guard.highest("a") == 3 and guard.highest("zz") is None


def test_replay_guard_out_of_order_within_the_window() -> None:
    guard = ReplayGuard(window=8)
    assert guard.accept("a", 10)
    assert guard.accept("a", 5) and not guard.accept("a", 5)
    assert guard.accept("a", 3)  # offset 7: the last slot in the window
    assert not guard.accept("a", 2)  # offset 8: too old to tell, refused
    assert guard.is_new("a", 9) and guard.accept("a", 9)
    assert guard.accept("a", 14)  # slide by 4: 10, 9 still remembered
    assert not guard.accept("a", 10) and not guard.accept("a", 9)
    assert guard.accept("a", 8)


def test_replay_guard_big_jump_and_seeding() -> None:
    guard = ReplayGuard(window=1024)
    assert guard.accept("a", 1)
    assert guard.accept("a", 2**63)  # does not build a 2**63-bit integer
    assert not guard.accept("a", 2**63)
    assert not guard.accept("a", 1)
    seeded = ReplayGuard(window=16, highest={"a": 100})
    assert not seeded.accept("a", 100) and not seeded.accept("a", 95)
    assert seeded.accept("a", 101)
    with pytest.raises(ValueError):
        ReplayGuard(window=0)


@pytest.mark.parametrize("sodium", [True, False], ids=["libsodium", "openssl"])
def test_both_ed25519_verifiers_accept_real_signatures_and_refuse_forged_ones(
    sodium: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fleet verifies with libsodium when PyNaCl is there, else with OpenSSL: same answers."""
    if sodium and sealed._SODIUM_OPEN is None:
        pytest.skip("PyNaCl is not installed (the fleet extra has it)")
    if not sodium:
        monkeypatch.setattr(sealed, "_SODIUM_OPEN", None)
    key = Ed25519PrivateKey.generate()
    message = b"edgefleet record"
    signature = key.sign(message)
    assert sealed.verify_ed25519(key.public_key(), signature, message)
    assert not sealed.verify_ed25519(key.public_key(), signature, message + b"!")
    assert not sealed.verify_ed25519(Ed25519PrivateKey.generate().public_key(), signature, message)
    assert not sealed.verify_ed25519(key.public_key(), signature[:-1] + bytes([signature[-1] ^ 1]), message)
    assert not sealed.verify_ed25519(key.public_key(), signature[:63], message)
    assert not sealed.verify_ed25519(key.public_key(), bytes(64), message)
