"""A TCP proxy that breaks server-to-client streams on request: drop, reset, stall, corrupt, slow.

Faults are armed with ``inject(kind, after_bytes, times)``: each of the next ``times``
connections whose response stream passes ``after_bytes`` suffers the fault there, so with
small ``after_bytes`` it lands inside the first large body (a shard), not in small replies.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass


@dataclass
class Fault:
    kind: str  # "drop" (clean close), "reset" (RST), "stall", "corrupt" (flip a byte), "slow"
    after_bytes: int
    times: int
    stall_seconds: float = 3.0
    bytes_per_second: int = 100_000


class FaultProxy:
    """Forwards 127.0.0.1:<port> to an upstream server, applying armed faults."""

    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self.applied: list[str] = []
        self._resetting: set[int] = set()  # ids of sockets to close with RST, not FIN
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def inject(self, kind: str, after_bytes: int = 20_000, times: int = 1, **options) -> None:
        with self._lock:
            self._faults.append(Fault(kind, after_bytes, times, **options))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, response: bool | None) -> None:
        fault = None
        sent = 0
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if response and fault is None:
                    fault = self._arm_if_due(sent + len(data))
                    if fault is not None:  # at most one fault per connection
                        cut = max(0, fault.after_bytes - sent)
                        sink.sendall(data[:cut])
                        if self._apply(fault, data[cut:], source, sink):
                            return
                        sent += len(data)
                        continue
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                if id(sock) not in self._resetting:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                sock.close()
                self._resetting.discard(id(sock))

    def _arm_if_due(self, total: int) -> Fault | None:
        """Claim a fault for this response stream once it grows past the fault's offset."""
        with self._lock:
            for fault in self._faults:
                if fault.times > 0 and total > fault.after_bytes:
                    fault.times -= 1
                    return Fault(
                        fault.kind,
                        fault.after_bytes,
                        0,
                        fault.stall_seconds,
                        fault.bytes_per_second,
                    )
        return None

    def _apply(self, fault: Fault, rest: bytes, source: socket.socket, sink: socket.socket) -> bool:
        """Apply ``fault`` at the cut; True if the connection is finished."""
        with self._lock:
            self.applied.append(fault.kind)
        if fault.kind == "drop":
            return True
        if fault.kind == "reset":
            # With linger 0 the last close sends RST. SHUT_RD wakes the other pump thread,
            # blocked in recv on this socket, so that close happens now.
            sink.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._resetting.add(id(sink))
            sink.shutdown(socket.SHUT_RD)
            return True
        if fault.kind == "stall":
            time.sleep(fault.stall_seconds)
            return True
        if fault.kind == "corrupt":
            if rest:
                sink.sendall(bytes([rest[0] ^ 0xFF]) + rest[1:])
            return False
        if fault.kind == "slow":
            self._trickle(rest, source, sink, fault.bytes_per_second)
            return True
        raise ValueError(f"unknown fault {fault.kind!r}")

    @staticmethod
    def _trickle(data: bytes, source: socket.socket, sink: socket.socket, rate: int) -> None:
        """Forward the rest of the stream at ``rate`` bytes per second."""
        step = max(1, rate // 20)
        while True:
            for i in range(0, len(data), step):
                sink.sendall(data[i : i + step])
                time.sleep(0.05)
            data = source.recv(65536)
            if not data:
                return

    def close(self) -> None:
        self._closed = True
        self._listener.close()
