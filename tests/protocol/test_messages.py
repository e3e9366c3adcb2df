import json

import pytest

from protocol import ChunkRequest, Health, ProtocolError, UpdateState, UpdateStatus, decode, encode
from protocol.messages import MAX_JSON_PAYLOAD


def test_round_trip() -> None:
    status = UpdateStatus(device_id="d", update_id="u1", model_name="m", version=2, state=UpdateState.STAGED)
    assert decode(UpdateStatus, encode(status)) == status


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"update_id": "u", "offset": -1, "length": 10}', "offset"),
        (b'{"update_id": "u", "offset": 0, "length": 10, "extra": 1}', "extra"),
        (b'{"update_id": "u"}', "offset"),
    ],
)
def test_malformed_payloads_name_the_problem(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode(ChunkRequest, payload, topic="t")


def test_oversized_payload_is_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(Health, b" " * (MAX_JSON_PAYLOAD + 1))


def test_final_states() -> None:
    assert {s for s in UpdateState if s.is_final} == {
        UpdateState.COMMITTED,
        UpdateState.ROLLED_BACK,
        UpdateState.FAILED,
    }
    assert json.loads(encode(ChunkRequest(update_id="u", offset=0, length=5)))["length"] == 5
