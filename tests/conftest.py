"""Shared fixtures: offline Hugging Face settings and one tiny VLM built per session."""

import os

import pytest

# Nothing in the test suite may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


# Scheduling on pytest-xdist (``make test``: ``--dist loadgroup --no-loadscope-reorder``). Each module is one unit
# of work (its tests on one process, its module fixtures made once), except the modules that start vLLM servers
# (a test marked e2e), which together are one unit: one process runs them one after the other (one module's
# servers in memory at a time) while the others run the rest, and no process waits for another's servers. Units
# are handed out in collection order: the ahead-of-time compile first (the longest module: 7-11 minutes on a 2-core
# machine), the servers second, then the rest (pytest-xdist's own order, most tests first, made the compile the
# run's tail and left a process idle behind the other's servers).
_LONGEST_FIRST = ("test_aot_compile.py",)
SERVERS_GROUP = "vllm-servers"


def _server_modules(items) -> set:
    return {item.path for item in items if item.get_closest_marker("e2e")}


@pytest.hookimpl(tryfirst=True)  # (before pytest-xdist's own hook reads the xdist_group marks)
def pytest_collection_modifyitems(config, items):
    servers = _server_modules(items)
    # (a stable sort: the modules keep their order within each rank)
    items.sort(key=lambda item: 0 if item.path.name in _LONGEST_FIRST else 1 if item.path in servers else 2)
    for item in items:
        item.add_marker(pytest.mark.xdist_group(SERVERS_GROUP if item.path in servers
                                                else item.path.stem))


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """A tiny random-weight Idefics3 model (64 image tokens, 2 layers, 4 q / 2 kv heads, d=64)."""
    from ap_vllm.tools.testing.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"), image_tokens=64)


@pytest.fixture(scope="module", autouse=True)
def _vllm_servers_one_module_at_a_time(request, tmp_path_factory):
    """On pytest-xdist processes a module with tests that start vLLM servers (marked e2e) holds a lock shared by
    the processes while it runs, so one module's servers are in memory at a time, as in a serial run, whichever
    way the modules are distributed (``make test`` hands all of them to one process: ``SERVERS_GROUP``)."""
    e2e = any(item.get_closest_marker("e2e") for item in request.session.items
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
