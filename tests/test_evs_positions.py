"""EVS video pruning (``--video-pruning-rate``) with compaction: M-RoPE positions at prefill-chunk boundaries.

vLLM recomputes a pruned prompt's M-RoPE positions in every step that carries media embeddings
(``vllm.multimodal.video_prune.evs.recompute_mrope_positions``, through the model's method of that name). A step
that starts after a whole image or video, or right after a vision start, is read there as the continuation of
the previous item (vllm-project/vllm#48833), and compaction ends a prefill chunk at every image and video end.
:func:`ap_vllm.compat.correct_evs_positions_between_items` reads such a step from a slice of the prompt. Oracle:
the positions vLLM computes when the whole prompt is one step, and, independently of vLLM's function, the rule
of Qwen2.5-VL's M-RoPE at the items' edges (an item's first token sits one past its vision start, the text after
an item goes on from the item's positions).
"""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.multimodal.video_prune import evs  # noqa: E402

from ap_vllm import compat  # noqa: E402
from ap_vllm.config import AttentionPackConfigError, check_video_pruning  # noqa: E402

TEXT, VS, VE, IMG, VID = 1, 7, 8, 5, 6


class _Qwen25VLPositions:
    """The Qwen2.5-VL model's ``recompute_mrope_positions`` as vLLM 0.32 writes it (embeddings carry their
    positions in 4 extra channels)."""

    config = SimpleNamespace(model_type="qwen2_5_vl", vision_start_token_id=VS, image_token_id=IMG,
                             video_token_id=VID)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        media = [m[:, -4:].permute(1, 0).long() for m in multimodal_embeddings]
        positions, delta = evs.recompute_mrope_positions(torch.as_tensor(input_ids, dtype=torch.long), media,
                                                         mrope_positions, num_computed_tokens, VS, IMG, VID)
        return [m[:, :-4] for m in multimodal_embeddings], positions, delta


def _prompt():
    """Text, an image (grid 1 x 4 x 6 after the merge), text, a video (3 x 4 x 4, about half its tokens pruned),
    text, an image (1 x 2 x 4), text. Returns the token ids and each item's (offset, 4-channel positions)."""
    gen = torch.Generator().manual_seed(0)
    items, ids = [], [TEXT] * 5
    for token, thw, keep in ((IMG, (1, 8, 12), 1.0), (VID, (3, 8, 8), 0.5), (IMG, (1, 4, 8), 1.0)):
        pos = evs.compute_mrope_for_media(torch.tensor(thw), 2, tokens_per_second=2.0, video_second_per_grid=1.0)
        if keep < 1.0:
            mask = torch.rand(pos.shape[0], generator=gen) < keep
            mask[0] = True
            pos = pos[mask]
        ids += [VS]
        items.append((len(ids), pos))
        ids += [token] * pos.shape[0] + [VE] + [TEXT] * 3
    return ids, items


def _run(model, ids, items, cuts):
    """The positions and delta after prefilling ``ids`` in steps that end at ``cuts``, as the V1 runner calls the
    model: each step passes the rows of the media tokens it computes, item by item."""
    n = len(ids)
    positions = torch.arange(n).repeat(3, 1)  # unpruned-style start values, overwritten from each step on
    delta = None
    bounds = [0, *cuts, n]
    for a, b in zip(bounds, bounds[1:]):
        blocks = []
        for off, pos in items:
            lo, hi = max(a, off), min(b, off + pos.shape[0])
            if lo < hi:
                emb = torch.cat([torch.randn(hi - lo, 2), pos[lo - off:hi - off].float()], dim=1)
                blocks.append(emb)
        _, new, delta = model.recompute_mrope_positions(input_ids=ids, multimodal_embeddings=blocks,
                                                        mrope_positions=positions, num_computed_tokens=a)
        positions = new.clone()
    return positions, delta


def _boundaries(ids, items):
    """Cuts at every item end (what compaction makes), right after each vision start, on each vision start, in
    the text between items, and inside each item's media."""
    cuts = []
    for off, pos in items:
        end = off + pos.shape[0]
        cuts.append([end])
        cuts.append([off])  # right after the vision start
        cuts.append([off - 1])  # on the vision start
        cuts.append([end + 2])  # in the text after the item
        cuts.append([off + pos.shape[0] // 2])  # inside the media
    return cuts + [[end for end in (off + p.shape[0] for off, p in items)]]


def _check_mrope_rule(got, ids, items):
    """Independent of vLLM's function: text positions go up by one a token on all three axes; an item's media
    tokens sit at their (t, h, w) offsets from one past its vision start; the vision end after an item continues
    from the item's grid width (Qwen2.5-VL's rule, ``compute_mrope_for_media``'s fourth channel)."""
    media_at = {off + k: (off, pos[k]) for off, pos in items for k in range(pos.shape[0])}
    for p in range(1, len(ids)):
        if p in media_at:
            off, row = media_at[p]
            assert torch.equal(got[:, p], row[:3] + got[0, off - 1] + 1), p
        elif p - 1 in media_at:
            off, row = media_at[p - 1]
            assert torch.equal(got[:, p], torch.full((3,), int(got[0, off - 1] + 1 + row[3]))), p
        else:
            assert torch.equal(got[:, p], got[:, p - 1] + 1), p


def test_positions_equal_one_step_at_every_boundary():
    ids, items = _prompt()
    model = _Qwen25VLPositions()
    compat.correct_evs_positions_between_items(model)
    expect, expect_delta = _run(_Qwen25VLPositions(), ids, items, [])  # vLLM's own, the prompt in one step
    _check_mrope_rule(expect, ids, items)
    for cuts in [[]] + _boundaries(ids, items):
        got, delta = _run(model, ids, items, cuts)
        assert torch.equal(got, expect), cuts
        assert delta == expect_delta, cuts


def test_vllm_alone_misplaces_an_item_after_a_whole_one():
    """What the correction is for: vLLM's own reading, with a step starting at the end of the first image,
    differs from the one-step positions. (When vLLM fixes this, the correction is a no-op and this test says
    the touch can go.)"""
    ids, items = _prompt()
    expect, _ = _run(_Qwen25VLPositions(), ids, items, [])
    got, _ = _run(_Qwen25VLPositions(), ids, items, [items[0][0] + items[0][1].shape[0]])
    assert not torch.equal(got, expect)


def test_other_models_and_repeats_are_left_alone():
    model = _Qwen25VLPositions()
    compat.correct_evs_positions_between_items(model)
    wrapped = model.recompute_mrope_positions
    compat.correct_evs_positions_between_items(model)
    assert model.recompute_mrope_positions is wrapped
    other = _Qwen25VLPositions()
    other.config = SimpleNamespace(**{**vars(other.config), "model_type": "qwen3_vl"})
    compat.correct_evs_positions_between_items(other)
    assert "recompute_mrope_positions" not in vars(other)


def test_video_pruning_refused_for_models_outside_the_list():
    def model(model_type, rate):
        return SimpleNamespace(hf_config=SimpleNamespace(model_type=model_type),
                               multimodal_config=SimpleNamespace(video_pruning_rate=rate))

    check_video_pruning(model("qwen2_5_vl", 0.5))
    check_video_pruning(model("qwen3_vl", None))
    check_video_pruning(model("qwen3_vl", 0.0))
    with pytest.raises(AttentionPackConfigError,
                       match=r"--video-pruning-rate 0.75 .*'qwen3_vl'.*allowed for 'qwen2_5_vl'"):
        check_video_pruning(model("qwen3_vl", 0.75))
