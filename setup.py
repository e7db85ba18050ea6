"""Packaging: the Triton kernels in kernels/ and the presets in configs/ ship inside ap_vllm.

A top-level package named ``kernels`` would clash with an existing PyPI package of that name,
so kernels/ is installed as ``ap_vllm.kernels`` and configs/ as ``ap_vllm/configs``.
"""

from setuptools import setup

setup(
    packages=["ap_vllm", "ap_vllm.backend", "ap_vllm.core", "ap_vllm.testing", "ap_vllm.kernels",
              "ap_vllm.configs"],
    package_dir={"ap_vllm": "ap_vllm", "ap_vllm.kernels": "kernels", "ap_vllm.configs": "configs"},
    package_data={"ap_vllm.configs": ["*.yaml"], "ap_vllm.testing": ["*.json", "*.jinja"]},
)
