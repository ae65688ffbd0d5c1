"""A tiny authoritative DNS server for tests: UDP on 127.0.0.1, A records that the test changes while it runs."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    """Answers A queries from :attr:`records` (name → addresses; a name with no addresses exists but has
    no A record, a name not in it is NXDOMAIN). ``failing = True`` answers SERVFAIL; ``silent = True``
    answers nothing (a timeout)."""

    def __init__(self, records: dict[str, list[str]] | None = None, ttl: int = 1) -> None:
        self.records = {_absolute(name): list(addresses) for name, addresses in (records or {}).items()}
        self.ttl = ttl
        self.failing = False
        self.silent = False
        self.queries = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.1)  # so that the thread sees close() soon
        self._stop = threading.Event()
        self.port: int = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, name: str, addresses: list[str]) -> None:
        with self._lock:
            self.records[_absolute(name)] = list(addresses)

    def remove(self, name: str) -> None:
        with self._lock:
            self.records.pop(_absolute(name), None)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            try:
                query = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue
            self.queries += 1
            if self.silent:
                continue
            self._sock.sendto(self._answer(query).to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.failing:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        question = query.question[0]
        with self._lock:
            addresses = self.records.get(question.name.to_text().lower())
        if addresses is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A and addresses:
            response.answer.append(dns.rrset.from_text_list(question.name, self.ttl, "IN", "A", addresses))
        return response

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


def _absolute(name: str) -> str:
    return name.lower() if name.endswith(".") else f"{name.lower()}."


@contextmanager
def dns_server(records: dict[str, list[str]] | None = None) -> Iterator[DnsServer]:
    server = DnsServer(records)
    try:
        yield server
    finally:
        server.close()
