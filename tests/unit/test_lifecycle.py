from services.core.lifecycle import ACCEPTS_USER_TURNS, TRANSITIONS, legal_sources


def test_the_table_is_the_product_briefs_lifecycle() -> None:
    assert TRANSITIONS == {
        ("active", "waiting_for_human"),
        ("waiting_for_human", "active"),
        ("active", "awaiting_approval"),
        ("awaiting_approval", "active"),
        ("awaiting_approval", "closed"),
        ("active", "closed"),
        ("waiting_for_human", "closed"),
    }


def test_closed_is_terminal() -> None:
    assert not [t for t in TRANSITIONS if t[0] == "closed"]
    assert "closed" not in ACCEPTS_USER_TURNS


def test_legal_sources_come_from_the_table() -> None:
    assert legal_sources("closed") == ["active", "awaiting_approval", "waiting_for_human"]
    assert legal_sources("awaiting_approval") == ["active"]
