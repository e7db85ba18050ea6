"""No host synchronisation in the backend's ``forward`` (and the cache write).

On a GPU, reading a device value on the host (``.item()``, ``.tolist()``, ``.cpu()``, ``int(t)``,
``if t:``) or an op whose output shape depends on device data (``nonzero``, boolean-mask indexing,
``masked_select``, ``unique``) waits for the device: once per layer, that is tens of stalls a step.
The builder (``ap_vllm.backend.metadata``) does all host work once per step; ``forward`` only launches.

Runtime check: while ``forward`` / ``do_kv_cache_update`` run, those tensor methods raise when called from
this project's own code (``ap_vllm/``, ``kernels/``); the Triton interpreter's own conversions are not ours
and pass. Steps cover prefill with compaction, chunked prefill over compacted spans, a span completing on a
one-token step, and decode with the two-level read (importance or score selection), on the kernel path and
on the torch decode path.
A static check keeps the impl free of these calls even on branches the steps do not take.
"""

import ast
import inspect
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("triton")

from ap_vllm.tools.testing.backend_world import World, build, make_builder, make_impl, run_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OURS = (str(ROOT / "ap_vllm") + os.sep, str(ROOT / "kernels") + os.sep)
SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
           "masked_select", "unique")


class SyncFound(AssertionError):
    pass


@pytest.fixture
def forbid_syncs(monkeypatch):
    """A context manager: inside it, syncing tensor methods called from our code raise SyncFound."""
    import contextlib

    state = {"on": False, "seen": []}

    def guard(name, original):
        def wrapper(self, *args, **kwargs):
            if state["on"]:
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(OURS):
                    state["seen"].append(name)
                    raise SyncFound(f"Tensor.{name} called from {caller}:{sys._getframe(1).f_lineno} inside forward")
            return original(self, *args, **kwargs)
        return wrapper

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    original_getitem = torch.Tensor.__getitem__

    def getitem(self, index):
        if state["on"] and sys._getframe(1).f_code.co_filename.startswith(OURS):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                raise SyncFound(f"boolean-mask indexing at {sys._getframe(1).f_code.co_filename}:"
                                f"{sys._getframe(1).f_lineno} inside forward")
        return original_getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)

    @contextlib.contextmanager
    def on():
        state["on"] = True
        try:
            yield
        finally:
            state["on"] = False

    return on


def _steps():
    return [[(0, 170), (1, 60), (2, 129)],  # prefill + compaction of r0's image; r2 stops one short of its span end
            [(0, 1), (1, 1), (2, 1), (3, 40)],  # r2's span completes on a one-token step
            [(0, 1), (1, 1), (2, 10), (3, 1)],  # chunked prefill over a compacted span
            [(0, 1), (1, 1), (2, 1), (3, 1)],  # decode, two-level read
            [(0, 1), (2, 1), (3, 1)]]


@pytest.mark.parametrize("kernel,selection", [("triton", "ema"), ("torch", "ema"), ("triton", "score")])
def test_forward_has_no_host_sync(kernel, selection, forbid_syncs):
    cfg = dict(threshold_sample_tokens=48, value_selection=selection)
    impl = make_impl(kernel, 4, 2, None, None, **cfg)
    builder = make_builder(kernel, 4, 2, [1], **cfg)
    world = World(4, 2)
    world.request(0, (10, 150), 170)
    world.request(2, (4, 126), 140)
    checked = 0
    for step in _steps():
        batch = world.batch(step)
        md = build(builder, *batch[3:])  # host work: allowed here
        # the torch path's prefill rows run the per-row torch reference (CPU only): lint its decode steps
        guarded = kernel == "triton" or md.prefill is None
        if guarded:
            with forbid_syncs():
                out = run_step(impl, world, world.pages, batch, md)
            checked += 1
        else:
            out = run_step(impl, world, world.pages, batch, md)
        assert torch.isfinite(out).all()
        world.poison_freed(builder, world.pages)
    assert checked >= 2


def test_the_guard_catches_a_sync_from_our_code(forbid_syncs):
    """The runtime check is live: a sync made by code that lives in ap_vllm/ raises inside the guard."""
    from ap_vllm.core import paged

    source = "def _probe(t):\n    return t.sum().item()\n"
    namespace: dict = {}
    exec(compile(source, paged.__file__, "exec"), namespace)  # a function whose code lives in ap_vllm/
    with forbid_syncs():
        with pytest.raises(SyncFound, match="item"):
            namespace["_probe"](torch.ones(2))
    assert namespace["_probe"](torch.ones(2)) == 2.0


def test_impl_source_has_no_syncing_calls():
    """Static: no syncing call anywhere in the impl (branches the steps above may not take included),
    and no loop over the batch's requests."""
    from ap_vllm.backend import attentionpack

    tree = ast.parse(textwrap.dedent(inspect.getsource(attentionpack.AttentionPackImpl)))
    methods = [m for m in tree.body[0].body if isinstance(m, ast.FunctionDef) and m.name != "__init__"]
    assert any(m.name == "forward" for m in methods)
    bad = []
    for node in (n for m in methods for n in ast.walk(m)):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in ("item", "tolist", "cpu", "numpy", "nonzero", "unique"):
                bad.append(f"{f.attr}() at line {node.lineno}")
            if isinstance(f, ast.Name) and f.id in ("int", "float", "bool") and node.args and not isinstance(
                    node.args[0], ast.Constant):
                bad.append(f"{f.id}(...) at line {node.lineno}")
        if isinstance(node, ast.For) and "num_reqs" in ast.unparse(node.iter):
            bad.append(f"loop over requests at line {node.lineno}")
    assert not bad, bad
