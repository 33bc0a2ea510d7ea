"""Linux ioctl request numbers (``include/uapi/asm-generic/ioctl.h``): ``_IOC``, ``_IO``, ``_IOR``, ``_IOW``,
``_IOWR``, the one place vmmshim encodes them (the KVM provider's ``ops/nvmm/kvm/ioctls.py``, the tap backend's
``vmmshim/backends/net.py``).

A request is ``dir << 30 | size << 16 | type << 8 | nr``. ``size`` is the argument's size in bytes: an ``int``, or
anything with ``sizeof()`` (a ``construct`` layout), where C passes the argument's type to ``sizeof``.

Not supported: the architectures with other encodings (alpha, mips, powerpc, sparc: 13-bit sizes, another
``_IOC_NONE``/``_IOC_READ``/``_IOC_WRITE``); NetBSD's ``_IOC`` (``sys/ioccom.h``), whose bits differ.
"""

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS


def _size(arg):
    return arg if isinstance(arg, int) else arg.sizeof()


def _IOC(direction, type_, nr, size):  # noqa: N802 - the C macro's name
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit {_IOC_SIZEBITS} bits")
    if not 0 <= nr < (1 << _IOC_NRBITS) or not 0 <= type_ < (1 << _IOC_TYPEBITS):
        raise ValueError(f"ioctl type {type_:#x} or number {nr:#x} does not fit {_IOC_NRBITS} bits")
    return ((direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT)
            | (size << _IOC_SIZESHIFT))


def _IO(type_, nr):  # noqa: N802
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_, nr, arg):  # noqa: N802
    """The device writes ``arg`` (an int size or a layout) for the caller to read."""
    return _IOC(_IOC_READ, type_, nr, _size(arg))


def _IOW(type_, nr, arg):  # noqa: N802
    """The caller writes ``arg`` (an int size or a layout) for the device to read."""
    return _IOC(_IOC_WRITE, type_, nr, _size(arg))


def _IOWR(type_, nr, arg):  # noqa: N802
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, _size(arg))
