"""One AHCI port: its registers (AHCI 1.3.1 section 3.3) and its command engine (section 5: the command list, the
received FIS area, NCQ), after bhyve ``pci_ahci.c``'s ``ahci_port`` and ``ahci_handle_port``.

Registers: PxCLB/PxFB (latched when PxCMD.ST / PxCMD.FRE are set), PxIS (write 1 to clear) and PxIE, PxCMD (ST
starts the engine: CR follows; clearing ST stops it: CI, SACT and CR clear once no command is in flight; FRE/FR;
CLO clears BSY and DRQ; CCS names the slot last taken), PxTFD, PxSIG, PxSSTS, PxSCTL (DET=1 with ST clear: a
COMRESET, the device's signature FIS follows), PxSERR (write 1 to clear), PxSACT and PxCI (set by writing 1 while
ST is set).

The engine takes the issued slots (PxCI) one at a time, round robin from the one after CCS, while the port is
started and neither BSY, DRQ, an unanswered error nor a checkpoint (``Hba.held``, :mod:`.snap`) holds it. For
each it fetches the command (:class:`~bhyve_devices.ahci.command.Command`), and:

- a Register H2D FIS with C=0 is a device control write: SRST set then cleared resets the device (its signature
  D2H FIS);
- READ/WRITE FPDMA QUEUED and SEND FPDMA QUEUED (NCQ) are first accepted (a D2H FIS without interrupt; the slot
  leaves PxCI), then served; their end is a Set Device Bits FIS with the slot's PxSACT bit (PxIS.SDBS);
- any other command is served and ends with a D2H FIS (PxIS.DHRS), preceded by a PIO Setup FIS whose E_Status
  is the ending status for PIO data-in commands; the command header's PRDBC gets the bytes moved.

A disk whose backend has a compiled data command (``AtaDisk.compiled``) is offered each slot first: a DMA or NCQ
read or write it takes moves its data in C (an NCQ command after the port accepted it), and the port ends it
exactly as above; a slot it does not take is fetched and served in Python.

A command ending with ERR sets PxIS.TFES (not DHRS/SDBS), keeps its PxCI (or PxSACT) bit and holds the port
until software clears ST (AHCI 6.2.2). A command table or PRDT entry outside guest RAM is a host bus fatal error:
PxIS.HBFS, PxSERR.E, PxTFD ERR with ABRT, the slot stays issued and the port holds (nothing was moved). A FIS
that cannot be posted (the FIS area outside RAM) sets PxIS.HBFS too.

Threads: the engine serves a port on a thread of its own (bhyve's ``block_if`` threads), started when the port
is first started: the vCPU's PxCI write only marks the slot and wakes it, so a guest vCPU never waits for the
image (a flush, a 32 MiB read) and keeps issuing NCQ commands while one is served, and register reads (the
interrupt handler's PxIS/PxCI) never wait for a transfer: the HBA's lock is dropped while a command moves data.
With ``Hba.inline_max`` (``-o vmmshim.ahci_inline_kib``) the thread that wrote PxCI serves, after the lock is
dropped, the slots that are compiled transfers of at most that many bytes and flush nothing (:meth:`Port._short`),
and hands the port's thread the first slot that is not with the rest: a short command costs no thread hand-over
and its interrupt is injected at the writing vCPU's next entry, while a flush or a long transfer never holds a
vCPU. With ``threaded=False`` the engine runs on the thread that wrote the register, after its lock is dropped:
the tests' deterministic mode. Either way the FIS, the register updates and the interrupt happen together under the
lock. A reset (GHC.HR, COMRESET) while a command is being served drops that command's ending (the epoch).

Not supported: port multipliers and FIS-based switching, partial/slumber power states (ICC reads 0), hot plug
(PxIS.PCS, cold presence), several commands of one port in flight at once, aggressive link power management.
"""

import threading

from bhyve_devices.base import published

from . import ata
from .command import CFIS_BYTES, HostBusFault, Command, failed
from .layouts import (CMD_CLO, CMD_CR, CMD_FR, CMD_FRE, CMD_ICC_MASK, CMD_POD, CMD_ST, CMD_SUD, CMD_WRITABLE,
                      CMD_CCS_MASK, CMD_CCS_SHIFT, CLB_ALIGN, COMMAND_HEADER_SIZE, CONTROL_SRST, CTBA_ALIGN, D2H,
                      ERR_ABRT, HDR_ATAPI, HEADER,
                      FB_ALIGN, FIS_I, FIS_TYPE_D2H, FIS_TYPE_H2D, FIS_TYPE_PIO_SETUP, FIS_TYPE_SDB, H2D_C,
                      IE_MASK, IS_DHRS, IS_HBFS, IS_SDBS, IS_TFES, P_CI, P_CLB, P_CLBU, P_CMD, P_FB, P_FBU, P_IE,
                      P_IS, P_SACT, P_SCTL, P_SERR, P_SIG, P_SSTS, P_TFD, PIO_D, PIO_SETUP, RFIS_PSFIS, RFIS_RFIS,
                      RFIS_SDBFIS, SCTL_DET_COMRESET, SCTL_DET_MASK, SCTL_SPD_MASK, SDB, SERR_E, SIG_NONE,
                      SPEED_GEN3, SSTS_DET_PRESENT, SSTS_IPM_ACTIVE, STS_BSY, STS_DRDY, STS_DRQ, STS_ERR, STS_OK,
                      TFD_NONE)

MASK32 = 0xFFFFFFFF
FATAL, CONTROL, NCQ, DONE = range(4)
RESET_ERROR = 0x01                      #: the error register after a reset: diagnostics passed
_READABLE = {P_CLB: "clb", P_CLBU: "clbu", P_FB: "fb", P_FBU: "fbu", P_IS: "is_", P_IE: "ie", P_CMD: "cmd",
             P_TFD: "tfd", P_SIG: "sig", P_SSTS: "ssts", P_SCTL: "sctl", P_SERR: "serr", P_SACT: "sact",
             P_CI: "ci"}


class Port:
    """Port ``index`` of ``hba`` with ``device`` (an AtaDisk, an AtapiCd, or None: no device). PxIS, PxSACT and
    PxCI are published (``Hba.publish_reads``): an interrupt handler's reads of them need not exit."""

    PUBLISHED = (P_IS, P_SACT, P_CI)
    publish = None
    is_, sact, ci = published("is_", P_IS), published("sact", P_SACT), published("ci", P_CI)

    def __init__(self, hba, index, device):
        self.hba, self.index, self.device, self.bit = hba, index, device, 1 << index
        #: the disk may serve slots through its backend's compiled data command (never a CD)
        self.compiled = device is not None and not device.atapi and getattr(device, "compiled", False)
        self.clb = self.clbu = self.fb = self.fbu = 0
        self.is_ = self.ie = self.sctl = self.serr = self.sact = self.ci = 0
        self.cmd = CMD_SUD | CMD_POD
        self.tfd, self.sig, self.ssts = TFD_NONE, SIG_NONE, 0
        self.cmdlist = 0                # the command list's address, latched when ST is set
        self.fisbase = None             # the received-FIS area's, latched when FRE is set
        self.pending = 0                # the slot being served
        self.serving = False
        self.waitforclear = False       # an error holds the port until ST is cleared
        self.next_slot = 0
        self.epoch = 0                  # bumped by a reset: a command served meanwhile ends silently
        self.srst = False
        self._kicked = False
        self._closing = False
        self._cond = threading.Condition(hba.lock)
        self._thread = None
        self.reset_link()

    # -- registers (the HBA's lock is held) -------------------------------------------------------------------
    def read(self, reg):
        name = _READABLE.get(reg)
        return getattr(self, name) if name else 0

    def write(self, reg, value):
        if reg == P_CLB:
            self.clb = value & ~CLB_ALIGN & MASK32
        elif reg == P_CLBU:
            self.clbu = value
        elif reg == P_FB:
            self.fb = value & ~FB_ALIGN & MASK32
        elif reg == P_FBU:
            self.fbu = value
        elif reg == P_IS:
            self.is_ &= ~value
            self.hba.port_interrupt(self)
        elif reg == P_IE:
            self.ie = value & IE_MASK
            self.hba.port_interrupt(self)
        elif reg == P_CMD:
            self._write_cmd(value)
        elif reg == P_SCTL:
            self.sctl = value & 0xFFF
            if not self.cmd & CMD_ST and value & SCTL_DET_MASK == SCTL_DET_COMRESET:
                self.reset_link()
        elif reg == P_SERR:
            self.serr &= ~value
        elif reg == P_SACT:
            if self.cmd & CMD_ST:
                self.sact |= value
        elif reg == P_CI:
            if self.cmd & CMD_ST:
                self.ci |= value
                self.kick()

    def _write_cmd(self, value):
        was = self.cmd
        cmd = (was & ~CMD_WRITABLE) | (value & CMD_WRITABLE)
        if value & CMD_FRE:
            if not was & CMD_FRE or self.fisbase is None:
                self.fisbase = (self.fbu << 32) | self.fb
            cmd |= CMD_FR
        else:
            cmd &= ~CMD_FR
            self.fisbase = None
        if value & CMD_ST and not was & CMD_ST:
            self.cmdlist = (self.clbu << 32) | self.clb
            cmd |= CMD_CR
        if value & CMD_CLO:
            self.tfd &= ~(STS_BSY | STS_DRQ)
        self.cmd = cmd & ~(CMD_CLO | CMD_ICC_MASK)
        self.check_stopped()
        if self.cmd & CMD_ST:
            self.kick()

    def check_stopped(self):
        """With ST clear and nothing in flight: CR, CCS, CI and SACT clear (bhyve's ``ahci_check_stopped``)."""
        if not self.cmd & CMD_ST and not self.pending:
            self.cmd &= ~(CMD_CR | CMD_CCS_MASK)
            self.ci = self.sact = 0
            self.next_slot = 0
            self.waitforclear = False

    def hba_reset(self):
        """GHC.HR: the port's registers to their defaults, and a COMRESET (CR stays set while a transfer that
        cannot be called back is still running; its ending is dropped)."""
        self.ie = self.is_ = self.sctl = 0
        self.cmd = CMD_SUD | CMD_POD | (self.cmd & CMD_CR if self.pending else 0)
        self.fisbase = None
        self.reset_link()
        self.check_stopped()

    def reset_link(self):
        """A COMRESET: the link comes up, the device resets and sends its signature (bhyve's
        ``ahci_port_reset``)."""
        self.epoch += 1
        self.serr = self.sact = 0
        self.srst = False
        if self.device is None:
            self.ssts, self.sig, self.tfd = 0, SIG_NONE, TFD_NONE
            return
        self.ssts = SSTS_DET_PRESENT | (self.sctl & SCTL_SPD_MASK or SPEED_GEN3 << 4) | SSTS_IPM_ACTIVE
        self.reset_device()

    def reset_device(self):
        dev = self.device
        dev.reset()
        sig = dev.signature
        status = 0 if dev.atapi else STS_OK
        self.sig, self.tfd = sig, RESET_ERROR << 8 | status
        tf = bytes(((sig >> 8) & 0xFF, (sig >> 16) & 0xFF, sig >> 24, 0, 0, 0, 0))
        self._post(RFIS_RFIS, D2H.pack(FIS_TYPE_D2H, 0, status, RESET_ERROR, tf, 0, sig & 0xFF, 0), 0)

    # -- the engine -----------------------------------------------------------------------------------------------
    def kick(self):
        """Slots were issued, or the port started (the lock is held): wake the engine."""
        if self.device is None or self._closing:
            return
        if not self.hba.threaded or self.hba.inline_max:
            self.hba.inline.append(self)        # the writer serves it once the lock is dropped (serve_here)
            return
        self._wake()

    def _wake(self):
        """Wakes the port's thread (the lock is held)."""
        self._kicked = True
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name=f"ahci-port{self.index}", daemon=True)
            self._thread.start()
        self._cond.notify()

    def _worker(self):
        while True:
            with self._cond:
                while not self._kicked and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                self._kicked = False
            self.serve()

    def serve(self):
        """Serves issued slots until none can be taken."""
        while self._serve_one():
            pass

    def serve_here(self):
        """After a register write that kicked the port (the lock dropped), on the writing thread: every issued
        slot (``threaded=False``), or, with the port's thread, the short transfers (:meth:`_short`) until a slot
        that is not one, which goes to the thread with the rest."""
        if not self.hba.threaded:
            self.serve()
            return
        while True:
            with self.hba.lock:
                slot = self._next()
                if slot is None:
                    return
                if not self._short(slot):
                    self._wake()
                    return
                job = self._take()
            self._finish(*job)

    def _short(self, slot):
        """Whether ``slot``'s command is a compiled transfer of at most ``Hba.inline_max`` bytes (the lock is
        held; a header or FIS outside RAM is not: the thread reports it)."""
        if not self.compiled:
            return False
        try:
            flags, _, _, ctba = HEADER.unpack(self.hba.mem.view(self.cmdlist + slot * COMMAND_HEADER_SIZE,
                                                                HEADER.size))
            cfis = self.hba.mem.view(ctba & ~CTBA_ALIGN, CFIS_BYTES)
        except (OSError, ValueError):
            return False
        n = None if flags & HDR_ATAPI else self.device.compiled_length(cfis)
        return n is not None and n <= self.hba.inline_max

    def _next(self):
        """The slot :meth:`_take` would take, or None (the lock is held)."""
        if (self.device is None or not self.cmd & CMD_ST or self.serving or self.waitforclear or self.hba.held
                or self.tfd & (STS_BSY | STS_DRQ)):
            return None
        avail = self.ci & ~self.pending
        if not avail:
            return None
        n = self.next_slot
        rot = ((avail >> n) | (avail << (32 - n))) & MASK32
        return (n + (rot & -rot).bit_length() - 1) & 31

    def _take(self):
        slot = self._next()
        if slot is None:
            return None
        self.next_slot = (slot + 1) & 31
        self.cmd = (self.cmd & ~CMD_CCS_MASK) | (slot << CMD_CCS_SHIFT)
        self.pending |= 1 << slot
        self.serving = True
        self.tfd |= STS_BSY
        return slot, self.epoch, self.cmdlist

    def _serve_one(self):
        with self.hba.lock:
            job = self._take()
        if job is None:
            return False
        self._finish(*job)
        return True

    def _finish(self, slot, epoch, cmdlist):
        """Serves the slot :meth:`_take` took, and ends it."""
        kind, cmd, res = self._run(slot, epoch, cmdlist)
        with self.hba.lock:
            self.pending &= ~(1 << slot)
            self.serving = False
            if self.hba.held:
                self.hba.idle.notify_all()      # a checkpoint waits for the command being served (snap.quiesced)
            if epoch == self.epoch:
                if kind == FATAL:
                    self._fatal()
                elif kind == CONTROL:
                    self._control(slot, cmd)
                elif kind == NCQ:
                    self._ncq_done(slot, res)
                else:
                    self._done(slot, cmd, res)
            self.check_stopped()

    def _run(self, slot, epoch, cmdlist):
        """Fetches and serves one command without the lock: ``(kind, command, result)``."""
        if self.compiled:
            done = self._run_compiled(slot, epoch, cmdlist)
            if done is not None:
                return done
        try:
            cmd = Command.fetch(self.hba.mem, cmdlist, slot)
        except HostBusFault:
            return FATAL, None, None
        c = cmd.cfis
        if c[0] != FIS_TYPE_H2D:
            return DONE, cmd, failed(ERR_ABRT)
        if not c[1] & H2D_C:
            return CONTROL, cmd, None
        queued = not self.device.atapi and c[2] in ata.NCQ
        if queued:
            with self.hba.lock:
                if epoch == self.epoch:
                    self._ncq_accept(slot)
        try:
            res = self.device.execute(cmd)
            if not queued and (res.transferred or cmd.prdtl):
                cmd.set_prdbc(res.transferred)
        except HostBusFault:
            return FATAL, cmd, None
        except Exception as exc:        # a bug: the command aborts, the VM goes on, the tests see it
            self.hba.errors.append(f"port {self.index} command {c[2]:#04x}: {exc!r}")
            res = failed(ERR_ABRT)
        return (NCQ if queued else DONE), cmd, res

    def _run_compiled(self, slot, epoch, cmdlist):
        """The slot through the disk's compiled data command (:meth:`.ata.AtaDisk.serve_compiled`), in :meth:`_run`'s
        order: an NCQ command is accepted before its data moves (:meth:`.ata.AtaDisk.end_compiled`), a command that
        is not queued gets its PRDBC. None where the disk did not take it."""
        ram = getattr(self.hba.mem, "ram", None)
        if ram is None:
            return None
        try:
            got = self.device.serve_compiled(ram, cmdlist, slot)
        except Exception as exc:        # a bug: the Python path serves the slot, the tests see it
            self.hba.errors.append(f"port {self.index} compiled slot {slot}: {exc!r}")
            return None
        if got is None:
            return None
        flags, prdtl, cfis = got
        cmd = Command(self.hba.mem, slot, flags, prdtl, cfis, b"", memoryview(b""),
                      cmdlist + slot * COMMAND_HEADER_SIZE)
        queued = cfis[2] in ata.NCQ
        if queued:
            with self.hba.lock:
                if epoch == self.epoch:
                    self._ncq_accept(slot)
        try:
            res = self.device.end_compiled()
            if queued:
                return NCQ, cmd, res
            cmd.set_prdbc(res.transferred)
        except HostBusFault:
            return FATAL, cmd, None
        except Exception as exc:        # a bug, as in _run
            self.hba.errors.append(f"port {self.index} command {cfis[2]:#04x}: {exc!r}")
            res = failed(ERR_ABRT)
        return (NCQ if queued else DONE), cmd, res

    # -- endings (the lock is held) -------------------------------------------------------------------------------
    def _post(self, offset, fis, irq):
        """Copies ``fis`` into the received-FIS area (with FRE) and raises ``irq`` (PxIS bits)."""
        if fis and self.cmd & CMD_FRE and self.fisbase is not None:
            try:
                self.hba.mem.view(self.fisbase + offset, len(fis))[:] = fis
            except OSError:
                irq |= IS_HBFS
                self.serr |= SERR_E
        if irq & ~self.is_:
            self.is_ |= irq
            self.hba.port_interrupt(self)

    def _error_irq(self, status, normal):
        if status & STS_ERR:
            self.waitforclear = True
            return IS_TFES
        return normal

    def _ncq_accept(self, slot):
        self.tfd = STS_OK
        self.ci &= ~(1 << slot)
        self._post(RFIS_RFIS, D2H.pack(FIS_TYPE_D2H, 0, STS_OK, 0, bytes(7), 0, 0, 0), 0)

    def _ncq_done(self, slot, res):
        status = res.status & 0x77
        self.tfd = (res.error << 8) | (self.tfd & ~0x77 & 0xFF) | status
        done = 0 if res.failed else 1 << slot
        self.sact &= ~done
        self._post(RFIS_SDBFIS, SDB.pack(FIS_TYPE_SDB, FIS_I, status, res.error, done),
                   self._error_irq(status, IS_SDBS))

    def _done(self, slot, cmd, res):
        c = cmd.cfis
        tf = res.tf if res.tf is not None else c[4:11]
        count = res.count if res.count is not None else c[12] | c[13] << 8
        if res.pio:
            self._post(RFIS_PSFIS, PIO_SETUP.pack(FIS_TYPE_PIO_SETUP, PIO_D, STS_DRDY | STS_DRQ, 0, tf, 0,
                                                  count & 0xFF, count >> 8 & 0xFF, 0, res.status,
                                                  min(res.transferred, 0xFFFF), 0), 0)
        self.tfd = (res.error << 8) | res.status
        if not res.failed:
            self.ci &= ~(1 << slot)
        self._post(RFIS_RFIS, D2H.pack(FIS_TYPE_D2H, FIS_I, res.status, res.error, bytes(tf), 0, count & 0xFF,
                                       count >> 8 & 0xFF), self._error_irq(res.status, IS_DHRS))

    def _control(self, slot, cmd):
        self.ci &= ~(1 << slot)
        self.tfd &= ~(STS_BSY | STS_DRQ)
        if cmd.cfis[15] & CONTROL_SRST:
            self.srst = True
        elif self.srst:
            self.srst = False
            self.reset_device()

    def _fatal(self):
        self.serr |= SERR_E
        self.tfd = ERR_ABRT << 8 | STS_DRDY | STS_ERR
        self.waitforclear = True
        self._post(0, b"", IS_HBFS)

    # -- teardown -------------------------------------------------------------------------------------------------
    def close(self):
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        if self.device is not None:
            self.device.close()
