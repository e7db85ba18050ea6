"""Shared fixtures: offline Hugging Face settings and one tiny VLM built per session."""

import os
import re
from pathlib import Path

import pytest
import torch

# Nothing in the test suite may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Without a CUDA device the Triton kernels run on Triton's interpreter. triton.jit reads the variable when a kernel
# is decorated, so it is set here, before any test module (or what it imports) imports ap_vllm.kernels: a module
# that imported them first would leave the rest with compiled-mode helpers that interpreted kernels cannot call.
# (The ahead-of-time compile test runs real Triton in subprocesses without it; servers inherit it.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Scheduling on pytest-xdist (``make test``: ``--dist loadfile --no-loadscope-reorder``). Each module is one unit
# of work (its tests on one process, its module fixtures made once), except the modules that start vLLM servers
# (a test marked e2e), which together are one unit: one process runs them one after the other (one module's
# servers in memory at a time) while the others run the rest, and no process waits for another's servers. Units
# are handed out in collection order: the ahead-of-time compile first (the longest module: 4-16 minutes on a 2-core
# machine), the servers second, then the rest, the longest first (pytest-xdist's own order, most tests first, made
# the compile the run's tail and left a process idle behind the other's servers). The controller sees node ids
# only, so a server module is told by its source (``pytest.mark.e2e``); the processes that collect check the marks
# against it.
# Modules whose e2e tests start one tiny server at a time (a few GiB): they are units of their own and run beside the
# server modules' unit, without the lock, so the two processes end together (the server modules take over half of
# the suite's time on 2 cores).
_ONE_SMALL_SERVER = ("test_tiny_vlm.py", "test_metrics.py", "test_serve_bench.py", "test_eval.py")
_LONGEST_FIRST = ("test_aot_compile.py",)
_LONG = ("test_triton_kernels.py", "test_bench_smoke.py", "test_compaction_gram.py", "test_compaction_batched.py")
SERVERS_UNIT = "vllm-servers"
_E2E = re.compile(r"\bpytest\.mark\.e2e\b")


def _server_modules(root: Path) -> set:
    """Test modules (paths relative to ``root``, as in node ids) whose source marks a test e2e, but for
    ``_ONE_SMALL_SERVER``."""
    return {p.relative_to(root).as_posix() for p in (root / "tests").rglob("test_*.py")
            if p.name not in _ONE_SMALL_SERVER and _E2E.search(p.read_text())}


@pytest.hookimpl(tryfirst=True)  # (every collected item, before -m / -k deselect any)
def pytest_collection_modifyitems(config, items):
    servers = _server_modules(config.rootpath)
    unseen = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("e2e")
              and item.path.name not in _ONE_SMALL_SERVER} - servers
    if unseen:
        raise pytest.UsageError(f"{sorted(unseen)}: e2e tests in modules whose source does not say pytest.mark.e2e "
                                "(tests/conftest.py schedules the server modules by their source)")
    # (a stable sort: the modules keep their order within each rank)
    items.sort(key=lambda item: 0 if item.path.name in _LONGEST_FIRST else
               1 if item.nodeid.split("::")[0] in servers else 2 + (item.path.name not in _LONG))


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``: a module a unit, the server modules one unit (``SERVERS_UNIT``)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    servers = _server_modules(config.rootpath)

    class ServersTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SERVERS_UNIT if scope in servers else scope

    return ServersTogether(config, log)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """A tiny random-weight Idefics3 model (64 image tokens, 2 layers, 4 q / 2 kv heads, d=64)."""
    from ap_vllm.tools.testing.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"), image_tokens=64)


@pytest.fixture(scope="module", autouse=True)
def _vllm_servers_one_module_at_a_time(request, tmp_path_factory):
    """On pytest-xdist processes a module with tests that start vLLM servers (marked e2e) holds a lock shared by
    the processes while it runs (but for ``_ONE_SMALL_SERVER``), so one module's servers are in memory at a time
    (beside at most one small server), as in a serial run, whichever way the modules are distributed (``make
    test`` hands all of them to one process: ``SERVERS_UNIT``)."""
    e2e = request.path.name not in _ONE_SMALL_SERVER and any(
        item.get_closest_marker("e2e") for item in request.session.items
        if getattr(item, "module", None) is request.module)
    if not e2e or not hasattr(request.config, "workerinput"):
        yield
        return
    import fcntl

    with open(tmp_path_factory.getbasetemp().parent / "vllm-servers.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture
def compaction_calls(monkeypatch):
    """The number of spans of each ``compact_spans`` call the backend makes (the backend keeps calling the real
    one)."""
    import ap_vllm.backend.attentionpack as ap

    seen, real = [], ap.compact_spans

    def spy(ks, vs, *args, **kw):
        seen.append(len(ks))
        return real(ks, vs, *args, **kw)

    monkeypatch.setattr(ap, "compact_spans", spy)
    return seen
