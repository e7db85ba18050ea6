"""Shared fixtures: offline Hugging Face settings and one tiny VLM built per session."""

import os

import pytest

# Nothing in the test suite may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


# Modules that run longest on one process, started first: ``--dist loadfile`` hands modules out in collection
# order, and one of these collected late became the run's tail (the ahead-of-time compile: 7-11 minutes on a
# 2-core machine beside a server module; the server modules, which take turns, are the rest of the critical path).
_LONGEST_FIRST = ("test_aot_compile.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in _LONGEST_FIRST)  # (a stable sort: the rest keep their order)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """A tiny random-weight Idefics3 model (64 image tokens, 2 layers, 4 q / 2 kv heads, d=64)."""
    from ap_vllm.tools.testing.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"), image_tokens=64)


@pytest.fixture(scope="module", autouse=True)
def _vllm_servers_one_module_at_a_time(request, tmp_path_factory):
    """``make test`` runs the suite on pytest-xdist processes (``--dist loadfile``: each module whole on one of
    them). There a module with tests that start vLLM servers (marked e2e) holds a lock shared by the processes
    while it runs, so one module's servers are in memory at a time, as in a serial run; the other modules run
    beside it."""
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
