"""vLLM general plugin: makes ``--attention-backend attentionpack`` select this backend.

vLLM loads general plugins (entry point group ``vllm.general_plugins``) in the API server,
the engine core and every worker, so :func:`register` runs in each process, including
spawned children. It

1. registers :class:`~ap_vllm.backend.attentionpack.AttentionPackBackend` on vLLM's
   ``CUSTOM`` backend slot;
2. makes ``ATTENTIONPACK`` an alias of the ``CUSTOM`` enum member, so the name parses
   (``AttentionBackendEnum["ATTENTIONPACK"]``) while configs pickled to child processes carry
   ``CUSTOM``, a member every process has (a new enum member would not survive unpickling
   before plugins load);
3. pairs the KV-cache spec of compacted layers with the KV manager that frees their blocks
   (:mod:`ap_vllm.backend.kv_manager`, vLLM's spec registry);
4. applies :mod:`ap_vllm._vllm_patches` (CPU backend selection, start-up checks, the runner
   hook that tells the backend which requests are in a batch).
"""

from __future__ import annotations

BACKEND_NAME = "ATTENTIONPACK"
BACKEND_PATH = "ap_vllm.backend.attentionpack.AttentionPackBackend"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    AttentionBackendEnum._member_map_.setdefault(BACKEND_NAME, AttentionBackendEnum.CUSTOM)

    from ap_vllm import _vllm_patches
    from ap_vllm.backend.kv_manager import register_kv_cache_spec

    register_kv_cache_spec()
    _vllm_patches.apply()
    _registered = True


def is_selected(backend) -> bool:
    """True when ``backend`` (an AttentionBackendEnum member or None) selects AttentionPack."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return backend is AttentionBackendEnum.CUSTOM and AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH
