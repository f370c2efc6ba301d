"""Each sender's node address comes from the configured interface (NCCL_SOCKET_IFNAME /
GLOO_SOCKET_IFNAME, NCCL's syntax) or the route to the engines, never from a hostname lookup."""

import pytest

from rollout.bus.address import interfaces, match_interfaces, node_address, route_address

NAMES = ["lo", "eth0", "eth1", "ib0", "ib1", "docker0"]


@pytest.mark.parametrize("spec,want", [
    ("ib", ["ib0", "ib1"]),            # prefixes
    ("eth1,ib0", ["eth1", "ib0"]),     # a list
    ("=eth", []),                      # exact names only
    ("=eth0", ["eth0"]),
    ("^lo,docker", ["eth0", "eth1", "ib0", "ib1"]),  # exclusions
    ("^=eth0", ["lo", "eth1", "ib0", "ib1", "docker0"]),
])
def test_nccl_interface_syntax(spec, want):
    assert match_interfaces(spec, NAMES) == want


def test_address_of_the_named_interface_and_the_route():
    found = interfaces()
    assert found.get("lo") == "127.0.0.1"  # every Linux host has it
    assert node_address([], "gloo", {"GLOO_SOCKET_IFNAME": "lo"}) == "127.0.0.1"
    assert node_address(["http://127.0.0.1:30000"], "nccl", {}) == "127.0.0.1"  # the route to the engine
    assert route_address("127.0.0.2") == "127.0.0.1"
    # The variable of the group's backend decides: nccl reads NCCL_SOCKET_IFNAME only.
    assert node_address(["http://127.0.0.1:1"], "nccl", {"GLOO_SOCKET_IFNAME": "nope"}) == "127.0.0.1"
    with pytest.raises(ValueError, match="NCCL_SOCKET_IFNAME='nope0' matches none"):
        node_address([], "nccl", {"NCCL_SOCKET_IFNAME": "nope0"})
