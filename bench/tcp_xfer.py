"""Raw TCP reference for bench/msp_goodput.py: one connection moving one file.

Run inside a benchmark namespace (stdlib only, so any python3 does):

    tcp_xfer.py recv ADDR PORT SIZE      # prints "ready", then one JSON result line
    tcp_xfer.py send ADDR PORT FILE      # connects, sends FILE, half-closes, waits for EOF

The receiver keeps the bytes in memory and hashes them only after the last byte,
so hashing never slows the reference down. Times are CLOCK_MONOTONIC, which is
system-wide (network namespaces do not change it), so the orchestrator may
compare them across processes.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import time

CHUNK = 1 << 20


def recv(addr: str, port: int, size: int) -> int:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(1)
    print("ready", flush=True)
    conn, _ = srv.accept()
    # One spare chunk so a sender that sends more than announced is detected, not truncated.
    buf = bytearray(size + CHUNK)
    view = memoryview(buf)
    got = 0
    t_first = 0.0
    while True:
        n = conn.recv_into(view[got : got + CHUNK])
        if n == 0:
            break
        if got == 0:
            t_first = time.monotonic()
        got += n
        if got + CHUNK > len(buf):
            view.release()  # a bytearray cannot grow while a view of it exists
            buf.extend(bytes(CHUNK))
            view = memoryview(buf)
    t_end = time.monotonic()
    conn.close()
    srv.close()
    digest = hashlib.sha256(view[:got]).hexdigest()
    print(json.dumps({"bytes": got, "sha256": digest, "t_first": t_first, "t_end": t_end}))
    return 0


def send(addr: str, port: int, path: str) -> int:
    with open(path, "rb") as f:
        data = f.read()
    deadline = time.monotonic() + 10
    while True:
        try:
            sock = socket.create_connection((addr, port), timeout=30)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    # The 30 s was for connecting; a lossy path may stall a transfer longer than that
    # (TCP's retransmission timer backs off), and the orchestrator has its own limit.
    sock.settimeout(None)
    t_start = time.monotonic()
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(CHUNK):  # wait for the receiver's close: all bytes were read
        pass
    sock.close()
    print(json.dumps({"bytes": len(data), "t_start": t_start}))
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] not in ("recv", "send"):
        print(__doc__, file=sys.stderr)
        return 2
    role, addr, port = argv[0], argv[1], int(argv[2])
    if role == "recv":
        return recv(addr, port, int(argv[3]))
    return send(addr, port, argv[3])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
