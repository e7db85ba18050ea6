"""The one channel from vLLM's model runner to the AttentionPack metadata builders.

Attention metadata builders see token counts and block tables, never which requests are in a
batch; span plans need each request's image/video placeholder ranges and prompt length, and the
importance normaliser needs a stable per-request slot. The runner hook in :mod:`ap_vllm.compat`
calls :func:`begin_step` right before the runner builds a step's attention metadata and
:func:`end_step` right after. :func:`begin_step` hands every AttentionPack builder of that runner,
an EAGLE or MTP drafter's included (it keeps the step through the proposer's passes), one
:class:`StepRequests` (batch order); nothing is kept in module state: the per-runner
:class:`BatchChannel` lives on the runner object itself (one per worker process).

Slots. Each request gets a slot in ``[0, capacity)`` for its lifetime in the runner, with a
generation number that changes whenever a slot is reused. A layer keeps the lse of each request's
last query in a device buffer indexed by slot, tagged with ``generation << 32 | seq_len``; a decode
step finds it valid when the tag equals ``generation << 32 | (seq_len - 1)`` (device compare, no host
sync). Requests past ``capacity`` get slot -1 (the buffers' scratch row, never valid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ap_vllm import compat
from ap_vllm.engine.spec import RequestSpans, request_candidates


def slot_capacity(max_num_seqs: int) -> int:
    """Slots per runner: requests alive in the runner (running and those paused between steps)."""
    return 2 * max(1, int(max_num_seqs))


@dataclass(frozen=True)
class StepRequests:
    """What a builder needs about the requests of one step, in batch order."""

    request_ids: tuple[str, ...]
    candidates: tuple[RequestSpans, ...]
    slots: np.ndarray  # int64 [num_reqs], -1 = no slot
    generations: np.ndarray  # int64 [num_reqs]


class BatchChannel:
    """Per runner: span candidates and slots of the requests it holds."""

    def __init__(self, capacity: int, builders: list) -> None:
        self.capacity = capacity
        self.builders = builders
        self._slot: dict[str, int] = {}
        self._candidates: dict[str, RequestSpans] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._generation = np.zeros(capacity, dtype=np.int64)
        self._ends: dict[str, frozenset] = {}  # per request: where its spans end (see needs_eager_step)

    def step(self, request_ids: list[str], requests: dict[str, Any]) -> Optional[StepRequests]:
        """The step's :class:`StepRequests`; ``requests``: the runner's live requests by id."""
        if not all(r in requests for r in request_ids):
            return None
        for gone in self._slot.keys() - requests.keys():  # finished or preempted: slot back to the pool
            self._free.append(self._slot.pop(gone))
            self._candidates.pop(gone, None)
            self._ends.pop(gone, None)
        slots = np.empty(len(request_ids), dtype=np.int64)
        for i, rid in enumerate(request_ids):
            slot = self._slot.get(rid)
            if slot is None:
                features, prompt = compat.request_features(requests[rid])
                self._candidates[rid] = request_candidates(features, prompt)
                slot = -1
                if self._free:
                    slot = self._free.pop()
                    self._generation[slot] += 1
                self._slot[rid] = slot
            slots[i] = slot
        gens = np.where(slots >= 0, self._generation[np.maximum(slots, 0)], 0)
        return StepRequests(tuple(request_ids), tuple(self._candidates[r] for r in request_ids), slots, gens)


    def span_ends(self, rid: str, request: Any) -> frozenset:
        ends = self._ends.get(rid)
        if ends is None:
            cand = self._candidates.get(rid)
            if cand is None:
                cand = request_candidates(*compat.request_features(request))
            planner = next((b for b in self.builders if getattr(b, "geometry", None) is not None), None)
            ends = self._ends[rid] = frozenset(p.end for p in planner._plans(cand)) if planner else frozenset()
        return ends


def _channel(runner: Any) -> BatchChannel:
    channel = getattr(runner, "_attentionpack_channel", None)
    if channel is None or not channel.builders:  # (until the runner has its attention groups)
        builders = [b for b in compat.runner_metadata_builders(runner) + compat.runner_drafter_builders(runner)
                    if hasattr(b, "set_step_requests")]
        channel = BatchChannel(slot_capacity(compat.runner_max_num_seqs(runner)), builders)
        runner._attentionpack_channel = channel
    return channel


def begin_step(runner: Any, num_reqs: int) -> None:
    """Before the runner builds a step's attention metadata: hand the builders the step's requests."""
    channel = _channel(runner)
    if not channel.builders:
        return
    step = None
    if num_reqs:
        ids, requests = compat.runner_batch(runner, num_reqs)
        if ids is not None:
            step = channel.step(ids, requests)
    for builder in channel.builders:
        builder.set_step_requests(step)


def end_step(runner: Any) -> None:
    """After the builders ran: nothing of this step stays visible to them, except to a drafter's (EAGLE, MTP), whose
    builds come later in the step (the proposer's passes after the model's forward, over the same batch in the
    same order); the next :func:`begin_step` replaces it."""
    channel = getattr(runner, "_attentionpack_channel", None)
    for builder in channel.builders if channel is not None else ():
        if not getattr(builder, "drafter", False):
            builder.set_step_requests(None)


def needs_eager_step(runner: Any, num_reqs: int, num_scheduled_tokens: np.ndarray) -> bool:
    """Whether a step must run eagerly although vLLM would replay a decode CUDA graph for it: a batch of
    one-token rows in which a prompt chunk of one token completes a span. That span must be compacted in this
    very step (the KV manager frees its blocks right after), which only the eager ``forward`` does."""
    if num_reqs == 0 or int(np.max(num_scheduled_tokens[:num_reqs])) != 1:
        return False
    channel = _channel(runner)
    if not channel.builders:
        return False
    ids, requests = compat.runner_batch(runner, num_reqs)
    if ids is None:
        return False
    computed = compat.runner_num_computed_tokens(runner, num_reqs)
    return any(int(computed[i]) + 1 in channel.span_ends(rid, requests[rid]) for i, rid in enumerate(ids))
