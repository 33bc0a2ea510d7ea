"""Inside L1: a Linux guest on vmmshim's user-mode network (``-s 4,virtio-net,slirp,hostfwd=...``, libslirp) and on a
tap at once, with vmmshim run by an unprivileged user: ``python3 -m vmmshim.lab.slirp_check [--tries N]``.

L1 (root) prepares what only root may: a user ``vmmshim-lab`` (in the ``kvm`` group, ``/dev/kvm`` opened to it),
a persistent tap ``tap1`` owned by that user (10.0.3.1/24), and servers on L1's loopback: an HTTP server
(:data:`HTTP_PORT`, serving :data:`FILE_NAME`) and a :class:`~vmmshim.lab.l2vm.Sink` (:data:`SINK_PORT`). Then
vmmshim runs as ``vmmshim-lab`` (``setpriv``), with no root and no host network configuration for the slirp NIC.
The guest (:data:`GUEST_SCRIPT`) prints ``VX-*`` lines:

- ``VX-LEASE ip router dns`` from busybox ``udhcpc`` on the slirp NIC (slot 4);
- ``VX-HTTP`` the sha256 of the file ``wget`` fetched from ``http://10.0.2.2:HTTP_PORT/`` (L1's loopback);
- ``VX-SEND`` nc's status sending a file to 10.0.2.2:SINK_PORT (L1's Sink);
- ``VX-IN`` the sha256 of what arrived on the guest's ``nc -l`` through the first ``hostfwd`` rule, which L1
  sends to once the guest says ``VX-LISTEN-IN``; ``VX-LISTEN-OUT`` then serves a file on the second rule,
  which L1 reads (``out`` in the result);
- ``VX-TAP-PING`` the status of pings to 10.0.3.1 over the tap NIC (slot 5, 10.0.3.15/24).

The result is one line ``SLIRP-RESULT {json}`` (:func:`parse_result`), then the console, each line prefixed
with ``slirp| ``.

Not supported: DNS through 10.0.2.3 (L1 has no resolver to forward to), IPv6.
"""

import argparse
import functools
import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import threading
import time

from vmmshim.lab import l2vm
from vmmshim.lab.guest import encode_run
from vmmshim.lab.virtio_check import vx_lines

MiB = 1 << 20
USER = "vmmshim-lab"
TAP, TAP_HOST, TAP_GUEST = "tap1", "10.0.3.1", "10.0.3.15"
HTTP_PORT, SINK_PORT, IN_PORT, OUT_PORT = 8000, 5000, 7000, 7001
FILE_NAME = "blob"
LOOPBACK = "127.0.0.1"
MARKER_TIMEOUT_S = 180      # a slow L1 (TCG on a loaded host) takes the guest well past l2vm's 100 s to its shell
HOSTFWD_RE = re.compile(r"slirp hostfwd tcp 127\.0\.0\.1:(\d+) -> [\d.]+:(\d+)")

GUEST_SCRIPT = f"""\
s256(){{ sha256sum | cut -d' ' -f1; }}
for i in /sys/class/net/eth*; do
  case $(readlink -f $i/device) in *:04.0/*) S=${{i##*/}} ;; *:05.0/*) T=${{i##*/}} ;; esac
done
cat >/tmp/dhcp.sh <<'EOF'
#!/bin/sh
case "$1" in bound|renew)
  ip addr add "$ip/$mask" dev "$interface"; ip link set "$interface" up
  ip route add default via "$router"; echo "VX-LEASE $ip $router $dns" ;;
esac
EOF
chmod +x /tmp/dhcp.sh
echo VX-NICS slirp=$S tap=$T
ip link set $S up
udhcpc -i $S -n -q -t 5 -s /tmp/dhcp.sh; echo VX-DHCP $?
wget -q -O /tmp/f http://10.0.2.2:{HTTP_PORT}/{FILE_NAME}; echo VX-WGET $?
echo VX-HTTP $(s256 </tmp/f)
head -c 1048576 /tmp/f | nc 10.0.2.2 {SINK_PORT}; echo VX-SEND $?
nc -l -p {IN_PORT} </dev/null >/tmp/in & sleep 2; echo VX-LISTEN-IN; wait $!; echo VX-IN $(s256 </tmp/in)
nc -l -p {OUT_PORT} </tmp/f & sleep 2; echo VX-LISTEN-OUT; wait $!; echo VX-OUT $?
ip addr add {TAP_GUEST}/24 dev $T; ip link set $T up
ping -c 3 -W 5 {TAP_HOST} >/dev/null; echo VX-TAP-PING $?
"""


def _prepare_user(workdir):
    """The unprivileged user, its tap and its writable directories; returns the environment vmmshim runs in."""
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", USER], check=True)
    subprocess.run(["chown", USER, workdir], check=True)
    for dev in ("/dev/kvm", "/dev/net/tun"):     # 0666 by Debian's udev rules; L1's bare devtmpfs has 0600
        os.chmod(dev, 0o666)
    if not os.path.exists(f"/sys/class/net/{TAP}"):
        subprocess.run(["ip", "tuntap", "add", TAP, "mode", "tap", "user", USER], check=True)
        subprocess.run(["ip", "addr", "add", f"{TAP_HOST}/24", "dev", TAP], check=True)
    subprocess.run(["ip", "link", "set", TAP, "up"], check=True)
    return {**os.environ, "HOME": workdir, "VMMSHIM_CACHE": f"{workdir}/cache"}


def _http_server(directory):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer((LOOPBACK, HTTP_PORT), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


class _Forwards:
    """Watches the console and vmmshim's stderr: sends ``data`` to the guest's first forwarded port when the guest
    listens, and reads its second."""

    def __init__(self, errpath, data):
        self.errpath, self.data = errpath, data
        self.ports, self.sent, self.out = {}, None, None
        self._busy = set()

    def _read_ports(self):
        try:
            with open(self.errpath) as f:
                for host, guest in HOSTFWD_RE.findall(f.read()):
                    self.ports[int(guest)] = int(host)
        except FileNotFoundError:
            pass

    def watch(self, console):
        if not self.ports:
            self._read_ports()
        if "VX-LISTEN-IN" in console and "in" not in self._busy:
            self._busy.add("in")
            threading.Thread(target=self._send, daemon=True).start()
        if "VX-LISTEN-OUT" in console and "out" not in self._busy:
            self._busy.add("out")
            threading.Thread(target=self._receive, daemon=True).start()

    def _connect(self, guest_port):
        time.sleep(1)                       # the guest says so 2 s after it started nc -l
        return socket.create_connection((LOOPBACK, self.ports[guest_port]), timeout=60)

    def _send(self):
        try:
            with self._connect(IN_PORT) as c:
                c.sendall(self.data)
                c.shutdown(socket.SHUT_WR)
                c.recv(1)
            self.sent = hashlib.sha256(self.data).hexdigest()
        except (OSError, KeyError) as exc:
            self.sent = f"error {exc}"

    def _receive(self):
        try:
            with self._connect(OUT_PORT) as c:
                got = bytearray()
                while True:
                    chunk = c.recv(1 << 16)
                    if not chunk:
                        break
                    got += chunk
            self.out = {"bytes": len(got), "sha256": hashlib.sha256(got).hexdigest()}
        except (OSError, KeyError) as exc:
            self.out = {"error": str(exc)}


def run(tries=3, workdir="/tmp/slirp", timeout=300.0):
    os.makedirs(workdir, exist_ok=True)
    env = _prepare_user(workdir)
    blob, sent_in = l2vm.pattern(MiB, b"http"), l2vm.pattern(MiB // 2, b"in")
    with open(os.path.join(workdir, FILE_NAME), "wb") as f:
        f.write(blob)
    http_srv, sink = _http_server(workdir), l2vm.Sink(SINK_PORT, host=LOOPBACK)
    console = f"{workdir}/console.txt"
    fwd = _Forwards(console + ".err", sent_in)
    append = f"{l2vm.BASE_APPEND} {encode_run(GUEST_SCRIPT)}"
    hostfwd = f"hostfwd=tcp:{LOOPBACK}:0-:{IN_PORT};tcp:{LOOPBACK}:0-:{OUT_PORT}"

    def argv():
        base = l2vm.vmmshim_argv(append, console)
        at = base.index("-l")
        # setpriv execs vmmshim itself (runuser would fork it, and a killed hung try would leave it holding tap1)
        nics = ["-s", f"4,virtio-net,slirp,{hostfwd}", "-s", f"5,virtio-net,{TAP}"]
        return ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups", "--"] + base[:at] + nics + base[at:]
    try:
        old = dict(os.environ)
        os.environ.update(env)              # boot() starts the VMM with this process's environment
        res, hangs = l2vm.boot_retry(argv, console, tries=tries, timeout=timeout, watch=fwd.watch,
                                     marker_timeout=MARKER_TIMEOUT_S)
    finally:
        os.environ.clear()
        os.environ.update(old)
        http_srv.shutdown()
        sink.close()
    result = dict(status=res.status, up=res.up, powered_off=res.powered_off, hangs=hangs, total_s=res.total_s,
                  stderr=res.stderr[-1500:], vx=vx_lines(res.console), ports=fwd.ports, sent_in=fwd.sent,
                  out=fwd.out, sink=sink.results[-1] if sink.results else None,
                  expect=dict(http=hashlib.sha256(blob).hexdigest(), sink=hashlib.sha256(blob[:MiB]).hexdigest(),
                              into_guest=hashlib.sha256(sent_in).hexdigest()), user=USER)
    print("SLIRP-RESULT " + json.dumps(result), flush=True)
    for line in res.console.splitlines():
        print("slirp| " + line)
    return result


def parse_result(stdout):
    """``(result dict or None, console)`` from the output of this module."""
    m = re.search(r"^SLIRP-RESULT (\{.*\})$", stdout, re.M)
    console = "\n".join(line[len("slirp| "):] for line in stdout.splitlines() if line.startswith("slirp| "))
    return (json.loads(m.group(1)) if m else None), console


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tries", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    run(args.tries, timeout=args.timeout)


if __name__ == "__main__":
    main()
