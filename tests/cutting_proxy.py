"""A TCP proxy that cuts connections mid-transfer: real dropped connections for the object-storage
tests (tests/test_object_storage.py) and benchmark (bench/data_throughput.py --source s3)."""
import re
import socket
import threading
import time

# The first line of an HTTP/1.1 request at the start of a line (requests on a kept-alive connection
# follow each other; the bodies sent here, gzip parts and JSON, do not hold such a line).
REQUEST_LINE = re.compile(rb"^(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1\.1\r$", re.MULTILINE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CuttingProxy:
    """Forwards TCP connections to 127.0.0.1:`target`. While `cuts` > 0, a connection whose
    responses pass `cut_after` bytes is closed there, mid-transfer (one cut used per connection);
    with `cut_at_match` (lower-case bytes), `cut_after` bytes after where they first pass."""

    cut_at_match = b""
    quiet_s = 0.0  # after a cut, none for this long (so the retry of the cut transfer goes through)
    latency_s = 0.0  # each request held this long before it is passed on (a distant server's round trip)

    def __init__(self, target: int, cut_after: int):
        self.target, self.cut_after, self.cuts, self.cut_done = target, cut_after, 0, 0
        self._quiet_until = 0.0
        self.forwarded = 0  # response bytes passed on to clients, headers included
        self.requests = []  # "METHOD /path?query" of every request passed on, in order
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        upstream = socket.create_connection(("127.0.0.1", self.target))
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        sent, armed = 0, None  # bytes passed on; where the cut is counted from (a match, or 0)
        try:
            while True:
                chunk = upstream.recv(65536)
                if not chunk:
                    break
                if armed is None:
                    at = chunk.lower().find(self.cut_at_match) if self.cut_at_match else 0
                    armed = sent + at if at >= 0 else None
                with self.lock:
                    cut = (self.cuts > 0 and armed is not None and sent + len(chunk) > armed + self.cut_after
                           and time.monotonic() >= self._quiet_until)
                    if cut:
                        self.cuts -= 1
                        self.cut_done += 1
                        self._quiet_until = time.monotonic() + self.quiet_s
                piece = chunk[: armed + self.cut_after - sent] if cut else chunk
                client.sendall(piece)
                sent += len(piece)
                with self.lock:
                    self.forwarded += len(piece)
                if cut:
                    break
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _pump(self, src, dst):
        """Client to server: passed on as is; the request lines seen are kept in `requests`."""
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                lines = REQUEST_LINE.findall(chunk)
                if lines:
                    with self.lock:
                        self.requests.extend(f"{m.decode()} {p.decode()}" for m, p in lines)
                    time.sleep(self.latency_s)
                dst.sendall(chunk)
        except OSError:
            pass
