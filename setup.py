"""Packaging: the Triton kernels in kernels/ and the presets in configs/ ship inside ap_vllm.

A top-level package named ``kernels`` would clash with an existing PyPI package of that name,
so kernels/ is installed as ``ap_vllm.kernels`` and configs/ as ``ap_vllm/configs``.

The CUDA C++ sources in csrc/ ship as ``ap_vllm/csrc`` (next to ``ap_vllm/kernels``, where
``ap_vllm.kernels.cuda_span`` finds them to compile them on first use). With
``AP_VLLM_BUILD_CUDA=1`` (and a CUDA build of torch importable at build time, e.g.
``pip wheel --no-build-isolation``) the extension is also prebuilt as ``ap_vllm._span_decode_C``
for the archs of ``TORCH_CUDA_ARCH_LIST``.
"""

import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("AP_VLLM_BUILD_CUDA") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules.append(CUDAExtension(
        "ap_vllm._span_decode_C", sources=["csrc/span_decode.cu", "csrc/torch_binding.cpp"],
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}))
    cmdclass["build_ext"] = BuildExtension

setup(
    # ap_vllm and its subpackages (runtime: backend, core, ...; ap_vllm.tools: command line, eval, test
    # helpers) are discovered; kernels/, configs/ and csrc/ are mapped into the package below.
    packages=find_packages(include=["ap_vllm", "ap_vllm.*"]) + ["ap_vllm.kernels", "ap_vllm.configs", "ap_vllm.csrc"],
    package_dir={"ap_vllm": "ap_vllm", "ap_vllm.kernels": "kernels", "ap_vllm.configs": "configs",
                 "ap_vllm.csrc": "csrc"},
    package_data={"ap_vllm.configs": ["*.yaml"], "ap_vllm.tools.testing": ["*.json", "*.jinja"],
                  "ap_vllm.csrc": ["*.cu", "*.h", "*.cpp"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
