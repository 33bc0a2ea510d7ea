"""The GDB stub's server (bhyve's ``usr.sbin/bhyve/gdb.c`` in its behaviour; the packets as the GDB manual's
appendix E "GDB Remote Serial Protocol" documents them): one debugger at a time on a TCP port, all-stop mode.

Every vCPU is a gdb thread (id = vCPU + 1). While gdb holds the guest every vCPU is parked here: held through
``vm_suspend_cpu`` (a ``VM_EXITCODE_DEBUG`` exit), or stopped by its own event (``VM_EXITCODE_BPT`` at a
breakpoint, ``VM_EXITCODE_MTRAP`` after a step, ``VM_EXITCODE_DB`` at a debug register), each event queued and
reported in turn, as gdb's all-stop mode wants: a second vCPU's breakpoint, hit before the first stop held it, is
reported at the next ``c`` without resuming anything. A step runs only the stepping vCPU (with
``VM_CAP_MTRAP_EXIT`` and ``VM_CAP_MASK_HWINTR``), other vCPUs' pending stops or not (gdb steps one thread over its
breakpoint before it continues), and its stop is reported first. A debug-register match is resolved to its
breakpoint or watchpoint when it happens (gdb moves them between slots while the guest is held). An int3 that is
not gdb's is given back to the guest as its #BP. A connection starts by holding the guest (as bhyve's); ``D`` or a
lost connection removes the breakpoints and lets the guest run on; ``k`` ends the VM. What the provider cannot do
(``vm_features``: no ``debug-step``/``debug-bp``/``debug-hw``) is answered ``E`` at once, never with a wait.

Packets: ``qSupported`` (PacketSize, qXfer:features:read, swbreak, hwbreak), ``qXfer:features:read``, ``?``,
``g``/``G``, ``p``/``P``, ``m``/``M``/``X``, ``c``/``s``/``vCont``, ``Z0``-``Z4``/``z0``-``z4``, Ctrl-C, ``D``,
``k``, ``H``, ``T``, ``qfThreadInfo``/``qsThreadInfo``, ``qC``, ``qAttached``, ``qThreadExtraInfo``.

Not supported: non-stop mode, ``QStartNoAckMode``, ``C``/``S`` signals (ignored: the guest is not a process), the
``vCont`` of several threads at once (the first ``s`` action steps, else everything continues), ``qOffsets``.
"""

import errno
import os
import select
import socket
import sys
import threading
import time

from ops.vmm_ops import VmCapType, VmExitCode as E, VmRegName as R

from . import rsp
from .target import HW_TYPE_OF_Z, REGISTERS, Z_ACCESS, Z_READ, Z_SOFT, Z_WRITE, Target, target_xml

SIGINT, SIGTRAP = 2, 5
PARK_TIMEOUT_S = 5.0                 # how long a stop waits for every vCPU to park
POLL_S = 0.05
ERR_FAULT, ERR_INVAL, ERR_NOSUP = "E14", "E16", "E01"
WATCH_WORD = {Z_WRITE: "watch", Z_READ: "rwatch", Z_ACCESS: "awatch"}
NO_STEP, NO_BP, NO_HW, NO_WATCH = "debug-step", "debug-bp", "debug-hw", "debug-watch"
Z_SOFT_IN_HW = -1                    # a Z0 kept in a debug register


class GdbStub:
    def __init__(self, vm, address, port, wait=False, log=None):
        self.vm, self.ops, self.vmi = vm, vm.ops, vm.vmi
        self.target = Target(self.ops, self.vmi)
        self.features = self.target.features
        self.log = log or (lambda msg: print(f"vmmshim: gdb: {msg}", file=sys.stderr))
        self.cv = threading.Condition()
        self.held = False
        self.parked = set()
        self.releases = 0            # how many times the guest was let run: a parked vCPU leaves at the next one
        self.events = []             # (vcpu, kind, info) stops not reported yet
        self.run_only = None         # the vCPU a step lets run while the rest stay held
        self.stepping = None         # the vCPU whose step gdb waits for: its stop is reported first
        self.conn = None
        self.vcpus = list(range(vm.config.ncpus))
        self.gthread = self.cthread = 0
        self.closed = False
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((address, port))
        except OSError as exc:
            self.sock.close()
            raise OSError(exc.errno, f"gdb.port {address}:{port}: {exc.strerror}") from None
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        if wait:
            self._hold()
        self.log(f"listening on {address}:{self.port}" + (", the guest waits for gdb" if wait else ""))
        threading.Thread(target=self._serve, name="gdb", daemon=True).start()

    def close(self):
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
        with self.cv:
            self.held, self.run_only = False, None
            self.cv.notify_all()

    # -- the vCPU side (VM exit handlers) -----------------------------------------------------------------------
    def vcpu_exit(self, vcpu, vmexit):
        """A debug exit on ``vcpu``'s thread: park until gdb lets this vCPU run."""
        code = vmexit.exitcode
        event = None
        if code == E.VM_EXITCODE_BPT:
            if not self.target.is_breakpoint(vcpu, vmexit.rip):
                self.ops.vm_inject_exception(self.vmi, vcpu, 3)      # the guest's own int3: its #BP
                return
            event = (vcpu, "bp", vmexit.rip)
        elif code == E.VM_EXITCODE_MTRAP:
            event = (vcpu, "step", None)
        elif code == E.VM_EXITCODE_DB:
            event = (vcpu, "hw", self.target.hw_hit(vmexit.u.dr6))    # the slots as they are at the match
        with self.cv:
            if self.closed or (self.conn is None and not self.held):
                return
            if event is not None:
                if self.run_only == vcpu:
                    self._stop_stepping(vcpu)
                self.events.append(event)
                if not self.held:
                    self._hold()
            self.parked.add(vcpu)
            self.cv.notify_all()
            releases = self.releases
            while self.held and self.releases == releases and self.run_only != vcpu and not self.closed:
                self.cv.wait()
            self.parked.discard(vcpu)

    def _hold(self):
        self.held = True
        self.ops.vm_suspend_cpu(self.vmi, -1)

    def _release(self):
        """Lets every vCPU run; none counts as parked from here on (a stop reported later waits for them all
        to park again, even those whose threads have not woken yet)."""
        self.held, self.run_only = False, None
        self.releases += 1
        self.parked.clear()
        self.ops.vm_resume_cpu(self.vmi, -1)
        self.cv.notify_all()

    def _stop_stepping(self, vcpu):
        self.run_only = None
        self.ops.vmsetcap(self.vmi, vcpu, VmCapType.VM_CAP_MTRAP_EXIT, 0)
        self.ops.vmsetcap(self.vmi, vcpu, VmCapType.VM_CAP_MASK_HWINTR, 0)
        self.ops.vm_suspend_cpu(self.vmi, vcpu)

    def _all_parked(self):
        alive = {v for v, t in self.vm.threads.items() if t.is_alive()}
        return alive <= self.parked

    def _wait_parked(self):
        end = time.monotonic() + PARK_TIMEOUT_S
        with self.cv:
            while not self._all_parked() and time.monotonic() < end:
                self.cv.wait(POLL_S)

    # -- the connection ---------------------------------------------------------------------------------------
    def _serve(self):
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.cv:
                self.conn = conn
                if not self.held:
                    self._hold()
            try:
                self._session(conn)
            except OSError as exc:
                self.log(f"connection lost: {exc.strerror or exc}")
            finally:
                conn.close()
                with self.cv:
                    self.conn = None
                    if not self.closed:
                        self._detach()

    def _session(self, conn):
        reader = rsp.Reader()
        self.waiting = False         # gdb waits for a stop reply (after c, s, vCont)
        while not self.closed:
            if self.waiting:
                reply = self._next_stop()
                if reply is not None:
                    self.waiting = False
                    self._send(conn, reply)
            r, _, _ = select.select([conn], [], [], POLL_S)
            if not r:
                continue
            data = conn.recv(65536)
            if not data:
                return
            for kind, arg in reader.feed(data):
                if kind == "bad":
                    conn.sendall(rsp.NAK)
                elif kind == "interrupt":
                    with self.cv:
                        if not self.held:
                            self._hold()
                        self.events.append((self.cthread, "interrupt", None))
                elif kind == "packet":
                    conn.sendall(rsp.ACK)
                    reply = self._packet(arg)
                    if reply == "detach":
                        self._send(conn, "OK")
                        return
                    if reply is not None:
                        self._send(conn, reply)

    @staticmethod
    def _send(conn, reply):
        conn.sendall(rsp.frame(reply.encode() if isinstance(reply, str) else reply))

    def _next_stop(self):
        """The stop reply for the next event once every vCPU is parked, or None to wait on."""
        with self.cv:
            if not self.events or not self._all_parked():
                return None
            mine = [i for i, e in enumerate(self.events) if e[0] == self.stepping]
            vcpu, kind, info = self.events.pop(mine[0] if mine else 0)
            self.stepping = None
        self.gthread = self.cthread = vcpu
        return self._stop_reply(vcpu, kind, info)

    def _stop_reply(self, vcpu, kind, info):
        tid = f"thread:{vcpu + 1:x};"
        if kind == "interrupt":
            return f"T{SIGINT:02x}{tid}"
        if kind == "bp":
            return f"T{SIGTRAP:02x}swbreak:;{tid}"
        if kind == "hw":
            hit = info
            if hit is not None and hit[0] in WATCH_WORD:
                return f"T{SIGTRAP:02x}{WATCH_WORD[hit[0]]}:{hit[1]:x};{tid}"
            if hit is not None and hit[0] == Z_SOFT:
                return f"T{SIGTRAP:02x}swbreak:;{tid}"
            return f"T{SIGTRAP:02x}hwbreak:;{tid}"
        return f"T{SIGTRAP:02x}{tid}"

    def _valid_events(self):
        """Drops queued breakpoint stops whose breakpoint gdb removed since (the vCPU runs the instruction)."""
        self.events = [e for e in self.events if e[1] != "bp" or self.target.is_breakpoint(e[0], e[2])]

    def _detach(self):
        try:
            self.target.clear(self.vcpus)
        except OSError as exc:
            self.log(f"detach: {exc.strerror or exc}")
        for v in self.vcpus:
            for cap in (VmCapType.VM_CAP_MTRAP_EXIT, VmCapType.VM_CAP_BPT_EXIT, VmCapType.VM_CAP_MASK_HWINTR):
                try:
                    self.ops.vmsetcap(self.vmi, v, cap, 0)
                except OSError:
                    pass
        self.events, self.stepping = [], None
        self._release()

    # -- packets ----------------------------------------------------------------------------------------------
    def _packet(self, data):
        try:
            return self._dispatch(data)
        except OSError as exc:
            if os.environ.get("VMMSHIM_DEBUG"):
                self.log(f"{data[:40]!r}: {exc}")
            return ERR_FAULT if exc.errno == errno.EFAULT else ERR_INVAL if exc.errno in (
                errno.EINVAL, errno.EPERM) else ERR_NOSUP
        except (ValueError, IndexError, KeyError):
            return ERR_INVAL

    def _dispatch(self, data):
        cmd, rest = chr(data[0]), data[1:]
        text = rest.decode("latin-1")
        if cmd == "q":
            return self._query(text)
        if cmd == "?":
            self._wait_parked()
            return f"T{SIGTRAP:02x}thread:{self.gthread + 1:x};"
        if cmd == "g":
            return self.target.read_registers(self.gthread)
        if cmd == "G":
            self.target.write_registers(self.gthread, bytes.fromhex(text))
            return "OK"
        if cmd == "p":
            return self.target.read_register(self.gthread, int(text, 16))
        if cmd == "P":
            num, value = text.split("=")
            if int(num, 16) >= len(REGISTERS):
                return ERR_INVAL
            self.target.write_register(self.gthread, int(num, 16), bytes.fromhex(value))
            return "OK"
        if cmd == "m":
            addr, length = (int(x, 16) for x in text.split(","))
            return self.target.read_memory(self.gthread, addr, min(length, rsp.MAX_PACKET // 2)).hex()
        if cmd == "M":
            head, value = text.split(":")
            addr, _ = (int(x, 16) for x in head.split(","))
            self.target.write_memory(self.gthread, addr, bytes.fromhex(value))
            return "OK"
        if cmd == "X":
            colon = rest.index(b":")
            addr, length = (int(x, 16) for x in rest[:colon].decode().split(","))
            payload = rsp.unescape(rest[colon + 1:])
            if length:
                self.target.write_memory(self.gthread, addr, payload[:length])
            return "OK"
        if cmd in "csCS":                    # C/S: the signal is dropped (the guest is no process)
            return self._resume(self.cthread, cmd in "sS", text if cmd in "cs" else text.partition(";")[2])
        if cmd == "v":
            return self._vpacket(text)
        if cmd in "Zz":
            return self._breakpoint(cmd == "Z", text)
        if cmd == "H":
            tid = int(text[1:], 16) if text[1:] not in ("", "-1") else 0
            if tid and tid - 1 not in self.vcpus:
                return ERR_INVAL
            setattr(self, "gthread" if text[0] == "g" else "cthread", tid - 1 if tid > 0 else 0)
            return "OK"
        if cmd == "T":
            return "OK" if int(text, 16) - 1 in self.vcpus else ERR_INVAL
        if cmd == "D":
            return "detach"
        if cmd == "k":
            self.log("killed by the debugger")
            self.vm.stop(4, "killed by the debugger (gdb k)")
            return "detach"
        return ""

    def _query(self, text):
        if text.startswith("Supported"):
            return f"PacketSize={rsp.MAX_PACKET:x};qXfer:features:read+;swbreak+;hwbreak+;vContSupported+"
        if text.startswith("Xfer:features:read:"):
            annex, _, span = text[len("Xfer:features:read:"):].partition(":")
            if annex != "target.xml":
                return "E00"
            off, length = (int(x, 16) for x in span.split(","))
            xml = target_xml()
            chunk = xml[off:off + length]
            return (b"m" if off + length < len(xml) else b"l") + rsp.escape(chunk)
        if text == "fThreadInfo":
            return "m" + ",".join(f"{v + 1:x}" for v in self.vcpus)
        if text == "sThreadInfo":
            return "l"
        if text == "C":
            return f"QC{self.gthread + 1:x}"
        if text.startswith("Attached"):
            return "1"
        if text.startswith("ThreadExtraInfo,"):
            v = int(text.split(",")[1], 16) - 1
            return f"vCPU {v}".encode().hex()
        return ""

    def _vpacket(self, text):
        if text == "Cont?":
            return "vCont;c;C;s;S"
        if text.startswith("Cont;"):
            step = None
            for action in text[5:].split(";"):
                what, _, tid = action.partition(":")
                if what[0] in "sS":
                    step = int(tid, 16) - 1 if tid and tid != "-1" else self.cthread
                    break
            return self._resume(step if step is not None else self.cthread, step is not None, "")
        if text.startswith("Kill"):
            self.vm.stop(4, "killed by the debugger (gdb vKill)")
            return "OK"
        return ""

    def _resume(self, vcpu, step, addr):
        if step and NO_STEP not in self.features:
            return ERR_NOSUP
        if vcpu not in self.vcpus:
            return ERR_INVAL
        if addr:
            self.ops.vmsetreg(self.vmi, vcpu, R.VM_REG_GUEST_RIP, int(addr, 16))
        with self.cv:
            self._valid_events()
            self.waiting = True
            # A stop not reported yet (all-stop: a second vCPU's breakpoint) is reported at the next continue, and
            # nothing runs; a step of another vCPU (gdb stepping over a breakpoint) runs and is reported first.
            if any(e[0] == vcpu for e in self.events) or (self.events and not step):
                return None
            if step:
                if vcpu not in self.parked:
                    self.waiting = False
                    return ERR_INVAL         # not started yet: nothing to step
                self.stepping = vcpu
                self.parked.discard(vcpu)    # running now: its stop is the one to wait for
                self.ops.vmsetcap(self.vmi, vcpu, VmCapType.VM_CAP_MASK_HWINTR, 1)
                self.ops.vmsetcap(self.vmi, vcpu, VmCapType.VM_CAP_MTRAP_EXIT, 1)
                self.run_only = vcpu
                self.ops.vm_resume_cpu(self.vmi, vcpu)
                self.cv.notify_all()
            else:
                self._release()
        return None

    def _breakpoint(self, insert, text):
        ztype, addr, kind = (int(x, 16) for x in text.split(";")[0].split(","))
        if ztype == Z_SOFT and NO_BP not in self.features and NO_HW in self.features:
            ztype = Z_SOFT_IN_HW         # no int3 trap (kvm_pvm): a debug register does it
        if ztype == Z_SOFT_IN_HW:
            if insert:
                self.target.insert_hw(self.vcpus, Z_SOFT, addr, 1)
            else:
                self.target.remove_hw(self.vcpus, Z_SOFT, addr, 1)
            return "OK"
        if ztype == Z_SOFT:
            if NO_BP not in self.features:
                return ERR_NOSUP
            if insert:
                for v in self.vcpus:
                    self.ops.vmsetcap(self.vmi, v, VmCapType.VM_CAP_BPT_EXIT, 1)
                self.target.insert_soft(self.gthread, addr)
            else:
                self.target.remove_soft(self.gthread, addr)
            return "OK"
        if ztype in HW_TYPE_OF_Z:
            if NO_HW not in self.features or (ztype in WATCH_WORD and NO_WATCH not in self.features):
                return ""                    # gdb falls back (software watchpoints, or says it cannot)
            if insert:
                self.target.insert_hw(self.vcpus, ztype, addr, kind)
            else:
                self.target.remove_hw(self.vcpus, ztype, addr, kind)
            return "OK"
        return ""
