"""A small fault-injecting reverse proxy in front of the real Synapse.

Every request is forwarded unchanged (method, raw path and query, headers
including ``Authorization``, body) to the homeserver and its answer relayed
back, except when a queued fault matches: then the fault is answered *instead
of* forwarding (the homeserver never sees the request, as with a real 429 or a
load balancer's 502). ``drop_response_once`` forwards the request and then
throws the homeserver's answer away, answering 502: the work was done but the
reply got lost, which is what a client's settle/idempotency logic is for.

Nothing here fakes Matrix: every successful answer comes from Synapse.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import unquote

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from backflow.stack.synapse import Synapse

# Hop-by-hop headers (RFC 9110 7.6.1) and ones aiohttp recomputes itself.
_SKIP_REQUEST = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade"}
)
_SKIP_RESPONSE = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "server", "date"}
)


class Seen(NamedTuple):
    """One request received by the proxy: method, raw path with query, headers."""

    method: str
    path_qs: str
    headers: dict[str, str]


@dataclass
class Fault:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1
    match: str | None = None
    forward: bool = False  # forward to the homeserver first, then answer the fault
    delay: float = 0.0  # seconds to hold the request first (a slow gateway timing out)

    def matches(self, path: str) -> bool:
        return self.match is None or self.match in path


class FaultProxy:
    """Reverse proxy to ``upstream_url`` on 127.0.0.1, with queued faults.

    Use ``async with FaultProxy(url) as proxy`` (or ``start``/``close``).
    """

    def __init__(self, upstream_url: str) -> None:
        self.upstream = upstream_url.rstrip("/")
        self.seen: list[Seen] = []
        self.forwarded: list[Seen] = []  # the subset that reached the homeserver
        self._faults: list[Fault] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._port: int | None = None

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("FaultProxy is not started")
        return f"http://127.0.0.1:{self._port}"

    # ------------------------------------------------------------ faults

    def inject(
        self,
        status: int,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
        times: int = 1,
        match: str | None = None,
        delay: float = 0.0,
    ) -> None:
        """Answer the next ``times`` requests whose path contains ``match`` with this.

        Faults are consumed in the order they were queued; the first queued
        fault that matches a request answers it, after ``delay`` seconds.
        """
        if times < 1:
            raise ValueError("times must be >= 1")
        fault = Fault(status, dict(body), dict(headers or {}), times, match, delay=delay)
        self._faults.append(fault)

    def drop_response_once(self, match: str | None = None) -> None:
        """Forward the next matching request, then answer 502 instead of the real reply."""
        self._faults.append(
            Fault(502, {"errcode": "M_UNKNOWN", "error": "reply lost"}, forward=True, match=match)
        )

    def clear_faults(self) -> None:
        """Stop injecting: every later request goes to the homeserver."""
        self._faults.clear()

    @property
    def pending_faults(self) -> int:
        return sum(f.times for f in self._faults)

    def requests(self, match: str, method: str | None = None) -> list[Seen]:
        """Requests received whose decoded path contains ``match``."""
        return [
            s
            for s in self.seen
            if match in unquote(s.path_qs.split("?", 1)[0])
            and (method is None or s.method == method)
        ]

    def _take(self, path: str) -> Fault | None:
        for i, fault in enumerate(self._faults):
            if fault.matches(path):
                fault.times -= 1
                if fault.times == 0:
                    del self._faults[i]
                return fault
        return None

    # ------------------------------------------------------------ server

    async def start(self) -> FaultProxy:
        self._session = aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=120)
        )
        app = web.Application(client_max_size=200 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self._port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen = Seen(request.method, request.raw_path, dict(request.headers))
        self.seen.append(seen)
        fault = self._take(request.path)
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)
        if fault is not None and not fault.forward:
            return web.json_response(fault.body, status=fault.status, headers=fault.headers)
        status, headers, payload = await self._forward(request, body)
        self.forwarded.append(seen)
        if fault is not None:  # the homeserver did the work; lose its reply
            return web.json_response(fault.body, status=fault.status, headers=fault.headers)
        return web.Response(status=status, body=payload, headers=headers)

    async def _forward(
        self, request: web.Request, body: bytes
    ) -> tuple[int, CIMultiDict[str], bytes]:
        assert self._session is not None
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _SKIP_REQUEST
        )
        url = URL(self.upstream + request.raw_path, encoded=True)
        try:
            async with self._session.request(
                request.method, url, headers=headers, data=body or None, allow_redirects=False
            ) as resp:
                payload = await resp.read()
                out = CIMultiDict(
                    (k, v) for k, v in resp.headers.items() if k.lower() not in _SKIP_RESPONSE
                )
                return resp.status, out, payload
        except aiohttp.ClientConnectionError:
            # Upstream down (a Synapse restart) or the connection cut mid-reply: a real
            # gateway answers 502, not the 500 an unhandled error here would give.
            error = b'{"errcode":"M_UNKNOWN","error":"bad gateway: homeserver unreachable"}'
            return 502, CIMultiDict({"Content-Type": "application/json"}), error


@asynccontextmanager
async def fault_proxy_for(synapse: Synapse) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(synapse.url) as proxy:
        yield proxy


@pytest.fixture
async def fault_proxy(synapse: Synapse) -> AsyncIterator[FaultProxy]:
    """A fresh proxy in front of the session's Synapse (import this fixture to use it)."""
    async with fault_proxy_for(synapse) as proxy:
        yield proxy
