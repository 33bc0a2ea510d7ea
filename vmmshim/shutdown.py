"""Ending a running VM from the host: SIGTERM, SIGHUP and SIGINT, the console's escape keys and the forced power
off, as bhyve and QEMU users expect them.

- **Signals** (bhyve's ``SIGTERM`` handler in ``bhyverun.c`` presses the ACPI power button; vmmshim treats
  ``SIGHUP`` and ``SIGINT`` alike, so Ctrl-C on a console that is not a raw tty ends the VM the same way): the
  first one presses the power button (a guest that has not enabled ACPI is powered off at once, see
  :meth:`vmmshim.platform.Platform.press_power_button`); a second one, or ``vmmshim.poweroff_timeout_s`` seconds
  without the guest powering off, powers the VM off (status 1, bhyve's power off) with one line on stderr that
  says why. A signal before the guest runs ends the command with :class:`Interrupted` (status 4). A signal the
  parent process ignores (``nohup``'s SIGHUP, SIGINT in a shell's background job) stays ignored.
- **The escape keys** of the ``stdio`` console when stdin is a tty (it is in raw mode, so Ctrl-C goes to the
  guest): ``Ctrl-A x`` powers off at once, ``Ctrl-A b`` presses the power button, ``Ctrl-A h`` prints the keys,
  ``Ctrl-A Ctrl-A`` sends one Ctrl-A (QEMU's ``-serial mon:stdio`` keys). ``vmmshim/backends/escape.py`` takes
  them out of the input stream and the backend calls :meth:`Shutdown.escape` with the key.

Not supported: QEMU's monitor (``Ctrl-A c``), cu's ``~.`` escape, ``SIGUSR1``/``SIGUSR2``.
"""

import signal
import threading

from .backends.escape import ESCAPE_HELP, KEY_BUTTON, KEY_HELP, KEY_POWEROFF

#: The signals that end a VM.
SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class Interrupted(BaseException):
    """A signal arrived before the guest ran: unwinds the setup (restoring the terminal) to status 4."""

    def __init__(self, name):
        super().__init__(f"{name} before the guest started")


class Shutdown:
    """The VM's host-side off switch: ``power_button()`` asks the guest (False where the guest has not enabled
    ACPI), ``power_off(why)`` ends the VM (the runner gives ``vm.stop``), ``say(bytes)`` writes to the console (the escape help). :meth:`install` takes the
    signals until :meth:`uninstall`; :meth:`running` marks the moment the guest starts."""

    def __init__(self, power_button=None, power_off=None, timeout_s=30.0, say=None):
        self.power_button, self.power_off = power_button, power_off
        self.timeout_s = timeout_s
        self.say = say
        self.pressed_by = None          # what pressed the button first
        self._running = False
        self._lock = threading.Lock()
        self._timer = None
        self._old = {}

    def install(self):
        """Takes the signals, except those the parent set to be ignored (``nohup``'s SIGHUP, SIGINT for a
        shell's background job), as every Unix command does."""
        for sig in SIGNALS:
            if signal.getsignal(sig) != signal.SIG_IGN:
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self):
        self.cancel()
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def running(self, power_button, power_off):
        """The guest runs from now on: signals press ``power_button`` and force ``power_off``."""
        self.power_button, self.power_off = power_button, power_off
        self._running = True

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if not self._running:
            raise Interrupted(name)
        self.request(name)

    def request(self, why):
        """A polite request to end the VM (a signal): the power button first, then the forced power off."""
        with self._lock:
            first = self.pressed_by is None
            if first:
                self.pressed_by = why
                if self.timeout_s > 0:
                    self._timer = threading.Timer(self.timeout_s, self._timed_out)
                    self._timer.daemon = True
                    self._timer.start()
        if first:
            if not self.power_button():
                self.power_off(f"{why}: powered off (the guest has not enabled ACPI: no power button to press)")
        else:
            self.power_off(f"powered off by a second signal ({self.pressed_by}, then {why})")

    def _timed_out(self):
        self.power_off(f"powered off: the guest ignored the ACPI power button ({self.pressed_by}) for "
                       f"{self.timeout_s:g} s")

    def escape(self, key):
        """A console escape key (see the module docstring)."""
        if key == KEY_POWEROFF:
            self.power_off("powered off (Ctrl-A x)")
        elif key == KEY_BUTTON:
            if not self.power_button():
                self.power_off("powered off (Ctrl-A b: the guest has not enabled ACPI)")
        elif key == KEY_HELP and self.say is not None:
            self.say(ESCAPE_HELP)

    def cancel(self):
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
