import pytest

from protocol import topics


def test_device_topics_live_under_the_device_id() -> None:
    assert topics.device_topic("line1-cam", topics.HEALTH) == "edgefleet/v1/line1-cam/health"
    assert topics.device_topic("line1-cam", topics.CMD_UPDATE) == "edgefleet/v1/line1-cam/cmd/update"


@pytest.mark.parametrize("bad", ["", "A", "a/b", "a+", "#", "$sys", "-lead", "x" * 64, "a b"])
def test_ids_that_could_escape_the_tree_are_refused(bad: str) -> None:
    assert not topics.is_valid_device_id(bad)
    with pytest.raises(ValueError, match="invalid device id"):
        topics.device_topic(bad, topics.HEALTH)


def test_split_device_topic_round_trips() -> None:
    assert topics.split_device_topic("edgefleet/v1/dev-a/update/status") == ("dev-a", "update/status")
    with pytest.raises(ValueError):
        topics.split_device_topic("other/v1/dev-a/health")
    with pytest.raises(ValueError):
        topics.split_device_topic("edgefleet/v1/dev-a")


def test_shared_subscription_filter() -> None:
    assert topics.shared(topics.all_devices(topics.HEALTH)) == "$share/edgefleet-fleet/edgefleet/v1/+/health"
