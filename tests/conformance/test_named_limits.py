"""A guest that runs into a provider's declared limit (``Capability.limits``) ends the VM as bhyve does for an
unhandled exit (status 4) with a sentence that names the limit, the instruction and the vCPU's mode, never a
Python repr; on a provider without the limit the same guest runs on (issue 24, item 9)."""

import struct

from ops.nvmm.capability import LIMIT_SOFT_INT
from tests.guests.vmboot import boot64, gate, idt
from vmmshim.vm import EXIT_ERROR, EXIT_HALT

RESULT = 0x8000
VECTOR = 0x80

INT_N_GUEST = gate(VECTOR, "handler") + f"""
  lidt idtr
  int ${VECTOR}
  movl $2, {RESULT}
  cli
  hlt
handler:
  movl $1, {RESULT + 4}
  iretq
""" + idt(VECTOR + 1)


def test_int_n_runs_or_names_the_limit(make_vm, provider):
    vm = make_vm()
    boot64(vm, INT_N_GUEST)
    status = vm.run(timeout=60)
    after, handled = struct.unpack_from("<2I", vm.view(RESULT, 8))
    if LIMIT_SOFT_INT in provider.capability().limits:
        assert status == EXIT_ERROR
        line = vm.error.splitlines()[0]
        assert f"declares the limit {LIMIT_SOFT_INT} (the instruction is int n)" in line, line
        assert f"instruction bytes cd {VECTOR:02x}" in line and "64-bit mode" in line, line
        assert "<" not in line and "Vmx(" not in line, line
    else:
        assert status == EXIT_HALT, vm.error
        assert (after, handled) == (2, 1)
