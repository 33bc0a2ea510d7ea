"""vmmshim's built-in smoke guest (``-f hello``): the smallest real guest, a real-mode program that prints one
line on COM1, polling the 16550's line status like a BIOS would, then halts with interrupts off (exit status 2).

The bytes below were assembled with GNU as from the listing in their comments, so running it needs no
toolchain. Not supported: anything else; this is a smoke test, not firmware.
"""

from ..loader.common import BootImage

LOAD_ADDR = 0x7C00
# 7c00 fa           cli
# 7c01 31 c0        xor  %ax,%ax
# 7c03 8e d8        mov  %ax,%ds
# 7c05 be 25 7c     mov  $0x7c25,%si          ; the message
# 7c08 ba fd 03     mov  $0x3fd,%dx           ; COM1 line status register
# 7c0b ac           lods %ds:(%si),%al        ; next character
# 7c0c 84 c0        test %al,%al
# 7c0e 74 12        je   7c22                 ; NUL: done
# 7c10 88 c3        mov  %al,%bl
# 7c12 ec           in   (%dx),%al            ; wait until THR is empty (LSR bit 5)
# 7c13 a8 20        test $0x20,%al
# 7c15 74 fb        je   7c12
# 7c17 ba f8 03     mov  $0x3f8,%dx           ; COM1 data register
# 7c1a 88 d8        mov  %bl,%al
# 7c1c ee           out  %al,(%dx)
# 7c1d ba fd 03     mov  $0x3fd,%dx
# 7c20 eb e9        jmp  7c0b
# 7c22 f4           hlt                       ; IF is clear: the VM halts (status 2)
# 7c23 eb fd        jmp  7c22
CODE = bytes.fromhex("fa 31 c0 8e d8 be 25 7c ba fd 03 ac 84 c0 74 12 88 c3 ec a8 20 74 fb ba f8 03 88 d8 ee ba fd 03 eb e9 f4 eb fd")
MESSAGE = b'Hello from vmmshim: a real-mode guest on COM1, halting now.\r\n\x00'


def hello_image():
    """The smoke guest as a :class:`BootImage` (real mode, CS:IP = 0:0x7C00)."""
    real = lambda sel: (sel, sel << 4, 0xFFFF, 0x93)  # noqa: E731
    return BootImage(writes=[(LOAD_ADDR, CODE + MESSAGE)],
                     regs={"rip": LOAD_ADDR, "rflags": 0x2, "rsp": LOAD_ADDR, "cr0": 0x10},
                     segs={"cs": (0, 0, 0xFFFF, 0x9B), "ds": real(0), "es": real(0), "ss": real(0),
                           "fs": real(0), "gs": real(0)},
                     gdtr=(0, 0xFFFF), idtr=(0, 0x3FF), e820=[], description="vmmshim hello (real mode, COM1)")
