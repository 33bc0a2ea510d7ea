"""The compiled KVM run loop's build and load (``ops/nvmm/kvm/fastrun.py``): cached by the source's hash, a clear
reason when it cannot be built, and the published-reads tables (ports, and MMIO pages with their limit). The loop
itself runs in ``tests/conformance/test_answered_io.py`` and ``test_answered_mmio.py`` (a real KVM guest)."""

import shutil

import pytest

from ops import native
from ops.nvmm.kvm import fastrun


def _unloaded(monkeypatch):
    monkeypatch.setattr(fastrun, "_library", native.LazyLibrary(fastrun.SOURCE, "fastrun", fastrun.CDEF,
                                                                env_off=fastrun.ENV_OFF))


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """fastrun as if nothing had been loaded yet, caching under ``tmp_path``."""
    _unloaded(monkeypatch)
    monkeypatch.setenv("VMMSHIM_CACHE", str(tmp_path))
    monkeypatch.delenv(fastrun.ENV_OFF, raising=False)
    return tmp_path


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_built_once_and_cached_by_source_hash(fresh, monkeypatch):
    assert fastrun.load() is not None and fastrun.unavailable() is None
    built = list(fresh.glob("fastrun-*.so"))
    assert len(built) == 1 and fastrun._library.path == built[0]
    mtime = built[0].stat().st_mtime_ns
    _unloaded(monkeypatch)
    monkeypatch.setenv("CC", "false")                   # a rebuild would fail: the cached file must be used
    assert fastrun.load() is not None
    assert built[0].stat().st_mtime_ns == mtime and not list(fresh.glob(".fastrun-*"))


def test_a_failed_build_is_a_reason_not_an_exception(fresh, monkeypatch):
    monkeypatch.setenv("CC", "false")
    assert fastrun.load() is None
    assert "false failed on fastrun.c" in fastrun.unavailable()
    assert not list(fresh.iterdir())                    # no half-built library left behind


def test_a_missing_compiler_is_a_reason(fresh, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert fastrun.load() is None and "cannot run /nonexistent/cc" in fastrun.unavailable()


def test_turned_off_by_the_environment(fresh, monkeypatch):
    monkeypatch.setenv(fastrun.ENV_OFF, "0")
    assert fastrun.load() is None and fastrun.unavailable() == f"{fastrun.ENV_OFF}=0"


def test_answers_table_counts_published_ports():
    import cffi
    a = fastrun.Answers(cffi.FFI())
    assert a.count == 0 and a.table[0x3FD] == fastrun.NO_ANSWER and a.table[0xFFFF] == fastrun.NO_ANSWER
    a.set(0x3FD, 0x60)
    a.set(0x3FD, 0x61)                                  # a new value of the same port
    a.set(0x2FD, 0x60)
    assert a.count == 2 and a.table[0x3FD] == 0x61
    a.set(0x3FD, None)
    a.set(0x3FD, None)                                  # withdrawing twice counts once
    a.set(0x80, None)
    assert a.count == 1 and a.table[0x3FD] == fastrun.NO_ANSWER


def test_the_mmio_table_is_declared_alike_in_c_and_python():
    import re
    header = next(p for p in fastrun.SOURCE if p.suffix == ".h").read_text()
    defines = {m[0]: int(m[1]) for m in re.findall(r"^#define (MMIO_\w+) (\d+)u$", header, re.M)}
    assert defines == {"MMIO_PAGES": fastrun.MMIO_PAGES, "MMIO_PAGE_SHIFT": fastrun.MMIO_PAGE_SHIFT,
                       "MMIO_SLOTS": fastrun.MMIO_SLOTS}
    assert fastrun.MMIO_SLOTS * fastrun.MMIO_REG == 1 << fastrun.MMIO_PAGE_SHIFT
    assert _mmio_answers().ffi.sizeof("struct vmmshim_mmio_answers") == 8 + 16 * fastrun.MMIO_PAGES


def _mmio_answers():
    import cffi
    ffi = cffi.FFI()
    ffi.cdef(fastrun.CDEF)
    return fastrun.MmioAnswers(ffi)


def test_mmio_answers_pages_and_counts():
    a = _mmio_answers()
    assert a.set(0xFEBF0110, 7) and a.set(0xFEBF0114, 0xFFFFFFFF) and a.set(0xFEBF1000, 1)
    s = a.struct
    assert s.npages == 2 and a.count == 3
    first = a.ffi.cast("int64_t *", s.pages[0].values)
    assert s.pages[0].gpa == 0xFEBF0000 and first[0x110 // 4] == 7 and first[0x114 // 4] == 0xFFFFFFFF
    assert first[0] == fastrun.NO_ANSWER and first[fastrun.MMIO_SLOTS - 1] == fastrun.NO_ANSWER
    assert a.set(0xFEBF0110, 8) and a.count == 3          # a new value of the same register
    assert a.set(0xFEBF0110, None) and a.set(0xFEBF0110, None) and a.count == 2
    assert first[0x110 // 4] == fastrun.NO_ANSWER
    assert a.set(0xC0000000, None) and s.npages == 2       # withdrawing where nothing was: no page


def test_mmio_answers_refuse_a_page_past_the_last_and_keep_the_rest():
    """A guest moving a BAR from page to page gets new pages up to MMIO_PAGES (they are never freed: the run loop
    reads them without a lock), then the provider refuses: those reads exit, as without the table."""
    a = _mmio_answers()
    for i in range(fastrun.MMIO_PAGES):
        assert a.set(0xE0000000 + (i << fastrun.MMIO_PAGE_SHIFT), i)
    assert not a.set(0xF0000000, 1) and a.struct.npages == fastrun.MMIO_PAGES
    assert a.set(0xE0000004, 9)                            # a page it has still takes values
