"""This node's address for the engines to reach a broadcast group's TCP store (nccl backend).

Every pipeline stage's sender hosts its own group, on its own node, so the address is per node,
never one configured value. In order:

1. the first interface that matches ``NCCL_SOCKET_IFNAME`` (``GLOO_SOCKET_IFNAME`` for a gloo
   group), in NCCL's syntax: a comma-separated list of name prefixes, ``=`` before the list for
   exact names, ``^`` for names to exclude (NCCL's documentation of NCCL_SOCKET_IFNAME);
2. else the local address of the route to the first engine (a UDP ``connect`` sends nothing; the
   kernel picks the interface that reaches that host), so a node whose hostname resolves to
   127.0.1.1 (Debian's /etc/hosts) still advertises a reachable address.

``socket.gethostbyname(socket.gethostname())`` is deliberately not used (issue 21).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from typing import Dict, List, Optional
from urllib.parse import urlparse

SIOCGIFADDR = 0x8915  # linux/sockios.h


def interfaces() -> Dict[str, str]:
    """{interface name: IPv4 address} of the interfaces that have one (Linux)."""
    out: Dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                out[name] = socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24])
            except OSError:
                continue  # no IPv4 address on it
    return out


def match_interfaces(spec: str, names: List[str]) -> List[str]:
    """The names ``spec`` selects, in ``names`` order (NCCL_SOCKET_IFNAME syntax)."""
    spec = spec.strip()
    exclude = spec.startswith("^")
    spec = spec.lstrip("^")
    exact = spec.startswith("=")
    wanted = [w for w in spec.lstrip("=").split(",") if w]

    def hit(name: str) -> bool:
        return any(name == w if exact else name.startswith(w) for w in wanted)

    return [n for n in names if hit(n) != exclude]


def route_address(host: str, port: int = 9) -> str:
    """The local address the kernel uses to reach ``host`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


def node_address(engine_urls: List[str], backend: str = "nccl", environ=os.environ) -> str:
    """This node's address for a broadcast group to the engines at ``engine_urls``."""
    var = "GLOO_SOCKET_IFNAME" if backend == "gloo" else "NCCL_SOCKET_IFNAME"
    spec = environ.get(var)
    if spec:
        found = interfaces()
        names = match_interfaces(spec, list(found))
        if not names:
            raise ValueError(f"{var}={spec!r} matches none of this node's interfaces with an IPv4 address "
                             f"({', '.join(f'{n} {a}' for n, a in found.items()) or 'none'})")
        return found[names[0]]
    host: Optional[str] = urlparse(engine_urls[0]).hostname if engine_urls else None
    return route_address(host or "127.0.0.1")
