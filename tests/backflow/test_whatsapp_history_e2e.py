"""whatsapp-history end to end: bridge database -> `backflow import` -> pipeline -> Synapse.

The sample account (DMs, a group, own messages, a LID chat, a reply, reactions,
an edit, a revoke, media, stubs, wrappers) is read back from the rooms: order,
senders and their names, and every relation pointing at the right event.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.parse

import aiohttp
import pytest
import yaml

from connectors.matrix.ghosts import ghost_user_id
from tests.conftest import make_settings
from tests.helpers import backflow_cli, portal_timeline, stage_env, stop_stages
from tests.wa_bridge import ALICE, DAVE, GROUP, sample, write_sqlite

TYPES = ("m.room.message", "m.reaction", "m.room.redaction")
SOURCE = "fi.backflow.source"
# Ghosts as a bridge with username_template "_bf_wa_{{.}}" would name them.
TEMPLATE = "whatsapp=_bf_wa_{id}"


@pytest.fixture(scope="module")
async def running(kafka, pg_admin, synapse, appservices, tmp_path_factory):
    from backflow.stack.postgres import drop_database

    tmp = tmp_path_factory.mktemp("wa-e2e")
    settings, db = await make_settings(
        kafka, pg_admin, synapse, appservices["free"], tmp, **{"sink.ghost_templates": TEMPLATE}
    )
    # The sink names WhatsApp ghosts by a template (issue 13 item 5): the stages
    # get it through the environment, as an operator's compose file would.
    env = stage_env(settings, BACKFLOW_SINK_GHOST_TEMPLATES=TEMPLATE)
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "backflow.cli", stage],
            env=env,
            stdout=open(tmp / f"{stage}.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        for stage in ("worker", "sink")
    ]
    yield settings, children
    stop_stages(children)
    await drop_database(pg_admin, db)


async def rooms(settings, children, want: dict[str, int]) -> dict[str, list[dict]]:
    got: dict[str, list[dict]] = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for portal in want:
            got[portal] = await portal_timeline(settings, "whatsapp", portal, TYPES) or []
        if all(len(got[p]) >= n for p, n in want.items()):
            break
        assert all(c.poll() is None for c in children), "worker or sink exited"
        await asyncio.sleep(1)
    return got


async def display_name(settings, user_id: str) -> str | None:
    url = f"{settings.homeserver.url}/_matrix/client/v3/profile/{urllib.parse.quote(user_id)}"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return (await resp.json()).get("displayname")


async def test_bridge_database_lands_with_senders_and_relations(running, tmp_path):
    settings, children = running
    db = write_sqlite(tmp_path / "whatsapp.db", sample())
    result = backflow_cli(settings, "import", "whatsapp-history", str(db))
    assert result.returncode == 0, result.stderr
    assert "0 rejected" in result.stdout, result.stdout
    # Events per room: DM 4 messages + edit + reaction + redaction; group 7 + 3 reactions.
    got = await rooms(settings, children, {ALICE: 7, GROUP: 10, DAVE: 2})
    registration = yaml.safe_load(open(settings.appservice.registration))
    prefix = registration["namespaces"]["users"][0]["regex"].lstrip("@").split(".*")[0]
    server = settings.homeserver.server_name

    def ghost(sender_id: str) -> str:
        return ghost_user_id(prefix, "whatsapp", sender_id, server, {"whatsapp": "_bf_wa_"})

    assert ghost("lid-999000") == f"@_bf_wa_lid-999000:{server}"  # the template's form

    def by_key(events: list[dict]) -> dict[str, dict]:
        return {
            e["content"][SOURCE]["id"].split(":")[-1]: e
            for e in events
            if SOURCE in e["content"] and e["type"] != "m.room.redaction"
        }

    dm = got[ALICE]
    messages = [e for e in dm if e["type"] == "m.room.message"]
    assert [e["origin_server_ts"] for e in messages] == sorted(
        e["origin_server_ts"] for e in messages
    )
    # A1 was revoked: its event is redacted (content gone) by a redaction from Alice.
    redacted = [e for e in messages if not e["content"]]
    assert len(redacted) == 1
    [redaction] = [e for e in dm if e["type"] == "m.room.redaction"]
    assert redaction["redacts"] == redacted[0]["event_id"]
    assert redaction["sender"] == ghost("15550000002")
    dm_ev = by_key(dm)
    assert dm_ev["A2"]["sender"] == ghost("lid-999000")  # own messages: the own (LID) ghost
    reply = dm_ev["A3"]["content"]["m.relates_to"]["m.in_reply_to"]["event_id"]
    assert reply == redacted[0]["event_id"]
    edit = dm_ev["A5"]["content"]
    assert edit["m.relates_to"] == {"rel_type": "m.replace", "event_id": dm_ev["A2"]["event_id"]}
    assert edit["m.new_content"]["body"] == "hello Alice!"
    heart = next(e for e in dm if e["type"] == "m.reaction")
    assert heart["content"]["m.relates_to"]["event_id"] == dm_ev["A3"]["event_id"]
    assert heart["content"]["m.relates_to"]["key"] == "❤️"
    assert heart["sender"] == ghost("15550000002")
    assert dm_ev["A4"]["content"]["msgtype"] == "m.notice"
    assert dm_ev["A4"]["content"]["body"].startswith("Image (image/jpeg, 2.3 MB, 1280×720)")

    group = got[GROUP]
    bodies = [e["content"]["body"] for e in group if e["type"] == "m.room.message"]
    assert bodies[:3] == ["created the group Family", "welcome", "thanks"]
    assert bodies[-1] == "added Carol" and len(bodies) == 7
    g = by_key(group)
    assert g["G2"]["sender"] == ghost("15550000004")
    assert g["G6"]["content"]["msgtype"] == "m.location"
    reactions = {
        (e["sender"], e["content"]["m.relates_to"]["key"]): e["content"]["m.relates_to"]["event_id"]
        for e in group
        if e["type"] == "m.reaction"
    }
    assert reactions == {
        (ghost("lid-999000"), "👍"): g["G1"]["event_id"],
        (ghost("15550000004"), "😂"): g["G1"]["event_id"],
        (ghost("15550000003"), "🎉"): g["G2"]["event_id"],
    }
    assert await display_name(settings, ghost("15550000003")) == "Bob (bridge)"
    assert await display_name(settings, ghost("15550000004")) == "Carol"

    lid = got[DAVE]
    assert [e["sender"] for e in lid] == [ghost("lid-111222333"), ghost("lid-999000")]
    assert [e["content"]["body"] for e in lid] == ["hey from dave", "hi dave"]
