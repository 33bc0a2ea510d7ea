"""Run a command inside the nested lab's L1 and bring its output back.

Each run:

1. makes a fresh ext4 *work disk* (``mkfs.ext4 -d``, no mount) holding ``project/`` (a copy of the clone's
   source directories), ``guest/`` (the default guest's vmlinuz and initramfs.gz), ``run.sh`` (the command),
   ``lab-init.sh`` (what L1 does) and an empty ``out/``;
2. boots L1 under QEMU TCG with the cached root image (``snapshot=on``: the image is never written, so runs
   may overlap) as /dev/vda and the work disk as /dev/vdb; the stub ``/lab-init`` in the image mounts
   /dev/vdb on /lab and runs ``lab-init.sh``, which loads kvm_amd, runs ``run.sh`` with the project on
   PYTHONPATH, writes ``out/stdout``, ``out/stderr``, ``out/status``, syncs, unmounts and powers off
   with sysrq ``o``;
3. reads ``out/`` back with ``debugfs -R 'rdump /out DIR'`` (no mount needed).

The host watches L1's console: if the marker ``VMMSHIM-LAB-L1-UP`` does not appear within ``boot_timeout``
seconds, or L1 stops without writing a status, QEMU is killed (the QEMU process itself, so the image lock
goes with it) and L1 is booted once more.  A command that outlives ``timeout`` is killed inside L1 and
reported with status 124; the host gives L1 a grace period beyond that and then kills QEMU, and kills it early
when L1's console heartbeat (``VMMSHIM-LAB-HB`` every ``HB_PERIOD_S``) has stopped for ``HB_LIMIT_S``: a hung
L1 (its timers dead, or its CPUs stuck) then costs minutes, not the whole deadline.  L1 also streams
the command's stdout and stderr to its ttyS1 and ttyS2, files on the host, so a run killed from outside still
returns what it printed (``LabResult.stdout``/``stderr`` with status 124).
"""

import ctypes
import dataclasses
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from vmmshim.lab import guest as guest_mod
from vmmshim.lab import image as image_mod
from vmmshim.lab.paths import REPO_ROOT

QEMU = "qemu-system-x86_64"
L1_CPU = "EPYC,+svm,+npt"
#: TCG's threading for L1. Multi-threaded TCG (a host thread per L1 vCPU) lost about half of the two-vCPU virtio
#: guest runs here (L1 kernels panicked or hung, L2 guests triple-faulted); with one TCG thread every one passed,
#: at about the same speed (the boots and times are in docs/lab.md, "Known problems").
#: ``VMMSHIM_LAB_TCG_THREAD=multi`` brings the old mode back, for comparison.
L1_TCG_THREAD = os.environ.get("VMMSHIM_LAB_TCG_THREAD", "single")
MARK_UP = "VMMSHIM-LAB-L1-UP"
MARK_KVM = "VMMSHIM-LAB-KVM="
MARK_DONE = "VMMSHIM-LAB-DONE"
MARK_HB = "VMMSHIM-LAB-HB"
HB_PERIOD_S = 15        # L1 prints a heartbeat on its console this often while the command runs ...
HB_LIMIT_S = 150        # ... and is taken for hung (its clock or its CPUs stuck) when none came for this long

#: What of the clone travels to L1 (whatever of it exists).
PROJECT_PATHS = ("ops", "vmmshim", "bhyve_devices", "tests", "bench", "scripts", "docs", "pyproject.toml",
                 "setup.cfg", "conftest.py", "pytest.ini")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.egg-info", ".git")

#: Per-run L1 init, on the work disk.  @TIMEOUT@ is replaced by the command's timeout in seconds.
LAB_INIT = r"""#!/bin/sh
# vmmshim lab: what L1 does (written to the work disk on every run)
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb
mount -t tmpfs tmpfs /tmp 2>/dev/null
mount -t tmpfs tmpfs /run 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /dev/shm 2>/dev/null
hostname vmmshim-lab
ip link set lo up 2>/dev/null
echo "VMMSHIM-LAB-L1-UP uptime=$(cut -d' ' -f1 /proc/uptime)"
modprobe kvm_amd >/lab/out/modprobe.log 2>&1
modprobe tun >>/lab/out/modprobe.log 2>&1
if [ -c /dev/kvm ]; then echo "VMMSHIM-LAB-KVM=yes"; else echo "VMMSHIM-LAB-KVM=no"; fi
export PYTHONPATH=/lab/project VMMSHIM_LAB=1 VMMSHIM_GUEST_DIR=/lab/guest VMMSHIM_CACHE=/lab/cache
mkdir -p /lab/cache
ln -s /lab/guest /lab/cache/guest
cd /lab/project
# the compiled run loop (ops/nvmm/kvm/fastrun.c), built once per L1 boot, not inside a timed command
python3 -m ops.nvmm.kvm.fastrun >/lab/out/fastrun.log 2>&1
start=$(cut -d' ' -f1 /proc/uptime)
# a heartbeat on the console: the host takes L1 for hung when it stops (L1's timers died or its CPUs are stuck)
( while :; do echo "@MARK_HB@"; sleep @HB_PERIOD@; done ) &
hb=$!
echo $hb >/run/lab-hb.pid
: >/lab/out/stdout; : >/lab/out/stderr
# the command's output also streams to ttyS1 (stdout) and ttyS2 (stderr), files on the host, so a run that is
# killed still shows what it printed
streams=""
for n in 1 2; do
    [ -c /dev/ttyS$n ] && stty -F /dev/ttyS$n raw -echo 2>/dev/null || continue
    f=stdout; [ $n = 2 ] && f=stderr
    tail -n +1 -f /lab/out/$f >/dev/ttyS$n 2>/dev/null &
    streams="$streams $!"
done
if grep -qw vmmshim.echo=1 /proc/cmdline; then
    tail -q -n +1 -f /lab/out/stdout /lab/out/stderr >/dev/console 2>&1 &
    echo_pid=$!
fi
timeout -s KILL @TIMEOUT@ /bin/sh /lab/run.sh </dev/null >/lab/out/stdout 2>/lab/out/stderr
status=$?
kill $hb 2>/dev/null
[ -n "$echo_pid$streams" ] && sleep 0.5 && kill $echo_pid $streams 2>/dev/null
[ $status = 137 ] && status=124
end=$(cut -d' ' -f1 /proc/uptime)
echo "$start $end" >/lab/out/uptime
dmesg >/lab/out/dmesg 2>/dev/null
echo $status >/lab/out/status
sync
cd /
umount /lab 2>/dev/null || mount -o remount,ro /lab
sync
echo "VMMSHIM-LAB-DONE status=$status"
echo o >/proc/sysrq-trigger
sleep 30
"""


class LabError(RuntimeError):
    pass


@dataclasses.dataclass
class LabResult:
    status: int
    stdout: str
    stderr: str
    boot_s: float = 0.0  # host-side seconds from starting QEMU to L1's init marker
    cmd_s: float = 0.0  # seconds the command ran, by L1's clock
    total_s: float = 0.0  # host-side seconds, all attempts
    attempts: int = 1
    kvm: bool = False
    console: str = ""
    out_dir: pathlib.Path | None = None

    def __iter__(self):  # status, stdout, stderr = result
        return iter((self.status, self.stdout, self.stderr))


def lab_available() -> tuple[bool, str]:
    """Whether the lab can run here, and why not if it cannot."""
    if shutil.which(QEMU) is None:
        return False, f"{QEMU} not found (scripts/install-deps.sh)"
    for tool in ("mkfs.ext4", "debugfs"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}") and not os.path.exists(
                f"/sbin/{tool}"):
            return False, f"{tool} not found (e2fsprogs; scripts/install-deps.sh)"
    if not image_mod.image_ready():
        return False, f"L1 image not built at {image_mod.image_dir()} (python3 -m vmmshim.lab build)"
    if not guest_mod.guest_ready():
        return False, f"default guest not built at {guest_mod.guest_dir()} (scripts/build-guest.sh)"
    return True, "ok"


def _tool(name: str) -> str:
    for d in ("", "/usr/sbin/", "/sbin/"):
        path = shutil.which(d + name) if d == "" else (d + name if os.path.exists(d + name) else None)
        if path:
            return path
    raise LabError(f"{name} not found (scripts/install-deps.sh)")


def _make_work_disk(workdir: pathlib.Path, cmd: str, timeout: int, size_mb: int, extra_files) -> pathlib.Path:
    stage = workdir / "stage"
    (stage / "project").mkdir(parents=True)
    (stage / "out").mkdir()
    for name in PROJECT_PATHS:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, stage / "project" / name, ignore=_IGNORE, symlinks=True)
        elif src.is_file():
            shutil.copy2(src, stage / "project" / name)
    if guest_mod.guest_ready():
        shutil.copytree(guest_mod.guest_dir(), stage / "guest", ignore=shutil.ignore_patterns(".build-*"))
    else:
        (stage / "guest").mkdir()
    for dest, src in (extra_files or {}).items():
        target = stage / "files" / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    (stage / "run.sh").write_text("#!/bin/sh\n" + cmd + "\n")
    (stage / "lab-init.sh").write_text(LAB_INIT.replace("@TIMEOUT@", str(int(timeout))).replace(
        "@MARK_HB@", MARK_HB).replace("@HB_PERIOD@", str(HB_PERIOD_S)))
    disk = workdir / "work.ext4"
    r = subprocess.run([_tool("mkfs.ext4"), "-q", "-F", "-L", "vmmshim-work", "-d", str(stage), str(disk),
                        f"{size_mb}M"], capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"mkfs.ext4 of the work disk failed: {r.stderr.strip()}")
    shutil.rmtree(stage)
    return disk


def _read_out(disk: pathlib.Path, dest: pathlib.Path) -> pathlib.Path | None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([_tool("debugfs"), "-R", f"rdump /out {dest}", str(disk)], capture_output=True, text=True)
    out = dest / "out"
    return out if (out / "status").is_file() else None


def _streamed(streams) -> list[str]:
    """What L1 streamed of the command's stdout and stderr (its ttyS1 and ttyS2) so far."""
    return [pth.read_bytes().decode(errors="replace") if pth.is_file() else "" for pth in streams]


def _die_with_parent() -> None:
    """In the QEMU child: get SIGKILL when the Python process that started it dies, however it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Terminated(BaseException):
    """SIGTERM, SIGINT or SIGHUP while L1 ran: L1 was killed. ``str()`` is the signal's name."""


def _raise_terminated(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _l1_command(img: pathlib.Path, disk: pathlib.Path, smp: int, mem: str, append_extra: str,
                streams: tuple[pathlib.Path, pathlib.Path]) -> list[str]:
    append = ("root=/dev/vda rw rootfstype=ext4 console=ttyS0 init=/lab-init panic=-1 quiet loglevel=3 "
              "net.ifnames=0 mitigations=off " + append_extra).strip()
    return [QEMU, "-accel", f"tcg,thread={L1_TCG_THREAD}", "-cpu", L1_CPU, "-smp", str(smp), "-m", mem,
            "-nographic", "-no-reboot", "-nic", "none", "-monitor", "none", "-serial", "stdio",
            "-serial", f"file:{streams[0]}", "-serial", f"file:{streams[1]}",
            "-kernel", str(img / "vmlinuz"), "-initrd", str(img / "initrd.img"),
            "-append", append,
            "-drive", f"file={img / 'rootfs.ext4'},if=virtio,format=raw,snapshot=on",
            "-drive", f"file={disk},if=virtio,format=raw"]


def _boot_once(argv, console_path, boot_timeout, hard_deadline, echo):
    """Run one L1 boot.  Returns (outcome, boot_s, kvm) with outcome 'done', 'boot-hang', 'timeout', 'hung' (no
    heartbeat for ``HB_LIMIT_S``) or 'exit'."""
    t0 = time.monotonic()
    boot_s = None
    beats, last_beat = 0, t0
    kvm = False
    # SIGTERM/SIGHUP/SIGINT (timeout(1), a CI runner, Ctrl-C) end this process through `finally`, which kills QEMU
    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            if signal.getsignal(sig) != signal.SIG_IGN:
                old[sig] = signal.signal(sig, _raise_terminated)
    with open(console_path, "wb") as con:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=con, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
    pos = 0
    try:
        while True:
            rc = proc.poll()
            text = console_path.read_bytes().decode(errors="replace")
            if echo and len(text) > pos:
                print("".join(x for x in text[pos:].splitlines(True) if MARK_HB not in x), end="", flush=True)
            pos = len(text)
            if boot_s is None and MARK_UP in text:
                boot_s = time.monotonic() - t0
                last_beat = time.monotonic()
            n = text.count(MARK_HB)
            if n != beats:
                beats, last_beat = n, time.monotonic()
            if MARK_KVM + "yes" in text:
                kvm = True
            if rc is not None:
                return ("done" if MARK_DONE in text else "exit"), boot_s, kvm
            now = time.monotonic()
            if boot_s is None and now - t0 > boot_timeout:
                return "boot-hang", None, kvm
            if now > hard_deadline:
                return "timeout", boot_s, kvm
            if boot_s is not None and beats and now - last_beat > HB_LIMIT_S:
                return "hung", boot_s, kvm
            time.sleep(0.25)
    finally:
        _kill(proc)
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run_in_lab(cmd, timeout: float = 600, smp: int = 2, mem: str = "6G", boot_timeout: float = 240,
               retries: int = 2, keep: bool = False, echo: bool = False, extra_files=None,
               work_mb: int = 512, append: str = "", retry_killed: bool = False) -> LabResult:
    """Boot L1, run ``cmd`` (a shell string, or an argv list) inside it, return a :class:`LabResult`.

    ``result.status, result.stdout, result.stderr`` (or unpack the result as a 3-tuple).  ``timeout`` is for
    the command inside L1; the L1 boot has ``boot_timeout`` on top and, when it hangs or L1 stops without a
    status, is tried ``retries`` more times; with ``retry_killed`` (for a command that may run twice) also when
    the command was killed, inside L1 or with L1 from outside (a soft-locked or hung L1: the lab's TCG
    emulation, not the command).  Status 124 means the command timed out.  Inside L1 the clone's
    source is /lab/project (the working directory, on PYTHONPATH), the default guest /lab/guest
    (``$VMMSHIM_GUEST_DIR``), ``extra_files`` ({name: host path}) /lab/files/<name>.
    """
    if not isinstance(cmd, str):
        cmd = shlex.join(cmd)
    if not image_mod.image_ready():
        raise LabError(f"L1 image not built at {image_mod.image_dir()}: python3 -m vmmshim.lab build")
    img = image_mod.image_dir()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="vmmshim-lab-"))
    t_start = time.monotonic()
    result = None
    killed = False          # an L1 was killed from outside: its consoles stay for the post-mortem
    try:
        for attempt in range(1, retries + 2):
            adir = tmp / f"attempt{attempt}"
            adir.mkdir()
            disk = _make_work_disk(adir, cmd, timeout, work_mb, extra_files)
            streams = (adir / "stdout.stream", adir / "stderr.stream")
            argv = _l1_command(img, disk, smp, mem, append + (" vmmshim.echo=1" if echo else ""), streams)
            console = adir / "console.log"
            t0 = time.monotonic()
            outcome, boot_s, kvm = _boot_once(argv, console, boot_timeout, t0 + boot_timeout + timeout + 90,
                                              echo)
            wall = time.monotonic() - t0
            text = console.read_bytes().decode(errors="replace")
            out = _read_out(disk, adir / "result") if outcome != "boot-hang" else None
            msg = f"L1 attempt {attempt}: {outcome}"
            if boot_s is not None:
                msg += f", boot {boot_s:.1f} s"
            print(f"[lab] {msg}, wall {wall:.1f} s", flush=True)
            if out is not None:
                status = int((out / "status").read_text().strip() or 255)
                cmd_s = 0.0
                if (out / "uptime").is_file():
                    a, b = map(float, (out / "uptime").read_text().split())
                    cmd_s = b - a
                result = LabResult(status, (out / "stdout").read_text(errors="replace"),
                                   (out / "stderr").read_text(errors="replace"), boot_s or 0.0, cmd_s,
                                   time.monotonic() - t_start, attempt, kvm, text, out if keep else None)
            elif outcome in ("timeout", "hung") and boot_s is not None:
                # L1 booted and the command ran past the grace period; what it printed before that, as L1
                # streamed it to its second and third serial port
                partial = _streamed(streams)
                killed = True
                why = "no heartbeat: L1 hung" if outcome == "hung" else "past the deadline"
                result = LabResult(124, partial[0], partial[1] + f"\nlab: L1 killed after {wall:.0f} s ({why}); "
                                   f"its console is kept in {adir}\n",
                                   boot_s, 0.0, time.monotonic() - t_start, attempt, kvm, text)
            if result is not None:
                if result.status == 124 and retry_killed and attempt <= retries:
                    print(f"[lab] L1 attempt {attempt}: the command was killed; L1 again. It printed:\n"
                          f"{result.stdout[-1500:]}\n{result.stderr[-1500:]}", flush=True)
                    result = None
                    continue
                break
            lines = [x for x in text.splitlines() if "TCG doesn't support requested feature" not in x]
            tail = "\n".join(lines[-15:])
            partial = _streamed(streams)
            print(f"[lab] L1 attempt {attempt} gave no result; console tail:\n{tail}\n"
                  f"[lab] what the command printed:\n{partial[0][-1500:]}\n{partial[1][-1500:]}", flush=True)
        if result is None:
            raise LabError(f"L1 gave no result in {retries + 1} boots (console logs in {tmp}); the last one's "
                           f"command printed: {partial[0][-300:]!r} {partial[1][-300:]!r}")
        return result
    finally:
        if not keep and result is not None and not killed:
            shutil.rmtree(tmp, ignore_errors=True)
        elif keep:
            print(f"[lab] kept {tmp}", flush=True)
