"""Shared fixtures: offline Hugging Face settings and one tiny VLM built per session."""

import os

import pytest

# Nothing in the test suite may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """A tiny random-weight Idefics3 model (64 image tokens, 2 layers, 4 q / 2 kv heads, d=64)."""
    from ap_vllm.tools.testing.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"), image_tokens=64)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test``: ``-n 2 --dist loadgroup``): the tests that start vLLM servers (marked e2e)
    run on one worker, one module after the other as in a serial run (one module's servers in memory at a time),
    while the other worker takes the remaining modules, each whole (its module fixtures built once)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        group = "vllm-servers" if item.get_closest_marker("e2e") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
