"""The control socket of a running VM (bhyve's checkpoint socket, ``/var/run/bhyve/checkpoint/VMNAME``, which
``bhyvectl --checkpoint``/``--suspend`` talk to) and the requests it serves for ``vmmshim ctl`` (``ctl.py``).

The socket is a Unix stream socket named after the VM (the ``name`` key) in :func:`run_dir`:
``/var/run/vmmshim`` for root, else ``$XDG_RUNTIME_DIR/vmmshim`` or ``/tmp/vmmshim-UID``; the directory is the
user's own (0700) and the socket 0600, so only its owner can talk to it. A live socket of the same name is another
VM's: this one then runs without a control socket (with a warning when it was given its name; VMs left with the
default name ``vm`` are many and say nothing). One request per connection, one JSON line each way:

- ``{"op": "checkpoint", "file": PATH}``: checkpoint and run on (``vmmshim/snapshot/checkpoint.py``);
  ``"suspend"``: checkpoint, then the VM ends with status 1;
- ``{"op": "pause"}`` / ``{"op": "resume"}``: every vCPU held / released;
- ``{"op": "status"}``: name, state (running, paused), vCPUs, memory, provider, uptime.

The reply is ``{"ok": true, ...}`` or ``{"ok": false, "error": ONE_LINE}``. A request that is not JSON, too long
(:data:`MAX_REQUEST`), or names an unknown op gets an error reply; nothing a client sends can end the VM but
``suspend``.

Not supported: bhyve's binary request format (``struct checkpoint_op``), migration requests.
"""

import json
import os
import socket
import sys
import threading
import time

MAX_REQUEST = 4096
CLOSE_JOIN_S = 2               # how long close() waits for the serving thread to end


def run_dir():
    if os.geteuid() == 0:
        return "/var/run/vmmshim"
    base = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(base, "vmmshim") if base and os.path.isdir(base) else f"/tmp/vmmshim-{os.geteuid()}"


def socket_path(name):
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"VM name {name!r} cannot name a control socket")
    return os.path.join(run_dir(), name)


class ControlSocket:
    def __init__(self, vm, path, sock):
        self.vm, self.path, self.sock = vm, path, sock
        self.started = time.monotonic()
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name="vmmshim-control", daemon=True)
        self.thread.start()

    @classmethod
    def open(cls, vm):
        """The VM's control socket, or None where it cannot be made: with a warning on stderr when the VM was
        named (``name``, the last argument), silently for the default name, which VMs run side by side share."""
        try:
            path = socket_path(vm.cfg.get("name"))
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            if _alive(path):
                raise OSError(f"{path} is in use (another VM of that name)")
            if os.path.lexists(path):
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            sock.listen(4)
        except (OSError, ValueError) as exc:
            if "name" in vm.cfg.explicit:
                print(f"vmmshim: no control socket: {exc}", file=sys.stderr)
            return None
        return cls(vm, path, sock)

    def close(self):
        """The serving thread sleeps in accept() (no polling: an idle VM's host core stays idle); one last
        connection of our own wakes it to see ``_stop``."""
        self._stop = True
        waker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            waker.settimeout(1)
            waker.connect(self.path)
        except OSError:
            pass
        finally:
            waker.close()
        self.thread.join(CLOSE_JOIN_S)
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _loop(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self._stop:
                conn.close()
                return
            with conn:
                conn.settimeout(5)
                try:
                    reply = self.handle(read_line(conn))
                except Exception as exc:  # noqa: BLE001 - a bad request never ends the VM
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    pass

    def handle(self, line):
        """The reply to one request line (see the module docstring)."""
        try:
            req = json.loads(line)
        except ValueError:
            return _error("the request is not JSON")
        if not isinstance(req, dict):
            return _error("the request is not a JSON object")
        op = req.get("op")
        serve = self.OPS.get(op) if isinstance(op, str) else None
        if serve is None:
            return _error(f"unknown request {op!r} ({', '.join(self.OPS)})")
        return serve(self, req)

    def _status(self, req):
        vm = self.vm
        return {"ok": True, "name": vm.cfg.get("name"), "state": "paused" if vm.pauser.holding else "running",
                "vcpus": vm.config.ncpus, "memory": vm.config.memsize, "provider": vm.ops.provider.name,
                "uptime_s": round(time.monotonic() - self.started, 3)}

    def _pause(self, req):
        from .snapshot.pause import PauseError
        try:
            self.vm.pauser.pause()
        except PauseError as exc:
            return _error(str(exc))
        return {"ok": True}

    def _resume(self, req):
        if not self.vm.pauser.holding:
            return _error("the VM is not paused")
        self.vm.pauser.resume()
        return {"ok": True}

    def _checkpoint(self, req):
        op, path, vm = req["op"], req.get("file"), self.vm
        if not isinstance(path, str) or not path:
            return _error(f"{op} needs a file")
        if vm.pauser.holding:
            return _error("the VM is paused (ctl --resume first)")
        from .snapshot.checkpoint import take
        from .snapshot.files import CheckpointError, disk_paths
        config = [line for line in vm.cfg.dump() if not line.startswith("restore=")]
        try:
            secs = take(vm, path, config, disk_paths(vm.cfg), stop=op == "suspend")
        except CheckpointError as exc:
            return _error(str(exc))
        return {"ok": True, "file": os.path.abspath(path), "paused_s": round(secs, 3)}

    #: request op -> its handler
    OPS = {"checkpoint": _checkpoint, "suspend": _checkpoint, "pause": _pause, "resume": _resume, "status": _status}


def _error(text):
    return {"ok": False, "error": text}


def read_line(conn, limit=MAX_REQUEST):
    """The first line a peer sends on ``conn`` (without its newline), or ``b"{too long"`` (not JSON) past
    ``limit`` bytes."""
    buf = b""
    while b"\n" not in buf:
        chunk = conn.recv(limit)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            return b"{too long"
    return buf.split(b"\n", 1)[0]


def _alive(path):
    """Whether a VM listens on ``path`` now."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
