"""The whole vmmshim path for the exit benchmark: ``vmm_ops_nvmm.vmrun`` -> the VM's exit-handler table ->
the port bus -> a device that counts, on the same 64-bit guest loop as the other rows."""

import sys
import time


class Counter:
    """The device: counts writes and sums the bytes, as the C peer does."""

    def __init__(self):
        self.count = 0
        self.total = 0

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        self.count += 1
        self.total += value


def run_ops_loop(guest_source, n, port):
    from ops.nvmm import nvmm_init
    from ops.nvmm_ops import VmmOpsNvmm
    from tests.guests.vmboot import boot64
    from vmmshim.vm import VM, VmConfig

    vm = VM(VmmOpsNvmm(nvmm_init("kvm")), VmConfig(memsize=16 << 20), log=lambda m: None)
    dev = Counter()
    vm.add_port_device(port, 1, dev, "counter")
    boot64(vm, guest_source + "\ncli\nhlt\n")
    vm.set_boot_state(0, regs={"rcx": n, "rdx": port})
    t0 = time.perf_counter()
    status = vm.run()
    dt = time.perf_counter() - t0
    if status != 2:
        print(f"VM ended with status {status}: {vm.error}", file=sys.stderr)
    vm.close()
    return dev.count, dt
