"""``vmmshim linux``: the command line it builds is one the CLI accepts, and where it runs follows /dev/kvm."""

import base64

from vmmshim import default_guest
from vmmshim.cli import parse_args


def test_guest_argv_is_a_valid_xhyve_command_line():
    argv = default_guest.guest_argv("/g", 2, "512M", "stdio", run="echo hi", cmdline_extra="quiet")
    cfg = parse_args(argv)
    assert cfg.get("cpus") == "2"
    fw = argv[argv.index("-f") + 1]
    assert fw.startswith("kexec,/g/vmlinuz,/g/initramfs.gz,console=ttyS0 panic=-1 quiet vmmshim.run=")
    assert base64.b64decode(fw.rsplit("vmmshim.run=", 1)[1]) == b"echo hi"


def test_where_to_run_follows_the_kvm_kind(monkeypatch):
    import ops.nvmm.kvm.provider as prov

    monkeypatch.delenv("VMMSHIM_LAB", raising=False)
    for kind, where in (("kvm_amd", "here"), ("kvm_intel", "here"), ("kvm_pvm", "lab"), ("unknown", "lab")):
        monkeypatch.setattr(prov, "hardware_kind", lambda k=kind: k)
        got, why = default_guest.where_to_run()
        assert got == where and kind in why
    monkeypatch.setenv("VMMSHIM_LAB", "1")
    assert default_guest.where_to_run()[0] == "here"


def _lab_script_run(tmp_path, statuses):
    """Runs lab_script with a stand-in VMM that exits with the next of ``statuses`` (a negative one: after
    printing the shell marker) and returns (exit status, stdout, stderr, boots made)."""
    import subprocess

    fake = tmp_path / "vmm.sh"
    count = tmp_path / "count"
    count.write_text("0")
    fake.write_text("n=$(cat {c}); n=$((n+1)); echo $n > {c}\nset -- {s}\nshift $((n-1))\n"
                    "st=$1; echo console of boot $n; echo err of boot $n >&2\n"
                    "if [ $st -lt 0 ]; then echo VMMSHIM-GUEST-UP; st=$((-st)); fi; exit $st\n"
                    .format(c=count, s=" ".join(map(str, statuses))))
    p = subprocess.run(["bash", "-c", default_guest.lab_script(f"bash {fake}")], capture_output=True, text=True,
                       timeout=60)
    return p.returncode, p.stdout, p.stderr, int(count.read_text())


def test_lab_boots_again_only_after_a_triple_fault_before_the_shell(tmp_path):
    st, out, err, boots = _lab_script_run(tmp_path, [3, 3, -1])
    assert (st, boots) == (1, 3)
    assert "console of boot 3" in out and "VMMSHIM-GUEST-UP" in out and "boot 1" not in out
    assert err.count("triple-faulted before its shell") == 2 and "err of boot 3" in err
    # a triple fault after the shell marker is the guest's: no other boot, status 3
    assert _lab_script_run(tmp_path, [-3, -1])[0::3] == (3, 1)
    # any other status ends it at once
    assert _lab_script_run(tmp_path, [4, -1])[0::3] == (4, 1)
    # three triple faults: the last one's status and console
    st, out, err, boots = _lab_script_run(tmp_path, [3, 3, 3, -1])
    assert (st, boots) == (3, default_guest.LAB_GUEST_TRIES) and "console of boot 3" in out
