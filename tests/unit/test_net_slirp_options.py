"""The slirp backend's options and names (``vmmshim/backends/slirp_options.py``, ``slirp_ffi.py``,
``open_backend``): bhyve's and QEMU's options and their one-line errors, ``SlirpConfig``'s layout, a missing
libslirp, the backend names ``open_backend`` takes, and two NICs from the command line. The backend over libslirp
with a guest's frames: ``test_net_slirp.py``.
"""

import errno

import pytest

from bhyve_devices.pci import registry
from bhyve_devices.virtio import net as N
from vmmshim import backends
from vmmshim.backends import net as NB
from vmmshim.backends import slirp as S
from vmmshim.backends import slirp_ffi
from vmmshim.backends import slirp_options as SO
from vmmshim.config import Config, parse_slot
from tests.unit.test_net_slirp import needs_libslirp


# ---- options --------------------------------------------------------------------------------------------------------
def test_defaults_are_qemus_user_network():
    c = SO.parse_options({})
    assert (str(c.net), str(c.host), str(c.dns), str(c.dhcpstart)) == ("10.0.2.0/24", "10.0.2.2", "10.0.2.3",
                                                                       "10.0.2.15")
    assert not c.restricted and c.forwards == ()
    c = SO.parse_options(dict(net="192.168.7.0/255.255.255.0", host="192.168.7.1", dhcpstart="192.168.7.50",
                             hostname="g", domainname="example"))
    assert (str(c.net), str(c.host), str(c.dns), str(c.dhcpstart)) == ("192.168.7.0/24", "192.168.7.1",
                                                                       "192.168.7.3", "192.168.7.50")
    assert (c.hostname, c.domainname) == ("g", "example")


@pytest.mark.parametrize("opts,restricted", [({"restrict": "on"}, True), ({"restrict": "off"}, False),
                                             ({"restrict": "true"}, True), ({"open": "true"}, False),
                                             ({"open": "false"}, True), ({}, False)])
def test_restrict_and_bhyves_open(opts, restricted):
    assert SO.parse_options(opts).restricted is restricted


def test_hostfwd_rules_as_bhyve_writes_them():
    fs = SO.parse_hostfwd("tcp:127.0.0.1:2222-:22;udp::5353-10.0.2.15:53;;tcp::0-10.0.2.16:80")
    assert [(f.proto, str(f.host_addr), f.host_port, str(f.guest_addr), f.guest_port) for f in fs] == [
        ("tcp", "127.0.0.1", 2222, "0.0.0.0", 22), ("udp", "0.0.0.0", 5353, "10.0.2.15", 53),
        ("tcp", "0.0.0.0", 0, "10.0.2.16", 80)]


@pytest.mark.parametrize("opts,needle", [
    ({"hostfwd": "tcp:127.0.0.1:2222"}, "is malformed"), ({"hostfwd": "sctp::1-:2"}, "is malformed"),
    ({"hostfwd": "tcp:1.2.3:1-:2"}, "not an IPv4 address"), ({"hostfwd": "tcp::70000-:22"}, "bad port '70000'"),
    ({"hostfwd": "tcp::22-:0"}, "bad port '0'"), ({"hostfwd": "tcp::22-192.168.0.9:22"}, "guest address"),
    ({"restrict": "maybe"}, "expected on or off"), ({"open": "true", "restrict": "on"}, "contradict"),
    ({"net": "10.0.2.0/30"}, "too small"), ({"net": "nonsense"}, "not an IPv4 network"),
    ({"host": "10.0.3.2"}, "not a host address"), ({"ipv6": "on"}, "unknown option 'ipv6'")])
def test_bad_options_are_one_line(opts, needle):
    with pytest.raises(ValueError) as e:
        SO.parse_options(opts)
    assert needle in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("slirp: ")


def test_slirp_config_layout_is_libslirp_47s():
    """Offsets measured with gcc against Debian's libslirp-dev 4.7.0 headers (x86-64; NetBSD/amd64 is LP64 too)."""
    ffi = slirp_ffi.ffi
    assert ffi.sizeof("SlirpConfig") == 184 and ffi.sizeof("SlirpCb") == 88
    want = dict(vnetwork=12, vhost=20, in6_enabled=24, vprefix_addr6=28, vprefix_len=44, vhost6=48, vhostname=64,
                vdhcp_start=96, vnameserver=100, vnameserver6=104, vdnssearch=120, vdomainname=128, if_mtu=136,
                if_mru=144, disable_host_loopback=152, enable_emu=153, outbound_addr=160, disable_dns=176,
                disable_dhcp=177)
    assert {k: ffi.offsetof("SlirpConfig", k) for k in want} == want
    assert ffi.offsetof("SlirpCb", "notify") == 64 and ffi.offsetof("SlirpCb", "timer_new_opaque") == 80


def test_missing_libslirp_is_one_line(monkeypatch):
    monkeypatch.setattr(slirp_ffi, "LIBNAMES", ("libslirp-missing.so.9",))
    monkeypatch.setattr(slirp_ffi, "_loaded", {})
    with pytest.raises(OSError) as e:
        S.SlirpBackend(SO.parse_options({}))
    assert e.value.errno == errno.ENOENT and "libslirp0" in e.value.strerror and "\n" not in e.value.strerror


# ---- opening by name --------------------------------------------------------------------------------------------------
def slot_opts(spec):
    cfg = Config()
    parse_slot(spec, cfg)
    (_, slot, func, opts), = cfg.pci_slots()
    return {k: v for k, v in opts.items() if k != "device"} | dict(slot=slot, func=func, vmname="vm1")


def test_unknown_backend_names_are_refused():
    for name in ("nosuch", "eth0", "slir"):
        with pytest.raises(ValueError, match="the backends: tapN, vmnetN, slirp"):
            NB.open_backend(name)
    with pytest.raises(ValueError, match="a tap takes none"):
        NB.open_backend("tap0", {"hostfwd": "tcp::1-:2"})
    with pytest.raises(ValueError, match="without a backend"):
        backends.open_device_backends("virtio-net", slot_opts("2,virtio-net,hostfwd=tcp::1-:2"))
    with pytest.raises(ValueError, match="two backends"):
        backends.open_device_backends("virtio-net", slot_opts("2,virtio-net,slirp,stream=unix:/nonexistent"))


@needs_libslirp
def test_slirp_from_the_command_line_two_nics_two_macs():
    devs = [registry.create("virtio-net", backends.open_device_backends(
        "virtio-net", slot_opts(f"{slot},virtio-net,slirp,hostfwd=tcp:127.0.0.1:0-:22,restrict=on")))
        for slot in (2, 3)]
    try:
        assert all(isinstance(d.vdev.backend, S.SlirpBackend) and d.vdev.backend.config.restricted for d in devs)
        assert devs[0].vdev.mac != devs[1].vdev.mac
        assert devs[0].vdev.mac == N.genmac(2, 0, "vm1") and devs[1].vdev.mac == N.genmac(3, 0, "vm1")
        ports = [d.vdev.backend.forwards[0][2] for d in devs]
        assert ports[0] != ports[1]
    finally:
        for d in devs:
            d.close()
    legacy = backends.open_device_backends("virtio-net", "slirp,hostfwd=tcp:127.0.0.1:0-:22")
    assert isinstance(legacy["backend"], S.SlirpBackend)
    legacy["backend"].close()
