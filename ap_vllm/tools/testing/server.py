"""Run a real ``vllm serve`` subprocess for tests and benchmarks.

::

    from ap_vllm.tools.testing.server import VllmServer, image_data_url

    with VllmServer(model_dir, extra_args=["--attention-backend", "attentionpack"]) as srv:
        out = srv.client().chat.completions.create(
            model=srv.model_name, max_tokens=8, temperature=0.0,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(seed=1)}},
                {"type": "text", "text": "Describe the image."}]}])

The server listens on 127.0.0.1 at a free port, runs in its own process group (session), and
keeps its caches, sockets and log in a temporary directory it owns (``VLLM_CACHE_ROOT``,
``VLLM_CONFIG_ROOT``, ``TMPDIR``, ``HF_HOME``). On exit the whole process group (and any
descendant that left it) gets SIGTERM, then SIGKILL; the exit fails loudly if a process
survives, and the temporary directory is removed.

Two things make a start cheaper (a start of the tests' tiny VLM on 2 cores: 32-35 s, 17-18 s with both):

- ``executor="uni"`` (the default): the model runs in vLLM's engine-core process, as vLLM runs it on
  one GPU. On CPU vLLM gives it a worker process of its own (``mp``, what ``vllm serve`` does there
  by default, and what ``executor="mp"`` keeps) unless ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which
  ``uni`` sets: one Python process fewer to start (about 6 s).
- vLLM's inspection of the model class (a subprocess that imports vLLM: about 7 s) is cached in
  ``<VLLM_CACHE_ROOT>/modelinfos``, keyed by the hash of the model's module and written
  atomically; that one directory is shared by the servers of a user (``modelinfo_cache``; None:
  the server's own, empty).
"""

from __future__ import annotations

import base64
import contextlib
import importlib.abc
import importlib.machinery
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, TypeVar, Union

__all__ = ["VllmServer", "ServerError", "free_port", "image_data_url", "synthetic_image",
           "live_processes", "EXECUTORS", "shared_modelinfo_cache", "sitecustomize_env", "base_and_ours", "running",
           "equal_up_to_a_tie", "greedy_turn"]

EXECUTORS = ("uni", "mp")  # the model in vLLM's engine-core process / in a worker process of its own


def shared_modelinfo_cache() -> Path:
    """The directory of vLLM's model-class inspection results shared by this user's test servers."""
    return Path(tempfile.gettempdir()) / f"ap_vllm_modelinfos_{os.getuid()}"


class ServerError(RuntimeError):
    """The server failed to start, died, or left processes behind."""


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, drawn below the kernel's ephemeral range when it can be.

    A port the kernel hands out (bind to 0) is an ephemeral one: between this call and the server's own bind, any
    outgoing connection or ZMQ socket of a neighbouring process (another test worker's server) may take it. Ports
    below the ephemeral range are only ever taken by an explicit bind, so a random one of them almost never races.
    """
    import random

    low, high = _ephemeral_range()
    candidates = (10000, low - 1) if low > 11000 else (high + 1, 65535)
    for _ in range(50):
        port = random.randint(*candidates)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _proc_table() -> dict[int, tuple[int, int, str, int]]:
    """pid -> (ppid, pgid, state, start time) for every process visible in /proc.

    The start time (clock ticks since boot) tells a process from a later one that reuses its pid.
    """
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # comm may contain spaces/parens: split after the last ')'
        rest = stat[stat.rfind(")") + 2:].split()
        table[int(entry)] = (int(rest[1]), int(rest[2]), rest[0], int(rest[19]))
    return table


def _descendants(root: int, table: dict[int, tuple[int, int, str, int]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = set(), [root]
    while stack:
        for c in children.get(stack.pop(), ()):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out


def live_processes(pgid: int, extra: Mapping[int, int] = {}) -> list[int]:  # noqa: B006 (read only)
    """Processes (not zombies) in process group ``pgid`` or in ``extra`` (pid -> start time; a pid
    now used by a process started at another time is someone else's)."""
    return sorted(pid for pid, (_, g, state, started) in _proc_table().items()
                  if state not in ("Z", "X") and (g == pgid or extra.get(pid) == started))


def synthetic_image(width: int = 64, height: int = 64, seed: int = 0):
    """A deterministic RGB PIL image: colored rectangles on a gradient, different per seed."""
    import random

    from PIL import Image, ImageDraw

    import numpy as np

    rng = random.Random(seed)
    base = np.array([rng.randrange(256) for _ in range(3)], dtype=np.int64)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.empty((height, width, 3), dtype=np.int64)
    arr[..., 0] = base[0] + xx * 255 // max(width, 1)
    arr[..., 1] = base[1] + yy * 255 // max(height, 1)
    arr[..., 2] = base[2] + (xx + yy) * 127 // max(width + height, 1)
    img = Image.fromarray((arr % 256).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = rng.randrange(x0, width + 1), rng.randrange(y0, height + 1)
        draw.rectangle([x0, y0, x1, y1], fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


def image_data_url(image=None, *, width: int = 64, height: int = 64, seed: int = 0) -> str:
    """``data:image/png;base64,...`` for ``image`` (a PIL image) or a :func:`synthetic_image`."""
    if image is None:
        image = synthetic_image(width, height, seed)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_content(seed: int, text: str = "Describe the image.", size: tuple[int, int] = (64, 48), n: int = 1) -> list:
    """Chat message content: ``n`` synthetic images (the i-th ``8 * i`` pixels wider, seed ``seed + 100 * i``),
    then ``text``."""
    parts = [{"type": "image_url", "image_url": {"url": image_data_url(width=size[0] + 8 * i, height=size[1],
                                                                        seed=seed + 100 * i)}} for i in range(n)]
    return parts + [{"type": "text", "text": text}]


def greedy_turn(server: "VllmServer", messages: list, max_tokens: int) -> tuple[str, list[tuple[str, float, dict]]]:
    """A greedy answer of ``server`` to a chat: its text, and (token, log-probability, the top-3 tokens'
    log-probabilities) of each of its tokens, as :func:`equal_up_to_a_tie` compares them."""
    r = server.client().chat.completions.create(model=server.model_name, messages=messages, max_tokens=max_tokens,
                                                temperature=0.0, logprobs=True, top_logprobs=3)
    c = r.choices[0]
    return c.message.content, [(t.token, t.logprob, {x.token: x.logprob for x in t.top_logprobs})
                               for t in c.logprobs.content]


def equal_up_to_a_tie(base: list, ours: list, tie: float) -> int:
    """Asserts two greedy answers, each a list of (token, log-probability, {top token: log-probability}) as
    :func:`greedy_turn` gives them, equal up
    to a tie: the tokens equal up to the first position where they part, every log-probability before it within
    ``tie`` of the other server's, and there each server scoring the other's choice within ``tie`` of its own (a
    half-precision model's logits often tie, and two servers that chunk a prompt differently round differently);
    equal lengths when they never part. Returns the number of tokens compared (the position where they part)."""
    n = next((i for i, (b, o) in enumerate(zip(base, ours)) if b[0] != o[0]), min(len(base), len(ours)))
    for (token, lp_base, _), (_, lp_ours, _) in zip(base[:n], ours[:n]):
        assert abs(lp_base - lp_ours) <= tie, (token, lp_base, lp_ours)
    if n < min(len(base), len(ours)):
        (b, lp_b, top_b), (o, lp_o, top_o) = base[n], ours[n]
        assert o in top_b and lp_b - top_b[o] <= tie, (n, base[n], ours[n])
        assert b in top_o and lp_o - top_o[b] <= tie, (n, base[n], ours[n])
    else:
        assert len(base) == len(ours)
    return n


def video_data_url(*, frames: int = 8, width: int = 64, height: int = 48, fps: float = 2.0, seed: int = 0) -> str:
    """``data:video/mp4;base64,...``: ``frames`` :func:`synthetic_image` frames (seeds ``seed``, ``seed + 1``, ...)
    encoded with OpenCV (``mp4v``; vLLM's own video decoder is OpenCV's)."""
    import tempfile

    import cv2
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "video.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        if not writer.isOpened():
            raise RuntimeError("OpenCV cannot write mp4v videos here")
        for i in range(frames):
            writer.write(cv2.cvtColor(np.asarray(synthetic_image(width, height, seed + i)), cv2.COLOR_RGB2BGR))
        writer.release()
        with open(path, "rb") as f:
            data = f.read()
    return "data:video/mp4;base64," + base64.b64encode(data).decode("ascii")


def video_content(seed: int, text: str = "Describe the video.", frames: int = 8, size: tuple[int, int] = (64, 48),
                  images: int = 0) -> list:
    """Chat message content: ``images`` synthetic images (:func:`image_content`), one :func:`video_data_url` video,
    then ``text``."""
    parts = image_content(seed + 1000, "", size, images)[:-1] if images else []
    parts.append({"type": "video_url", "video_url": {"url": video_data_url(frames=frames, width=size[0],
                                                                          height=size[1], seed=seed)}})
    return parts + [{"type": "text", "text": text}]


def _vllm_cmd() -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]


class VllmServer:
    """Context manager around a real ``vllm serve`` process.

    ``extra_args`` are appended to the command line (they can override the defaults, e.g. a
    second ``--max-model-len``: argparse keeps the last). ``env`` entries override the
    environment the server inherits (a value of ``None`` removes the variable). ``executor``:
    where the model runs, ``"uni"`` (vLLM's engine-core process) or ``"mp"`` (a worker process:
    vLLM's CPU default); ``modelinfo_cache``: the directory of vLLM's model-class inspection
    results the server shares (None: its own); see the module's docstring.
    """

    def __init__(
        self,
        model_dir: Union[str, os.PathLike],
        *,
        extra_args: Sequence[str] = (),
        env: Optional[Mapping[str, Optional[str]]] = None,
        startup_timeout: float = 300.0,
        enforce_eager: bool = True,
        max_model_len: Optional[int] = 8192,
        dtype: Optional[str] = "float32",
        kv_cache_space_gib: int = 2,
        served_model_name: Optional[str] = None,
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        stop_timeout: float = 30.0,
        executor: str = "uni",
        modelinfo_cache: Optional[Union[str, os.PathLike]] = shared_modelinfo_cache(),
    ):
        if executor not in EXECUTORS:
            raise ValueError(f"executor={executor!r}: where the model runs, one of {EXECUTORS}")
        self.executor = executor
        self.modelinfo_cache = None if modelinfo_cache is None else Path(modelinfo_cache)
        self.model_dir = str(model_dir)
        self.model_name = served_model_name or self.model_dir
        self.extra_args = list(extra_args)
        self.env_overrides = dict(env or {})
        self.startup_timeout = startup_timeout
        self.enforce_eager = enforce_eager
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.kv_cache_space_gib = kv_cache_space_gib
        self.host = host
        self.port = port
        self.stop_timeout = stop_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.tmpdir: Optional[Path] = None
        self.log_path: Optional[Path] = None
        self.startup_seconds: Optional[float] = None
        self._log_file = None

    # ------------------------------------------------------------------ properties
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ServerError("server not started")
        return self.proc.pid

    def command(self) -> list[str]:
        cmd = _vllm_cmd() + [self.model_dir, "--host", self.host, "--port", str(self.port)]
        if self.model_name != self.model_dir:
            cmd += ["--served-model-name", self.model_name]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.dtype:
            cmd += ["--dtype", self.dtype]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        assert self.tmpdir is not None
        env = dict(os.environ)
        t = self.tmpdir
        env.update({
            "VLLM_CACHE_ROOT": str(t / "vllm_cache"),
            "VLLM_CONFIG_ROOT": str(t / "vllm_config"),
            "VLLM_RPC_BASE_PATH": str(t / "tmp"),
            "TMPDIR": str(t / "tmp"),
            "HF_HOME": str(t / "hf_home"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_space_gib),
            "PYTHONUNBUFFERED": "1",
        })
        if self.executor == "uni":  # (vLLM's CPU platform then keeps its uniprocess executor)
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        else:
            env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        for k, v in self.env_overrides.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = str(v)
        return env

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "VllmServer":
        if self.proc is not None:
            raise ServerError("already started")
        self.tmpdir = Path(tempfile.mkdtemp(prefix="ap_vllm_server_"))
        for sub in ("vllm_cache", "vllm_config", "tmp", "hf_home"):
            (self.tmpdir / sub).mkdir()
        if self.modelinfo_cache is not None:  # (removing the temp dir unlinks the link, not the shared dir)
            self.modelinfo_cache.mkdir(parents=True, exist_ok=True)
            (self.tmpdir / "vllm_cache" / "modelinfos").symlink_to(self.modelinfo_cache, target_is_directory=True)
        pick_port = self.port is None
        self.log_path = self.tmpdir / "server.log"
        t0 = time.monotonic()
        for attempt in range(3):
            if pick_port:
                self.port = free_port(self.host)
            self._log_file = open(self.log_path, "wb")
            try:
                self.proc = subprocess.Popen(
                    self.command(), env=self.environment(), cwd=str(self.tmpdir),
                    stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
                    start_new_session=True)
                self._wait_healthy(t0)
            except ServerError as e:
                # a port we picked, taken by another process before the server bound it: pick another
                lost_port = pick_port and attempt < 2 and "Address already in use" in str(e)
                if lost_port and not self._end_process():
                    self.proc = None
                    continue
                self.stop(raise_on_leftovers=False)
                raise
            except BaseException:
                self.stop(raise_on_leftovers=False)
                raise
            break
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_healthy(self, t0: float) -> None:
        deadline = t0 + self.startup_timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerError(f"vllm serve exited with code {rc} during startup\n"
                                  f"--- errors ---\n{self.error_lines()}\n--- log tail ---\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"vllm serve not healthy after {self.startup_timeout:.0f}s\n"
                                  f"--- log tail ---\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self, raise_on_leftovers: bool = True) -> None:
        """SIGTERM the process group, then SIGKILL; verify nothing survives; remove the temp dir."""
        leftovers = self._end_process()
        if leftovers:
            # keep the temp dir (and log) for inspection
            if raise_on_leftovers:
                raise ServerError(f"processes survived SIGKILL: {leftovers}; log at {self.log_path}")
            return
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def _end_process(self) -> list[int]:
        """SIGTERM the process group, then SIGKILL, and close the log; the pids that survived."""
        leftovers: list[int] = []
        if self.proc is not None:
            pgid = self.proc.pid  # start_new_session: pgid == pid of the leader
            table = _proc_table()
            tracked = {pid: table[pid][3] for pid in _descendants(pgid, table) | {pgid} if pid in table}
            for sig, wait in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 30.0)):
                alive = live_processes(pgid, tracked)
                if not alive:
                    break
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
                for pid in alive:  # descendants that changed process group
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                end = time.monotonic() + wait
                while time.monotonic() < end:
                    try:
                        self.proc.wait(timeout=0.2)
                    except subprocess.TimeoutExpired:
                        pass
                    if not live_processes(pgid, tracked):
                        break
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            leftovers = live_processes(pgid, tracked)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return leftovers

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.log_path is not None and self.log_path.exists():
            sys.stderr.write(f"--- vllm serve log tail ({self.log_path}) ---\n{self.log_tail()}\n")
        self.stop(raise_on_leftovers=exc_type is None)

    # ------------------------------------------------------------------ access
    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        if self._log_file is not None:
            self._log_file.flush()
        return self.log_path.read_text(errors="replace")

    def error_lines(self, limit: int = 20) -> str:
        """The log's first lines that name an error (the root cause precedes vLLM's shutdown noise)."""
        hits = [ln for ln in self.log_text().splitlines() if "Error" in ln and "Traceback" not in ln]
        return "\n".join(hits[:limit])

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def get(self, path: str, timeout: float = 30.0) -> str:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as r:
            return r.read().decode()

    def metrics(self) -> str:
        """Prometheus text from ``GET /metrics``."""
        return self.get("/metrics")

    def metric(self, name: str) -> float:
        """The sum of metric ``name`` over its label sets (engines); an error if /metrics lacks it."""
        values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([-+0-9.e]+)$",
                                                          self.metrics(), re.M)]
        assert values, f"{name} missing from /metrics"
        return sum(values)

    def _wait_for(self, name: str, done, timeout: float) -> float:
        """Metric ``name`` once ``done(value)``, or at ``timeout``, read every half second."""
        end = time.monotonic() + timeout
        while True:
            v = self.metric(name)
            if done(v) or time.monotonic() > end:
                return v
            time.sleep(0.5)

    def wait_metric(self, name: str, target: float, timeout: float = 30.0) -> float:
        """``name`` once it reached ``target``, or at ``timeout`` (stats reach /metrics with the engine's next
        step)."""
        return self._wait_for(name, lambda v: v >= target, timeout)

    def wait_kv_empty(self, timeout: float = 60.0) -> float:
        """vLLM's KV-cache usage once it is 0, or at ``timeout``."""
        return self._wait_for("vllm:kv_cache_usage_perc", lambda v: v == 0.0, timeout)

    def client(self, timeout: float = 600.0, max_retries: int = 0):
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="EMPTY", timeout=timeout,
                             max_retries=max_retries)

    def stream_then_cancel(self, content, after: Optional[int], max_tokens: int = 64, client=None) -> str:
        """Streams a greedy chat completion of one user message and closes the connection once ``after`` chunks
        came (the server aborts the request): "cancelled", or "done" if the stream ended first (``after=None``:
        read to the end)."""
        client = client or self.client()
        s = client.chat.completions.create(model=self.model_name, messages=[{"role": "user", "content": content}],
                                           max_tokens=max_tokens, temperature=0.0, stream=True)
        for pieces, _ in enumerate(s, 1):
            if pieces == after:
                s.response.close()
                return "cancelled"
        return "done"

    def greedy_tokens(self, content, max_tokens: int = 16, model: Optional[str] = None, **kw) -> list[str]:
        """The tokens of a greedy chat completion of one user message (``model``: a served name, e.g. a LoRA
        adapter's, default the model's; ``kw``: more request fields)."""
        r = self.client().chat.completions.create(
            model=model or self.model_name, messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
            temperature=0.0, logprobs=True, **kw)
        return [t.token for t in r.choices[0].logprobs.content]


_Servers = TypeVar("_Servers", bound=Mapping[str, "VllmServer"])


def sitecustomize_env(directory: Path, *calls: str) -> dict[str, str]:
    """A server ``env`` whose ``PYTHONPATH`` starts with ``directory``, where a ``sitecustomize.py`` imports and
    calls each of ``calls`` (``"module.function(args)"``) in every Python process the server starts (import hooks
    that must be in place before vLLM imports a model, e.g. the tiny models' torchvision stand-ins)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for call in calls:
        module, _, function = call.partition("(")[0].rpartition(".")
        lines += [f"from {module} import {function}", call[len(module) + 1:]]
    (directory / "sitecustomize.py").write_text("\n".join(lines) + "\n")
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(directory), os.environ.get("PYTHONPATH", "")) if p)}


class PatchingLoader(importlib.abc.Loader):
    """Runs a module's own loader, then ``patch(module)``."""

    def __init__(self, inner, patch):
        self.inner, self.patch = inner, patch

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        self.patch(module)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, patch) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, name, path, target=None):
        if name != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = PatchingLoader(spec.loader, self.patch)
        return spec


def patch_on_import(name: str, patch) -> None:
    """``patch(module)`` for module ``name``: now if it is imported, else right after its own loader runs (an
    import hook: nothing is imported now, so a ``sitecustomize`` can call it without importing vLLM early).
    Idempotent for the same ``patch``."""
    if name in sys.modules:
        patch(sys.modules[name])
    elif not any(isinstance(f, _PatchOnImport) and f.name == name and f.patch is patch for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(name, patch))


def base_and_ours(model_dir, *, max_model_len: int, args: Sequence[str], attentionpack: dict,
                  env: Optional[Mapping[str, str]] = None, dtype: Optional[str] = "float32") -> dict[str, "VllmServer"]:
    """The pair the end-to-end tests compare (start them with :func:`running`): ``"base"`` on vLLM's CPU_ATTN and
    ``"ours"`` on AttentionPack with ``attentionpack`` as its ``--additional-config`` section, both with ``args``
    and ``dtype``."""
    import json

    return {"base": VllmServer(model_dir, max_model_len=max_model_len, env=env, dtype=dtype,
                               extra_args=["--attention-backend", "CPU_ATTN", *args]),
            "ours": VllmServer(model_dir, max_model_len=max_model_len, env=env, dtype=dtype, extra_args=[
                "--attention-backend", "attentionpack", *args,
                "--additional-config", json.dumps({"attentionpack": attentionpack})])}


@contextlib.contextmanager
def running(servers: _Servers) -> Iterator[_Servers]:
    """Start every server of the mapping side by side (start-up is mostly imports, so two or
    three overlap well); stop them all on exit, even if one failed to start."""
    errors: list[BaseException] = []

    def start(server: VllmServer) -> None:
        try:
            server.start()
        except BaseException as e:  # re-raised below, after the others finished starting
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield servers
    finally:
        for server in servers.values():
            if server.proc is not None:
                server.stop()
