"""bhyve's device models as pure Python state machines.

Each device is built with what it needs injected (an interrupt line, a timer service, guest memory, a backend)
and exposes ``read(offset, size) -> int`` / ``write(offset, size, value)`` for the bus range it is mapped at.
Nothing here imports ``ops`` or ``vmmshim``; see ``bhyve_devices.base`` for the small interfaces.
"""
