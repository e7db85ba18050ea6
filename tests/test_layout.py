"""Package layout: the runtime never loads the tooling, benchmarks share benchmarks/common.py.

``ap_vllm.tools`` (command line, eval harness, demo, test helpers) has its own optional
dependencies (the ``tools`` extra); serving needs none of them.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the tooling and what only it needs (tqdm and httpx are not here: torch / Triton may load them themselves)
TOOLS_DEPS = ("ap_vllm.tools", "tokenizers", "PIL", "openai", "matplotlib")


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_runtime_imports_no_tooling():
    proc = _run(f"""
        import sys
        import ap_vllm.plugin, ap_vllm.config, ap_vllm.core
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {TOOLS_DEPS!r} or m.startswith("ap_vllm.tools"))
        print("LOADED", loaded)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout, proc.stdout


def test_runtime_sources_never_import_tools():
    """No module of the runtime (ap_vllm outside ap_vllm/tools, kernels/) names ap_vllm.tools in an import."""
    sources = [p for p in (ROOT / "ap_vllm").rglob("*.py") if "tools" not in p.relative_to(ROOT / "ap_vllm").parts]
    sources += list((ROOT / "kernels").rglob("*.py"))
    offenders = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            if any(n == "ap_vllm.tools" or n.startswith("ap_vllm.tools.") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_gpu_check_needs_only_torch_and_triton():
    """benchmarks/gpu_check.py (and decode_bench.py it uses) import with vLLM and the tools' dependencies absent."""
    blocked = ("vllm",) + TOOLS_DEPS
    proc = _run(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in {blocked!r}):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import benchmarks.gpu_check
        print("OK")
    """)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_benchmarks_do_not_load_each_other_by_path():
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        assert "spec_from_file_location" not in path.read_text(), path.name


def test_documentation_links_resolve():
    """Relative links of README.md, docs/ and benchmarks/README.md name files that exist."""
    import re

    broken = []
    for doc in [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken
