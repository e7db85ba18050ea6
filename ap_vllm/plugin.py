"""vLLM general plugin: makes ``--attention-backend attentionpack`` select this backend.

vLLM loads general plugins (entry point group ``vllm.general_plugins``) in the API server,
the engine core and every worker, so :func:`register` runs in each process, including
spawned children. It

1. registers :class:`~ap_vllm.backend.attentionpack.AttentionPackBackend` on vLLM's
   ``CUSTOM`` backend slot;
2. pairs the KV-cache spec of compacted layers with the KV manager that frees their blocks
   (:mod:`ap_vllm.engine.kv_manager`, vLLM's spec registry);
3. applies :mod:`ap_vllm.compat`, the one place that reaches into vLLM internals: the
   ``ATTENTIONPACK`` alias of the ``CUSTOM`` enum member (so the name parses while configs pickled
   to child processes carry ``CUSTOM``), CPU backend selection, the start-up config check (with
   compaction's start-up policy, :mod:`ap_vllm.engine.policy`), the
   request check against the KV pool, the rotary tables, and the runner hook that tells the
   backend's metadata builders which requests are in a step (:mod:`ap_vllm.backend.channel`).

Every step is idempotent, so calling :func:`register` again changes nothing.
"""

from __future__ import annotations

from ap_vllm.selection import BACKEND_NAME, BACKEND_PATH, is_selected

__all__ = ["BACKEND_NAME", "BACKEND_PATH", "is_selected", "register"]


def register() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from ap_vllm import compat
    from ap_vllm.backend.attentionpack import attach_rotary_tables
    from ap_vllm.backend.channel import begin_step, end_step, needs_eager_step
    from ap_vllm.engine import policy
    from ap_vllm.engine.kv_manager import check_request_fits, register_kv_cache_spec

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    register_kv_cache_spec()
    compat.apply(attach_rotary_tables=attach_rotary_tables, check_request_fits=check_request_fits,
                 begin_step=begin_step, end_step=end_step, before_build=policy.before_build,
                 configure=policy.configure, needs_eager_step=needs_eager_step)
