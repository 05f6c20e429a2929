"""Waiting for a TCP port to accept connections (daprd's app start-up probe)."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_for_port(host: str, port: int, interval: float = 0.1) -> None:
    """Dial host:port every `interval` seconds until a connection is accepted."""
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(interval)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
