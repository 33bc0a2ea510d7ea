"""The engine's local-APIC glue (part of bhyve's ``vmm.c`` and ``vmx.c`` in their role next to ``vlapic.c``): what
the vCPU's CPU state and the Python vlapic must agree on, on any NVMM provider, and the injection of their
interrupts.

- :func:`inject_interrupt` (bhyve's ``vmx_inject_interrupts``): the vlapic's vector or the 8259's (ExtINT, its
  INTA cycle run here) injected before an entry, with NVMM's one event slot, or the interrupt window requested.

- CR8 and the TPR are one value (Intel SDM vol. 3A 10.8.6.1 "Interaction of Task Priorities between CR8 and
  APIC"): the guest's CR8, which NVMM reports in every exit's state (``exitstate.cr8``), goes into the vlapic's
  TPR before the engine looks at priorities (:func:`tpr_from_guest`: before an injection, a HLT's sleep, an
  access to the APIC page or MSRs, a TPR_CHANGED exit), and a TPR the guest wrote through the APIC page or the
  x2APIC MSR goes into CR8 before the next entry (:func:`tpr_to_guest`), as QEMU's NVMM accelerator keeps them.
- CPUID.1:EDX.APIC follows IA32_APIC_BASE.EN (10.4.3 "Enabling or Disabling the Local APIC"): the leaf 1 mask
  of :func:`leaf1_cpuid`, configured again when a WRMSR turns the APIC off or on.
- Where the provider's run loop injects at the interrupt window itself (the KVM provider's ``interrupt_window``:
  ``ops/nvmm/kvm/intwin.py``), the window request posts the vector the vlapic would take there
  (:func:`post_window`), and a kick from another thread posts it while the vCPU runs (:func:`post_kick`); the
  loop's injection is accepted in the vlapic when the run returns
  (:func:`window_taken`), before any exit is handled.
- The KVM provider's ticker thread posts a TSC-deadline tick to the run loop itself where :func:`plan_tick` said
  what the vlapic would deliver then; what it took over and found ended in the guest is accepted and ended first
  when the slot comes back (:func:`take_folds`), and a tick it posted that the loop did not inject fires in the vlapic
  (:func:`window_withdrawn`).
- What wakes a HLT with interrupts enabled (:func:`interrupt_waiting`): a vlapic vector above the PPR, or the
  8259's INTR through LINT0 (ExtINT, or the plain INTR pin of an APIC that is not enabled: 10.4.7.2, 10.5.1).

Not supported: another vCPU reading this one's PPR (lowest-priority arbitration) sees the TPR of its last
exit, not a CR8 write since; a provider whose CPU keeps no CR8 of its own (the soft CPU) shows TPR writes in
NVMM's state only.
"""

from .nvmm import api
from .nvmm import constants as C

SPARED = "spared"                  # post_kick_taken: nothing posted, and no kick needed
INTR_WINDOW = 0x2                  # nvmm_x64_state_intr.int_window_exiting
CPUID_1_EDX_APIC = 1 << 9          # leaf 1 EDX bit 9: an on-chip local APIC, enabled
CR8_MASK = 0xF


def tpr_from_guest(ctx):
    """After an exit: the guest's CR8 into the vlapic's TPR, when it moved since CR8 and TPR last agreed (a TPR
    written through the page keeps its low nibble until the guest writes CR8)."""
    cr8 = ctx.nv.exit.cr8 & CR8_MASK
    if cr8 != ctx.cr8:
        ctx.cr8 = cr8
        ctx.vlapic.set_cr8(cr8)


def tpr_to_guest(ctx):
    """Right before an entry: a TPR written through the APIC page or MSR (or reset) into the guest's CR8. Only
    here, so that no exit state older than this write is read back by :func:`tpr_from_guest`."""
    cr8 = ctx.vlapic.get_cr8()
    if cr8 != ctx.cr8:
        ctx.cr8 = cr8
        nv = ctx.nv
        nv.getstate(C.NVMM_X64_STATE_CRS)
        nv.state.crs[C.NVMM_X64_CR_CR8] = cr8
        nv.setstate(C.NVMM_X64_STATE_CRS)


def interrupt_waiting(vm, vl):
    """Whether a vCPU halted with IF set has something to take: a vlapic vector above its PPR, or the 8259's
    output through LINT0."""
    return vl.pending_intr() is not None or vl.lint0_pending()


def extint_ready(vm, vl):
    """Whether an ExtINT can be injected now: LINT0 passes the 8259's INTR and the 8259 has a request. An ExtINT
    latched with nothing behind it in the 8259 is dropped (bhyve would inject the 8259's spurious IR7)."""
    if not vl.lint0_pending():
        return False
    if vm.vatpic.pending() is None:
        vl.extint_accepted()
        return False
    return True


def leaf1_cpuid(x2apic, apic_enabled, tsc_deadline=False):
    """The vCPU's CPUID leaf 1 mask: x2APIC offered with ``-x`` (bhyve's X2APIC_ENABLED), TSC-deadline where the
    vlapic has it (``x86.tsc_deadline``), the APIC bit cleared while IA32_APIC_BASE.EN is."""
    ecx = (C.CPUID_1_ECX_X2APIC if x2apic else 0) | (C.CPUID_1_ECX_TSC_DEADLINE if tsc_deadline else 0)
    return api.ConfCpuid(leaf=1, mask=True, set=(0, 0, ecx, 0),
                         del_=(0, 0, 0, 0 if apic_enabled else CPUID_1_EDX_APIC))


def inject_interrupt(vm, ctx, vl, queued):
    """Before an entry (bhyve's ``vmx_inject_interrupts``): the vlapic's or the 8259's interrupt injected, or
    the interrupt window requested. ``queued``: an exception or NMI already takes this entry's event slot."""
    nv = ctx.nv
    pv_eoi = ctx.pv_eoi
    if pv_eoi is not None:
        pv_eoi.sync()                        # the guest may have ended the interrupt in memory
    vec = vl.pending_intr()
    extint = vec is None and extint_ready(vm, vl)
    if vec is None and not extint:
        return
    # Completing the exiting instruction (one more KVM_RUN) only when no event is queued and the exit state
    # allows an injection: completion cannot set IF, and while a guest with IF=0 has an interrupt pending
    # every exit comes here (a Linux boot's console writes run with interrupts off).
    es = nv.exit.exitstate
    injectable = not queued and _injectable(es)
    if injectable and nv.complete_exit() is not False:     # events its completion queues (a #GP) come first
        es = nv.exit.exitstate
        injectable = _injectable(es)
    if injectable:
        if extint:
            vec = vm.vatpic.intr_accepted()     # the INTA cycle
            vl.extint_accepted()
        else:
            vl.intr_accepted(vec)
        nv.event.set(C.NVMM_VCPU_EVENT_INTR, vec)
        nv.inject()
        ctx.injected += 1
        # PV EOI (kvm_para.py). Unlike KVM, also with a request that waits for this vector's EOI (a timer
        # tick on top of a device's interrupt): the window exit at the handler's IRET then finds the EOI
        # made in memory (every exit syncs it) instead of the guest's EOI exiting; a guest that opens the
        # window before its EOI finds PV EOI disarmed there, and its EOI exits as without it.
        behind = None
        if pv_eoi is not None and not extint and pv_eoi.word is not None:
            behind = vl.edge_in_service_before()
            if behind is not None:
                pv_eoi.arm()
        ctx.pending = vl.pending_intr() is not None or vl.lint0_pending()   # more: re-check next entry
        ctx.masked = ctx.pending                 # what is left waits for the handler just injected to end
        if ctx.pending or behind:
            request_window(nv)
            if behind and not ctx.pending and ctx.intwin is not None:
                post_window(ctx, vl, True)       # the next one, once the guest ended this one in memory
    else:
        request_window(nv)
        ctx.pending = True
        ctx.masked = not es.rflags & C.RFLAGS_IF    # the guest's IF, not a shadow or an event, holds it back
        if ctx.intwin is not None and not extint:
            post_window(ctx, vl, False)
    if ctx.itrace is not None:
        ctx.itrace.append(("inj" if ctx.injected != ctx.itrace_n else "win", vec, hex(ctx.current_rip()),
                           hex(es.rflags), int(es.int_shadow), int(es.evt_pending), nv.exit.reason))
        ctx.itrace_n = ctx.injected


def post_window(ctx, vl, in_service_ends):
    """Posts to the provider's run loop what the vlapic takes when the window opens (``Vlapic.window_plan``), with
    the PV EOI word's part in it as :func:`inject_interrupt` would do there: the one in service ended through the
    word first (``in_service_ends``), the word armed for the new vector when it is alone in service, the window
    asked again when another vector waits for its end."""
    plan = vl.window_plan(in_service_ends)
    if plan is None:
        return
    vector, arm, again = plan
    pv_eoi = ctx.pv_eoi
    word = pv_eoi.word if pv_eoi is not None else None
    if word is None:
        if not in_service_ends:
            ctx.intwin.post(vector)          # without PV EOI nothing more is asked after an injection
        return
    ctx.intwin.post(vector, after_eoi=in_service_ends, arm=arm, again=again, word=word)


def _kick_conditions(ctx):
    """``(ends, args)`` for a kick's post: ``ends``, whether the vector must wait for the guest's PV EOI of the
    one in service (the word armed for it: the guest may have ended it in memory already, and the loop reads the
    word's bit); ``args(vector, arm, again)``, the positional arguments of ``IntWindow.kick``/``release`` for a
    plan of ``Vlapic.window_plan(ends)`` (without PV EOI, the vector alone)."""
    pv_eoi = ctx.pv_eoi
    word = pv_eoi.word if pv_eoi is not None else None
    if word is None:
        return False, lambda vector, arm, again: (vector,)
    ends = pv_eoi.armed
    return ends, lambda vector, arm, again: (vector, ends, arm, again, word)


def post_kick(ctx):
    """From the thread that kicks the vCPU: posts the vlapic's next vector to the provider's run loop while it runs
    (``Vlapic.offer_outside``), to be injected at the kick's EINTR without Python. True when posted."""
    vl, win = ctx.vlapic, ctx.intwin
    if vl is None:
        return False
    ends, args = _kick_conditions(ctx)

    def post(*plan):
        if not win.kick(*args(*plan)):
            return False
        plan_tick(ctx, vl)              # the vector is the loop's now
        return True
    return vl.offer_outside(post, in_service_ends=ends)


def post_kick_taken(ctx, spare=False):
    """From the thread that kicks the vCPU while the provider's run loop holds an injection the vlapic has not
    accepted yet (``IntWindow.can_take_over``): under the vlapic's lock, the loop's return is held
    (``IntWindow.take_over``), the vlapic accepts that vector here as :func:`window_taken` does at the return, and
    its next vector is posted as :func:`post_kick` posts (``IntWindow.release``). True when posted; with
    ``spare``, :data:`SPARED` when nothing could be posted but the guest's end of what is in service exits (the
    PV EOI word not armed), where Python finds the request: no kick is needed."""
    vl, win = ctx.vlapic, ctx.intwin
    if vl is None:
        return False
    with vl.under_lock():
        taken = win.take_over()
        if taken is None:
            return False
        post = ()
        try:                            # the loop's return waits for the release: it must come
            vector, ended, armed, tick = taken
            window_taken(ctx, win, vector, ended, armed, done=_nothing, tick=tick)
            ends, args = _kick_conditions(ctx)      # after the acceptance: the word may be armed for it now
            plan = vl.window_plan(ends)
            if plan is not None:
                post = args(*plan)
        finally:
            posted = win.release(*post)
        plan_tick(ctx, vl)
        if not posted and spare and vl.isr and not (ctx.pv_eoi is not None and ctx.pv_eoi.armed) \
                and not vl.lint0_pending():
            return SPARED
        return posted


def post_behind(ctx):
    """From the thread that kicks the vCPU while the provider's run loop holds a post not injected yet: the post
    becomes one of the highest vector the vlapic requests (the posted one, a higher one, or the one in service
    requested again when the post waits for its end), and the loop is told to come back to Python once it
    injected it (``IntWindow.again``), where what waits below it is found; no kick is needed. True if so."""
    vl, win = ctx.vlapic, ctx.intwin
    if vl is None or win.held() is None:
        return False                    # a look without the lock first: nothing posted
    with vl.under_lock():
        posted = win.held()
        rest = 0 if posted is None else vl.irr & ~(1 << posted)
        if not rest:
            return False
        top = rest.bit_length() - 1
        if top < posted:
            return win.again(posted)
        isr = vl.isr
        if isr >> top & 1 and isr != 1 << top:
            return False                # one of several in service, requested again: Python looks
        # the one in service requested again comes first once it ends, if the post waits for that end
        return win.again(posted, top, not vl.tmr >> top & 1, in_service=bool(isr))


def _nothing():
    pass


def window_taken(ctx, win, vector, ended_first, armed, done=None, tick=False):
    """The provider's run loop ``win`` injected the posted ``vector`` (its ``on_taken``): the vlapic accepts it,
    after the EOI the guest made in its PV EOI word when ``ended_first``; the word is armed for it when ``armed``;
    ``tick``: the ticker posted it (the vlapic's timer fired outside). What ``pending`` said stays (the EOI's own
    kick is the loop's doing), unless the vector was requested again. ``done`` (default ``win.clear``) runs under
    the vlapic's lock once it has accepted the vector. The injections the ticker found ended before are accepted
    and ended first (:func:`take_folds`)."""
    was = ctx.pending
    pv_eoi, vl = ctx.pv_eoi, ctx.vlapic
    if vl is None:                       # cleaned up meanwhile: nothing is left to accept it
        win.clear()
        return
    take_folds(ctx, win, vl)
    _accept(ctx, win, vl, pv_eoi, vector, ended_first, armed, done, was, tick)
    dl = ctx.tsc_deadline
    if done is None and dl is not None and dl.tick is not None:
        # the run returned (its settle): the loop may be entered again without a look at the vlapic, so the
        # ticker's plan, withdrawn by the acceptance, is made again from the state with this vector in service
        vl.changed = False
        plan_tick(ctx, vl)


def _accept(ctx, win, vl, pv_eoi, vector, ended_first, armed, done, was, tick):
    if tick:
        vl.ticked_outside(1)
    if ended_first:
        pv_eoi.armed = False
    again = vl.accept_outside(vector, ended_first, win.clear if done is None else done, requested=not tick)
    if armed:
        pv_eoi.armed = True
    ctx.injected += 1
    ctx.masked = False
    ctx.pending = was or again


def window_withdrawn(ctx, win, tick):
    """A kick's post came back from the run loop not injected (its ``on_withdrawn``): Python looks at the vlapic
    before the next entry; a tick the ticker posted fires in the vlapic now (its deadline was taken)."""
    vl = ctx.vlapic
    if vl is not None:
        take_folds(ctx, win, vl)
        if tick:
            vl.on_deadline()
    ctx.pending = True


def take_folds(ctx, win, vl):
    """What the ticker, or the run loop at a HLT, found ended in the guest since Python last looked
    (``TscDeadline.take_folds``): the first injection accepted as :func:`window_taken` would have, then ended (the
    guest cleared its PV EOI bit), and the ticks posted after that counted."""
    dl = ctx.tsc_deadline
    if dl is None or dl.tick is None or not dl.tick.folds:
        return
    with vl.under_lock():               # the record goes with the acceptance: a request of its vector meanwhile
        folds = dl.take_folds()         # is a new one (Vlapic.outside), never merged with it and then cleared
        if folds is None:
            return
        first, count = folds
        if first is not None:
            vector, ended_first, armed, tick = first
            _accept(ctx, win, vl, ctx.pv_eoi, vector, ended_first, armed, _nothing, ctx.pending, tick)
            ctx.pv_eoi.armed = False
            vl.ended_outside()
        vl.ticked_outside(count - 1)


def plan_tick(ctx, vl):
    """The vCPU in the run loop or about to enter it: tells the ticker (the KVM provider's
    ``TscDeadline.plan``) what the vlapic's TSC-deadline timer delivers when it falls due (``Vlapic.tick_plan``),
    beside what the loop's slot holds: the tick waits for the end of the one in service only through an armed PV
    EOI word, and the word is armed for the tick where the guest has one."""
    dl = ctx.tsc_deadline
    if dl is None or dl.tick is None:
        return
    pv_eoi = ctx.pv_eoi
    word = pv_eoi.word if pv_eoi is not None else None

    def publish(plan):
        if plan is None or (plan[1] and (word is None or not pv_eoi.armed)):
            dl.plan(None)
        else:
            dl.plan(plan[0], after_eoi=plan[1], arm=word is not None)
    vl.offer_tick(publish, ctx.intwin.held())


def _injectable(es):
    """Whether an exit state lets an external interrupt in: IF set, no interrupt shadow, no event pending."""
    return es.rflags & C.RFLAGS_IF and not es.int_shadow and not es.evt_pending


def request_window(nv):
    """Asks for an exit when the guest can take an interrupt (``int_window_exiting``)."""
    nv.getstate(C.NVMM_X64_STATE_INTR)
    if not nv.state.intr & INTR_WINDOW:
        nv.state.intr = nv.state.intr | INTR_WINDOW
        nv.setstate(C.NVMM_X64_STATE_INTR)
