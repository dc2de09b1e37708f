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
