"""vmmshim boots stock Debian Linux (the default guest: Debian's kernel and a busybox initramfs) inside the nested
lab, one L1 boot for all cases: to the shell marker with ACPI (the HPET as Linux's clock-event device), with two
vCPUs (both online), with the MP table instead of ACPI, ``reboot -f`` ending with status 0, and the guest's serial
output arriving whole.

Two bugs made about half of these boots hang until they were fixed: the HPET's periodic timer waited for the
32-bit wrap (256 s) when the timer thread ran late, and an interrupt queued while KVM completed a faulting RDMSR
was dropped by L1's KVM 6.1 (see ``tests/unit/test_vhpet.py`` and ``tests/conformance/test_interrupt_stress.py``).
"""

import re

import pytest

from tests.lab.boot_cases import run_cases
from vmmshim.lab.guest import encode_run

pytestmark = [pytest.mark.lab, pytest.mark.linux_boot, pytest.mark.timeout(1500)]
UUID = "6c0a4b4e-1f2d-4e5a-9b3c-7d8e9f0a1b2c"
#: What the x2APIC/SMBIOS case runs in the guest: the guest's own dmidecode (from Debian's package, in the default
#: guest's initramfs) on the tables Linux found, and the kernel's view of the APIC mode and of the DMI UUID.
DMI_RUN = ("dmidecode -s system-uuid; dmidecode -t system | grep -E 'Manufacturer|UUID'; "
           "dmidecode -t processor | grep -c 'Processor Information'; dmidecode -t memory | grep 'Size:'; "
           "echo DMI-ID-UUID=$(cat /sys/class/dmi/id/product_uuid); dmesg | grep -i x2apic")
CASES = {
    "acpi1": ("-A -c 1", ""),
    "smp2": ("-A -c 2", ""),
    "mptable": ("-c 1", ""),
    "reboot": ("-A -c 1", "vmmshim.exit=reboot"),
    "x2apic_smbios": (f"-A -c 2 -x -U {UUID}", encode_run(DMI_RUN)),
}


@pytest.fixture(scope="module")
def boots(lab_ready):
    return run_cases(CASES)


def test_acpi_boot_reaches_the_shell_and_powers_off(boots):
    status, secs, console = boots["acpi1"]
    assert "VMMSHIM-GUEST-UP" in console, console[-2000:]
    assert "VMMSHIM-GUEST-POWEROFF" in console and status == 1, (status, console[-1000:])
    assert "ttyS0 at I/O 0x3f8 (irq = 4" in console, "the 8250 driver did not find COM1"
    assert "Linux version" in console.splitlines()[0] or "Linux version" in console[:2000], \
        "the console lost the start of the boot log"
    assert console.count("VMMSHIM-GUEST-UP") == 1
    assert "Switched to clocksource kvm-clock" in console, "kvmclock is offered by default (x86.kvm_pv)"


def test_two_vcpus_are_online(boots):
    status, secs, console = boots["smp2"]
    assert "VMMSHIM-CPUS=2" in console, console[-2000:]
    assert status == 1, (status, console[-1500:])


def test_mptable_boot_without_acpi(boots):
    status, secs, console = boots["mptable"]
    assert "VMMSHIM-GUEST-UP" in console, console[-2000:]
    assert "MultiProcessor Specification" in console, "Linux did not read the MP table"
    assert status == 2, f"without ACPI Linux cannot power off: it halts (bhyve status 2): {status} " \
        f"{console[-1500:]}"


def test_reboot_exits_with_status_0(boots):
    status, secs, console = boots["reboot"]
    assert "VMMSHIM-GUEST-UP" in console, console[-2000:]
    assert status == 0, (status, console[-1500:])


def test_x2apic_mode_and_smbios_as_the_guest_sees_them(boots):
    """-x: Linux finds its APICs in x2APIC mode, set by the firmware (bhyve's X2APIC_ENABLED); -U: the guest's
    dmidecode and the kernel's DMI both read the UUID from vmmshim's SMBIOS tables, with two processors and the
    512 MiB of RAM."""
    status, secs, console = boots["x2apic_smbios"]
    assert "VMMSHIM-RUN-STATUS=0" in console, console[-3000:]
    assert status == 1, (status, console[-1500:])
    assert re.search(r"x2apic.*enabled", console, re.I), console[-3000:]
    assert UUID in console.splitlines(), console[-3000:]                 # dmidecode -s system-uuid
    assert f"DMI-ID-UUID={UUID}" in console
    assert "Manufacturer: FreeBSD" in console and "VMMSHIM-CPUS=2" in console
    assert re.search(r"^2$", console, re.M), "dmidecode did not list two processors"
    assert "Size: 512 MB" in console, console[-3000:]
    run = console.split("VMMSHIM-GUEST-UP", 1)[-1]                       # what dmidecode printed
    assert "Invalid" not in run and "checksum" not in run.lower(), run[-3000:]
