"""The slirp backend's options (:mod:`.slirp`): bhyve's ``hostfwd`` rules and ``open``, QEMU's ``-netdev user``
names for the rest (``restrict``, ``net``, ``host``, ``dhcpstart``, ``dns``, ``hostname``, ``domainname``), as
the ``-s`` option keys give them, checked into a :class:`SlirpConfig`. Every error is a ``ValueError`` of one line
naming the option or rule.

Not supported: QEMU's IPv6, TFTP, DNS search, SMB and guest-forward options; QEMU's legacy ``hostfwd`` form
without a host address.
"""

import ipaddress
from typing import NamedTuple

DEFAULT_NET = "10.0.2.0/24"
HOST_OFFSET, DNS_OFFSET, DHCP_OFFSET = 2, 3, 15     # QEMU's 10.0.2.2, .3, .15
OPTIONS = ("hostfwd", "open", "restrict", "net", "host", "dhcpstart", "dns", "hostname", "domainname")
RULE_FORM = "tcp|udp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT"
_TRUE = ("true", "on", "yes", "1")
_FALSE = ("false", "off", "no", "0")


class Forward(NamedTuple):
    rule: str
    udp: bool
    host_addr: ipaddress.IPv4Address
    host_port: int              # 0: any free port (the one bound is in SlirpBackend.forwards)
    guest_addr: ipaddress.IPv4Address
    guest_port: int

    @property
    def proto(self):
        return "udp" if self.udp else "tcp"


class SlirpConfig(NamedTuple):
    net: ipaddress.IPv4Network
    host: ipaddress.IPv4Address
    dhcpstart: ipaddress.IPv4Address
    dns: ipaddress.IPv4Address
    restricted: bool = False
    hostname: str = None
    domainname: str = None
    forwards: tuple = ()


# ---- options --------------------------------------------------------------------------------------------------------
def _addr(text, what):
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise ValueError(f"slirp: {what}={text}: not an IPv4 address") from None


def _port(text, rule, lowest):
    if not text.isdigit() or not lowest <= int(text) <= 0xFFFF:
        raise ValueError(f"slirp: hostfwd rule {rule!r}: bad port {text!r} ({RULE_FORM})")
    return int(text)


def parse_hostfwd(text):
    """bhyve's ``hostfwd`` value: ``;``-separated rules -> [:class:`Forward`]. Empty rules are skipped."""
    out = []
    for rule in text.split(";"):
        if not rule:
            continue
        proto, sep, rest = rule.partition(":")
        host, dash, guest = rest.partition("-")
        haddr, hsep, hport = host.rpartition(":")
        gaddr, gsep, gport = guest.rpartition(":")
        if proto not in ("tcp", "udp", "") or not (sep and dash and hsep and gsep):
            raise ValueError(f"slirp: hostfwd rule {rule!r} is malformed ({RULE_FORM})")
        try:
            ha = ipaddress.IPv4Address(haddr or "0.0.0.0")
            ga = ipaddress.IPv4Address(gaddr or "0.0.0.0")
        except ValueError:
            raise ValueError(f"slirp: hostfwd rule {rule!r}: not an IPv4 address ({RULE_FORM})") from None
        out.append(Forward(rule, proto == "udp", ha, _port(hport or "0", rule, 0), ga, _port(gport, rule, 1)))
    return out


def _bool(key, value):
    v = str(value).lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"slirp: {key}={value}: expected on or off")


def _network(text):
    try:
        net = ipaddress.IPv4Network(text if "/" in text else text + "/24", strict=False)
    except ValueError:
        raise ValueError(f"slirp: net={text}: not an IPv4 network (ADDR[/MASK])") from None
    if net.num_addresses < 8:
        raise ValueError(f"slirp: net={text}: too small for a host, a DNS and a DHCP address")
    return net


def _inside(net, addr, key):
    if addr not in net or addr in (net.network_address, net.broadcast_address):
        raise ValueError(f"slirp: {key}={addr} is not a host address of net={net}")
    return addr


def parse_options(options):
    """A dict of the ``-s`` options (:data:`OPTIONS`; bools as ``"true"``/``on``/...) -> :class:`SlirpConfig`.
    An unknown option or a bad value is a ``ValueError`` naming it."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"slirp: unknown option {unknown[0]!r} (slirp takes {', '.join(OPTIONS)})")
    net = _network(options.get("net", DEFAULT_NET))
    base = int(net.network_address)
    host = _inside(net, _addr(options["host"], "host") if "host" in options else
                   ipaddress.IPv4Address(base + HOST_OFFSET), "host")
    dns = _inside(net, _addr(options["dns"], "dns") if "dns" in options else
                  ipaddress.IPv4Address(base + DNS_OFFSET), "dns")
    start = ipaddress.IPv4Address(base + DHCP_OFFSET) if net.num_addresses > DHCP_OFFSET + 1 else \
        ipaddress.IPv4Address(base + DNS_OFFSET + 1)
    dhcp = _inside(net, _addr(options["dhcpstart"], "dhcpstart") if "dhcpstart" in options else start, "dhcpstart")
    restricted = "restrict" in options and _bool("restrict", options["restrict"])
    if "open" in options:
        is_open = _bool("open", options["open"])
        if is_open and restricted:
            raise ValueError("slirp: open and restrict=on contradict each other")
        restricted = restricted or not is_open
    forwards = tuple(parse_hostfwd(str(options.get("hostfwd", ""))))
    for f in forwards:
        if f.guest_addr != ipaddress.IPv4Address(0):
            _inside(net, f.guest_addr, f"hostfwd rule {f.rule!r}: guest address")
    return SlirpConfig(net, host, dhcp, dns, restricted, options.get("hostname"), options.get("domainname"),
                       forwards)
