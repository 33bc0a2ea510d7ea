"""A PCI emulation's options as bhyve hands them over (``pci_emul.c``): a dict of ``bhyve_config(5)`` keys, or the
legacy ``-s`` option string an emulation parses itself (``pe_legacy_config``), and bhyve's booleans.

Not supported: nested option trees (``port.N.key`` stays a flat key), ``%(var)`` expansion (the configuration
does it before a device sees a value).
"""

FALSE_WORDS = ("false", "0", "no", "off")


def as_options(opts, parse):
    """An emulation's options as a dict: bhyve config keys as given, or the legacy ``-s`` string parsed."""
    if opts is None:
        return {}
    if isinstance(opts, str):
        return parse(opts)
    return dict(opts)


def legacy_options(text, first_key):
    """bhyve's common legacy grammar ``FIRST[,KEY=VALUE|,FLAG]...`` -> the keys ``-s`` would store: the first bare
    word under ``first_key`` (a path, a backend name), ``KEY=VALUE`` as is, a later bare flag as ``"true"``."""
    out = {}
    for i, part in enumerate(text.split(",") if text else []):
        key, eq, value = part.partition("=")
        if eq:
            out[key] = value
        elif i == 0:
            out[first_key] = part
        elif part:
            out[part] = "true"
    return out


def is_true(v):
    """A bhyve boolean option: True, or a string other than false/0/no/off."""
    return v is True or (isinstance(v, str) and v.lower() not in FALSE_WORDS)


def is_false(v):
    """The opposite of :func:`is_true` for a value that was given: False, or false/0/no/off."""
    return v is False or (isinstance(v, str) and v.lower() in FALSE_WORDS)
