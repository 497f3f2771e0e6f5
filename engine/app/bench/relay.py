"""A TCP relay that holds every byte for a fixed delay each way: a link slower than loopback's, for
`hetpipe bench spec --link-delay-ms` (this kernel has no netem qdisc to do it).

It relays TCP, below ZeroMQ: each connection to the relay opens one to the target, and ZeroMQ's
own session (identities, CURVE) runs end to end through it. Bytes keep their order; each read is
released `delay` seconds after it arrived. Loopback addresses only.

    python -m engine.app.bench.relay LISTEN_PORT TARGET_PORT DELAY_MS   (prints the port, then serves)
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

HOST = "127.0.0.1"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop, held = asyncio.get_running_loop(), asyncio.Queue()

    async def release():
        while True:
            due, data = await held.get()
            if data is None:
                break
            await asyncio.sleep(max(0.0, due - loop.time()))
            writer.write(data)
            await writer.drain()
        writer.close()

    task = asyncio.ensure_future(release())
    try:
        while data := await reader.read(1 << 20):
            held.put_nowait((loop.time() + delay, data))
    except ConnectionError:
        pass
    held.put_nowait((0.0, None))
    await task


async def _serve(listen: int, target: int, delay: float) -> None:
    async def handle(reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer, delay), _pipe(up_reader, writer, delay),
                             return_exceptions=True)

    server = await asyncio.start_server(handle, HOST, listen)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def start_relay(target: str, delay_ms: float) -> tuple[subprocess.Popen, str]:
    """A relay process in front of a loopback `tcp://127.0.0.1:PORT`: (the process, its address)."""
    host, _, port = target.removeprefix("tcp://").rpartition(":")
    if host not in (HOST, "localhost"):
        raise ValueError(f"the link-delay relay runs on loopback addresses only, not {target}")
    proc = subprocess.Popen([sys.executable, "-m", "engine.app.bench.relay", "0", port, str(delay_ms)],
                            stdout=subprocess.PIPE, text=True)
    return proc, f"tcp://{HOST}:{int(proc.stdout.readline())}"


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000))
