"""ap_vllm.tools.eval: data loading, rank validation, the comparison metrics, the plot, and one e2e run.

The e2e test runs the tiny CPU VLM offline twice (vLLM's default backend, then AttentionPack in
exact mode) and checks agreement 1.0 and KL ~0, and that the JSON and PNG are written.
"""

from __future__ import annotations

import json
import math

import pytest

from ap_vllm.tools import eval as ap_eval
from ap_vllm.tools.eval import EvalError, Generation, ModelDims


def _png(path, seed=0):
    from ap_vllm.tools.testing.server import synthetic_image

    synthetic_image(32, 32, seed=seed).save(path)
    return path


# ----------------------------------------------------------------------------- data
def test_load_items_jsonl_and_folder(tmp_path):
    pytest.importorskip("PIL")
    d = tmp_path / "data"
    d.mkdir()
    _png(d / "a.png", 0)
    _png(d / "b.jpg", 1)
    (d / "b.txt").write_text("What colour is it?\n")
    # folder without questions.jsonl: sidecar text or the default question
    items = ap_eval.load_items(d, question="Q?")
    assert [(p.split("/")[-1], q) for p, q in ((i.image, i.question) for i in items)] == \
        [("a.png", "Q?"), ("b.jpg", "What colour is it?")]
    # JSONL with relative paths; a folder's questions.jsonl wins
    (d / "questions.jsonl").write_text('{"image": "a.png", "question": "one"}\n\n{"image": "b.jpg", "question": "two"}\n')
    assert [i.question for i in ap_eval.load_items(d)] == ["one", "two"]
    assert [i.question for i in ap_eval.load_items(d / "questions.jsonl", limit=1)] == ["one"]
    msg = items[0].messages()[0]["content"]
    assert msg[0]["image_url"]["url"].startswith("data:image/png;base64,") and msg[1]["text"] == "Q?"


def test_load_items_errors(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"image": "missing.png", "question": "x"}\n')
    with pytest.raises(EvalError, match="not found"):
        ap_eval.load_items(bad)
    bad.write_text('{"img": "a.png"}\n')
    with pytest.raises(EvalError, match=r"q.jsonl:1: expected"):
        ap_eval.load_items(bad)
    with pytest.raises(EvalError, match="no such file"):
        ap_eval.load_items(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="no \\(image, question\\) items"):
        ap_eval.load_items(tmp_path / "empty")


# ----------------------------------------------------------------------------- ranks
def test_model_dims_reads_text_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "idefics3", "text_config": {"num_attention_heads": 4, "num_key_value_heads": 2,
                                                  "hidden_size": 256, "num_hidden_layers": 3}}))
    dims = ap_eval.model_dims(tmp_path)
    assert dims == ModelDims(3, 2, 64) and dims.width == 128
    with pytest.raises(EvalError, match="config.json"):
        ap_eval.model_dims(tmp_path / "nothing")


def test_ranks_are_validated_with_a_clear_error():
    dims = ModelDims(num_layers=2, num_kv_heads=2, head_size=64)
    assert ap_eval.parse_ranks("64, 16,16,128") == [16, 64, 128]
    ap_eval.validate_ranks([1, 128], dims)
    with pytest.raises(EvalError, match=r"rank\(s\) \[129\].*\[1, 128\].*2\*64"):
        ap_eval.validate_ranks([16, 129], dims)
    with pytest.raises(EvalError, match=r"\[0\]"):
        ap_eval.validate_ranks([0], dims)
    with pytest.raises(EvalError, match="comma-separated integers"):
        ap_eval.parse_ranks("16,x")


def test_cli_rejects_a_rank_above_h_times_d(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "num_hidden_layers": 2}))
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": str(tmp_path / "i.png"), "question": "q"}) + "\n")
    (tmp_path / "i.png").write_bytes(b"\x89PNG")
    assert ap_eval.main(["--model-dir", str(tmp_path), "--data", str(tmp_path / "q.jsonl"), "--ranks", "16,64"]) == 2
    err = capsys.readouterr().err
    assert "rank(s) [64] not allowed" in err and "[1, 32]" in err


def test_run_specs():
    dims = ModelDims(2, 2, 64)
    specs = ap_eval.run_specs([8, 32], dims, extra={"min_span_tokens": 16})
    assert [s.name for s in specs] == ["baseline", "exact", "rank_8", "rank_32"]
    assert specs[0].attentionpack is None
    assert specs[1].attentionpack == {"min_span_tokens": 16, "enabled": False}
    assert specs[3].attentionpack == {"min_span_tokens": 16, "enabled": True, "key_rank": 32, "value_rank": 32}
    with pytest.raises(EvalError, match="key_rank"):
        ap_eval.run_specs([8], dims, extra={"key_rank": 4})
    with pytest.raises(ValueError, match="unknown field"):
        ap_eval.run_specs([8], dims, extra={"no_such_field": 1})


# ----------------------------------------------------------------------------- metrics
def _gen(tokens, logits_rows):
    steps = []
    for row in logits_rows:
        z = math.log(sum(math.exp(v) for v in row.values()))
        steps.append({t: v - z for t, v in row.items()})
    return Generation(list(tokens), steps, "")


def test_step_kl():
    p = {1: math.log(0.7), 2: math.log(0.2), 3: math.log(0.1)}
    assert ap_eval.step_kl(p, dict(p), 3) == pytest.approx(0.0, abs=1e-12)
    q = {1: math.log(0.5), 2: math.log(0.3), 3: math.log(0.2)}
    expected = sum(a * math.log(a / b) for a, b in ((0.7, 0.5), (0.2, 0.3), (0.1, 0.2)))
    assert ap_eval.step_kl(p, q, 3) == pytest.approx(expected, rel=1e-9)
    # a baseline token missing from the run's top-k gets the run's smallest logprob
    q2 = {1: math.log(0.5), 2: math.log(0.3), 9: math.log(0.2)}
    assert ap_eval.step_kl(p, q2, 3) == pytest.approx(ap_eval.step_kl(p, q, 3), rel=1e-9)


def test_compare_identical_and_diverging():
    rows = [{1: 2.0, 2: 1.0, 3: 0.0}] * 4
    base = [_gen([1, 1, 1, 1], rows), _gen([1, 2, 3], rows[:3])]
    same = ap_eval.compare(base, base, k=3)
    assert same["token_agreement"] == 1.0 and same["exact_match_rate"] == 1.0
    assert same["first_divergence"] == [None, None] and same["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert same["kl_steps"] == 7

    other_rows = [{1: 2.0, 2: 1.0, 3: 0.0}, {1: 0.0, 2: 3.0, 3: 0.0}, {1: 0.0, 2: 0.0, 3: 0.0}, rows[0]]
    run = [_gen([1, 2, 1, 1], other_rows), _gen([1, 2], rows[:2])]
    r = ap_eval.compare(base, run, k=3)
    # item 0: 3 of 4 positions equal, diverges at 1; item 1: 2 of max(3, 2) = 3, diverges at 2 (shorter)
    assert r["token_agreement"] == pytest.approx(5 / 7)
    assert r["first_divergence"] == [1, 2] and r["first_divergence_min"] == 1
    assert r["exact_match_rate"] == 0.0
    # KL counts steps up to and including the first divergence: 2 (item 0) + 2 (item 1)
    assert r["kl_steps"] == 4 and r["kl_max"] > 0.1 and r["kl_mean"] > 0


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    report = {"model_dir": "/m/tiny", "model": {"kv_width": 128}, "settings": {"logprobs": 5, "num_items": 3,
                                                                              "max_tokens": 8},
              "runs": {"baseline": {"rank": None},
                       "exact": {"rank": None, "token_agreement": 1.0, "exact_match_rate": 1.0, "kl_mean": 0.0,
                                 "kl_max": 0.0},
                       "rank_16": {"rank": 16, "token_agreement": 0.8, "exact_match_rate": 0.34, "kl_mean": 0.02,
                                   "kl_max": 0.3}}}
    path = ap_eval.plot(report, tmp_path / "p.png")
    assert path and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# ----------------------------------------------------------------------------- end to end
@pytest.mark.e2e
def test_exact_mode_matches_the_default_backend(tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("matplotlib")
    from ap_vllm.tools.testing.tiny_vlm import build_tiny_vlm

    model = build_tiny_vlm(tmp_path / "tiny", image_tokens=64, num_layers=2)  # fp32: the kernels agree to ~1e-6
    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for i, q in enumerate(["Describe the image.", "What is on the table?", "Is it raining?"]):
        _png(data / f"img{i}.png", seed=i)
        lines.append(json.dumps({"image": f"img{i}.png", "question": q}))
    (data / "questions.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    rc = ap_eval.main(["--model-dir", str(model), "--data", str(data), "--max-tokens", "8", "--logprobs", "5",
                       "--max-model-len", "2048", "--dtype", "float32", "--out-dir", str(out), "--tag", "tiny"])
    assert rc == 0
    report = json.loads((out / "tiny.json").read_text())
    assert list(report["runs"]) == ["baseline", "exact"]
    assert all(o["tokens"] == 8 for o in report["runs"]["baseline"]["outputs"])
    exact = report["runs"]["exact"]
    assert exact["token_agreement"] == 1.0 and exact["exact_match_rate"] == 1.0
    assert exact["first_divergence"] == [None, None, None]
    assert exact["kl_steps"] == 3 * 8 and exact["kl_mean"] < 1e-6 and exact["kl_max"] < 1e-5
    png = (out / "tiny.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and report["plot"] == str(out / "tiny.png")


def test_text_only_items_and_attentionpack_config(tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Once upon a time"}) + "\n" + json.dumps({"prompt": "1, 2, 3,"}) + "\n")
    items = ap_eval.load_items(data)
    assert [i.prompt for i in items] == ["Once upon a time", "1, 2, 3,"] and all(i.is_text for i in items)
    assert items[0].describe() == {"prompt": "Once upon a time"}
    with pytest.raises(EvalError, match="plain prompt"):
        items[0].messages()
    data.write_text(json.dumps({"prompt": ""}) + "\n")
    with pytest.raises(EvalError, match="p.jsonl:1"):
        ap_eval.load_items(data)
    # extra AttentionPack fields reach every AttentionPack run; an exact-mode baseline replaces "exact"
    dims = ModelDims(2, 2, 64)
    specs = ap_eval.run_specs([32], dims, extra={"compact_text": True, "text_value_rank": 64}, exact_baseline=True)
    assert [s.name for s in specs] == ["baseline", "rank_32"]
    assert specs[0].attentionpack == {"compact_text": True, "text_value_rank": 64, "enabled": False}
    assert specs[1].attentionpack["compact_text"] is True and specs[1].attentionpack["key_rank"] == 32
    # the CLI flag (and its old alias) is validated before any engine starts
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "num_hidden_layers": 2}))
    data.write_text(json.dumps({"prompt": "hello"}) + "\n")
    base = ["--model-dir", str(tmp_path), "--data", str(data), "--ranks", "16"]
    assert ap_eval.main(base + ["--attentionpack-config", "[1]"]) == 2
    assert "must be a JSON object" in capsys.readouterr().err
    assert ap_eval.main(base + ["--ap-config", '{"no_such_field": 1}']) == 2
    assert "unknown field" in capsys.readouterr().err
