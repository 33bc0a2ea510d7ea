"""Debian's gdb on a Linux guest through vmmshim's gdb stub in the nested lab (issue 22), through
``python3 -m vmmshim.lab.gdb_check`` (see there for the sequence): gdb attaches mid-boot, reads ``$pc`` and
disassembles there, continues, interrupts with Ctrl-C, reads ``$pc`` again and detaches; the guest boots on to its
shell and powers off."""

import pytest

KERNEL_TEXT = 0xFFFFFFFF80000000     # x86-64 Linux's kernel text mapping starts here
USER_TOP = 0x0000800000000000        # user space is the canonical lower half
RPL_MASK = 3                         # a code selector's low bits: the privilege level it runs at

pytestmark = [pytest.mark.lab, pytest.mark.linux_boot, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def session(lab_ready):
    from vmmshim.lab import run_in_lab
    from vmmshim.lab.gdb_check import parse_result
    res = run_in_lab("python3 -m vmmshim.lab.gdb_check --tries 3 --timeout 300", timeout=1000, boot_timeout=120,
                     retries=2, retry_killed=True)
    result, console = parse_result(res.stdout)
    assert result is not None, (f"no GDB-RESULT in {res.attempts} L1 boots (status {res.status}):\n"
                                f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}\n{res.console[-1500:]}")
    print(f"gdb lab: attached after {result['attached_at']} console bytes, pcs {result['pcs']}, "
          f"insns {result['insns']}, status {result['status']}")
    return result, console


def why(result, console):
    return (f"\n--- gdb ---\n{result['gdb_out']}\n--- vmmshim stderr ---\n{result['stderr']}\n"
            f"--- console ---\n{console[-2000:]}")


def test_gdb_attaches_mid_boot_and_reads_the_pc_in_the_kernel(session):
    r, console = session
    assert r["attached_at"] is not None and r["attached_at"] < len(console), why(r, console)
    assert len(r["pcs"]) == 2 and len(r["css"]) == 2, why(r, console)
    assert int(r["pcs"][0], 16) >= KERNEL_TEXT and int(r["css"][0], 16) & RPL_MASK == 0, why(r, console)
    # the interrupt finds the guest in its kernel (ring 0, kernel text) or running init (ring 3, the lower half)
    stop_pc, rpl = int(r["pcs"][1], 16), int(r["css"][1], 16) & RPL_MASK
    assert (stop_pc >= KERNEL_TEXT and rpl == 0) or (stop_pc < USER_TOP and rpl == 3), why(r, console)
    assert len(r["insns"]) == 2 and all(i.split(":")[0].split()[0] == pc for i, pc in zip(r["insns"], r["pcs"])), \
        why(r, console)
    assert r["threads"] and "Thread 1" in r["threads"][0], why(r, console)


def test_ctrl_c_interrupts_the_running_guest_and_detach_lets_it_run_on(session):
    r, console = session
    assert r["interrupted"] and r["detached"], why(r, console)
    assert r["up"] and "VX-GDB-GUEST-RAN 0" in console, why(r, console)
    assert r["status"] == 1 and r["powered_off"], why(r, console)
