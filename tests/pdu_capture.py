"""A tiny recording TCP proxy: put it between a real DICOM sender and the appliance, keep the bytes.

The fuzzer mutates what DCMTK's ``storescu`` really sends (its A-ASSOCIATE-RQ with all its proposed
contexts, its P-DATA-TF framing and fragment sizes), not what our own builders think a sender sends.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field


@dataclass
class Recording:
    """One proxied connection: what the client sent and what the server answered, in order."""

    client: bytearray = field(default_factory=bytearray)
    server: bytearray = field(default_factory=bytearray)


class RecordingProxy:
    """Listens on a free loopback port and forwards each connection to ``target_port``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.recordings: list[Recording] = []
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self._accept = threading.Thread(target=self._serve, name="capture-accept", daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            server = socket.create_connection(self.target, timeout=30)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, server]
            rec = Recording()
            self.recordings.append(rec)
            for src, dst, buf in ((client, server, rec.client), (server, client, rec.server)):
                t = threading.Thread(target=self._pump, args=(src, dst, buf), daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        src.settimeout(60)
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                buf += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._accept.join(timeout)
        for t in self._threads:
            t.join(timeout)
        self.listener.close()
        for s in self._sockets:
            s.close()

    def __enter__(self) -> "RecordingProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
