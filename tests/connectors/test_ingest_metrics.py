"""`backflow --log-json ingest` as a process: /metrics counts, JSON logs, no token in them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson

from tests.connectors.test_ingest import message
from tests.helpers import free_port, read_topic, scrape_until, stage_env

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "ingest-token-7f3a9c"


async def test_ingest_metrics_count_requests_and_logs_hide_the_token(stack, tmp_path):
    port, metrics_port = free_port(), free_port()
    env = stage_env(
        stack,
        PYTHONPATH=str(ROOT),
        BACKFLOW_INGEST_TOKEN=TOKEN,
        BACKFLOW_METRICS_INGEST_PORT=str(metrics_port),
    )
    log_path = tmp_path / "ingest.log"
    args = ["-m", "backflow.cli", "--log-json", "ingest", "--listen", f"127.0.0.1:{port}"]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *args], env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/v1/records"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        start = await scrape_until(
            metrics_port, lambda m: "backflow_ingest_records_accepted_total" in m
        )
        assert start["backflow_ingest_records_accepted_total"] == 0
        async with aiohttp.ClientSession() as http:
            async with http.post(url, data=orjson.dumps(message(1))) as r:
                assert r.status == 401
            batch = [message(2), message(3), message(4)]
            async with http.post(url, data=orjson.dumps(batch), headers=auth) as r:
                assert r.status == 200, await r.text()
            # A bad value that happens to be the token: its dead-letter log line
            # must not carry it.
            async with http.post(url, data=orjson.dumps({"type": TOKEN}), headers=auth) as r:
                assert r.status == 400
        m = await scrape_until(
            metrics_port, lambda m: m["backflow_ingest_records_accepted_total"] == 3
        )
        assert m["backflow_ingest_requests_rejected_total"] == 1
        assert m["backflow_ingest_requests_unauthorized_total"] == 1
        assert m["backflow_ingest_requests_unavailable_total"] == 0
        live = await read_topic(stack, stack.catalog.live, expect=3)
        assert len(live) == m["backflow_ingest_records_accepted_total"]
        letters = await read_topic(stack, stack.catalog.dead_letters, expect=1)
        assert len(letters) == m["backflow_ingest_requests_rejected_total"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    log = log_path.read_text()
    assert TOKEN not in log
    lines = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
    dead = [x for x in lines if x["msg"].startswith("dead letter")]
    assert dead and "***" in dead[0]["msg"], log
