"""Names shared by the plugin, the vLLM compatibility layer, the engine side and the backend.

A leaf module: it imports nothing of AttentionPack, and vLLM only inside :func:`is_selected`.
"""

from __future__ import annotations

BACKEND_NAME = "ATTENTIONPACK"
"""What ``--attention-backend attentionpack`` parses to: an alias of vLLM's ``CUSTOM`` member."""

BACKEND_PATH = "ap_vllm.backend.attentionpack.AttentionPackBackend"
"""The class registered on vLLM's ``CUSTOM`` backend slot."""

SCHEDULER_STATS_FIELD = "attentionpack"
"""The field declared on vLLM's ``SchedulerStats`` that carries the engine's metrics to the API server."""

SCHEDULER_CLS = "ap_vllm.engine.scheduler.AttentionPackScheduler"
ASYNC_SCHEDULER_CLS = "ap_vllm.engine.scheduler.AsyncAttentionPackScheduler"
"""The scheduler classes compaction needs (``--scheduler-cls``), without and with async scheduling."""


def names_attentionpack(backend) -> bool:
    """True when ``backend`` (an AttentionBackendEnum member, a name, or None) is spelled as AttentionPack is
    selected: ``attentionpack`` (any case) or ``CUSTOM``, before vLLM resolves what ``CUSTOM`` holds."""
    return getattr(backend, "name", str(backend or "")).upper() in ("CUSTOM", BACKEND_NAME)


def is_selected(backend) -> bool:
    """True when ``backend`` (an AttentionBackendEnum member or None) selects AttentionPack."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return backend is AttentionBackendEnum.CUSTOM and AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH
