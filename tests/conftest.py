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
