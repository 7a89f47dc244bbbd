"""Which addresses the agent may connect to for an image source (contract section 9).

A URL names a host; what matters is the address the socket connects to, so the rule is applied
to every address at connect time (fetchers.py), never to the URL's text: `0x7f000001`,
`127.1`, `[::ffff:127.0.0.1]` and a DNS name that resolves to 127.0.0.1 all reach loopback.

The decision for an address:
1. Among the operator's `--allow-networks` and `--deny-networks` entries that contain it, the
   longest prefix decides, and a denial wins a tie. So `--deny-networks 0.0.0.0/0,::/0
   --allow-networks 10.1.0.0/16` is an allow-list, and `--allow-networks 127.0.0.1/32` opens
   one loopback address and no other.
2. When no entry contains it, the default denials decide: loopback, link-local (cloud metadata
   at 169.254.169.254 included, and the two metadata addresses clouds put elsewhere:
   fd00:ec2::254 and 100.100.100.200), multicast, unspecified ("this network" 0.0.0.0/8 too,
   which Linux routes to the host itself) and reserved ranges are refused; private ranges are
   allowed, because internal mirrors are common.

An IPv4 address spelled as IPv6 (`::ffff:a.b.c.d`) is judged as the IPv4 address it reaches.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
# Cloud metadata services outside link-local: AWS's IPv6 endpoint (in the private fd00::/8)
# and Alibaba Cloud's (in the shared 100.64.0.0/10). Their ranges stay allowed, not they.
_METADATA = frozenset(
    {ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")}
)


def parse_networks(text: str | Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs from a comma-separated string (a bare address is a /32 or /128); ValueError
    names the entry that is not one."""
    items = text.split(",") if isinstance(text, str) else list(text)
    networks: list[IPNetwork] = []
    for item in items:
        entry = item.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP network (CIDR)") from None
    return tuple(networks)


def _plain(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def default_denial(address: IPAddress) -> str | None:
    """Why the address is refused when no operator entry names it, or None."""
    address = _plain(address)
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address in _METADATA:
        return "a cloud metadata service"
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified or (
        isinstance(address, ipaddress.IPv4Address) and address in _THIS_NETWORK
    ):
        return "unspecified"
    if address.is_reserved:  # 240.0.0.0/4 (broadcast included), ::/8 ...
        return "reserved"
    return None


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()

    @classmethod
    def of(cls, allow: str | Iterable[str] = (), deny: str | Iterable[str] = ()) -> NetworkPolicy:
        return cls(parse_networks(allow), parse_networks(deny))

    def refusal(self, address: str | IPAddress) -> str | None:
        """Why a connection to `address` is refused (text naming the address), or None when
        it is allowed. Anything that is not an IP address is refused."""
        try:
            ip = _plain(
                ipaddress.ip_address(address.split("%", 1)[0])
                if isinstance(address, str)
                else address
            )
        except ValueError:
            return f"{address!r} is not an IP address"
        best: tuple[int, bool, IPNetwork] | None = None  # (prefix length, denied, network)
        for denied, networks in ((False, self.allow), (True, self.deny)):
            for network in networks:
                if ip.version == network.version and ip in network:
                    candidate = (network.prefixlen, denied, network)
                    if best is None or candidate[:2] > best[:2]:
                        best = candidate
        if best is not None:
            return f"address {ip} is in denied network {best[2]}" if best[1] else None
        reason = default_denial(ip)
        if reason is not None:
            return f"address {ip} is {reason} (allow it with --allow-networks)"
        return None
