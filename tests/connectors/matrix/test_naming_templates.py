"""Ghost and alias naming templates (sink.ghost_templates / alias_templates)."""

from __future__ import annotations

import pytest

from connectors.matrix.ghosts import (
    MAX_MXID,
    alias_localpart,
    ghost_localpart,
    parse_templates,
    room_alias,
)


def test_templates_name_ghosts_and_aliases_like_the_bridge() -> None:
    ghosts = parse_templates("whatsapp=whatsapp_{id}, signal=signal_{id}", "g", "")
    assert ghosts == {"whatsapp": "whatsapp_", "signal": "signal_"}
    assert (
        ghost_localpart("_bf_", "whatsapp", "15550000003", "hs", ghosts) == "whatsapp_15550000003"
    )
    assert ghost_localpart("_bf_", "whatsapp", "lid-42", "hs", ghosts) == "whatsapp_lid-42"
    # Other networks keep backflow's own scheme; ids are still escaped.
    assert ghost_localpart("_bf_", "slack", "U1", "hs", ghosts) == "_bf_slack__u1"
    assert ghost_localpart("_bf_", "whatsapp", "Ann_B", "hs", ghosts) == "whatsapp__ann___b"
    aliases = parse_templates("whatsapp=whatsapp_{id}", "a", "whatsapp_")
    assert alias_localpart("_bf_", "whatsapp", "1@g.us", "hs", aliases) == "whatsapp_1=40g.us"
    assert room_alias("_bf_", "whatsapp", "1@g.us", "hs", aliases) == "#whatsapp_1=40g.us:hs"
    # Too long for a Matrix id: cut with a hash, still unique and stable.
    long = ghost_localpart("_bf_", "whatsapp", "9" * 400, "hs", ghosts)
    assert long.startswith("whatsapp_999") and len(long) <= MAX_MXID - 4 and "=~" in long


@pytest.mark.parametrize(
    "text, reason",
    [
        ("whatsapp=whatsapp_", "is not NETWORK=PREFIX{id}"),
        ("whatsapp={id}_wa", "is not NETWORK=PREFIX{id}"),
        ("whatsapp=WhatsApp_{id}", "is not NETWORK=PREFIX{id}"),
        ("=x_{id}", "is not NETWORK=PREFIX{id}"),
        ("whatsapp=other_{id}", "outside the registration's namespace"),
    ],
)
def test_bad_templates_are_one_clear_error(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as info:
        parse_templates(text, "sink.ghost_templates", "whatsapp_")
    assert str(info.value).startswith("sink.ghost_templates: ")
