"""Fetching network media for the sink: public addresses only, bounded in size and time.

Records name media by URL, and records come from strangers: a URL may point
at the metadata service (169.254.169.254), a database port on localhost, or
redirect there. The resolver refuses non-public addresses (checked after DNS
and again on every redirect) unless the operator allow-lists a host.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

MAX_MEDIA_BYTES = 100 * 1024 * 1024


class MediaError(ValueError):
    """A media URL that must not or cannot be fetched."""


@dataclass(frozen=True)
class MediaPolicy:
    """Where network media may be fetched from, how much and for how long.

    Media URLs come from records, i.e. from whoever can put a message in a
    chat, so by default only public addresses are fetched (the address a name
    resolves to is checked, on every connection, redirects included).
    ``allow`` lists hosts or networks an operator vouches for (an internal
    media server): hostnames (exact, lowercase) and IP networks in CIDR form.
    """

    allow: tuple[str, ...] = ()
    max_bytes: int = MAX_MEDIA_BYTES
    timeout_s: float = 60.0
    max_redirects: int = 5

    @classmethod
    def parse(cls, allow: str, max_bytes: int, timeout_s: float) -> MediaPolicy:
        entries = tuple(e.strip().lower() for e in allow.split(",") if e.strip())
        for entry in entries:
            if "/" in entry:
                ipaddress.ip_network(entry, strict=False)  # ValueError: bad setting
        return cls(allow=entries, max_bytes=max_bytes, timeout_s=timeout_s)

    def _networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(e, strict=False) for e in self.allow if "/" in e]

    def host_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.allow

    def address_allowed(self, address: str) -> bool:
        """Public unicast, or inside an allowed network."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
        if any(ip in net for net in self._networks()) or address in self.allow:
            return True
        return ip.is_global and not (
            ip.is_loopback
            or ip.is_private
            or ip.is_link_local
            or ip.is_multicast
            or ip.is_reserved
            or ip.is_unspecified
        )


class _GuardedResolver(AbstractResolver):
    """Resolves like aiohttp does, then refuses non-public addresses.

    The connector connects to exactly what the resolver returns, so there is
    no window between the check and the connection (DNS rebinding).
    """

    def __init__(self, policy: MediaPolicy) -> None:
        self.policy = policy
        self._inner = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self.policy.host_allowed(host):
            return results
        kept = [r for r in results if self.policy.address_allowed(r["host"])]
        if not kept:
            raise MediaError(f"refusing to fetch media from {host}: not a public address")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def media_session(policy: MediaPolicy) -> aiohttp.ClientSession:
    """A session for network media only: guarded resolver, bounded time, no env proxies."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=_GuardedResolver(policy), limit=20),
        timeout=aiohttp.ClientTimeout(total=policy.timeout_s),
        trust_env=False,
    )


def _check_url(url: URL, policy: MediaPolicy) -> None:
    if url.scheme not in ("http", "https"):
        raise MediaError(f"refusing to fetch media from a {url.scheme}: URL (only http/https)")
    host = url.host or ""
    if not host:
        raise MediaError("media URL has no host")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return  # a name: checked on resolution (_GuardedResolver)
    # aiohttp does not resolve IP literals, so they are checked here.
    if not policy.host_allowed(host) and not policy.address_allowed(host):
        raise MediaError(f"refusing to fetch media from {host}: not a public address")


async def fetch_url(
    session: aiohttp.ClientSession, url: str, policy: MediaPolicy | None = None
) -> tuple[bytes, str]:
    """Download network media (http(s), public addresses unless allowed); no token sent.

    Redirects are followed by hand so that each hop's URL is checked too.
    """
    policy = policy or MediaPolicy()
    scheme = url.split(":", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise MediaError(f"refusing to fetch media from a {scheme}: URL (only http/https)")
    delay = 0.5
    for attempt in range(5):
        target = URL(url)
        try:
            for _ in range(policy.max_redirects + 1):
                _check_url(target, policy)
                async with session.get(target, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                        target = target.join(URL(resp.headers["Location"]))
                        continue
                    if resp.status >= 500 and attempt < 4:
                        raise aiohttp.ClientResponseError(
                            resp.request_info, (), status=resp.status
                        )
                    if resp.status != 200:
                        raise MediaError(f"media URL answered HTTP {resp.status}")
                    if (resp.content_length or 0) > policy.max_bytes:
                        raise MediaError(f"media is larger than {policy.max_bytes} bytes")
                    chunks = []
                    total = 0
                    async for chunk in resp.content.iter_chunked(65536):
                        total += len(chunk)
                        if total > policy.max_bytes:
                            raise MediaError(f"media is larger than {policy.max_bytes} bytes")
                        chunks.append(chunk)
                    ctype = resp.headers.get("Content-Type", "application/octet-stream")
                    return b"".join(chunks), ctype.split(";")[0].strip()
            raise MediaError(f"media URL redirected more than {policy.max_redirects} times")
        except MediaError:
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, MediaError):  # the resolver refused the address
                raise cause from None
            if attempt == 4:
                raise MediaError(f"cannot fetch media: {type(exc).__name__}") from None
            await asyncio.sleep(delay)
            delay *= 2
    raise MediaError("cannot fetch media")
