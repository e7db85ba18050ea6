"""AttentionPack configuration: one typed object, read from vLLM's ``--additional-config``.

Users write::

    vllm serve MODEL --attention-backend attentionpack \
        --additional-config '{"attentionpack": {"preset": "qwen2_5_vl", "value_rank": 96}}'

A ``preset`` names a YAML file in ``configs/`` (shipped inside the package as
``ap_vllm/configs``) or a path to a YAML file; explicit keys override the preset.
Anything that is not a known field, has the wrong type or is out of range makes vLLM
refuse to start with a message naming the field and what is allowed.

Checks that need the model (ranks <= H*d, per-layer list lengths) run in
:meth:`AttentionPackConfig.validate_for_model`, called by :func:`config_from_vllm` in every process.
Ranks count components of the model's whole ``T x (H*d)`` matrix; under tensor parallelism each worker
keeps its share for its own heads (:meth:`AttentionPackConfig.for_kv_heads`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ap_vllm.selection import names_attentionpack

CONFIG_KEY = "attentionpack"
# Installed wheels carry the presets as ap_vllm/configs; a source checkout has them in configs/.
PRESETS_DIR = next((p for p in (Path(__file__).with_name("configs"), Path(__file__).parents[1] / "configs")
                    if p.is_dir()), Path(__file__).with_name("configs"))

Rank = Union[int, list[int]]
_RANK_FIELDS = ("key_rank", "value_rank", "text_key_rank", "text_value_rank")


class AttentionPackConfigError(ValueError):
    """Raised for invalid AttentionPack configuration; the message names the field."""


# settings only the EMA selection reads: given explicitly, they make value_selection 'auto' mean 'ema'
EMA_SETTINGS = ("importance_fraction", "importance_ema", "threshold_sample_tokens")


def _triton_on_cuda(data: dict) -> bool:
    """Whether the served path will run the Triton kernels on a CUDA device (kernel 'auto' or 'triton')."""
    if data.get("kernel", "auto") not in ("auto", "triton"):
        return False
    import torch

    return torch.cuda.is_available()


class AttentionPackConfig(BaseModel):
    """How visual-token KV spans are compacted and read back.

    Ranks: a span of T tokens of one layer is stored as coefficients (T x R) and a basis
    (R x H*d) for K and V separately, so the per-token cost drops from H*d to R numbers.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    enabled: bool = Field(True, description="Compact visual spans. False = AttentionPack steps aside: vLLM's own attention "
                         "backend serves, bit for bit.")
    key_rank: Rank = Field(64, description="Rank R_k of the key basis (int or one per layer).")
    value_rank: Rank = Field(64, description="Rank R_v of the value basis (int or one per layer).")
    energy_threshold: Optional[float] = Field(
        None, description="If set, pick the smallest rank keeping this fraction of spectral energy, "
        "capped by key_rank/value_rank.")
    importance_fraction: float = Field(
        0.25, description="value_selection 'ema': fraction of a span's tokens (most important) whose values are "
        "read at full rank. Giving it makes value_selection 'auto' mean 'ema'.")
    threshold_sample_tokens: int = Field(
        1024, description="value_selection 'ema' (giving it makes 'auto' mean 'ema'): the importance threshold "
        "of a longer span is estimated from this many of its tokens "
        "(a stratified sample; the full-rank share is then off by ~1.4% at fraction 0.25), one small sort per "
        "layer and step instead of a sort of every span token. 0 = every token.")
    importance_ema: float = Field(
        0.25, description="value_selection 'ema': EMA weight omega of the newest attention probability in the "
        "importance score. Giving it makes value_selection 'auto' mean 'ema'.")
    low_rank_divisor: int = Field(
        4, description="Less important tokens are read with only the first R/divisor components.")
    two_level_keys: bool = Field(False, description="Apply the two-level read to keys too (values always).")
    value_selection: Literal["auto", "ema", "score", "full"] = Field(
        "auto", description="Which tokens' values a decode step reads at full rank. 'score' (beyond the paper): "
        "the tokens this step's query attends to, max over query heads of exp(s - lse_ref) >= score_threshold "
        "with lse_ref the previous step's log-normaliser, from the full-rank key scores the step computes "
        "anyway; rows without a previous lse read every token at full rank; no importance is kept (no update, "
        "no thresholds). 'ema' (the paper): the top importance_fraction of a span by importance, an EMA of the "
        "attention each token received in earlier steps (importance_ema). 'auto' (default) = 'ema' where a setting "
        "asks for the EMA (importance_fraction, importance_ema or threshold_sample_tokens given, two_level_keys "
        "true, or kernel 'cuda'); otherwise 'full' where the Triton kernels run on a CUDA device (on an H200 the "
        "two-level read took 0.94-0.97 of the full-rank read's time for 0.74-0.76 of its bytes, and score "
        "selection was no faster than a full-rank read: see docs/gpu-kernels.md), 'score' elsewhere. Measured "
        "on Gemma 3 270M text (docs/results.md): at about equal bytes read, score had 1.2x and 1.7x lower mean "
        "KL than the EMA at R=128 and 192 (1.2x higher at R=64, "
        "where the EMA read 10% more), reading 5-6% of the tokens at full rank against the default EMA's 28%. "
        "'score' needs two_level_keys false and a Triton or torch kernel. 'full': no selection, every token's "
        "values (and keys) at full rank: the most accurate read, 4 bytes of importance less per token and step, "
        "and on a GPU a span kernel whose loads never wait on loaded data; it reads the most bytes (R_k + R_v "
        "components a token, where the others read R_k + R_v / low_rank_divisor for a low-rank token). Needs "
        "two_level_keys false and a Triton or torch kernel.")
    score_threshold: float = Field(
        1.0 / 256, description="value_selection 'score': a token's values are read at full rank when its "
        "estimated attention probability in some query head is at least this, so a token read at low rank adds "
        "at most about score_threshold times its value error to any head's output (to be tuned).")
    text_two_level: bool = Field(
        False, description="Apply the two-level read (value_selection) to text spans too (compact_text). "
        "Off by default: on Gemma 3 270M text at 4x fewer bytes it doubled the mean KL (0.091 against 0.048 "
        "with every value read at full rank) and lost a copied year at R=192 of 256; text spans then read "
        "their values at full rank (2*R_v bytes per token and step more than the two-level read).")
    min_span_tokens: int = Field(64, description="Spans shorter than this stay exact.")
    chunk_tokens: Optional[int] = Field(
        8192, description="Longer spans (long videos) are cut at block boundaries into chunks of about this "
        "many tokens (at most chunk_tokens + block_size), each with its own basis and compacted as soon as its "
        "last token is prefilled, so a long video never holds its whole exact KV; tokens prefilled later "
        "attend to the earlier chunks in compact form. null = one span per image/video.")
    sink_tokens: int = Field(4, description="The first tokens of a sequence always stay exact.")
    pool_check: Literal["exact", "compacted"] = Field(
        "exact", description="What vLLM's start-up check asks of the KV pool. exact: one request of max_model_len "
        "exact tokens fits (vLLM's rule). compacted: one request of max_model_len tokens that is one long video, "
        "compacted chunk by chunk while prefilled, fits; so a video longer than the pool can be served. Each "
        "request is then checked on arrival against the pool (the most it holds at any time, compacted), and "
        "one that cannot fit is refused with HTTP 400 naming both numbers. Not for models with sliding-window "
        "or linear-attention layers.")
    key_space: Literal["post_rope", "pre_rope"] = Field(
        "post_rope", description="'post_rope': keys are compacted as the backend sees them (after RoPE); "
        "scores are taken in coefficient space. 'pre_rope': keys are rotated back to their pre-RoPE form "
        "before compaction (lower rank for the same error) and each read rebuilds and rotates them "
        "(R_k*H*d more multiply-adds per token and step). Needs a 1-D rotary embedding (not M-RoPE).")
    coefficient_dtype: Literal["auto", "model", "fp8_e4m3"] = Field(
        "auto", description="Storage of coefficients: model dtype or FP8 e4m3 with a per-token scale. 'auto': "
        "FP8 when the KV cache is FP8 (--kv-cache-dtype fp8), the model dtype otherwise.")
    svd_oversample: int = Field(8, description="Extra columns of the randomized SVD sketch (CPU compaction; the "
                                "GPU's Gram method keeps R + 1 candidates).")
    svd_power_iters: int = Field(2, description="Subspace (power) iterations of the randomized SVD (the GPU's Gram "
                                 "method runs this + 2 steps).")
    compact_text: bool = Field(False, description="Also compact long text prompts (beyond the paper).")
    text_min_tokens: int = Field(512, description="Text prompts shorter than this are not compacted.")
    text_recent_window: int = Field(128, description="The newest prompt tokens stay exact.")
    text_key_rank: Optional[Rank] = Field(None, description="Key rank for text spans (default key_rank).")
    text_value_rank: Optional[Rank] = Field(None, description="Value rank for text spans (default value_rank).")
    kernel: Literal["auto", "torch", "triton", "cuda"] = Field(
        "auto", description="Attention kernels of the served path: 'triton' runs every row through the "
        "Triton kernels of ap_vllm.kernels (decode rows in one call per layer, CUDA-graph safe; prefill and "
        "span-completing rows in one call of the exact varlen kernel + span instances; spans compacted on "
        "the device); 'torch' runs the torch path (decode rows batched, prefill rows with fused CPU "
        "attention); 'auto' = Triton on CUDA, torch otherwise. 'triton' without a CUDA device "
        "needs TRITON_INTERPRET=1 (Triton's interpreter, for tests). 'cuda': the CUDA C++ span kernel "
        "(csrc/, ap_vllm.kernels.cuda_span) for post-RoPE spans; needs a CUDA device of compute "
        "capability >= 8.0 and the prebuilt extension (AP_VLLM_BUILD_CUDA=1) or nvcc to build it.")
    seed: int = Field(0, description="Seed of the randomized SVD sketch (deterministic compaction).")

    # ---- field-level checks (model-independent) ---------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _resolve_value_selection(cls, data: Any) -> Any:
        """value_selection 'auto' -> 'ema' where a setting asks for the EMA; otherwise 'full' where the Triton
        kernels run on a CUDA device (kernel 'auto' or 'triton'), 'score' elsewhere."""
        if isinstance(data, dict) and data.get("value_selection", "auto") == "auto":
            wants_ema = (any(k in data for k in EMA_SETTINGS) or data.get("two_level_keys") is True
                         or data.get("kernel") == "cuda")
            data = {**data, "value_selection": "ema" if wants_ema else "full" if _triton_on_cuda(data) else "score"}
        return data

    @field_validator("key_rank", "value_rank", "text_key_rank", "text_value_rank")
    @classmethod
    def _ranks_positive(cls, v: Optional[Rank]) -> Optional[Rank]:
        for r in ([v] if isinstance(v, int) else (v or [])):
            if r < 1:
                raise ValueError(f"rank {r} is not allowed: ranks must be >= 1 (and <= num_kv_heads*head_size)")
        if isinstance(v, list) and not v:
            raise ValueError("an empty per-layer rank list is not allowed: give an int or one rank per layer")
        return v

    @field_validator("importance_fraction", "importance_ema", "score_threshold")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not (0.0 < v <= 1.0):
            raise ValueError(f"{v} is outside the allowed range (0, 1]")
        return v

    @field_validator("value_selection")
    @classmethod
    def _selection(cls, v: str, info) -> str:
        if v == "score" and info.data.get("two_level_keys"):
            raise ValueError("'score' is not allowed with two_level_keys=true: score selection needs each token's "
                             "score from its full-rank key before its values are read; use 'ema' or "
                             "two_level_keys=false")
        if v == "full" and info.data.get("two_level_keys"):
            raise ValueError("'full' is not allowed with two_level_keys=true: 'full' reads every token at full "
                             "rank, keys included; use 'ema' or two_level_keys=false")
        return v

    @field_validator("energy_threshold")
    @classmethod
    def _energy(cls, v: Optional[float]) -> Optional[float]:
        if v is not None and not (0.0 < v <= 1.0):
            raise ValueError(f"{v} is outside the allowed range (0, 1]")
        return v

    @field_validator("threshold_sample_tokens")
    @classmethod
    def _sample(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"{v} is not allowed: threshold_sample_tokens must be >= 0 (0 = every token)")
        return v

    @field_validator("low_rank_divisor")
    @classmethod
    def _divisor(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"{v} is not allowed: low_rank_divisor must be >= 1")
        return v

    @field_validator("min_span_tokens", "text_min_tokens")
    @classmethod
    def _min_tokens(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"{v} is not allowed: must be >= 1")
        return v

    @field_validator("chunk_tokens")
    @classmethod
    def _chunk(cls, v: Optional[int], info) -> Optional[int]:
        lo = info.data.get("min_span_tokens", 1)
        if v is not None and v < lo:
            raise ValueError(f"{v} is not allowed: chunk_tokens must be >= min_span_tokens ({lo}) or null")
        return v

    @field_validator("sink_tokens", "text_recent_window", "svd_oversample", "svd_power_iters")
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"{v} is not allowed: must be >= 0")
        return v

    @field_validator("kernel")
    @classmethod
    def _kernel_runs_here(cls, v: str, info) -> str:
        if v == "cuda":
            if info.data.get("value_selection") in ("score", "full"):
                raise ValueError(f"'cuda' is not allowed with value_selection={info.data['value_selection']!r}: the "
                                 "CUDA span kernel selects values by importance only; use 'triton' or 'auto' (or "
                                 "value_selection='ema')")
            from ap_vllm.kernels import cuda_span

            problem = cuda_span.runtime_problem()
            if problem is not None:
                raise ValueError(f"'cuda' is not allowed here: {problem}; use 'auto', 'torch' or 'triton'")
            if info.data.get("key_space") == "pre_rope":
                raise ValueError("'cuda' is not allowed with key_space='pre_rope': the CUDA span kernel reads "
                                 "post-RoPE spans only; use 'triton' or 'auto'")
        if v == "triton":
            import importlib.util

            import torch

            if importlib.util.find_spec("triton") is None:
                raise ValueError("'triton' is not allowed: the triton package is not installed "
                                 "(use 'auto' or 'torch')")
            if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError("'triton' is not allowed without a CUDA device unless TRITON_INTERPRET=1 "
                                 "is set (Triton's CPU interpreter); use 'auto' or 'torch'")
        return v

    def use_triton(self, device: Any) -> bool:
        """Whether attention on ``device`` (a torch.device) runs the kernels (Triton; with ``kernel: cuda`` the
        decode span launch runs the CUDA C++ kernel)."""
        return self.kernel in ("triton", "cuda") or (self.kernel == "auto" and getattr(device, "type", device) == "cuda")

    # ---- model-dependent checks --------------------------------------------------------
    def rank_for_layer(self, which: Literal["key", "value"], layer: int, text: bool = False) -> int:
        """The configured rank of K or V for one layer (0-based). A layer past a per-layer list (a drafter's,
        numbered after the model's: :func:`layer_index`) takes the model's last layer's rank."""
        rank = getattr(self, f"{which}_rank")
        if text and getattr(self, f"text_{which}_rank") is not None:
            rank = getattr(self, f"text_{which}_rank")
        return rank if isinstance(rank, int) else rank[min(layer, len(rank) - 1)]

    def for_kv_heads(self, local_kv_heads: int, total_kv_heads: int) -> "AttentionPackConfig":
        """The ranks one tensor-parallel worker uses for its ``local_kv_heads`` of the model's ``total_kv_heads``.

        Ranks are stated for the model's whole ``T x (H*d)`` matrix. A worker holding ``h`` of the ``H`` KV
        heads (``h = max(1, H / tp)``; vLLM replicates heads when ``tp > H``) can only compact its own
        ``T x (h*d)`` slice: a joint basis over all heads would need the other workers' keys at every
        compaction and the whole basis at every decode step. It keeps ``ceil(R * h / H)`` components, so
        the bytes per token, and the share of KV memory freed, do not depend on the tensor-parallel size.
        The blocks of the ``tp`` slices together form a block-diagonal rank-``R`` basis, which by
        Eckart-Young approximates at most as well as the joint rank-``R`` one; to keep ``R``
        components per worker, give ``R * tp``.
        """
        if local_kv_heads >= total_kv_heads:
            return self

        def share(rank: int) -> int:
            return -(-rank * local_kv_heads // total_kv_heads)

        update: dict[str, Any] = {}
        for name in _RANK_FIELDS:
            value = getattr(self, name)
            if value is not None:
                update[name] = [share(r) for r in value] if isinstance(value, list) else share(value)
        return self.model_copy(update=update)

    def validate_for_model(self, num_layers: int, num_kv_heads: int, head_size: int) -> None:
        """Check ranks against the model: 1 <= R <= H_kv*d, per-layer lists of num_layers entries."""
        width = num_kv_heads * head_size
        for name in _RANK_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, list) and len(value) != num_layers:
                raise AttentionPackConfigError(
                    f"attentionpack.{name}: a per-layer list must have one rank per attention layer "
                    f"({num_layers}), got {len(value)} entries")
            for r in ([value] if isinstance(value, int) else value):
                if r > width:
                    raise AttentionPackConfigError(
                        f"attentionpack.{name}={r} is not allowed: ranks must be in [1, {width}] "
                        f"(num_kv_heads*head_size = {num_kv_heads}*{head_size} for this model)")


def _load_preset(name: str) -> dict[str, Any]:
    path = Path(name) if (os.sep in name or name.endswith((".yaml", ".yml"))) else PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise AttentionPackConfigError(
            f"attentionpack.preset={name!r} is not allowed: no such preset; available presets: "
            f"{', '.join(available)} (or a path to a .yaml file)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise AttentionPackConfigError(f"attentionpack.preset={name!r}: {path} must hold a mapping")
    data = data.get(CONFIG_KEY, data)
    if "preset" in data:
        raise AttentionPackConfigError(f"attentionpack.preset={name!r}: presets cannot name other presets")
    return data


def parse_config(raw: Optional[dict[str, Any]]) -> AttentionPackConfig:
    """Build the config from the ``attentionpack`` section of ``--additional-config``.

    ``raw`` is that section (a mapping) or None for all defaults.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise AttentionPackConfigError(
            f"additional_config.attentionpack must be a mapping of fields, got {type(raw).__name__}")
    raw = dict(raw)
    merged: dict[str, Any] = {}
    preset = raw.pop("preset", None)
    if preset is not None:
        if not isinstance(preset, str):
            raise AttentionPackConfigError(f"attentionpack.preset={preset!r} is not allowed: give a preset name")
        merged.update(_load_preset(preset))
    merged.update(raw)
    try:
        return AttentionPackConfig(**merged)
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "<config>"
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(AttentionPackConfig.model_fields)
                msgs.append(f"attentionpack.{field}: unknown field (allowed fields: preset, {allowed})")
            else:
                msgs.append(f"attentionpack.{field}={err.get('input')!r}: {err['msg']}")
        raise AttentionPackConfigError("invalid AttentionPack configuration: " + "; ".join(msgs)) from None


SPECULATIVE_METHODS = ("ngram", "eagle", "eagle3", "mtp")
"""``--speculative-config`` methods served: drafts looked up in the request's own tokens (``ngram``), or proposed
by an EAGLE / EAGLE-3 head or a model's own MTP head (:data:`DRAFT_MODEL_METHODS`)."""

DRAFT_MODEL_METHODS = ("eagle", "eagle3", "mtp")
"""Methods whose drafter has attention layers of its own: they share the model's KV-cache group (the same block
table), so their visual spans are compacted with the model's, and read at full rank."""

MTP_MODEL_TYPES = ("qwen3_5_mtp",)
"""MTP heads served (``--speculative-config`` method ``mtp``; the draft model's ``model_type`` as vLLM sets it):
Qwen3.5's, dense and MoE (one full-attention layer, ``mtp.layers.0``, paged like the model's full-attention
layers). Others are refused: Gemma 4's assistant reads the model's KV caches through cross-layer sharing set after
its layers are built; the rest are text-only or MLA models this backend does not serve."""

MTP_LAYER_PREFIX = "mtp.layers."


def layer_index(name: str, num_layers: int) -> int:
    """An attention layer's index in the model, from its name: vLLM's (``model.layers.7.self_attn.attn`` -> 7).
    vLLM numbers an EAGLE head's layers after the model's itself; an MTP head's (``mtp.layers.{i}...``, Qwen3.5)
    it names from 0, beside the model's layers, so they get ``num_layers + i`` here (vLLM's own
    ``mtp_start_layer_idx``): every layer numbered past the model's is a drafter's."""
    from vllm.model_executor.models.utils import extract_layer_index

    i = extract_layer_index(name)
    return num_layers + i if name.startswith(MTP_LAYER_PREFIX) else i


DRAFT_MODEL_VLLM = "0.32"
"""The vLLM release series the drafters of :data:`DRAFT_MODEL_METHODS` are served on (run end to end there)."""


def check_speculative(vllm_config: Any) -> None:
    """Speculative decoding, if configured, is one the backend serves, without async scheduling.

    A verification row holds ``1 + k`` queries (the last token and ``k <= num_speculative_tokens`` drafts);
    the builder gives it the path of every multi-query row (exact keys plus compacted spans at full rank),
    and rejected drafts' slots are rewritten by the next step, as for any backend. An EAGLE / EAGLE-3 drafter's
    or an MTP head's (:data:`MTP_MODEL_TYPES`) attention layers hold the same tokens as the model's, in the same
    blocks: they run on this backend (vLLM picks a drafter's backend on its own unless ``attention_backend`` is
    given; compaction sets it), their spans are compacted with the model's and freed with them, so their pages
    must be the model's (KV heads, head size). Refused: other draft models (``draft_model``, other MTP heads,
    ...), whose layers this backend does not plan; parallel drafting (untested here); async scheduling, under
    which the host sequence lengths the builder plans with are upper bounds (every draft assumed accepted)."""
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None:
        return
    method = getattr(spec, "method", None)
    if method not in SPECULATIVE_METHODS:
        raise AttentionPackConfigError(
            f"--speculative-config method {method!r} is not allowed with --attention-backend attentionpack: "
            f"allowed: {', '.join(map(repr, SPECULATIVE_METHODS))} (this draft model's attention layers are not "
            "planned by this backend)")
    if getattr(getattr(vllm_config, "scheduler_config", None), "async_scheduling", False):
        raise AttentionPackConfigError(
            "--async-scheduling with --speculative-config is not allowed with --attention-backend attentionpack: "
            "its host sequence lengths are upper bounds; serve without --async-scheduling")
    if method not in DRAFT_MODEL_METHODS:
        return
    draft = getattr(spec, "draft_model_config", None)
    if method == "mtp":
        mtp_type = getattr(getattr(draft, "hf_config", None), "model_type", None)
        if mtp_type not in MTP_MODEL_TYPES:
            raise AttentionPackConfigError(
                f"--speculative-config method 'mtp' with the MTP head {mtp_type!r} is not allowed with "
                f"--attention-backend attentionpack: allowed: {', '.join(map(repr, MTP_MODEL_TYPES))} (this head's "
                "attention layers are not planned by this backend); use 'ngram', or an EAGLE head")
    import vllm

    version = str(getattr(vllm, "__version__", ""))
    if not version.startswith(DRAFT_MODEL_VLLM):
        raise AttentionPackConfigError(
            f"--speculative-config method {method!r} is not allowed with --attention-backend attentionpack on vLLM "
            f"{version}: allowed on vLLM {DRAFT_MODEL_VLLM}.x (from 0.33 vLLM hashes blocks with the drafter's "
            "lookahead tokens, which the compact spans' hashes do not take yet); use 'ngram' there")
    if getattr(spec, "parallel_drafting", False):
        raise AttentionPackConfigError(
            "--speculative-config parallel_drafting=true is not allowed with --attention-backend attentionpack: "
            "allowed: false (one draft token per drafter pass)")
    backend = getattr(spec, "attention_backend", None)
    if backend is not None and not names_attentionpack(backend):
        raise AttentionPackConfigError(
            f"--speculative-config attention_backend {getattr(backend, 'name', backend)!r} is not allowed with "
            "--attention-backend attentionpack: allowed: unset or 'attentionpack' (the drafter's layers share the "
            "model's blocks, whose visual spans are compacted)")
    target = getattr(vllm_config, "model_config", None)
    if draft is not None and target is not None:
        parallel = getattr(vllm_config, "parallel_config", None)
        mine = (target.get_num_kv_heads(parallel), target.get_head_size())
        theirs = (draft.get_num_kv_heads(getattr(spec, "draft_parallel_config", None) or parallel),
                  draft.get_head_size())
        if theirs != mine:
            raise AttentionPackConfigError(
                f"--speculative-config model {getattr(draft, 'model', '?')!r}: its attention layers have "
                f"{theirs[0]} KV heads of size {theirs[1]}; allowed with --attention-backend attentionpack: the "
                f"model's {mine[0]} KV heads of size {mine[1]} (the drafter's pages share the model's blocks)")


EVS_MODEL_TYPES = ("qwen2_5_vl",)
"""Models (``hf_config.model_type``) served with EVS video pruning (``--video-pruning-rate``) and compaction: their
EVS positions stay right at the prefill-chunk boundaries compaction makes (:func:`ap_vllm.compat.
correct_evs_positions_between_items`, for four position channels a media token and media tokens only between a
vision start and a vision end)."""


def check_video_pruning(model_config: Any) -> None:
    """EVS video pruning (``--video-pruning-rate``) with compaction only for :data:`EVS_MODEL_TYPES`.

    Compaction ends a prefill chunk at every image and video end. There vLLM 0.32-0.33 misplace the next item's
    M-RoPE positions under EVS (vllm-project/vllm#48833), which AttentionPack corrects for the layouts it knows;
    Qwen3-VL's videos interleave timestamp tokens with their frames, where a step's start does not tell a new
    video from the next frame of the same one."""
    mm = getattr(model_config, "multimodal_config", None)
    rate = getattr(mm, "video_pruning_rate", None)
    if not rate:
        return
    model_type = getattr(getattr(model_config, "hf_config", None), "model_type", None)
    if model_type not in EVS_MODEL_TYPES:
        raise AttentionPackConfigError(
            f"--video-pruning-rate {rate} is not allowed with AttentionPack compaction for model_type "
            f"{model_type!r}: allowed for {', '.join(map(repr, EVS_MODEL_TYPES))}; vLLM places EVS positions "
            "wrongly after a prefill chunk that ends between two images or videos (vllm-project/vllm#48833), "
            "and compaction ends one at every image and video. Serve without --video-pruning-rate, or with "
            "compaction off (preset 'exact')")


def config_from_vllm(vllm_config: Any) -> AttentionPackConfig:
    """The AttentionPack config of a vLLM instance (``VllmConfig.additional_config``), checked
    against its model when the config has one, and against its speculative decoding
    (:func:`check_speculative`)."""
    check_speculative(vllm_config)
    extra = getattr(vllm_config, "additional_config", None) or {}
    config = parse_config(extra.get(CONFIG_KEY) if isinstance(extra, dict) else None)
    if config.coefficient_dtype == "auto":  # resolved once, so every process plans the same layout
        cache_dtype = str(getattr(getattr(vllm_config, "cache_config", None), "cache_dtype", "auto"))
        config = config.model_copy(update={"coefficient_dtype": "fp8_e4m3" if cache_dtype.startswith("fp8")
                                           else "model"})
    model = getattr(vllm_config, "model_config", None)
    if model is not None:
        local_heads, total_heads, head_size = compacted_kv_shape(model, getattr(vllm_config, "parallel_config", None))
        config.validate_for_model(num_layers=model_layers(model), num_kv_heads=total_heads, head_size=head_size)
        sliding = getattr(getattr(model, "hf_text_config", None), "sliding_window", None)
        hybrid = getattr(model, "is_hybrid", False)
        if config.pool_check == "compacted" and (not config.enabled or sliding or hybrid):
            why = ("compaction is off (enabled: false)" if not config.enabled else
                   f"{model.model} has sliding-window layers, whose blocks the check does not model" if sliding else
                   f"{model.model} has linear-attention layers (Mamba / Gated DeltaNet states), whose blocks of the "
                   "pool the check does not model")
            raise AttentionPackConfigError(f"attentionpack.pool_check='compacted' is not allowed: {why}; "
                                           "use 'exact'")
        if config.enabled:
            check_video_pruning(model)
        if config.enabled and config.key_space == "pre_rope" and getattr(model, "uses_mrope", False):
            raise AttentionPackConfigError(
                f"attentionpack.key_space='pre_rope' is not allowed for {model.model}: it uses multi-axis "
                "rotary positions (M-RoPE), which pre-RoPE compaction does not rebuild; use 'post_rope'")
        config = config.for_kv_heads(local_heads, total_heads)
    return config


def compacted_kv_shape(model_config: Any, parallel_config: Any = None) -> tuple[int, int, int]:
    """(KV heads of one worker, KV heads of the model, head size) of the layers whose spans are compacted: the
    global-attention ones. Most models have one shape for every layer. Where layers differ (Gemma 4: sliding
    layers of 256 and global layers of 512, with other KV-head counts), vLLM's whole-model values are the
    largest over all layers; the global layers' own are taken here, the shape of the pages their spans are laid
    out in, for the ranks' bound and the span plans alike."""
    arch = getattr(model_config, "model_arch_config", None)
    whole = (model_config.get_num_kv_heads(parallel_config) if parallel_config is not None
             else model_config.get_total_num_kv_heads(), model_config.get_total_num_kv_heads(),
             model_config.get_head_size())
    if arch is None or getattr(arch, "per_layer_overrides", None) is None:
        return whole
    types = getattr(getattr(model_config, "hf_text_config", None), "layer_types", None) or []
    shapes = set()
    for i in range(model_layers(model_config)):
        if i < len(types) and types[i] != "full_attention":
            continue  # (sliding-window layers stay exact; linear-attention layers have no pages)
        layer = arch[i]
        local = (model_config.get_num_kv_heads(parallel_config, arch_config=layer) if parallel_config is not None
                 else layer.total_num_kv_heads)
        shapes.add((local, layer.total_num_kv_heads, layer.head_size))
    if len(shapes) > 1:
        raise AttentionPackConfigError(
            f"{model_config.model}: its global-attention layers have different KV shapes (KV heads of a worker, "
            f"KV heads, head size) {sorted(shapes)}; AttentionPack compacts global layers of one shape (serve it "
            "without --attention-backend attentionpack)")
    return shapes.pop() if shapes else whole


def model_layers(model_config: Any) -> int:
    """The model's layers, all pipeline stages together: what per-layer rank lists count, and what span plans
    take the most storage over. (vLLM's ``get_num_layers`` counts one pipeline stage's layers; the scheduler
    plans one block table for every stage, and layer indices are global.)"""
    return model_config.get_total_num_hidden_layers()


# ---- configuration reference (docs/configuration.md is generated from this) -------------------
# Allowed values beyond the type: numeric bounds (lo, lo_inclusive, hi, hi_inclusive), checked against the
# validators above by tests/test_config_docs.py, and words for what a bound cannot say.
_BOUNDS: dict[str, tuple[Optional[float], bool, Optional[float], bool]] = {
    "key_rank": (1, True, None, False), "value_rank": (1, True, None, False),
    "text_key_rank": (1, True, None, False), "text_value_rank": (1, True, None, False),
    "energy_threshold": (0, False, 1, True), "importance_fraction": (0, False, 1, True),
    "importance_ema": (0, False, 1, True), "threshold_sample_tokens": (0, True, None, False),
    "score_threshold": (0, False, 1, True),
    "low_rank_divisor": (1, True, None, False), "min_span_tokens": (1, True, None, False),
    "text_min_tokens": (1, True, None, False), "sink_tokens": (0, True, None, False),
    "text_recent_window": (0, True, None, False), "svd_oversample": (0, True, None, False),
    "svd_power_iters": (0, True, None, False),
}
_RANK_NOTE = ("<= num_kv_heads*head_size of the model (all its KV heads: with tensor parallelism each worker "
              "keeps its heads' share, rounded up); a list: one rank per layer of the model")
_ALLOWED_NOTES: dict[str, str] = {
    "key_rank": _RANK_NOTE, "value_rank": _RANK_NOTE, "text_key_rank": _RANK_NOTE, "text_value_rank": _RANK_NOTE,
    "chunk_tokens": ">= min_span_tokens",
    "kernel": "`triton` needs the triton package and a CUDA device (on CPU only with TRITON_INTERPRET=1); "
              "`cuda` needs a CUDA device of compute capability >= 8.0, post_rope keys and value_selection ema",
    "pool_check": "`compacted` is refused when compaction is off or the model has sliding-window or "
                  "linear-attention layers",
    "key_space": "`pre_rope` is refused for models with M-RoPE (multi-axis rotary positions)",
    "value_selection": "`score` and `full` are refused with `two_level_keys: true` and with `kernel: cuda`",
}


def _type_text(annotation: Any) -> str:
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return type(args[0]).__name__
    if origin is Union:
        return " or ".join(_type_text(a) for a in args)
    if origin is list:
        return f"list[{_type_text(args[0])}]"
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _value_text(value: Any, quote: str = "`") -> str:
    import json

    return f"{quote}{value if isinstance(value, str) else json.dumps(value)}{quote}"


def _allowed_text(name: str, annotation: Any) -> str:
    import typing

    parts = []
    args = typing.get_args(annotation)
    literals = [a for a in ([annotation] if typing.get_origin(annotation) is Literal else args)
                if typing.get_origin(a) is Literal]
    for lit in literals:
        parts.append(", ".join(_value_text(v) for v in typing.get_args(lit)))
    if annotation is bool:
        parts.append("`true`, `false`")
    if name in _BOUNDS:
        lo, lo_in, hi, hi_in = _BOUNDS[name]
        fmt = lambda v: f"{v:g}"  # noqa: E731
        if hi is None:
            parts.append(f"{'>=' if lo_in else '>'} {fmt(lo)}")
        else:
            parts.append(f"{'[' if lo_in else '('}{fmt(lo)}, {fmt(hi)}{']' if hi_in else ')'}")
    if name in _ALLOWED_NOTES:
        parts.append(_ALLOWED_NOTES[name])
    if type(None) in args:
        parts.append("`null`")
    return "; ".join(parts) or "any"


def config_reference_markdown() -> str:
    """docs/configuration.md: every field of :class:`AttentionPackConfig` (name, type, default, allowed values,
    description) and the presets, generated from this module and ``configs/`` (``make docs``)."""
    presets = sorted(PRESETS_DIR.glob("*.yaml"))
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from ap_vllm/config.py and configs/ by `make docs` "
        "(python -m ap_vllm.config --markdown); do not edit by hand. -->",
        "",
        "One typed object, `ap_vllm.config.AttentionPackConfig` (pydantic), read from vLLM's "
        "`--additional-config '{\"attentionpack\": {...}}'` (offline: `LLM(..., additional_config=...)`). "
        "`preset` names a file of `configs/` or a path to a YAML file; explicit keys override the preset. "
        "Unknown keys, wrong types and out-of-range values stop vLLM at start-up, in the API server "
        "process, with a message naming the field and what is allowed. Checks that need the model (ranks "
        "<= num_kv_heads*head_size, one rank per layer in a list) run when the backend is built.",
        "",
        "```bash",
        "vllm serve MODEL --attention-backend attentionpack \\",
        "    --additional-config '{\"attentionpack\": {\"preset\": \"qwen2_5_vl\", \"value_rank\": 96}}'",
        "```",
        "",
        "## Fields",
        "",
        "| field | type | default | allowed values | description |",
        "|---|---|---|---|---|",
        "| `preset` | str or null | `null` | " + ", ".join(f"`{p.stem}`" for p in presets)
        + ", or a path to a `.yaml` file | Start from this preset; explicit fields override it. |",
    ]
    for name, field in AttentionPackConfig.model_fields.items():
        description = " ".join((field.description or "").split()).replace("|", "\\|")
        lines.append(f"| `{name}` | {_type_text(field.annotation)} | {_value_text(field.default)} | "
                     f"{_allowed_text(name, field.annotation)} | {description} |")
    lines += ["", "## Presets", "", "| preset | fields | note |", "|---|---|---|"]
    for path in presets:
        text = path.read_text()
        data = yaml.safe_load(text) or {}
        data = data.get(CONFIG_KEY, data)
        fields = ", ".join(f"`{k}: {_value_text(v, quote='')}`" for k, v in data.items())
        note = " ".join(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
        lines.append(f"| `{path.stem}` | {fields} | {note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m ap_vllm.config", description="AttentionPack configuration")
    parser.add_argument("--markdown", action="store_true", help="print the configuration reference (Markdown)")
    parser.add_argument("--out", type=Path, help="write it to this file instead (docs/configuration.md)")
    cli = parser.parse_args()
    if not (cli.markdown or cli.out):
        parser.error("nothing to do: give --markdown or --out PATH")
    if cli.out:
        cli.out.write_text(config_reference_markdown())
        print(f"wrote {cli.out}")
    else:
        sys.stdout.write(config_reference_markdown())
