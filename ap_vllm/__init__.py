"""AttentionPack for vLLM: memory-efficient decoding for vision-language models.

Select it with ``vllm serve MODEL --attention-backend attentionpack``.
"""

__version__ = "0.1.0"
