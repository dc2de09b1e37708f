import pytest

from shared.errors import InvalidRequest
from shared.identity import make_identifier, normalize_email, normalize_phone, redact


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+1 (415) 555-0109", "+14155550109"),
        ("415-555-0109", "+14155550109"),
        ("+44 20 7946 0958", "+442079460958"),
        ("tel:+14155550109", "+14155550109"),
    ],
)
def test_phone_numbers_normalise_to_e164(raw: str, expected: str) -> None:
    assert normalize_phone(raw) == expected


@pytest.mark.parametrize("raw", ["hello", "12", "+999999999999999999"])
def test_impossible_phone_numbers_are_rejected(raw: str) -> None:
    with pytest.raises(InvalidRequest):
        normalize_phone(raw)


def test_emails_are_case_folded_and_trimmed() -> None:
    assert normalize_email("  Jane.Doe@Example.COM ") == "jane.doe@example.com"


@pytest.mark.parametrize("raw", ["no-at-sign", "@example.com", "jane@", "a b@example.com"])
def test_malformed_emails_are_rejected(raw: str) -> None:
    with pytest.raises(InvalidRequest):
        normalize_email(raw)


def test_external_identifiers_keep_their_value_but_not_whitespace() -> None:
    ident = make_identifier("external", "  crm-42 ")
    assert ident.normalized == "crm-42"
    assert ident.raw == "  crm-42 "


def test_redaction_hides_the_middle() -> None:
    assert redact("+14155550109") == "+141•••09"
    assert "5550" not in redact("+14155550109")
