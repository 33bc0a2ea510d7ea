"""NetBSD ``tests/lib/libnvmm/h_io_assist`` as provider-parametrized tests, plus real-mode and 32-bit variants.

NetBSD's set-up (``h_io_assist.c``): 64-bit long mode (CR0 PG|PE|NE|TS|MP|WP|AM, CR4 PAE, EFER LME|SCE|LMA,
4 KiB identity paging with L4..L1 at 0x3000..0x6000), code at 0x2000, **mapped data** at 0x1000, port 123. Each
program ends with ``mov $-1,%rcx; rdmsr`` and the run stops at the RDMSR exit. The I/O callback serves IN from a
128-byte buffer holding the wanted string and records OUT into it (``iobuf_off`` advances by each access's size),
and fails on any port but 123. Verdict, as NetBSD's ``run_test``: for an IN test the NUL-terminated string at
guest 0x1000 (a zeroed page) must equal the wanted one; for an OUT test (the string was put at guest 0x1000) the
NUL-terminated string in the I/O buffer must. Here the byte count is checked too: an IN program consumes, and an
OUT program emits, exactly ``len(wanted)`` bytes.

The guest programs are ours (GNU as, AT&T syntax), written once as templates and assembled for 64-bit long mode
(NetBSD's cases), flat 32-bit protected mode and real mode (port I/O in all three CPU modes). The string forms
additionally check the final RCX (0) and RSI/RDI (advanced by the string length): REP completes only once the
count reaches 0.

Encodings of the interesting instructions (``objdump -d``; 16-bit code swaps the 0x66 prefix between the word
and the dword forms)::

    64-bit / 32-bit                          16-bit (real mode)
    e4 7b     inb  $0x7b,%al                 e4 7b     inb  $0x7b,%al
    ec        inb  (%dx),%al                 ec        inb  (%dx),%al
    66 e5 7b  inw  $0x7b,%ax                 e5 7b     inw  $0x7b,%ax
    66 ed     inw  (%dx),%ax                 ed        inw  (%dx),%ax
    e5 7b     inl  $0x7b,%eax                66 e5 7b  inl  $0x7b,%eax
    ed        inl  (%dx),%eax                66 ed     inl  (%dx),%eax
    e6 7b     outb %al,$0x7b                 e6 7b     outb %al,$0x7b
    ee        outb %al,(%dx)                 ee        outb %al,(%dx)
    66 e7 7b  outw %ax,$0x7b                 e7 7b     outw %ax,$0x7b
    66 ef     outw %ax,(%dx)                 ef        outw %ax,(%dx)
    e7 7b     outl %eax,$0x7b                66 e7 7b  outl %eax,$0x7b
    ef        outl %eax,(%dx)                66 ef     outl %eax,(%dx)
    f3 6c     rep insb  (%dx),%es:(%rdi)     f3 6c     rep insb  (%dx),%es:(%di)
    66 f3 6d  rep insw  (%dx),%es:(%rdi)     f3 6d     rep insw  (%dx),%es:(%di)
    f3 6d     rep insl  (%dx),%es:(%rdi)     66 f3 6d  rep insl  (%dx),%es:(%di)
    f3 6e     rep outsb %ds:(%rsi),(%dx)     f3 6e     rep outsb %ds:(%si),(%dx)
    66 f3 6f  rep outsw %ds:(%rsi),(%dx)     f3 6f     rep outsw %ds:(%si),(%dx)
    f3 6f     rep outsl %ds:(%rsi),(%dx)     66 f3 6f  rep outsl %ds:(%si),(%dx)

(32-bit code is encoded as 64-bit code, with %edi/%esi for %rdi/%rsi.)
"""

import pytest

from ops.nvmm import constants as C
from tests.guests.asm import assemble
from tests.guests.harness import CODE

PORT = 123
DATA = 0x1000
IO_SIZE = 128          # NetBSD's iobuf

# Register spelling per CPU mode: {R}di is %rdi / %edi / %di, mov{S} is movq / movl / movw.
MODES = {
    "long64": dict(directive=".code64", R="r", S="q", end="movq $-1,%rcx", mask=(1 << 64) - 1),
    "prot32": dict(directive=".code32", R="e", S="l", end="movl $-1,%ecx", mask=0xFFFFFFFF),
    "real16": dict(directive=".code16", R="", S="w", end="movl $-1,%ecx", mask=0xFFFF),
}
# Accumulator and suffix per operand size.
ACC = {1: ("b", "%al"), 2: ("w", "%ax"), 4: ("l", "%eax")}

# Plain IN, imm8 form then DX form; each datum is stored at the next bytes of the data page.
#   e.g. 64-bit INW:  66 e5 7b  inw $0x7b,%ax ; 66 89 07  movw %ax,(%rdi) ; 66 ed  inw (%dx),%ax
IN_PLAIN = """
    mov{S}  $0x1000,%{R}di
    in{x}   ${port},{acc}              # imm8 port
    mov{x}  {acc},(%{R}di)
    add{S}  ${n},%{R}di
    movw    ${port},%dx
    in{x}   %dx,{acc}                  # DX port
    mov{x}  {acc},(%{R}di)
"""

# Plain OUT: the two data items are read from the data page, sent with the imm8 then the DX form.
#   e.g. 64-bit OUTL:  8b 06  movl (%rsi),%eax ; e7 7b  outl %eax,$0x7b ; ef  outl %eax,(%dx)
OUT_PLAIN = """
    mov{S}  $0x1000,%{R}si
    mov{x}  (%{R}si),{acc}
    out{x}  {acc},${port}              # imm8 port
    add{S}  ${n},%{R}si
    mov{x}  (%{R}si),{acc}
    movw    ${port},%dx
    out{x}  {acc},%dx                  # DX port
"""

# REP INS: RCX elements from port DX to ES:RDI.
IN_STRING = """
    mov{S}  $0x1000,%{R}di
    mov{S}  ${count},%{R}cx
    mov{S}  ${port},%{R}dx
    rep ins{x}                         # f3 6c / 66 f3 6d / f3 6d (64-bit)
    mov{S}  %{R}cx,%{R}bp                # the count left, checked by the test
"""

# REP OUTS: RCX elements from DS:RSI to port DX.
OUT_STRING = """
    mov{S}  $0x1000,%{R}si
    mov{S}  ${count},%{R}cx
    mov{S}  ${port},%{R}dx
    rep outs{x}                        # f3 6e / 66 f3 6f / f3 6f (64-bit)
    mov{S}  %{R}cx,%{R}bp                # the count left, checked by the test
"""

STR28 = "123456789abcdefghijklmnopqrs"

# NetBSD's cases: (name, template, operand size, wanted, in, REP count)
CASES = [
    ("test1-INB", IN_PLAIN, 1, "12", True, None),
    ("test2-INW", IN_PLAIN, 2, "1234", True, None),
    ("test3-INL", IN_PLAIN, 4, "12345678", True, None),
    ("test4-INSB+REP", IN_STRING, 1, "12345", True, 5),
    ("test5-INSW+REP", IN_STRING, 2, "Comment est votre blanquette", True, 14),
    ("test6-INSL+REP", IN_STRING, 4, STR28, True, 7),
    ("test7-OUTB", OUT_PLAIN, 1, "12", False, None),
    ("test8-OUTW", OUT_PLAIN, 2, "1234", False, None),
    ("test9-OUTL", OUT_PLAIN, 4, "12345678", False, None),
    ("test10-OUTSB+REP", OUT_STRING, 1, "12345", False, 5),
    ("test11-OUTSW+REP", OUT_STRING, 2, "Ah, Herr Bramard", False, 8),
    ("test12-OUTSL+REP", OUT_STRING, 4, STR28, False, 7),
]


def program(mode, template, size, count):
    m = MODES[mode]
    x, acc = ACC[size]
    body = template.format(R=m["R"], S=m["S"], x=x, acc=acc, n=size, port=PORT, count=count)
    return f"{m['directive']}\n{body}\n    {m['end']}\n    rdmsr\n"


def cstr(buf):
    """The NUL-terminated string at the start of ``buf`` (what ``strcmp`` compares)."""
    buf = bytes(buf)
    end = buf.find(b"\0")
    return buf if end < 0 else buf[:end]


def setup(guest, mode):
    if mode == "long64":
        guest.setup_long64(CODE)
    elif mode == "prot32":
        guest.setup_prot32(CODE)
    else:
        guest.setup_real(CODE)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name,template,size,wanted,is_in,count", CASES, ids=[c[0] for c in CASES])
def test_io_assist(guest_factory, mode, name, template, size, wanted, is_in, count):
    wanted = wanted.encode()
    assert len(wanted) % size == 0 and (count is None or count * size == len(wanted))
    g = guest_factory()
    g.load(CODE, assemble(program(mode, template, size, count), CODE))
    setup(g, mode)
    if is_in:
        g.io_in[PORT] = wanted            # NetBSD: strcpy(iobuf, wanted)
    else:
        g.load(DATA, wanted + b"\0")      # NetBSD: strcpy(databuf, wanted)

    ex = g.run(until=(C.NVMM_VCPU_EXIT_RDMSR,))
    assert ex.reason == C.NVMM_VCPU_EXIT_RDMSR, \
        f"stopped on exit {C.EXIT_NAMES.get(ex.reason, ex.reason)} instead of the final RDMSR; io_log={g.io_log}"

    # NetBSD's io_callback: port 123 only, one direction per test, iobuf_off advancing by each access's size.
    assert all(port == PORT for port, _, _ in g.io_log), g.io_log
    assert all(d == is_in for _, d, _ in g.io_log), g.io_log
    assert all(len(data) == size for _, _, data in g.io_log), g.io_log
    iobuf = b"".join(data for _, _, data in g.io_log)
    assert len(iobuf) == len(wanted), f"{len(iobuf)} bytes of port I/O instead of {len(wanted)}: {g.io_log}"
    assert len(iobuf) <= IO_SIZE

    res = g.read(DATA, 4096) if is_in else iobuf
    assert cstr(res) == wanted, f"wanted {wanted!r}, got {cstr(res)!r}"

    if count is not None:
        # After REP INS/OUTS: the count (copied to RBP) is 0 and the pointer has moved past the string.
        mask = MODES[mode]["mask"]
        assert g.gpr(C.NVMM_X64_GPR_RBP) & mask == 0, f"count left after REP: {g.gpr(C.NVMM_X64_GPR_RBP):#x}"
        ptr = g.gpr(C.NVMM_X64_GPR_RDI if is_in else C.NVMM_X64_GPR_RSI)
        assert ptr & mask == DATA + len(wanted), f"string pointer {ptr:#x} after REP, wanted {DATA + len(wanted):#x}"
