"""A ZeroMQ endpoint that acknowledges and drops whatever it gets: the raw transfer that
`hetpipe bench delivery` times weight delivery against (`delivery.raw_send` feeds it).

Run as `python -m transport.sink [ADDRESS]`; it prints `ready ADDRESS` and serves until a message of
one empty frame."""

from __future__ import annotations

import sys

import zmq


def main(listen: str = "tcp://127.0.0.1:0") -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(listen)
    print("ready", sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    while True:
        sender, *frames = sock.recv_multipart(copy=False)
        sock.send_multipart([sender, b"ok"])
        if len(frames) == 1 and len(frames[0]) == 0:
            break
    sock.close(0)


if __name__ == "__main__":
    main(*sys.argv[1:2])
