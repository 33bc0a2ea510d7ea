"""Test fixtures shared by every suite.

``provider`` runs a test body once per NVMM provider present (``kvm``, ``soft``, ``libnvmm``). A provider that
cannot run here is skipped with its one-line reason, except KVM in CI (``CI`` set): there a missing or broken
``/dev/kvm`` fails the run, it is never skipped. ``guest_factory`` builds :class:`tests.guests.harness.Guest`
objects on that provider and destroys them after the test.
"""

import os
import re

import pytest

from ops.nvmm import PROVIDERS, nvmm_init

IN_CI = bool(os.environ.get("CI"))
#: Providers the suite is parametrized over (``VMMSHIM_PROVIDERS=kvm,soft`` narrows it).
SELECTED = [p for p in os.environ.get("VMMSHIM_PROVIDERS", ",".join(PROVIDERS)).split(",") if p]


def require_compiled(library, what, probe=None):
    """For the tests of a compiled data path (``library``: ``vmmshim/backends/blkfast.py`` and its kin):
    skipped where the library cannot be built, except in CI (``CI`` set), whose dependencies include a C compiler:
    there a missing library fails the run. ``probe()`` builds an accelerator (default ``library.accelerator()``)."""
    if (probe or library.accelerator)() is None:
        why = f"no {what} here: {library.unavailable()}"
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)


def open_or_skip(name):
    try:
        return nvmm_init(name)
    except OSError as exc:
        if name == "kvm" and IN_CI:
            pytest.fail(f"/dev/kvm is required in CI: {exc.strerror or exc}")
        pytest.skip(f"provider {name} unavailable: {exc.strerror or exc}")


@pytest.fixture(params=SELECTED)
def provider(request):
    prov = open_or_skip(request.param)
    trace_dir = os.environ.get("VMMSHIM_TRACE_DIR")
    if not trace_dir:
        yield prov
        return
    from ops.nvmm.trace import TracingProvider
    case = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name.replace(f"[{request.param}", "["))
    with open(os.path.join(trace_dir, f"{case}.{request.param}.trace"), "w") as sink:
        yield TracingProvider(prov, sink)


@pytest.fixture
def kvm_provider():
    return open_or_skip("kvm")


@pytest.fixture
def guest_factory(provider):
    from tests.guests.harness import Guest
    made = []

    def make(**kw):
        g = Guest(provider, **kw)
        made.append(g)
        return g
    yield make
    for g in made:
        g.close()


def requires(provider, *limits):
    """Skips the calling test when ``provider`` declares one of the named ``limits`` (see
    ``ops.nvmm.api.LIMIT_*``); the skip message names the limit, so a report says why."""
    cap = provider.capability()
    hit = sorted(set(limits) & cap.limits)
    if hit:
        pytest.skip(f"provider {provider.name} declares limit {', '.join(hit)}")
