"""Prefix caching with compacted spans on vLLM's real block pool, requests and hash functions: what is
cached under which hash, what a later request hits (the whole span or none of it, exact prefixes as in
vLLM), settings that never share a block, eviction and resumption, admission with a hit, and the chunk
rule that ends a prompt chunk at a span's end."""

import pickle

import pytest
import torch

pytest.importorskip("vllm")

BS = 16
PROMPT = 40 + 512 + 70  # text, a 512-token image, text: [40, 552)
IMAGE = (40, 512)


@pytest.fixture(scope="module", autouse=True)
def plugin_registered():
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import init_none_hash

    from ap_vllm.plugin import register

    register()
    init_none_hash(get_hash_fn_by_name("sha256"))


def _config(**kw):
    from ap_vllm.config import AttentionPackConfig

    return AttentionPackConfig(**{"key_rank": 8, "value_rank": 8, **kw})


class World:
    """One KV-cache group: the block pool, an AttentionPackManager, the engine state, and requests hashed the
    way our scheduler hashes them."""

    def __init__(self, config=None, num_blocks=400, pool=None):
        from vllm.v1.core.block_pool import BlockPool
        from vllm.utils.hashing import get_hash_fn_by_name

        from ap_vllm.engine.kv_manager import AttentionPackManager
        from ap_vllm.engine.scheduler import EngineState
        from ap_vllm.engine.spec import AttentionPackSpec

        self.spec = AttentionPackSpec(block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.float32)
        self.state = EngineState(config=config or _config(), num_layers=2, step_lag_tokens=1024)
        self.pool = pool or BlockPool(num_gpu_blocks=num_blocks, enable_caching=True, hash_block_size=BS)
        self.manager = AttentionPackManager(self.spec, block_pool=self.pool, enable_caching=True,
                                            kv_cache_group_id=0, scheduler_block_size=BS)
        self.manager.attach(self.state)
        self.hash_fn = get_hash_fn_by_name("sha256")

    def request(self, rid, image_id="img-a", tokens=None, image=IMAGE, prompt=PROMPT, rehash=True):
        from vllm import SamplingParams
        from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
        from vllm.v1.request import Request

        from ap_vllm import compat
        from ap_vllm.engine.prefix_cache import SpanAwareBlockHasher, settings_digest
        from ap_vllm.engine.spec import request_candidates

        tokens = tokens or [7 + (i % 91) if not image[0] <= i < sum(image) else 3 for i in range(prompt)]
        feature = MultiModalFeatureSpec(data=None, modality="image", identifier=image_id,
                                        mm_position=PlaceholderRange(offset=image[0], length=image[1]),
                                        mm_hash=image_id)
        req = Request(rid, tokens, SamplingParams(max_tokens=16), None, mm_features=[feature],
                      block_hasher=self.exact_hasher())
        if not rehash:  # vLLM's own hashes
            return req
        self.state.requests[rid] = request_candidates(req.mm_features, req.num_prompt_tokens)
        plans = self.manager.plans_for(rid)
        compat.rehash_request_blocks(req, SpanAwareBlockHasher(plans, BS, self.hash_fn,
                                                               settings_digest(self.state.config, self.spec.geometry(2))))
        return req

    def exact_hasher(self):
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher

        return get_request_block_hasher(BS, self.hash_fn)

    def plan(self, rid):
        (plan,) = self.manager.plans_for(rid)
        return plan

    def lookup(self, req):
        """vLLM's lookup: at most prompt - 1 tokens."""
        blocks, hit = self.manager.find_longest_cache_hit(req.block_hashes, req.num_tokens - 1, [0], self.pool,
                                                          self.spec, False, BS)
        return blocks[0], hit

    def admit(self, req):
        blocks, hit = self.lookup(req)
        self.manager.add_local_computed_blocks(req.request_id, blocks, hit, 0)
        req.num_computed_tokens = hit
        return blocks, hit

    def run_to(self, req, upto):
        """Schedule tokens up to ``upto`` (allocate + cache, as allocate_slots does), then mark them processed
        (spans ending there are compacted and their blocks freed)."""
        self.manager.allocate_new_blocks(req.request_id, upto, upto)
        self.manager.cache_blocks(req, upto, replay_boundaries=())
        self.manager.remove_skipped_blocks(req.request_id, upto, req.num_prompt_tokens)
        req.num_computed_tokens = upto

    def next_step(self, req):
        """The caching of the request's next step (vLLM's allocate_slots caches before the step runs): spans
        completed by the steps before are hittable from now on."""
        self.manager.cache_blocks(req, min(req.num_computed_tokens + 1, req.num_tokens), replay_boundaries=())

    def free(self, req):
        self.manager.free(req.request_id)


def test_hashes_exact_before_the_span_own_from_it_on():
    w = World()
    a = w.request("a")
    p = w.plan("a")
    exact = w.request("exact", rehash=False).block_hashes
    first, stop = p.first_block, -(-p.end // BS)
    assert len(a.block_hashes) == len(exact) == PROMPT // BS
    assert a.block_hashes[:first] == exact[:first]  # vLLM's own hashes before the span
    assert all(h != e for h, e in zip(a.block_hashes[first:], exact[first:]))  # span and everything after it
    from ap_vllm.engine.prefix_cache import SpanBlockHash

    inner = a.block_hashes[first:p.end // BS]
    assert all(isinstance(h, SpanBlockHash) and h.first == first and h.stop == stop for h in inner)
    assert [h.stored for h in inner] == [i < p.storage_blocks for i in range(len(inner))]
    assert not any(isinstance(h, SpanBlockHash) for h in a.block_hashes[p.end // BS:])
    # appended tokens (decode) keep extending the chain
    a.append_output_token_ids([5] * (BS * 2))
    assert len(a.block_hashes) == (PROMPT + 2 * BS) // BS
    h = pickle.loads(pickle.dumps(inner[0]))
    assert h == inner[0] and (h.stored, h.first, h.end, h.stop) == (True, first, p.end, stop)


def test_a_later_request_hits_the_whole_compacted_span():
    w = World()
    a = w.request("a")
    p = w.plan("a")
    assert w.admit(a)[1] == 0
    w.run_to(a, p.end)  # the chunk ends at the span's end: compacted, freed
    null = w.pool.null_block
    row = w.manager.req_to_blocks["a"]
    lo, hi = p.freed_blocks
    assert all(b is null for b in row[lo:hi])
    # not hittable in the step that completes it: that step's attention runs before its compaction
    assert all(b.block_hash is None for b in row[p.first_block:lo])
    assert w.lookup(w.request("early"))[1] == p.first_block * BS
    w.run_to(a, PROMPT)  # the next step: the compact form is final, and cached
    assert all(b.block_hash is not None for b in row[p.first_block:lo])
    w.next_step(a)
    b = w.request("b")  # same prefix, same image
    assert b.block_hashes == a.block_hashes
    blocks, hit = w.admit(b)
    assert hit == (PROMPT - 1) // BS * BS and hit >= p.end
    assert blocks[p.first_block:lo] == row[p.first_block:lo]  # shares the compact form
    assert all(x is null for x in blocks[lo:hi])
    assert w.state.span_queries == 2 and w.state.span_hits == 1 and w.state.span_tokens_reused == p.num_tokens
    freed_before = w.state.blocks_freed
    w.run_to(b, PROMPT)
    assert w.state.blocks_freed == freed_before  # nothing compacted again, nothing freed twice
    # b's admission counted only what it holds: the hit's null blocks are not needed again
    c = w.request("c")
    hit_blocks, _ = w.lookup(c)
    need = w.manager.get_num_blocks_to_allocate("c", PROMPT, hit_blocks, len(hit_blocks) * BS, len(hit_blocks) * BS,
                                                PROMPT, apply_admission_cap=True)
    assert need <= -(-PROMPT // BS) - len(hit_blocks) + 1


def test_a_prompt_ending_in_the_span_end_block_hits_up_to_the_span_end():
    """The commonest chat: the question after the image ends in the block where the image ends, so that block
    is never full in any request. The hit then ends at the span's end, and the request writes the rest of the
    block (its own question) into a block of its own."""
    prompt = IMAGE[0] + IMAGE[1] + 5
    w = World()
    a = w.request("a", prompt=prompt)
    p = w.plan("a")
    assert p.end % BS and (prompt - 1) // BS == p.end // BS  # the prompt ends in the span's end block
    w.admit(a)
    w.run_to(a, p.end)
    w.run_to(a, prompt)
    b = w.request("b", prompt=prompt)
    blocks, hit = w.admit(b)
    assert hit == p.end and len(blocks) == p.end // BS
    w.run_to(b, prompt)
    mine, theirs = w.manager.req_to_blocks["b"], w.manager.req_to_blocks["a"]
    assert mine[:p.end // BS] == theirs[:p.end // BS] and mine[p.end // BS] is not theirs[p.end // BS]
    assert w.state.span_hits == 1 and not w.manager._partial_hit_reqs


def test_a_hit_never_ends_inside_a_span():
    from ap_vllm.engine.prefix_cache import allowed_hit_blocks

    w = World()
    a = w.request("a")
    p = w.plan("a")
    first, stop = p.first_block, -(-p.end // BS)
    for n in range(0, len(a.block_hashes) + 1):
        cut = allowed_hit_blocks(a.block_hashes, n)
        assert cut == (first if first < n < stop else n), n
    w.admit(a)
    w.run_to(a, p.end - 1)  # chunk stops one token short of the span's end: nothing from the span is cached
    assert all(b.block_hash is None for b in w.manager.req_to_blocks["a"][first:])
    b = w.request("b")
    assert w.lookup(b)[1] == first * BS  # the exact prefix only
    w.run_to(a, PROMPT)
    assert w.lookup(b)[1] == first * BS  # completed in this step: not yet
    w.next_step(a)
    assert w.lookup(b)[1] >= p.end
    # evict one block of the compact form: the span is all or nothing
    w.free(a)
    victim = w.manager.req_to_blocks.get("a") or None
    assert victim is None
    blocks, _ = w.lookup(b)
    w.pool.evict_blocks({blocks[first + 1].block_id})
    assert w.lookup(b)[1] == first * BS


def test_settings_and_images_never_share():
    w = World()
    a = w.request("a")
    p = w.plan("a")
    w.admit(a)
    w.run_to(a, PROMPT)
    w.next_step(a)
    other_rank = World(config=_config(value_rank=16), pool=w.pool)  # same pool, another compact form
    b = other_rank.request("b")
    assert other_rank.lookup(b)[1] == p.first_block * BS
    other_key_space = World(config=_config(key_space="pre_rope"), pool=w.pool)
    assert other_key_space.lookup(other_key_space.request("c"))[1] == p.first_block * BS
    other_dtype = World(config=_config(coefficient_dtype="fp8_e4m3"), pool=w.pool)
    assert other_dtype.lookup(other_dtype.request("e"))[1] == p.first_block * BS
    same = World(config=_config(), pool=w.pool)  # the same settings in another manager of the pool: a hit
    assert same.lookup(same.request("f"))[1] >= p.end
    other_image = w.request("d", image_id="img-b")
    assert w.lookup(other_image)[1] <= IMAGE[0] // BS * BS  # the block holding the image's first tokens differs


def test_ema_selection_caches_nothing_from_the_first_span_on():
    w = World(config=_config(value_selection="ema"))
    a = w.request("a")
    p = w.plan("a")
    w.admit(a)
    w.run_to(a, PROMPT)
    row = w.manager.req_to_blocks["a"]
    assert all(b.block_hash is not None for b in row[:p.first_block])
    assert all(b.block_hash is None for b in row[p.first_block:] if b is not w.pool.null_block)
    assert w.lookup(w.request("b"))[1] == p.first_block * BS


def test_preempted_request_resumes_from_its_own_compact_span():
    w = World(num_blocks=60)
    a = w.request("a")
    p = w.plan("a")
    w.admit(a)
    w.run_to(a, PROMPT)
    w.next_step(a)
    free_before = w.pool.get_num_free_blocks()
    w.free(a)  # preempted: every block back to the pool, the cached ones evictable
    a.num_computed_tokens = 0
    blocks, hit = w.admit(a)
    assert hit >= p.end and w.state.span_hits == 1
    w.run_to(a, PROMPT)
    assert w.pool.get_num_free_blocks() == free_before
    w.free(a)
    assert w.pool.get_num_free_blocks() == 60 - 1  # all blocks back (the null block is never free)


def test_chunks_end_at_span_ends():
    from ap_vllm.engine.prefix_cache import cap_at_span_end

    w = World()
    w.request("a")
    p = w.plan("a")
    plans = [p]
    assert cap_at_span_end(plans, 0, 2048) == p.end  # budget past the span: stop at its end
    assert cap_at_span_end(plans, 0, p.end) == p.end
    assert cap_at_span_end(plans, 0, 100) == 100
    assert cap_at_span_end(plans, p.end, 64) == 64  # after the span: unchanged
    assert cap_at_span_end(plans, p.end - 3, 64) == 3
