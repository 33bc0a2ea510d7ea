"""Inside L1: Debian's gdb attached to the default guest mid-boot through vmmshim's gdb stub (``-G PORT``, issue
22): ``python3 -m vmmshim.lab.gdb_check [--tries N]``.

vmmshim boots the guest with ``-G 127.0.0.1:PORT`` (no ``w``: the guest runs at once). When the console shows the
kernel's first line, L1 runs ``gdb -batch`` (no symbol file: the stub's target description tells gdb the
registers): ``target remote`` (the stub stops every vCPU), ``p/x $pc``, ``$cs``, ``x/i $pc`` and ``info threads``,
then ``continue``; :data:`RUN_S` seconds later L1 sends gdb SIGINT, which gdb turns into an interrupt packet
(Ctrl-C), and once the guest has stopped again gdb reads ``$pc``, ``$cs`` and ``x/i $pc`` once more and detaches.
The guest must then reach its shell marker and power off (status 1). The interrupt may find the guest in its
kernel or in user space (the guest's init), which ``$cs`` tells apart.

The result is one line ``GDB-RESULT {json}`` (:func:`parse_result`): ``up``, ``status``, ``attached_at`` (console
bytes before gdb attached), ``pcs`` (the ``$pc`` values gdb printed), ``css`` (the ``$cs`` values), ``insns`` (the
``x/i`` lines), ``threads`` (``info threads`` lines), ``interrupted`` (gdb saw the guest stop on its SIGINT),
``detached``, ``gdb_status``, ``gdb_out`` (gdb's output), ``stderr`` (vmmshim's), and the console after it, each
line prefixed ``gdb| ``.
"""

import argparse
import json
import os
import pty
import re
import signal
import subprocess
import threading
import time

from vmmshim.lab import l2vm
from vmmshim.lab.guest import encode_run

PORT = 1234
RUN_S = 3.0                 # gdb lets the guest run this long before its interrupt
ATTACH_AT = "Linux version"  # the kernel's first console line: mid-boot, long before the shell
GDB_TIMEOUT_S = 120
GUEST_SCRIPT = "echo VX-GDB-GUEST-RAN 0"
CS_PRINT = 'printf "CS=%#x\\n", $cs'   # the privilege level the stop found the vCPU at (CS's low two bits)
THREADS_DONE = re.compile(r"^[* ] +\d+ +Thread .*\r?\n(?![* ] +\d+ +Thread)", re.M)


def gdb_argv(port):
    ex = ["set pagination off", "set confirm off", f"target remote 127.0.0.1:{port}", "p/x $pc", CS_PRINT,
          "x/i $pc", "info threads", "continue", "p/x $pc", CS_PRINT, "x/i $pc", "detach"]
    return ["gdb", "-nx", "-batch", *[a for e in ex for a in ("-ex", e)]]


class Attacher:
    """Watches the console; at :data:`ATTACH_AT` runs gdb in a thread, and interrupts it after :data:`RUN_S`."""

    def __init__(self, port):
        self.port = port
        self.thread = None
        self.attached_at = None
        self.out = ""
        self.status = None

    def watch(self, console):
        if self.thread is None and ATTACH_AT in console:
            self.attached_at = len(console)
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _run(self):
        # gdb's stdout on a pty: line by line (on a pipe it holds its output back until it exits)
        master, slave = pty.openpty()
        p = subprocess.Popen(gdb_argv(self.port), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
        os.close(slave)
        chunks = []

        def read():
            while True:
                try:
                    data = os.read(master, 4096)
                except OSError:             # EIO: gdb exited and closed the pty
                    return
                if not data:
                    return
                chunks.append(data.decode(errors="replace"))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + GDB_TIMEOUT_S
        # batch mode prints no "Continuing.": the table of ``info threads`` is the last output before ``continue``
        while time.monotonic() < deadline and not THREADS_DONE.search("".join(chunks)) and p.poll() is None:
            time.sleep(0.1)
        if p.poll() is None:
            time.sleep(RUN_S)
            p.send_signal(signal.SIGINT)        # gdb sends the stub its interrupt (0x03)
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        reader.join(5)
        os.close(master)
        self.out, self.status = "".join(chunks).replace("\r\n", "\n"), p.returncode


def summarize(out):
    """What gdb printed: the ``$pc`` values, the ``x/i`` lines, the thread lines, interrupt and detach."""
    return dict(pcs=re.findall(r"^\$\d+ = (0x[0-9a-f]+)", out, re.M),
                css=re.findall(r"^CS=(0x[0-9a-f]+)", out, re.M),
                insns=re.findall(r"^=> (0x[0-9a-f]+.*)$", out, re.M),
                threads=re.findall(r"^[* ] +\d+ +Thread .*$", out, re.M),
                interrupted=bool(re.search(r"received signal SIGINT", out)),
                detached=bool(re.search(r"^\[Inferior \d+ \(.*\) detached\]|^Detaching from", out, re.M)))


def parse_result(stdout):
    m = re.search(r"^GDB-RESULT (\{.*\})$", stdout, re.M)
    console = "\n".join(line[5:] for line in stdout.splitlines() if line.startswith("gdb| "))
    return (json.loads(m.group(1)) if m else None), console


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tries", type=int, default=3, help="boots while the guest hangs before gdb could attach")
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args(argv)
    console = "/tmp/gdb-console.txt"
    append = f"{l2vm.BASE_APPEND} {encode_run(GUEST_SCRIPT)}"
    for _ in range(args.tries):
        att = Attacher(PORT)
        res = l2vm.boot(l2vm.vmmshim_argv(append, console, opts=["-G", f"127.0.0.1:{PORT}"]), console,
                        timeout=args.timeout, marker_timeout=args.timeout, watch=att.watch)
        if att.thread is not None:
            att.thread.join(GDB_TIMEOUT_S)
        if res.marker_s is not None or att.thread is not None:
            break
    result = dict(up=res.marker_s is not None, status=res.status, attached_at=att.attached_at,
                  gdb_status=att.status, gdb_out=att.out[-4000:], stderr=res.stderr[-1500:],
                  powered_off=res.powered_off, **summarize(att.out))
    print("GDB-RESULT " + json.dumps(result), flush=True)
    for line in res.console.splitlines():
        print("gdb| " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
