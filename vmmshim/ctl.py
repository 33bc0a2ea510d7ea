"""``vmmshim ctl``: requests to a running VM's control socket (``control.py``), with bhyvectl's verbs.

    vmmshim ctl --vm=NAME --checkpoint=FILE    checkpoint and keep running (bhyvectl --checkpoint)
    vmmshim ctl --vm=NAME --suspend=FILE       checkpoint, then end the VM with status 1 (bhyvectl --suspend)
    vmmshim ctl --vm=NAME --pause | --resume   hold every vCPU / let them go on
    vmmshim ctl --vm=NAME --status             name, state, vCPUs, memory, provider, uptime (JSON)

Exit status 0 when the VM did what was asked, 4 with one line on stderr otherwise (no such VM, a refused
checkpoint, a bad flag).

Not supported: bhyvectl's other verbs (register and memory access, statistics, ``--destroy``).
"""

import argparse
import json
import os
import socket
import sys

from .control import read_line, socket_path

EXIT_OK, EXIT_ERROR = 0, 4
REPLY_TIMEOUT_S = 600           # a checkpoint of a big guest writes its whole memory
MAX_REPLY = 1 << 16


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A bad flag is one line on stderr (the usage is ``vmmshim ctl -h``), status 4."""
        self.exit(EXIT_ERROR, f"vmmshim ctl: {message} (vmmshim ctl -h lists the verbs)\n")


def parse(argv):
    ap = _Parser(prog="vmmshim ctl", description=__doc__.splitlines()[0])
    ap.add_argument("--vm", required=True, help="the VM's name (its last argument, or -o name=)")
    verbs = ap.add_mutually_exclusive_group(required=True)
    verbs.add_argument("--checkpoint", metavar="FILE")
    verbs.add_argument("--suspend", metavar="FILE")
    verbs.add_argument("--pause", action="store_true")
    verbs.add_argument("--resume", action="store_true")
    verbs.add_argument("--status", action="store_true")
    args = ap.parse_args(argv)
    if args.checkpoint or args.suspend:
        op = "checkpoint" if args.checkpoint else "suspend"
        return args.vm, {"op": op, "file": os.path.abspath(args.checkpoint or args.suspend)}
    return args.vm, {"op": next(v for v in ("pause", "resume", "status") if getattr(args, v))}


def request(name, req, timeout=REPLY_TIMEOUT_S):
    """The VM's reply (a dict); OSError when there is no VM of that name, ValueError for a reply that is not
    JSON."""
    path = socket_path(name)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise OSError(f"no VM named {name!r} is running (no control socket at {path})") from None
        s.sendall(json.dumps(req).encode() + b"\n")
        return json.loads(read_line(s, MAX_REPLY))


def main(argv):
    try:
        name, req = parse(argv)
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_ERROR
    try:
        reply = request(name, req)
    except (OSError, ValueError) as exc:
        print(f"vmmshim ctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if not reply.get("ok"):
        print(f"vmmshim ctl: {reply.get('error', 'refused')}", file=sys.stderr)
        return EXIT_ERROR
    if req["op"] == "status":
        print(json.dumps({k: v for k, v in reply.items() if k != "ok"}))
    elif req["op"] in ("checkpoint", "suspend"):
        print(f"{reply['file']} (the guest stood still {reply['paused_s']} s)")
    return EXIT_OK
