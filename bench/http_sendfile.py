"""A minimal HTTP/1.0 file server for the benchmarks: ``sendfile`` does the copying, so
the server costs next to no CPU on the shared machine (python -m http.server would
cost about as much as what is measured).

    python bench/http_sendfile.py ADDR PORT DIR

prints ``ready`` once listening; serves ``GET /NAME`` with the file DIR/NAME (404
otherwise), one thread per connection, until killed.
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path


def serve_one(conn: socket.socket, root: Path) -> None:
    with conn:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 8192:
            data = conn.recv(4096)
            if not data:
                return
            head += data
        parts = head.split(b" ", 2)
        name = parts[1].decode(errors="replace").lstrip("/") if len(parts) > 1 else ""
        path = root / name
        if not name or "/" in name or not path.is_file():
            conn.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        with path.open("rb") as f:
            size = path.stat().st_size
            conn.sendall(f"HTTP/1.0 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
            try:
                conn.sendfile(f)
            except OSError:
                return


def main() -> int:
    addr, port, root = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    srv = socket.socket(fam, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve_one, args=(conn, root), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
