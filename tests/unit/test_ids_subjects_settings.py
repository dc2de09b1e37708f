import pytest

from shared.errors import InvalidRequest
from shared.ids import new_id, ulid
from shared.settings import ApiSettings, CoreSettings, env_name, load_settings
from shared.subjects import Subjects


def test_ulids_are_unique_and_sort_in_creation_order() -> None:
    ids = [ulid() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 26 for i in ids)


def test_new_id_carries_its_prefix() -> None:
    assert new_id("conv").startswith("conv_")


def test_partition_is_stable_and_in_range() -> None:
    subjects = Subjects(partitions=16)
    assert subjects.partition_of("conv_1") == Subjects(partitions=16).partition_of("conv_1")
    assert {subjects.partition_of(f"k{i}") for i in range(500)} == set(range(16))
    assert subjects.inbound("sms", "k").startswith("gw.in.sms.")


def test_namespace_prefixes_subjects_and_streams() -> None:
    subjects = Subjects(namespace="t1")
    assert subjects.inbound_all == "t1.gw.in.>"
    assert subjects.inbound_stream == "T1_INBOUND"
    assert Subjects().inbound_stream == "INBOUND"
    assert Subjects().reply("conv_x") == "gw.reply.conv_x"


def test_a_reply_addressed_to_an_inbox_is_seen_by_that_inbox_and_by_its_conversation() -> None:
    subjects = Subjects(namespace="t1")
    reply, delta = subjects.reply("conv_x", "inbox_1"), subjects.stream("conv_x", "inbox_1")
    assert (reply, delta) == ("t1.gw.reply.conv_x.inbox_1", "t1.gw.stream.conv_x.inbox_1")
    for subject in (reply, delta):
        assert _matches(subjects.reply_inbox("inbox_1"), subject)
        assert not _matches(subjects.reply_inbox("inbox_2"), subject)
        assert _matches(subjects.conversation_replies("conv_x"), subject)
        assert not _matches(subjects.conversation_replies("conv_y"), subject)
    # Nothing else the gateway publishes has that shape.
    assert not _matches(subjects.reply_inbox("inbox_1"), subjects.inbound("api", "conv_x"))


@pytest.mark.parametrize("inbox", [None, "", "a.b", "*", ">", "x y", "a" * 65])
def test_an_inbox_that_is_not_one_plain_token_leaves_the_reply_on_its_conversation(
    inbox: str | None,
) -> None:
    assert Subjects().reply("conv_x", inbox) == "gw.reply.conv_x"
    assert Subjects().stream("conv_x", inbox) == "gw.stream.conv_x"


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, `>` the rest (one or more)."""
    p, s = pattern.split("."), subject.split(".")
    if p[-1] == ">":
        return len(s) >= len(p) and all(a in ("*", b) for a, b in zip(p[:-1], s, strict=False))
    return len(p) == len(s) and all(a in ("*", b) for a, b in zip(p, s, strict=True))


@pytest.mark.parametrize("call_sid", ["CA" + "0" * 32, "\r", "a.b", "*", ">", "x y", ""])
def test_a_call_subject_is_one_safe_token_whatever_the_callsid(call_sid: str) -> None:
    subject = Subjects(namespace="t1").call_opened(call_sid)
    prefix, _, token = subject.rpartition(".")
    assert prefix == "t1.gw.call"
    assert token.isalnum()
    assert Subjects(namespace="t1").call_opened(call_sid) == subject  # both sides agree


def test_settings_read_the_documented_variable_names() -> None:
    assert env_name("api_port") == "SWITCHBOARD_API_PORT"
    assert env_name("nats_url") == "NATS_URL"
    settings = load_settings(
        ApiSettings,
        {
            "SWITCHBOARD_API_PORT": "9999",
            "REDIS_URL": "redis://x",
            "SWITCHBOARD_BOOTSTRAP_API_KEY": "k",
        },
    )
    assert settings.api_port == 9999
    assert settings.redis_url == "redis://x"
    assert settings.bootstrap_api_key == "k"


def test_settings_defaults_work_on_a_laptop() -> None:
    settings = load_settings(CoreSettings, {})
    assert settings.nats_url == "nats://127.0.0.1:4222"
    assert settings.data_dir == "./.switchboard"


def test_a_bad_setting_is_a_clear_error() -> None:
    with pytest.raises(InvalidRequest, match="api_port"):
        load_settings(ApiSettings, {"SWITCHBOARD_API_PORT": "eighty"})
