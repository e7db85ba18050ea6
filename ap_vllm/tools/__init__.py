"""Tooling around the AttentionPack backend, not needed to serve: the ``ap-vllm`` command line
(:mod:`.cli`), the quality harness (:mod:`.eval`), the demo (:mod:`.demo`) and the test helpers
(:mod:`.testing`: tiny offline VLM builder, ``vllm serve`` runner, Gemma 3 270M weights converter).

Their third-party dependencies are the ``tools`` extra (``pip install ".[tools]"``). The runtime
modules (``ap_vllm.plugin``, ``ap_vllm.config``, ``ap_vllm.backend``, ``ap_vllm.core``, the kernels)
never import this package.
"""
