"""The ops layer's declared interface (``ops/vmm_api.py``): every call ``vmmshim/`` and ``bench/`` make of the ops
layer is declared in ``VmmApi``, the NVMM table implements all of it with the declared parameters, and the test
double does too."""

import ast
import inspect
import pathlib

import pytest

from ops.nvmm_ops import VmmOpsNvmm
from ops.vmm_api import VMM_API_CALLS, VmmApi
from ops.vmm_ops import VMM_OPS_MEMBERS

from .recording_ops import RecordingOps

ROOT = pathlib.Path(__file__).resolve().parents[2]
DECLARED = set(VMM_OPS_MEMBERS) | set(VMM_API_CALLS)


def ops_calls(path):
    """The method names called on something named ``ops`` (``ops.x(...)``, ``self.ops.x(...)``, ``vm.ops.x(...)``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", None)
            if name == "ops":
                out.add(node.func.attr)
    return out


def test_every_call_vmmshim_makes_is_declared():
    files = [p for d in ("vmmshim", "bench") for p in (ROOT / d).rglob("*.py")]
    called = {(p.relative_to(ROOT).as_posix(), c) for p in files for c in ops_calls(p)}
    assert len({c for _, c in called}) >= 25, "the scan found too few calls: is it still reading the right files?"
    assert [(p, c) for p, c in sorted(called) if c not in DECLARED] == []


def test_the_protocol_lists_the_table_and_the_calls_beyond_it():
    assert set(VMM_OPS_MEMBERS) <= set(dir(VmmApi)) and set(VMM_API_CALLS) <= set(dir(VmmApi))
    assert "vcpu_runner" in VMM_API_CALLS and "vm_features" in VMM_API_CALLS and "vmrun" in VMM_OPS_MEMBERS


@pytest.mark.parametrize("impl", [VmmOpsNvmm, RecordingOps], ids=["nvmm", "double"])
def test_implementations_have_every_call(impl):
    missing = [n for n in sorted(DECLARED) if not callable(getattr(impl, n, None))]
    assert missing == []


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_the_nvmm_table_takes_the_declared_parameters(name):
    declared = [p for p in inspect.signature(getattr(VmmApi, name)).parameters.values()]
    got = inspect.signature(getattr(VmmOpsNvmm, name)).parameters
    for p in declared:
        assert p.name in got, f"{name}: no parameter {p.name}"
