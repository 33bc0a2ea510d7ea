"""Every NVMe layout (``bhyve_devices/nvme/regs.py``, ``layouts.py``) round-trips through ``construct``, has the
size and field offsets NVMe 1.4 gives it, and agrees with the ``struct`` formats and shifts the hot path uses."""

import os
import struct

import pytest
from hypothesis import given, strategies as st

from bhyve_devices.nvme import identify as I
from bhyve_devices.nvme import layouts as L
from bhyve_devices.nvme import regs as R

SIZES = [(R.CAP_REG, 8), (R.CC_REG, 4), (R.CSTS_REG, 4), (R.AQA_REG, 4), (R.REGISTER_FILE, 0x40),
         (R.SUBMISSION_ENTRY, 64), (R.COMPLETION_ENTRY, 16), (L.POWER_STATE, 32), (L.IDENTIFY_CONTROLLER, 4096),
         (L.LBA_FORMAT, 4), (L.IDENTIFY_NAMESPACE, 4096), (L.NS_DESCRIPTOR, 4), (L.ERROR_ENTRY, 64),
         (L.SMART_LOG, 512), (L.FIRMWARE_LOG, 512), (L.EFFECTS_ENTRY, 4), (L.EFFECTS_LOG, 4096),
         (L.SGL_DESCRIPTOR, 16), (L.DSM_RANGE, 16)]


@pytest.mark.parametrize("layout,size", SIZES, ids=[str(i) for i in range(len(SIZES))])
def test_sizes_and_round_trip(layout, size):
    assert layout.sizeof() == size
    for raw in (bytes(size), os.urandom(size)):
        parsed = layout.parse(raw)
        again = layout.build(parsed)
        assert layout.parse(again) == parsed
        # padding is built as zeros: every byte the layout names comes back
        assert len(again) == size


def _offset(layout, name):
    off = 0
    for sub in layout.subcons:
        if sub.name == name:
            return off
        off += sub.sizeof()
    raise KeyError(name)


@pytest.mark.parametrize("name,off", [("sn", 4), ("mn", 24), ("fr", 64), ("mdts", 77), ("ver", 80), ("oaes", 92),
                                      ("cntrltype", 111), ("oacs", 256), ("aerl", 259), ("lpa", 261),
                                      ("elpe", 262), ("wctemp", 266), ("tnvmcap", 280), ("kas", 320),
                                      ("sanicap", 328), ("sqes", 512), ("nn", 516), ("oncs", 520), ("vwc", 525),
                                      ("sgls", 536), ("subnqn", 768), ("psd", 2048), ("vendor", 3072)])
def test_identify_controller_offsets(name, off):
    assert _offset(L.IDENTIFY_CONTROLLER, name) == off


@pytest.mark.parametrize("name,off", [("nsze", 0), ("nlbaf", 25), ("flbas", 26), ("dlfeat", 33), ("noiob", 46),
                                      ("nvmcap", 48), ("npwg", 64), ("anagrpid", 92), ("nsattr", 99),
                                      ("nguid", 104), ("eui64", 120), ("lbaf", 128), ("vendor", 384)])
def test_identify_namespace_offsets(name, off):
    assert _offset(L.IDENTIFY_NAMESPACE, name) == off


@pytest.mark.parametrize("name,off", [("data_units_read", 32), ("power_cycles", 112), ("media_errors", 160),
                                      ("warning_temp_time", 192), ("temp_sensor", 200), ("tmt_count", 216)])
def test_smart_log_offsets(name, off):
    assert _offset(L.SMART_LOG, name) == off


@given(st.tuples(st.integers(0, 255), st.integers(0, 3), st.integers(0, 3), st.integers(0, 0xFFFF),
                 *[st.integers(0, 0xFFFFFFFF)] * 3, *[st.integers(0, 2**64 - 1)] * 3,
                 *[st.integers(0, 0xFFFFFFFF)] * 6))
def test_submission_entry_struct_matches_construct(v):
    opcode, fuse, psdt, cid, nsid, c2, c3, mptr, prp1, prp2, *cdw = v
    raw = R.SQE.pack(opcode, fuse | (psdt << R.FLAGS_PSDT_SHIFT), cid, nsid, c2, c3, mptr, prp1, prp2, *cdw)
    p = R.SUBMISSION_ENTRY.parse(raw)
    assert (p.opcode, p.flags.fuse, p.flags.psdt, p.cid, p.nsid, p.prp1, p.prp2) == (opcode, fuse, psdt, cid, nsid,
                                                                                   prp1, prp2)
    assert [p.cdw10, p.cdw11, p.cdw12, p.cdw13, p.cdw14, p.cdw15] == cdw and p.mptr == mptr
    assert R.SUBMISSION_ENTRY.build(p) == raw
    e = R.SQE.unpack(raw)
    assert (e[R.E_OPCODE], e[R.E_CID], e[R.E_NSID], e[R.E_PRP1], e[R.E_PRP2], e[R.E_CDW10]) == \
        (opcode, cid, nsid, prp1, prp2, cdw[0])


@given(st.integers(0, 0xFF), st.integers(0, 7), st.booleans(), st.integers(0, 1), st.integers(0, 0xFFFF))
def test_completion_status_word(sc, sct, dnr, phase, cid):
    status = R.status(sc, sct, dnr)
    raw = R.CQE.pack(7, 0, 3, 1, cid, ((status << 1) | phase) & 0xFFFF)
    p = R.COMPLETION_ENTRY.parse(raw)
    assert (p.dw0, p.sqhd, p.sqid, p.cid) == (7, 3, 1, cid)
    assert (p.status.sc, p.status.sct, p.status.dnr, p.status.phase, p.status.crd, p.status.more) == \
        (sc, sct, dnr, phase, 0, False)
    assert R.COMPLETION_ENTRY.build(p) == raw


def test_register_bits_match_the_named_shifts():
    cap = R.CAP_REG.parse(((2047 | R.CAP_CQR | (R.READY_TIMEOUT << R.CAP_TO_SHIFT) | R.CAP_CSS_NVM)
                           .to_bytes(8, "little")))
    assert (cap.mqes, cap.cqr, cap.to, cap.css, cap.dstrd, cap.mpsmin, cap.mpsmax) == (2047, True, R.READY_TIMEOUT,
                                                                                       1, 0, 0, 0)
    cc = R.CC_REG.parse((R.CC_EN | (6 << R.CC_IOSQES_SHIFT) | (4 << R.CC_IOCQES_SHIFT) | (1 << R.CC_SHN_SHIFT)
                         | (5 << R.CC_MPS_SHIFT) | (3 << R.CC_AMS_SHIFT) | (2 << R.CC_CSS_SHIFT)).to_bytes(4, "little"))
    assert (cc.en, cc.iosqes, cc.iocqes, cc.shn, cc.mps, cc.ams, cc.css) == (True, 6, 4, 1, 5, 3, 2)
    csts = R.CSTS_REG.parse((R.CSTS_RDY | R.CSTS_CFS | (R.SHST_COMPLETE << R.CSTS_SHST_SHIFT)).to_bytes(4, "little"))
    assert (csts.rdy, csts.cfs, csts.shst) == (True, True, R.SHST_COMPLETE)
    aqa = R.AQA_REG.parse((31 | (15 << R.AQA_ACQS_SHIFT)).to_bytes(4, "little"))
    assert (aqa.asqs, aqa.acqs) == (31, 15)


def test_register_file_offsets():
    for name, off in (("cap", R.REG_CAP), ("vs", R.REG_VS), ("intms", R.REG_INTMS), ("intmc", R.REG_INTMC),
                      ("cc", R.REG_CC), ("csts", R.REG_CSTS), ("nssr", R.REG_NSSR), ("aqa", R.REG_AQA),
                      ("asq", R.REG_ASQ), ("acq", R.REG_ACQ)):
        o = 0
        for sub in R.REGISTER_FILE.subcons:
            if sub.name == name:
                break
            o += sub.sizeof()
        assert o == off, name
    from bhyve_devices.nvme.controller import REGISTER_IMAGE
    assert REGISTER_IMAGE.size == R.REGISTER_FILE.sizeof()


@given(st.integers(0, 2**64 - 1), st.integers(0, 0xFFFFFFFF), st.integers(0, 15), st.integers(0, 15))
def test_sgl_descriptor_struct_matches_construct(addr, n, kind, subtype):
    raw = L.SGL_DESC.pack(addr, n, (kind << 4) | subtype)
    p = L.SGL_DESCRIPTOR.parse(raw)
    assert (p.address, p.length, p.ident.type, p.ident.subtype) == (addr, n, kind, subtype)
    assert L.SGL_DESCRIPTOR.build(p) == raw


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 2**64 - 1))
def test_dsm_range_struct_matches_construct(attrs, nlb, slba):
    raw = struct.pack(L.DSM_RANGE_FMT, attrs, nlb, slba)
    p = L.DSM_RANGE.parse(raw)
    assert (p.attributes, p.nlb, p.slba) == (attrs, nlb, slba) and L.DSM_RANGE.build(p) == raw


def test_identity_data_parses_back():
    eui, nguid, nqn = I.derived_ids("vm", 4, 0)
    ident = I.Identity(serial="NVME-4-0", nsze=4096, lba_shift=12, readonly=True, dsm=False, deallocates=False,
                       eui64=eui, nguid=nguid, subnqn=nqn)
    c = L.IDENTIFY_CONTROLLER.parse(ident.controller)
    assert c.mn.rstrip() == b"bhyve-NVMe" and c.sn.rstrip() == b"NVME-4-0" and c.ver == R.NVME_VERSION
    assert c.sqes == 0x66 and c.cqes == 0x44 and c.nn == 1 and c.oncs == I.ONCS_WRITE_ZEROES and c.mdts == 9
    assert c.subnqn.rstrip(b"\0").decode() == nqn and nqn.startswith("nqn.2014-08.org.nvmexpress:uuid:")
    n = L.IDENTIFY_NAMESPACE.parse(ident.namespace)
    assert (n.nsze, n.ncap, n.lbaf[0].lbads, n.nsattr, n.eui64, n.nguid) == (4096, 4096, 12, 1, eui, nguid)
    e = L.EFFECTS_LOG.parse(ident.effects_log)
    assert e.acs[R.ADM_IDENTIFY].csupp and not e.acs[0x80].csupp
    assert e.iocs[R.NVM_WRITE].lbcc and e.iocs[R.NVM_READ].csupp and not e.iocs[R.NVM_DSM].csupp
    assert I.derived_ids("vm", 5, 0)[0] != eui and I.derived_ids("vm", 4, 0, eui64=0x1234)[0] == \
        (0x1234).to_bytes(8, "big")
