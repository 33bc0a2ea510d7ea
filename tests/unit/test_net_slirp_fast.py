"""The compiled slirp loop (``vmmshim/backends/slirpfast.c``, ``slirp_fast.py``) with hostile frames and full
buffers, over the real libslirp; its ordinary exchanges (DHCP, ARP, hostfwd, TSO) run in ``test_net_slirp.py`` and
``test_net_offload.py`` beside the Python backend.

Checked: frames whose virtio-net header points outside them, GSO frames whose lengths disagree or are not TCP,
runts and a frame larger than the loop's buffer are dropped and counted, and the loop goes on answering; frames for
a guest that reads nothing are dropped once the socketpair is full, without holding the loop up; the opener picks
the Python backend when asked for it; the device's receive thread, woken once a round, leaves no frame behind.
"""

import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_net_slirp import GATEWAY, GUEST, arp_request, needs_libslirp, parse
from vmmshim.backends import offload as O
from vmmshim.backends import slirp as S
from vmmshim.backends import slirp_fast as SF
from vmmshim.backends import slirp_options as SO

pytestmark = [needs_libslirp, pytest.mark.skipif(SF.unavailable() is not None,
                                                  reason=f"the compiled slirp loop: {SF.unavailable()}")]
MAC = bytes.fromhex("020000000001")
HL = 12
WAIT_S = 5


@pytest.fixture(scope="module")
def be():
    b = SF.SlirpFastBackend(SO.parse_options({}), announce=None)
    b.set_vnet_hdr_len(HL)
    yield b
    b.close()


def hdr(flags=0, gso=0, hdr_len=0, gso_size=0, start=0, off=0):
    return O.HDR.pack(flags, gso, hdr_len, gso_size, start, off) + b"\0\0"


def arp_answered(b):
    """Sends an ARP request for the gateway and waits for libslirp's reply."""
    got = bytearray(2048)
    while b.recv_into([memoryview(got)]) is not None:
        pass                                                    # what an earlier case left
    b.send([hdr(), arp_request(MAC, GUEST, GATEWAY)])
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        n = b.recv_into([memoryview(got)])
        if n and parse(bytes(got[HL:n])).get("op") == 2:
            return True
        time.sleep(0.002)
    return False


@given(st.binary(min_size=10, max_size=10), st.binary(max_size=2000))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_hostile_frames_are_dropped_and_the_loop_goes_on(be, h, frame):
    before = be.stats["tx_frames"] + be.stats["tx_dropped"]
    be.send([h + b"\0\0", frame])
    deadline = time.monotonic() + WAIT_S
    while be.stats["tx_frames"] + be.stats["tx_dropped"] == before and time.monotonic() < deadline:
        time.sleep(0.001)
    assert be.stats["tx_frames"] + be.stats["tx_dropped"] == before + 1


def test_bad_headers_are_dropped_and_counted(be):
    arp = arp_request(MAC, GUEST, GATEWAY)
    ip = bytes(14) + struct.pack("!BBH", 0x45, 0, 1000) + bytes(16)      # IPv4 whose length says 1000
    ip = ip[:12] + b"\x08\x00" + ip[14:]
    cases = [
        (hdr(O.F_NEEDS_CSUM, start=len(arp) - 1, off=0), arp),           # the field ends past the frame
        (hdr(O.F_NEEDS_CSUM, start=60000, off=60000), arp),
        (hdr(0, O.GSO_UDP, 42, 1400), arp),                                # UFO: not offered
        (hdr(O.F_NEEDS_CSUM, O.GSO_TCPV4, 54, 1400, 34, 16), ip),          # lengths disagree
        (hdr(), b"\x01" * 10),                                             # a runt
        (hdr(), bytes(70000)),                                             # more than the loop's buffer
    ]
    dropped = be.stats["tx_dropped"]
    for h, f in cases:
        be.send([h, f])
    deadline = time.monotonic() + WAIT_S
    while be.stats["tx_dropped"] < dropped + len(cases) and time.monotonic() < deadline:
        time.sleep(0.002)
    assert be.stats["tx_dropped"] == dropped + len(cases)
    assert arp_answered(be)


def test_a_guest_that_reads_nothing_loses_frames_not_the_loop(monkeypatch):
    monkeypatch.setattr(SF, "SOCKET_BUFFER", 4096)
    b = SF.SlirpFastBackend(SO.parse_options({}), announce=None)
    try:
        b.set_vnet_hdr_len(HL)
        for _ in range(400):
            b.send([hdr(), arp_request(MAC, GUEST, GATEWAY)])
        deadline = time.monotonic() + WAIT_S
        while b.stats["tx_frames"] < 400 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert b.stats["tx_frames"] == 400 and b.stats["rx_dropped"] > 0
        assert b.stats["rx_frames"] + b.stats["rx_dropped"] == 400
        assert arp_answered(b)                                   # read out, and it answers again
    finally:
        b.close()


def _receiver(b, per_call):
    """Starts the device's receive thread on ``b`` with a receive that takes at most ``per_call`` frames a call
    (and says it filled its batch when it took that many) and no more than the buffers posted; returns (frames,
    wakes, post), ``post(n)`` posting ``n`` more buffers as the driver does."""
    got, wakes, state = [], [0], {"buffers": 0}
    buf = bytearray(2048)

    def receive():
        wakes[0] += 1
        n = 0
        while n < per_call and state["buffers"] and b.recv_into([memoryview(buf)]) is not None:
            n += 1
            state["buffers"] -= 1
            got.append(1)
        return SF.RX_BATCH if n == per_call else n

    def post(n):
        state["buffers"] += n
        b.rx_kick()                                              # the device's, for a receive queue notify
    b.start_rx(lambda: state["buffers"] > 0, receive)
    return got, wakes, post


def _wait(cond):
    deadline = time.monotonic() + WAIT_S
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.002)
    return cond()


def test_the_receive_thread_is_woken_per_round_and_leaves_no_frame_behind():
    """The loop announces a round's frames once (an eventfd, not the socketpair): a receive that stops at its
    batch's limit is woken again for the rest, and frames that waited while the guest had no buffers are taken
    when it posts them, even after the announcement was consumed."""
    b = SF.SlirpFastBackend(SO.parse_options({}), announce=None)
    try:
        b.set_vnet_hdr_len(HL)
        got, wakes, post = _receiver(b, per_call=3)
        for _ in range(10):
            b.send([hdr(), arp_request(MAC, GUEST, GATEWAY)])
        assert _wait(lambda: b.stats["rx_frames"] == 10), b.stats
        time.sleep(0.05)
        assert got == [] and wakes[0] == 0, "no buffers: nothing taken"
        post(8)
        assert _wait(lambda: len(got) == 8), (len(got), wakes)
        assert wakes[0] >= 3, "three frames a call: woken again for the rest"
        time.sleep(0.05)
        assert len(got) == 8, "out of buffers"
        post(10)
        assert _wait(lambda: len(got) == 10), (len(got), wakes)
        before = wakes[0]
        for _ in range(2):
            b.send([hdr(), arp_request(MAC, GUEST, GATEWAY)])
        assert _wait(lambda: len(got) == 12), (len(got), wakes)
        assert wakes[0] > before
    finally:
        b.close()


def test_the_opener_gives_the_python_loop_when_asked():
    py = SF.open_backend(SO.parse_options({}), compiled=False, announce=None)
    try:
        assert type(py) is S.SlirpBackend
    finally:
        py.close()
    fast = SF.open_backend(SO.parse_options({}), compiled=True, announce=None)
    try:
        assert isinstance(fast, SF.SlirpFastBackend) and fast.accel is not None
        assert fast.fileno() >= 0 and fast._tx_fileno() >= 0
    finally:
        fast.close()
    assert fast.fileno() == -1
