"""Field-engineer tokens: issue and verify with real Ed25519 keys; every refusal says why."""

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ProtocolError
from protocol.field_token import (
    CLOCK_SKEW_S,
    MAX_TOKEN_BYTES,
    MAX_TTL_S,
    FieldToken,
    FieldTokenError,
    FieldTrust,
    issue,
    key_id,
    verify,
)

NOW = 1_800_000_000.0
FLEET_KEY = Ed25519PrivateKey.generate()
KID = key_id(FLEET_KEY.public_key())
TRUST = FieldTrust(keys={KID: FLEET_KEY.public_key()}, revoked=frozenset())


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_raw(payload: bytes, key: Ed25519PrivateKey = FLEET_KEY) -> str:
    """A token over any payload bytes, signed properly: to reach the checks behind the signature."""
    signed = f"eft1.{b64(payload)}"
    return f"{signed}.{b64(key.sign(signed.encode()))}"


def claims(**changes: Any) -> dict[str, Any]:
    base = {
        "kid": KID,
        "sub": "ana",
        "role": "technician",
        "devices": ["cam-1"],
        "iat": int(NOW),
        "exp": int(NOW) + 3600,
        "jti": "0123456789abcdef0123456789abcdef",
    }
    return {**base, **changes}


def sign_claims(**changes: Any) -> str:
    return sign_raw(json.dumps(claims(**changes), sort_keys=True, separators=(",", ":")).encode())


def refusal(token: str, trust: FieldTrust = TRUST, device: str = "cam-1", now: float = NOW) -> str:
    with pytest.raises(FieldTokenError) as caught:
        verify(token, trust, device, now)
    assert isinstance(caught.value, ProtocolError)
    assert str(caught.value).startswith("field token: ")
    return caught.value.reason


def test_issue_and_verify_round_trip() -> None:
    compact, issued = issue(FLEET_KEY, KID, "ana", "viewer", ["cam-1", "cam-2"], 3600, now=NOW)
    assert issued == FieldToken(
        KID, "ana", "viewer", ("cam-1", "cam-2"), int(NOW), int(NOW) + 3600, issued.jti
    )
    assert len(issued.jti) == 32 and int(issued.jti, 16) >= 0
    prefix, payload, signature = compact.split(".")
    assert prefix == "eft1" and "=" not in compact
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    assert raw == json.dumps(issued.payload(), sort_keys=True, separators=(",", ":")).encode()
    FLEET_KEY.public_key().verify(
        base64.urlsafe_b64decode(signature + "=="), f"eft1.{payload}".encode()
    )  # raises if the signature is not over the ASCII `eft1.<payload>`
    assert verify(compact, TRUST, "cam-2", now=NOW + 3599) == issued
    assert issue(FLEET_KEY, KID, "ana", "viewer", ["cam-1"], 60, now=NOW)[1].jti != issued.jti


def test_any_device_token_covers_every_device_of_the_fleet() -> None:
    compact, _ = issue(FLEET_KEY, KID, "ana", "technician", ["*"], 60, now=NOW)
    assert verify(compact, TRUST, "press-17", now=NOW).covers("anything")


def test_key_id_is_stable_and_distinct() -> None:
    assert key_id(FLEET_KEY.public_key()) == KID and KID.startswith("ft-") and len(KID) == 19
    assert key_id(Ed25519PrivateKey.generate().public_key()) != KID


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ttl_s": MAX_TTL_S + 1}, "ttl_s"),
        ({"ttl_s": 0}, "ttl_s"),
        ({"ttl_s": -5}, "ttl_s"),
        ({"ttl_s": True}, "ttl_s"),
        ({"role": "admin"}, "unknown role"),
        ({"subject": ""}, "sub must be"),
        ({"subject": "x" * 65}, "sub must be"),
        ({"devices": []}, "devices must be"),
        ({"devices": ["*", "cam-1"]}, "not a device id"),
        ({"devices": ["Cam/1"]}, "not a device id"),
        ({"devices": [f"cam-{i}" for i in range(300)]}, "name fewer devices"),
    ],
)
def test_issue_refuses_what_a_device_would_refuse(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"subject": "ana", "role": "viewer", "devices": ["cam-1"], "ttl_s": 60}
    with pytest.raises(FieldTokenError, match=message):
        issue(FLEET_KEY, KID, now=NOW, **{**args, **kwargs})


def test_max_ttl_is_eight_hours_and_allowed() -> None:
    compact, token = issue(FLEET_KEY, KID, "ana", "viewer", ["cam-1"], MAX_TTL_S, now=NOW)
    assert MAX_TTL_S == 8 * 3600 and token.exp - token.iat == MAX_TTL_S
    assert verify(compact, TRUST, "cam-1", now=NOW + MAX_TTL_S - 1) == token


def test_expired_and_not_yet_valid_with_clock_skew() -> None:
    compact, token = issue(FLEET_KEY, KID, "ana", "viewer", ["cam-1"], 600, now=NOW)
    assert refusal(compact, now=token.exp).startswith("expired")
    assert refusal(compact, now=token.exp + 5000).startswith("expired 5000 s ago")
    # The device's clock may run behind by up to CLOCK_SKEW_S.
    assert verify(compact, TRUST, "cam-1", now=NOW - CLOCK_SKEW_S) == token
    assert refusal(compact, now=NOW - CLOCK_SKEW_S - 1).startswith("not yet valid")


def test_lifetime_over_eight_hours_is_refused_even_when_signed() -> None:
    token = sign_claims(exp=int(NOW) + MAX_TTL_S + 1)
    assert refusal(token).startswith("lifetime over 8 h")
    assert refusal(sign_claims(exp=int(NOW))).startswith("malformed: exp is not after iat")


def test_unknown_key_bad_signature_revoked_other_device_unknown_role() -> None:
    compact, token = issue(FLEET_KEY, KID, "ana", "technician", ["cam-1"], 600, now=NOW)
    assert refusal(compact, trust=FieldTrust(keys={})).startswith("unknown key id")
    impostor = Ed25519PrivateKey.generate()  # claims the fleet's key id, signs with its own key
    forged = sign_raw(json.dumps(claims()).encode(), impostor)
    assert refusal(forged).startswith("bad signature")
    prefix, payload, signature = compact.split(".")
    tampered = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    tampered["role"], tampered["devices"] = "technician", ["*"]
    swapped = f"eft1.{b64(json.dumps(tampered, sort_keys=True, separators=(',', ':')).encode())}.{signature}"
    assert refusal(swapped).startswith("bad signature")
    assert refusal(f"{prefix}.{payload}.{b64(bytes(64))}").startswith("bad signature")
    assert refusal(f"{prefix}.{payload}.{b64(bytes(10))}").startswith("bad signature")
    assert refusal(compact, trust=FieldTrust(TRUST.keys, frozenset({token.jti}))).startswith("revoked")
    assert refusal(compact, device="cam-2").startswith("not for this device")
    assert refusal(sign_claims(role="admin")).startswith("unknown role 'admin'")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "eft1",
        "eft1..",
        "jwt.e30.e30",
        "eft2.e30.AAAA",
        "eft1.e30.AA.AA",
        "eft1.e30=.AAAA",  # padding is not part of the form
        "eft1.e3 0.AAAA",
        "eft1.e31.AAAA",  # stray bits: not the one spelling of its bytes
        "eft1.!!!!.AAAA",
        "eft1." + "A" * (MAX_TOKEN_BYTES) + ".AAAA",
    ],
)
def test_malformed_tokens(token: str) -> None:
    assert refusal(token).startswith("malformed")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"[" * 3000, "not JSON"),
        (json.dumps({k: v for k, v in claims().items() if k != "jti"}).encode(), "missing ['jti']"),
        (json.dumps(claims(extra=1)).encode(), "unexpected ['extra']"),
        (b'{"sub":"a","sub":"b"}', "repeats a field"),
        (json.dumps(claims(iat=True)).encode(), "iat must be whole"),
        (json.dumps(claims(exp=1.5e9)).encode(), "exp must be whole"),
        (json.dumps(claims(exp=2**70)).encode(), "exp must be whole"),
        (json.dumps(claims(jti="XYZ")).encode(), "jti must be"),
        (json.dumps(claims(role=["technician"])).encode(), "role must be"),
        (json.dumps(claims(devices="cam-1")).encode(), "devices must be"),
        (json.dumps(claims(devices=["cam-1", "*"])).encode(), "not a device id"),
        (json.dumps(claims(sub="a\nb")).encode(), "sub must be"),
        (json.dumps(claims(kid=7)).encode(), "kid must be"),
    ],
)
def test_malformed_payloads_even_when_signed(payload: bytes, message: str) -> None:
    reason = refusal(sign_raw(payload))
    assert reason.startswith("malformed") and message in reason, reason


def test_a_token_over_four_kib_is_refused_before_decoding() -> None:
    assert (
        refusal("eft1." + "A" * MAX_TOKEN_BYTES + "." + "B" * 86)
        == f"malformed: longer than {MAX_TOKEN_BYTES} bytes"
    )
    assert refusal(123) == "malformed: a token is a string"  # type: ignore[arg-type]


# -- fuzz: whatever arrives, verify answers with a FieldToken or a FieldTokenError -----------------
VALID, _ = issue(FLEET_KEY, KID, "ana", "technician", ["cam-1"], 600, now=NOW)
token_chars = st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \x00é")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


def verify_or_refuse(token: object) -> None:
    try:
        verify(token, TRUST, "cam-1", NOW)  # type: ignore[arg-type]
    except FieldTokenError as e:
        assert e.reason


@settings(max_examples=400)
@given(st.text(max_size=600) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_arbitrary_strings_never_crash_verify(token: str) -> None:
    verify_or_refuse(token)
    verify_or_refuse("eft1." + token)


@settings(max_examples=400)
@given(st.text(token_chars, max_size=300))
def test_token_shaped_strings_never_crash_verify(token: str) -> None:
    verify_or_refuse(token)


@settings(max_examples=300)
@given(st.integers(0, len(VALID) - 1), token_chars)
def test_one_changed_character_is_refused(index: int, char: str) -> None:
    changed = VALID[:index] + char + VALID[index + 1 :]
    if changed == VALID:
        return
    with pytest.raises(FieldTokenError):
        verify(changed, TRUST, "cam-1", NOW)


@settings(max_examples=300)
@given(st.binary(max_size=400) | json_values.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_signed_payloads_never_crash_verify(payload: bytes) -> None:
    verify_or_refuse(sign_raw(payload))


@settings(max_examples=200)
@given(st.fixed_dictionaries({k: json_values | st.just(v) for k, v in claims().items()}))
def test_arbitrary_signed_claims_never_crash_verify(payload: dict[str, Any]) -> None:
    verify_or_refuse(sign_raw(json.dumps(payload).encode()))
