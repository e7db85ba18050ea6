"""End to end: ``vllm serve --attention-backend attentionpack`` against vLLM's own CPU backend.

Two real servers on the same tiny VLM (fp32, random weights): CPU_ATTN and AttentionPack in
exact mode (compaction disabled). Greedy outputs must be identical token for token, for
image chats, text chats, streaming and concurrent requests. Bad requests get 4xx and the
server keeps serving. A bad configuration stops vLLM at start-up with the field named.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from ap_vllm.tools.testing.server import ServerError, VllmServer, image_content, running  # noqa: E402
from ap_vllm.tools.testing.tiny_vlm import build_tiny_vlm  # noqa: E402

pytestmark = pytest.mark.e2e

IMAGE_TOKENS = 256
EXACT = json.dumps({"attentionpack": {"enabled": False}})


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny", image_tokens=IMAGE_TOKENS, num_layers=2,
                          num_kv_heads=2, num_heads=4, head_dim=64)


@pytest.fixture(scope="module")
def servers(tiny_vlm):
    """(baseline, attentionpack) servers, started side by side."""
    with running({"base": VllmServer(tiny_vlm, extra_args=["--attention-backend", "CPU_ATTN"]),
                  "ours": VllmServer(tiny_vlm, extra_args=["--attention-backend", "attentionpack",
                                                           "--additional-config", EXACT])}) as servers:
        base, ours = servers["base"], servers["ours"]
        # compaction off: AttentionPack steps aside and vLLM's own CPU backend serves (tests/test_e2e_disabled.py)
        assert "AttentionPack compaction is off (enabled: false)" in ours.log_text()
        assert "Using AttentionPack backend" not in ours.log_text() + base.log_text()
        yield base, ours
        pids = [base.pid, ours.pid]
    for pid in pids:  # stopped by PID, nothing left behind (VllmServer.stop checks the process group)
        assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0


def chat(server, content, max_tokens=16, **kw):
    r = server.client().chat.completions.create(
        model=server.model_name, messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens, temperature=0.0, logprobs=True, **kw)
    choice = r.choices[0]
    return [t.token for t in choice.logprobs.content], choice.finish_reason


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_chat_matches_cpu_attn(servers, seed):
    base, ours = servers
    expect = chat(base, image_content(seed), max_tokens=24)
    got = chat(ours, image_content(seed), max_tokens=24)
    assert got == expect
    assert len(got[0]) == 24


def test_two_images_and_text_chat_match(servers):
    base, ours = servers
    two = image_content(3)[:1] + image_content(4, "Compare both.")
    assert chat(ours, two) == chat(base, two)
    text = "the quick brown fox jumps over the lazy dog and keeps running"
    assert chat(ours, text, max_tokens=32) == chat(base, text, max_tokens=32)


def test_streaming_matches_non_streaming(servers):
    _, ours = servers
    content = image_content(5)
    stream = ours.client().chat.completions.create(
        model=ours.model_name, messages=[{"role": "user", "content": content}], max_tokens=16,
        temperature=0.0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    full = ours.client().chat.completions.create(
        model=ours.model_name, messages=[{"role": "user", "content": content}], max_tokens=16, temperature=0.0)
    assert len(pieces) > 2
    assert "".join(pieces) == full.choices[0].message.content


def test_eight_concurrent_requests_match_sequential_baseline(servers):
    base, ours = servers
    contents = [image_content(10 + i) if i % 2 == 0 else f"request number {i} says hello" for i in range(8)]
    expect = [chat(base, c, max_tokens=12) for c in contents]
    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda c: chat(ours, c, max_tokens=12), contents))
    assert got == expect


def test_bad_requests_get_4xx_and_server_keeps_serving(servers):
    _, ours = servers
    client = ours.client()
    bad_image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}},
                 {"type": "text", "text": "hi"}]
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=ours.model_name, messages=[{"role": "user", "content": bad_image}],
                                       max_tokens=4)
    assert 400 <= e.value.status_code < 500
    with pytest.raises(openai.APIStatusError) as e:  # malformed: messages must be a list
        client.post("/chat/completions", body={"model": ours.model_name, "messages": "hello"}, cast_to=object)
    assert 400 <= e.value.status_code < 500
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=ours.model_name, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=-3)
    assert 400 <= e.value.status_code < 500
    tokens, reason = chat(ours, image_content(0), max_tokens=8)
    assert len(tokens) == 8 and reason == "length"


@pytest.mark.parametrize("bad, field", [({"key_rank": 0, "colour": 1}, "colour"), ({"value_rank": 4096}, "value_rank")])
def test_bad_configuration_refuses_to_start(tiny_vlm, bad, field):
    server = VllmServer(tiny_vlm, startup_timeout=240, extra_args=[
        "--attention-backend", "attentionpack", "--additional-config", json.dumps({"attentionpack": bad})])
    with pytest.raises(ServerError) as err:
        server.start()
    log = str(err.value)  # carries the server's log tail
    assert "exited with code" in log, log[-3000:]
    assert f"attentionpack.{field}" in log, log[-3000:]


def test_cli_accepts_any_case_and_custom(tiny_vlm):
    """The name parses in vLLM's own CLI parser in any case, and CUSTOM names it too."""
    code = (
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "from vllm.engine.arg_utils import AsyncEngineArgs\nfrom vllm.config import AttentionConfig\n"
        "p = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())\n"
        "import sys\n"
        "for name in ('attentionpack', 'AttentionPack', 'CUSTOM'):\n"
        "    a = p.parse_args(['--model', sys.argv[1], '--attention-backend', name])\n"
        "    backend = AsyncEngineArgs.from_cli_args(a).attention_backend\n"
        "    print(name, AttentionConfig(backend=backend).backend.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tiny_vlm)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["attentionpack", "CUSTOM", "AttentionPack", "CUSTOM", "CUSTOM", "CUSTOM"]
