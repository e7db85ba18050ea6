"""AttentionPack for vLLM: memory-efficient decoding for vision-language models.

Select it with ``vllm serve MODEL --attention-backend attentionpack``.
"""

__version__ = "0.1.0"


def _source_checkout_kernels() -> None:
    """Run from a source checkout (``PYTHONPATH=.``, e.g. ``make gpu-check`` on a machine with torch + Triton
    only): kernels/ sits beside ap_vllm/ and is installed as ``ap_vllm.kernels``; map it the same way here."""
    import importlib.util
    import os
    import sys

    if "ap_vllm.kernels" in sys.modules or importlib.util.find_spec("ap_vllm.kernels") is not None:
        return
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(src, "__init__.py")
    if os.path.isfile(init):
        spec = importlib.util.spec_from_file_location("ap_vllm.kernels", init, submodule_search_locations=[src])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["ap_vllm.kernels"] = mod
        spec.loader.exec_module(mod)


_source_checkout_kernels()
