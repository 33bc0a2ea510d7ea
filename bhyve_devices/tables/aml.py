"""A minimal AML encoder and reader, enough for bhyve's DSDT without iasl.

ACPI 6.x chapter 20 "ACPI Machine Language (AML) Specification": 20.2.4 PkgLength (1-4 bytes), 20.2.2 name
strings (4-character segments, ``\\`` root and ``^`` parent prefixes, DualNamePrefix 0x2E, MultiNamePrefix
0x2F), 20.2.3 data objects (ZeroOp, OneOp, OnesOp, Byte/Word/DWord/QWord prefixes, String, Buffer, Package),
20.2.5 named objects (NameOp 0x08, ScopeOp 0x10, MethodOp 0x14, DeviceOp 0x5B 0x82), ReturnOp 0xA4, StoreOp
0x70, Arg0-6 0x68-0x6E. Section 19.6.37 EISAID's compression. Resource descriptors: ACPI 6.x section 6.4
(small IO 0x47, IRQ 0x22/0x23, End Tag 0x79; large Memory32Fixed 0x86, DWord address space 0x87, Word address
space 0x88, QWord address space 0x8A).

Every encoder returns ``bytes``; a term list is the concatenation of terms. :func:`parse_terms` reads back what
these encoders emit into ``(kind, ...)`` tuples, and :func:`parse_resources` a resource template's descriptors.

Not supported: everything else in AML (fields, operation regions, control flow, arithmetic, references beyond
name strings in Store), and, in the reader, opcodes these encoders do not emit (ValueError).
"""

import struct

ZERO, ONE, ONES = 0x00, 0x01, 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP, METHOD_OP = 0x08, 0x10, 0x11, 0x12, 0x14
EXT_PREFIX, DEVICE_OP = 0x5B, 0x82
RETURN_OP, STORE_OP, ARG0_OP = 0xA4, 0x70, 0x68
DUAL_NAME, MULTI_NAME, ROOT_CHAR, PARENT_CHAR = 0x2E, 0x2F, 0x5C, 0x5E


# -- encoding -------------------------------------------------------------------------------------------
def pkglength(n):
    """The PkgLength of a body of ``n`` bytes (the length counts its own bytes)."""
    if n + 1 <= 0x3F:
        return bytes([n + 1])
    for extra in (1, 2, 3):
        total = n + 1 + extra
        if total < 1 << (4 + 8 * extra):
            out = [((extra << 6) | (total & 0xF))]
            out += [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)]
            return bytes(out)
    raise ValueError("AML package too long")


def nameseg(seg):
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_") or \
            not all(c.isupper() or c.isdigit() or c == "_" for c in seg):
        raise ValueError(f"bad AML name segment {seg!r}")
    return seg.ljust(4, "_").encode()


def namestring(name):
    """``"\\_SB.PC00"``, ``"^FOO"``, ``"_HID"`` as an AML NameString."""
    prefix = b""
    while name.startswith(("\\", "^")):
        prefix += name[0].encode()
        name = name[1:]
    segs = [s for s in name.split(".") if s] if name else []
    if not segs:
        return prefix + b"\x00"
    body = b"".join(nameseg(s) for s in segs)
    if len(segs) == 1:
        return prefix + body
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME]) + body
    return prefix + bytes([MULTI_NAME, len(segs)]) + body


def integer(v):
    if v == 0:
        return bytes([ZERO])
    if v == 1:
        return bytes([ONE])
    if v == 0xFFFFFFFFFFFFFFFF:
        return bytes([ONES])
    for prefix, fmt, lim in ((BYTE_PREFIX, "<B", 0xFF), (WORD_PREFIX, "<H", 0xFFFF),
                             (DWORD_PREFIX, "<I", 0xFFFFFFFF), (QWORD_PREFIX, "<Q", 0xFFFFFFFFFFFFFFFF)):
        if 0 <= v <= lim:
            return bytes([prefix]) + struct.pack(fmt, v)
    raise ValueError(f"integer {v} out of range")


def string(s):
    b = s.encode("ascii")
    if b"\x00" in b:
        raise ValueError("NUL in AML string")
    return bytes([STRING_PREFIX]) + b + b"\x00"


def eisaid(s):
    """``EISAID("PNP0A03")`` as its DWord integer (0x030AD041)."""
    if len(s) != 7 or not s[:3].isalpha() or not s[:3].isupper():
        raise ValueError(f"bad EISA id {s!r}")
    c = [ord(ch) - 0x40 for ch in s[:3]]
    v = (c[0] << 26) | (c[1] << 21) | (c[2] << 16) | int(s[3:], 16)
    return int.from_bytes(v.to_bytes(4, "big"), "little")


def _data(v):
    if isinstance(v, bytes):
        return v
    if isinstance(v, bool):
        return integer(int(v))
    if isinstance(v, int):
        return integer(v)
    if isinstance(v, str):
        return string(v)
    if isinstance(v, (list, tuple)):
        return package(v)
    raise TypeError(f"no AML encoding for {v!r}")


def buffer(data):
    data = bytes(data)
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkglength(len(body)) + body


def package(elements):
    if len(elements) > 255:
        raise ValueError("Package of more than 255 elements")
    body = bytes([len(elements)]) + b"".join(_data(e) for e in elements)
    return bytes([PACKAGE_OP]) + pkglength(len(body)) + body


def name(n, value):
    """``Name(n, value)``: ``value`` an int, str, list (Package) or encoded bytes."""
    return bytes([NAME_OP]) + namestring(n) + _data(value)


def scope(n, *terms):
    body = namestring(n) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkglength(len(body)) + body


def device(n, *terms):
    body = namestring(n) + b"".join(terms)
    return bytes([EXT_PREFIX, DEVICE_OP]) + pkglength(len(body)) + body


def method(n, nargs, *terms, serialized=False):
    flags = (nargs & 7) | (0x08 if serialized else 0)
    body = namestring(n) + bytes([flags]) + b"".join(terms)
    return bytes([METHOD_OP]) + pkglength(len(body)) + body


def return_(value):
    return bytes([RETURN_OP]) + _data(value)


def arg(n):
    return bytes([ARG0_OP + n])


def store(src, target_name):
    return bytes([STORE_OP]) + _data(src) + namestring(target_name)


# -- resource descriptors (ACPI 6.x 6.4) ----------------------------------------------------------------
def res_io(minimum, maximum, align, length, decode16=True):
    return struct.pack("<BBHHBB", 0x47, 1 if decode16 else 0, minimum, maximum, align, length)


def res_irq(*irqs, flags=None):
    """IRQNoFlags (no ``flags``) or IRQ with the information byte ``flags`` (bit 0 level, 3 active-low,
    4 shared)."""
    mask = 0
    for i in irqs:
        mask |= 1 << i
    if flags is None:
        return struct.pack("<BH", 0x22, mask)
    return struct.pack("<BHB", 0x23, mask, flags)


def res_mem32_fixed(base, length, writable=True):
    return struct.pack("<BHBII", 0x86, 9, 1 if writable else 0, base, length)


# general flags: bit 0 consumer, 1 subtractive decode, 2 min fixed, 3 max fixed
PRODUCER_FIXED = 0x0C
RT_MEM, RT_IO, RT_BUS = 0, 1, 2


def res_word_bus(minimum, maximum, flags=PRODUCER_FIXED):
    return struct.pack("<BHBBBHHHHH", 0x88, 13, RT_BUS, flags, 0, 0, minimum, maximum, 0,
                       maximum - minimum + 1)


def res_dword_io(minimum, maximum, flags=PRODUCER_FIXED):
    return struct.pack("<BHBBBIIIII", 0x87, 23, RT_IO, flags, 0x03, 0, minimum, maximum, 0,
                       maximum - minimum + 1)


def res_dword_mem(minimum, maximum, flags=PRODUCER_FIXED, cacheable=False, prefetchable=False):
    tsf = 1 | ((3 if prefetchable else 1 if cacheable else 0) << 1)
    return struct.pack("<BHBBBIIIII", 0x87, 23, RT_MEM, flags, tsf, 0, minimum, maximum, 0,
                       maximum - minimum + 1)


def res_qword_mem(minimum, maximum, flags=PRODUCER_FIXED, cacheable=False, prefetchable=False):
    tsf = 1 | ((3 if prefetchable else 1 if cacheable else 0) << 1)
    return struct.pack("<BHBBBQQQQQ", 0x8A, 43, RT_MEM, flags, tsf, 0, minimum, maximum, 0,
                       maximum - minimum + 1)


def resource_template(*descriptors):
    """``ResourceTemplate(){...}`` as a Buffer, closed by an End Tag with checksum 0."""
    return buffer(b"".join(descriptors) + b"\x79\x00")


# -- reading back ---------------------------------------------------------------------------------------
def read_pkglength(b, i):
    """``(length, index after the PkgLength)``; ``length`` counts the PkgLength bytes themselves."""
    lead = b[i]
    extra = lead >> 6
    if extra == 0:
        return lead & 0x3F, i + 1
    v = lead & 0x0F
    for k in range(extra):
        v |= b[i + 1 + k] << (4 + 8 * k)
    return v, i + 1 + extra


def read_namestring(b, i):
    out = ""
    while b[i] in (ROOT_CHAR, PARENT_CHAR):
        out += chr(b[i])
        i += 1
    if b[i] == 0:
        return out, i + 1
    if b[i] == DUAL_NAME:
        n, i = 2, i + 1
    elif b[i] == MULTI_NAME:
        n, i = b[i + 1], i + 2
    else:
        n = 1
    segs = [b[i + 4 * k:i + 4 * k + 4].decode("ascii") for k in range(n)]
    return out + ".".join(segs), i + 4 * n


def _read_data(b, i):
    op = b[i]
    if op in (ZERO, ONE):
        return ("int", op), i + 1
    if op == ONES:
        return ("int", 0xFFFFFFFFFFFFFFFF), i + 1
    sizes = {BYTE_PREFIX: 1, WORD_PREFIX: 2, DWORD_PREFIX: 4, QWORD_PREFIX: 8}
    if op in sizes:
        n = sizes[op]
        return ("int", int.from_bytes(b[i + 1:i + 1 + n], "little")), i + 1 + n
    if op == STRING_PREFIX:
        end = b.index(0, i + 1)
        return ("str", b[i + 1:end].decode("ascii")), end + 1
    if op == BUFFER_OP:
        ln, j = read_pkglength(b, i + 1)
        end = i + 1 + ln
        (_, size), j = _read_data(b, j)
        data = bytes(b[j:end])
        if len(data) != size:
            raise ValueError(f"Buffer size {size} != {len(data)} bytes at {i:#x}")
        return ("buffer", data), end
    if op == PACKAGE_OP:
        ln, j = read_pkglength(b, i + 1)
        end = i + 1 + ln
        count, j = b[j], j + 1
        elems = []
        while j < end:
            e, j = _read_data(b, j)
            elems.append(e)
        if len(elems) != count or j != end:
            raise ValueError(f"Package at {i:#x}: {len(elems)} elements, NumElements {count}")
        return ("package", elems), end
    if ARG0_OP <= op <= ARG0_OP + 6:
        return ("arg", op - ARG0_OP), i + 1
    raise ValueError(f"unknown AML data opcode {op:#x} at {i:#x}")


def parse_terms(b, i=0, end=None):
    """Parses a term list into ``[("name", n, data) | ("scope", n, terms) | ("device", n, terms) |
    ("method", n, flags, terms) | ("return", data) | ("store", data, n)]``."""
    end = len(b) if end is None else end
    out = []
    while i < end:
        op = b[i]
        if op == NAME_OP:
            n, j = read_namestring(b, i + 1)
            d, i = _read_data(b, j)
            out.append(("name", n, d))
        elif op in (SCOPE_OP, METHOD_OP) or (op == EXT_PREFIX and b[i + 1] == DEVICE_OP):
            start = i + (2 if op == EXT_PREFIX else 1)
            ln, j = read_pkglength(b, start)
            stop = start + ln
            if stop > end:
                raise ValueError(f"package at {i:#x} runs past its parent ({stop:#x} > {end:#x})")
            n, j = read_namestring(b, j)
            if op == METHOD_OP:
                out.append(("method", n, b[j], parse_terms(b, j + 1, stop)))
            else:
                out.append(("scope" if op == SCOPE_OP else "device", n, parse_terms(b, j, stop)))
            i = stop
        elif op == RETURN_OP:
            d, i = _read_data(b, i + 1)
            out.append(("return", d))
        elif op == STORE_OP:
            d, j = _read_data(b, i + 1)
            n, i = read_namestring(b, j)
            out.append(("store", d, n))
        else:
            raise ValueError(f"unknown AML opcode {op:#x} at {i:#x}")
    return out


def parse_resources(data):
    """A resource template's descriptors as ``[(tag, bytes of the descriptor)]``; checks the End Tag."""
    out, i = [], 0
    while i < len(data):
        t = data[i]
        if t & 0x80:
            ln = 3 + int.from_bytes(data[i + 1:i + 3], "little")
            out.append((t, bytes(data[i:i + ln])))
        else:
            ln = 1 + (t & 7)
            out.append((t >> 3, bytes(data[i:i + ln])))
            if t >> 3 == 0xF:
                if i + ln != len(data):
                    raise ValueError("bytes after the End Tag")
                return out
        i += ln
    raise ValueError("resource template without an End Tag")
