"""Build a tiny Qwen2.5-VL with random weights, offline, in seconds; serve it without torchvision.

The result is a normal Hugging Face model directory (config.json, model.safetensors, tokenizer, image processor,
chat template) that transformers and vLLM's real loader (CPU) load::

    python -m ap_vllm.tools.testing.tiny_qwen2_5_vl /tmp/tiny-qwen --image-tokens 1024

Architecture: ``Qwen2_5_VLForConditionalGeneration`` (``model_type="qwen2_5_vl"``): a Qwen2 text model with
multi-axis rotary positions (M-RoPE: an image token's position is its (time, row, column), ``mrope_section``
splitting the rotary pairs between the three) and Qwen2.5-VL's windowed ViT with its 2x2 patch merger. Defaults:
hidden 128, 4 q / 2 kv heads of 32 (CPU_ATTN needs head sizes >= 32), 2 layers; a 2-layer vision tower of width 32.

Tokens per image: the image processor resizes every image to an area of ``(28 * sqrt(image_tokens))**2`` pixels
(``min_pixels = max_pixels``, aspect ratio kept, sides multiples of 28), so each 28x28 pixel square becomes one
token after the merger: ``image_tokens`` tokens for a square image, about as many for others (the grid follows
the aspect ratio). The chat template writes ``<|vision_start|><|image_pad|><|vision_end|>`` per image; the
processor repeats ``<|image_pad|>`` once per token.

``value_rank``: each layer's value projection is made of rank ``value_rank`` (and no bias), so the values of any
span have rank ``<= value_rank`` while the post-RoPE keys are full rank: compaction with keys at ``H*d`` and values
at ``value_rank`` loses nothing, yet stores fewer numbers per token than the exact cache.

Videos: ``frame_tokens`` tokens per two frames (Qwen2.5-VL's temporal patch), every frame resized to that area;
``<|vision_start|><|video_pad|><|vision_end|>`` per video, ``<|video_pad|>`` repeated once per token.

Without torchvision (this project's CPU venv: no torchvision wheel matches its torch) vLLM cannot load the model:
:func:`install_qwen2_vl_shim` (in every vLLM process, e.g. from a ``sitecustomize`` on ``PYTHONPATH``) is needed.
"""

from __future__ import annotations

import argparse
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Optional

from ap_vllm.tools.testing.server import PatchingLoader, patch_on_import

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
SPECIAL = [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
PATCH, MERGE = 14, 2

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' or part['type'] == 'image_url' or 'image' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen2_5_vl(out: Path, *, image_tokens: int = 1024, num_layers: int = 2, num_heads: int = 4,
                          num_kv_heads: int = 2, hidden_size: int = 128, value_rank: Optional[int] = None,
                          vocab_size: int = 1024, seed: int = 0, frame_tokens: int = 256) -> Path:
    """Writes the model directory ``out`` (see the module docstring) and returns it. The head size is
    ``hidden_size // num_heads``; ``image_tokens`` and ``frame_tokens`` (a video's tokens per two frames) must be
    perfect squares."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    head_dim = hidden_size // num_heads
    check_shapes("hidden_size // num_heads", head_dim, image_tokens=image_tokens, frame_tokens=frame_tokens)
    side = math.isqrt(image_tokens)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast, ids = chat_tokenizer(vocab_size, SPECIAL, CHAT_TEMPLATE)
    pairs = head_dim // 2  # rotary pairs, split between (time, row, column) as Qwen2.5-VL's [16, 24, 24] of 64
    mrope = [pairs // 4, (pairs - pairs // 4) // 2, pairs - pairs // 4 - (pairs - pairs // 4) // 2]
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
                         rope_scaling={"type": "mrope", "mrope_section": mrope}, rope_theta=1e6,
                         tie_word_embeddings=False, bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END],
                         pad_token_id=ids[ENDOFTEXT], use_sliding_window=False, max_window_layers=num_layers),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                           patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1], in_channels=3, tokens_per_second=2, hidden_act="silu"),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD], vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END], tie_word_embeddings=False)
    write_model(Qwen2_5_VLForConditionalGeneration, config, out, fast, ids, seed=seed, value_rank=value_rank)
    pixels = (PATCH * MERGE * side) ** 2
    Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=PATCH, temporal_patch_size=2,
                             merge_size=MERGE).save_pretrained(out)
    frame = (PATCH * MERGE * math.isqrt(frame_tokens)) ** 2
    (out / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "Qwen2VLVideoProcessor", "size": {"shortest_edge": frame, "longest_edge": frame},
        "patch_size": PATCH, "temporal_patch_size": 2, "merge_size": MERGE, "do_sample_frames": False}) + "\n")
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}) + "\n")
    return out


def check_shapes(rotary_name: str, rotary_dim: int, **squares: int) -> None:
    """Raises ``ValueError`` naming the value unless each of ``squares`` (token counts of an image or a frame pair)
    is a perfect square and ``rotary_dim`` (the rotary dimensions of a head, named ``rotary_name``) a multiple of 4,
    as M-RoPE's three sections of rotary pairs need."""
    for name, n in squares.items():
        if n < 1 or math.isqrt(n) ** 2 != n:
            raise ValueError(f"{name}={n} is not allowed: it must be a perfect square (256, 1024, ...)")
    if rotary_dim % 4:
        raise ValueError(f"{rotary_name} = {rotary_dim} is not allowed: M-RoPE needs a multiple of 4")


def write_model(model_class, config, out: Path, tokenizer, ids: dict, *, seed: int, value_rank: Optional[int],
                dtype: str = "float32") -> None:
    """Writes a tiny Qwen-VL model of ``model_class`` from ``config`` to ``out`` in ``dtype``, random weights from
    ``seed`` (:func:`init_weights`, value projections of rank ``value_rank``) and the chat tokens of ``ids`` as its
    special tokens, with ``tokenizer`` and :data:`CHAT_TEMPLATE`."""
    import torch
    from transformers import GenerationConfig

    from ap_vllm.tools.testing.tiny_vlm import save_quietly

    special = dict(bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT])
    for k, v in special.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = model_class(config)
    init_weights(model, tokenizer, set(ids.values()), seed=seed, vision="visual",
                 low_rank={"self_attn.v_proj.weight": value_rank})
    model.generation_config = GenerationConfig(**special)
    save_quietly(model.to(getattr(torch, dtype)), out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def chat_tokenizer(vocab_size: int, special: list[str], chat_template: str):
    """A fast byte-level BPE tokenizer trained in-process (``train_bpe``) with ``special`` first in its vocabulary
    (``special[0]`` padding, ``<|im_end|>`` the end of a turn and of generation) and ``chat_template``; returns it
    and the ids of ``special``."""
    from transformers import PreTrainedTokenizerFast

    from ap_vllm.tools.testing.tiny_vlm import train_bpe

    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(vocab_size, special), eos_token=IM_END, pad_token=special[0],
        additional_special_tokens=special[1:], model_max_length=32768, clean_up_tokenization_spaces=False)
    fast.chat_template = chat_template
    return fast, {t: fast.convert_tokens_to_ids(t) for t in special}


def init_weights(model, tokenizer, special_ids: set, *, seed: int, vision: str,
                 low_rank: dict[str, Optional[int]]) -> None:
    """Random weights for a tiny model, in place, from ``seed``: biases 0, norms 1, embeddings N(0, 1), other
    matrices N(0, 1 / fan_in) (the output head 4x that); a text-model weight (name without ``vision``) whose name
    ends with a key of ``low_rank`` keeps its top ``rank`` singular directions (None: full rank). The output head's
    rows of special tokens and of tokens that do not decode to printable text are 0, so greedy decoding emits
    printable, non-special tokens only."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            elif p.dim() >= 2:
                fan_in = int(torch.tensor(p.shape[1:]).prod())
                std = 1.0 if "embed_tokens" in name else (4.0 if "lm_head" in name else 1.0) / fan_in ** 0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
                rank = next((r for suffix, r in low_rank.items() if name.endswith(suffix)), None)
                if rank is not None and vision not in name:
                    u, s, vh = torch.linalg.svd(p, full_matrices=False)
                    p.copy_(u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank])
        head = model.get_output_embeddings().weight
        keep = torch.zeros(head.shape[0], dtype=torch.bool)
        for i in range(len(tokenizer)):
            text = tokenizer.decode([i])
            keep[i] = i not in special_ids and bool(text) and "\ufffd" not in text and text.isprintable()
        head[~keep] = 0


# ---- loading without torchvision -------------------------------------------------------------
_TORCHVISION_PROCESSOR = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
_PIL_PROCESSOR = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
_AUTO_VIDEO = "transformers.models.auto.video_processing_auto"
_QWEN3_VL = "transformers.models.qwen3_vl"


class _VideoProcessor:
    """Qwen2-VL's video preprocessing (``Qwen2VLVideoProcessor``) in numpy and PIL, for where that class cannot load
    (it needs torchvision). The same arithmetic: every frame resized to ``smart_resize``'s grid (sides multiples of
    ``patch_size * merge_size``, area within ``[min_pixels, max_pixels]``, bicubic), rescaled and normalised with
    CLIP's mean and std (unless ``do_rescale`` / ``do_normalize`` are False: vLLM may do both on the device); the
    frames padded to a multiple of ``temporal_patch_size`` with the last one; each ``temporal_patch_size x
    patch_size x patch_size`` cube one row of ``pixel_values_videos``, in the merger's order; ``video_grid_thw`` =
    (frames / temporal_patch_size, rows, columns) of patches. Frames are the caller's (vLLM samples them:
    ``num_frames`` / ``fps`` of ``--media-io-kwargs``): asking this processor to sample raises."""

    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OPENAI_CLIP_*
    _SIZE_KEYS = ("size", "min_pixels", "max_pixels")
    _IGNORED = ("return_tensors", "device", "input_data_format", "data_format", "do_convert_rgb")  # (no effect here)
    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, min_pixels: int, max_pixels: int, patch_size: int = PATCH, merge_size: int = MERGE,
                 temporal_patch_size: int = 2):
        super().__init__()
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.patch_size, self.merge_size, self.temporal_patch_size = patch_size, merge_size, temporal_patch_size
        self.size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}

    @classmethod
    def from_model_dir(cls, path, **kwargs) -> "_VideoProcessor":
        """From ``video_preprocessor_config.json`` (else ``preprocessor_config.json``) in the local model directory
        ``path``; ``min_pixels`` / ``max_pixels`` / ``size`` in ``kwargs`` override it."""
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            f = Path(path) / name
            if f.is_file():
                cfg = json.loads(f.read_text())
                break
        else:
            raise OSError(f"{path}: no video_preprocessor_config.json or preprocessor_config.json")
        size = dict(cfg.get("size") or {})
        lo, hi = cls._pixel_bounds(kwargs, size.get("shortest_edge") or cfg.get("min_pixels"),
                                   size.get("longest_edge") or cfg.get("max_pixels"))
        return cls(lo, hi, cfg.get("patch_size", PATCH), cfg.get("merge_size", MERGE),
                   cfg.get("temporal_patch_size", 2))

    @staticmethod
    def _pixel_bounds(kwargs: dict, lo, hi) -> tuple:
        """(min_pixels, max_pixels): ``kwargs``' ``min_pixels`` / ``max_pixels``, else its ``size`` edges, else
        ``lo`` / ``hi``."""
        size = kwargs.get("size") or {}
        return (kwargs.get("min_pixels") or size.get("shortest_edge") or lo,
                kwargs.get("max_pixels") or size.get("longest_edge") or hi)

    def _frame_size(self, num_frames: int, height: int, width: int, lo: int, hi: int) -> tuple[int, int]:
        """A frame's size after resizing: ``smart_resize``'s grid of ``patch_size * merge_size`` squares, its area
        within ``[lo, hi]`` (Qwen2-VL: the bounds of one frame)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        return smart_resize(height, width, factor=self.patch_size * self.merge_size, min_pixels=lo, max_pixels=hi)

    def __call__(self, videos, **kwargs):
        return self.preprocess(videos, **kwargs)

    def preprocess(self, videos, video_metadata=None, return_metadata: bool = False, do_sample_frames=None,
                   do_rescale=None, do_normalize=None, **kwargs):
        import numpy as np
        import torch
        from PIL import Image
        from transformers.feature_extraction_utils import BatchFeature
        from transformers.video_utils import make_batched_metadata, make_batched_videos

        if do_sample_frames:
            raise ValueError("do_sample_frames=True is not allowed here: frames are sampled by vLLM's video loader "
                             "(num_frames / fps in --media-io-kwargs)")
        unknown = {k: v for k, v in kwargs.items() if v is not None and k not in self._SIZE_KEYS + self._IGNORED}
        if unknown:
            raise ValueError(f"video processor options {sorted(unknown)} are not supported by this stand-in; "
                             f"allowed: {list(self._SIZE_KEYS)}")
        lo, hi = self._pixel_bounds(kwargs, self.min_pixels, self.max_pixels)

        videos = make_batched_videos(videos)
        ps, ms, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        mean = np.asarray(self.MEAN, np.float32)[:, None, None]
        std = np.asarray(self.STD, np.float32)[:, None, None]
        rows, grids = [], []
        for video in videos:
            frames = np.asarray(video)
            if frames.ndim != 4 or frames.shape[-1] not in (1, 3):
                raise ValueError(f"a video of shape {tuple(frames.shape)} is not allowed: frames x height x width x "
                                 "channels (1 or 3) expected")
            h, w = self._frame_size(frames.shape[0], frames.shape[1], frames.shape[2], lo, hi)
            out = []
            for frame in frames:
                img = Image.fromarray(np.ascontiguousarray(frame.squeeze(-1) if frame.shape[-1] == 1 else frame))
                img = img.convert("RGB").resize((w, h), Image.BICUBIC)
                x = np.asarray(img, np.float32).transpose(2, 0, 1)
                if do_rescale is not False:  # (vLLM may rescale and normalise on the device itself: False)
                    x = x / 255.0
                out.append((x - mean) / std if do_normalize is not False else x)
            x = torch.from_numpy(np.stack(out))  # (T, C, h, w)
            if pad := -x.shape[0] % tp:
                x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
            t, c = x.shape[0] // tp, x.shape[1]
            gh, gw = h // ps, w // ps
            x = x.view(t, tp, c, gh // ms, ms, ps, gw // ms, ms, ps).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
            rows.append(x.reshape(t * gh * gw, c * tp * ps * ps))
            grids.append([t, gh, gw])
        data = {"pixel_values_videos": torch.cat(rows), "video_grid_thw": torch.tensor(grids, dtype=torch.int64)}
        if return_metadata:
            data["video_metadata"] = make_batched_metadata(videos, video_metadata)
        return BatchFeature(data=data)

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int, videos_kwargs=None) -> int:
        h, w = self._frame_size(num_frames, height, width, self.min_pixels, self.max_pixels)
        return -(-num_frames // self.temporal_patch_size) * (h // self.patch_size) * (w // self.patch_size)


class _Qwen3VideoProcessor(_VideoProcessor):
    """Qwen3-VL's video preprocessing (``Qwen3VLVideoProcessor``) the same way: 16-pixel patches, mean and std 0.5,
    and its ``smart_resize``, whose pixel bounds are those of the whole clip (frames x height x width), not of one
    frame. With ``do_sample_frames`` (vLLM asks for it when its loader passed every frame) it keeps the frames
    ``Qwen3VLVideoProcessor.sample_frames`` keeps: ``fps`` (2) a second of the video's own rate, or ``num_frames``,
    at least ``min_frames``, evenly spaced (vLLM's timestamps assume the same frames). ``cap_pixels_per_frame`` must
    be unset or False (the bounds as written)."""

    MEAN = STD = (0.5, 0.5, 0.5)  # IMAGENET_STANDARD_*
    fps, min_frames, max_frames, cap_pixels_per_frame = 2, 4, 768, None

    def preprocess(self, videos, video_metadata=None, do_sample_frames=None, cap_pixels_per_frame=None,
                   fps=None, num_frames=None, **kwargs):
        import numpy as np
        from transformers.video_utils import make_batched_metadata, make_batched_videos

        if cap_pixels_per_frame:
            raise ValueError("cap_pixels_per_frame=True is not supported by this stand-in; allowed: None or False")
        if do_sample_frames:
            videos = make_batched_videos(videos)
            video_metadata = make_batched_metadata(videos, video_metadata)
            kept = []
            for video, meta in zip(videos, video_metadata):
                index = self.sample_frames(meta, num_frames=num_frames, fps=fps)
                meta.frames_indices = index.tolist()
                kept.append(np.asarray(video)[index])
            videos = kept
        return super().preprocess(videos, video_metadata=video_metadata, **kwargs)

    def sample_frames(self, metadata, num_frames=None, fps=None):
        """``Qwen3VLVideoProcessor.sample_frames``: the indices of the frames kept."""
        import numpy as np

        if fps is not None and num_frames is not None:
            raise ValueError("num_frames and fps are mutually exclusive: give one")
        total = metadata.total_num_frames
        fps = fps if fps is not None else self.fps
        if num_frames is None:
            if metadata.fps is None:
                raise ValueError("sampling frames at a rate needs the video's fps in its metadata; none was given")
            num_frames = min(max(int(total / metadata.fps * fps), self.min_frames), self.max_frames, total)
        return np.linspace(0, total - 1, num_frames).round().astype(int)

    def _frame_size(self, num_frames: int, height: int, width: int, lo: int, hi: int) -> tuple[int, int]:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        return smart_resize(num_frames, height, width, temporal_factor=self.temporal_patch_size,
                            factor=self.patch_size * self.merge_size, min_pixels=lo, max_pixels=hi)


_STAND_INS = {"Qwen2VLVideoProcessor": _VideoProcessor, "Qwen3VLVideoProcessor": _Qwen3VideoProcessor}


@functools.lru_cache(maxsize=None)  # (one class a name: vLLM's isinstance checks must hold across loads)
def _stand_in(name: str) -> type:
    """The stand-in class for the video processor class ``name``, under that name (vLLM tells them apart with
    ``isinstance``), a ``VideoProcessorMixin`` as ``ProcessorMixin``'s argument check requires."""
    import transformers
    from transformers.video_processing_utils import VideoProcessorMixin

    if not hasattr(transformers, "VideoProcessorMixin"):  # (exported only with torchvision; checked by
        transformers.VideoProcessorMixin = VideoProcessorMixin  # ProcessorMixin's argument check)
    return type(name, (_STAND_INS[name], VideoProcessorMixin), {})


def _numpy_video_processors(module) -> None:
    """``AutoVideoProcessor.from_pretrained`` returns :class:`_VideoProcessor` where the real one needs torchvision
    (``ProcessorMixin`` always loads one; every transformers video processor needs torchvision)."""
    auto = module.AutoVideoProcessor
    original = auto.from_pretrained.__func__

    def from_pretrained(cls, path, *args, **kwargs):
        try:
            return original(cls, path, *args, **kwargs)
        except ImportError:
            name = _video_processor_type(path)
            if name not in _STAND_INS:
                raise
            return _stand_in(name).from_model_dir(path, **kwargs)

    auto.from_pretrained = classmethod(from_pretrained)


def _video_processor_type(path) -> str:
    """``video_processor_type`` of the local model directory ``path`` (Qwen2-VL's when it says none)."""
    f = Path(path) / "video_preprocessor_config.json"
    cfg = json.loads(f.read_text()) if f.is_file() else {}
    return cfg.get("video_processor_type", "Qwen2VLVideoProcessor")


def _qwen3_vl_names(module) -> None:
    """``transformers.models.qwen3_vl.Qwen3VLVideoProcessor`` (a placeholder that raises without torchvision) is
    the stand-in, so that vLLM's ``isinstance`` checks against it see the processor it is given."""
    sys.modules[module.__name__].Qwen3VLVideoProcessor = _stand_in("Qwen3VLVideoProcessor")


class FromPil(importlib.abc.Loader):
    """Serves a transformers torchvision image processor's module from its PIL twin ``pil_module``: every public
    name, and ``name`` standing for ``name + "Pil"``."""

    def __init__(self, pil_module: str, name: str):
        self.pil_module, self.name = pil_module, name

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        pil = importlib.import_module(self.pil_module)
        module.__dict__.update({k: v for k, v in vars(pil).items() if not k.startswith("__")})
        setattr(module, self.name, getattr(pil, self.name + "Pil"))


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == _TORCHVISION_PROCESSOR:
            return importlib.machinery.ModuleSpec(name, FromPil(_PIL_PROCESSOR, "Qwen2VLImageProcessor"))
        patch = {_AUTO_VIDEO: _numpy_video_processors, _QWEN3_VL: _qwen3_vl_names}.get(name)
        if patch is not None:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None and spec.loader is not None:
                spec.loader = PatchingLoader(spec.loader, patch)
            return spec
        return None


def install_qwen2_vl_shim() -> bool:
    """Lets vLLM load Qwen2-VL / Qwen2.5-VL / Qwen3-VL where torchvision is not installed (the project's CPU venv).

    Two imports need torchvision: vLLM's ``qwen2_vl.py`` imports ``smart_resize`` from transformers' torchvision
    image processor module (served here from the PIL module, whose ``smart_resize`` is the same and whose
    ``Qwen2VLImageProcessorPil`` stands for ``Qwen2VLImageProcessor``), and the processor always loads a video
    processor (:class:`_VideoProcessor`, :class:`_Qwen3VideoProcessor`: the same preprocessing in numpy and PIL;
    for Qwen3-VL also under the name vLLM's ``qwen3_vl.py`` imports, which is a placeholder without torchvision). Lazy (an import hook: nothing is
    imported now), for every process that imports vLLM's model (call it from a ``sitecustomize``). Returns False,
    doing nothing, when torchvision is importable. Idempotent."""
    if importlib.util.find_spec("torchvision") is not None:
        return False
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    return True


_CPU_RUNNER = "vllm.v1.worker.cpu_model_runner"


def _cpu_runner_prunes(module) -> None:
    """``CPUModelRunner.load_model`` sets ``is_multimodal_pruning_enabled`` as ``GPUModelRunner.load_model`` does
    (vLLM 0.32's CPU runner never sets it: with ``--video-pruning-rate`` its embeddings keep their 4 position
    channels and the first video fails, whatever the attention backend)."""
    runner = module.CPUModelRunner
    original = runner.load_model

    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        from vllm.model_executor.models.interfaces import supports_multimodal_pruning

        mm = self.model_config.multimodal_config
        self.is_multimodal_pruning_enabled = (supports_multimodal_pruning(self.get_model()) and mm is not None
                                              and mm.is_multimodal_pruning_enabled())
        return result

    runner.load_model = load_model


def install_cpu_video_pruning() -> None:
    """Lets vLLM's CPU model runner serve EVS video pruning (``--video-pruning-rate``) as its GPU runner does
    (:func:`_cpu_runner_prunes`), for tests that compare backends with it on. Lazy, like
    :func:`install_qwen2_vl_shim`; idempotent."""
    patch_on_import(_CPU_RUNNER, _cpu_runner_prunes)


def main(argv: Optional[list[str]] = None, build=None, doc: Optional[str] = None) -> int:
    """The command line of a tiny Qwen-VL builder: ``build`` (this module's by default) with the output directory,
    ``--image-tokens`` and ``--value-rank``; ``doc``: the module docstring whose first line describes it."""
    ap = argparse.ArgumentParser(description=(doc or __doc__).split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--image-tokens", type=int, default=1024)
    ap.add_argument("--value-rank", type=int, default=None)
    a = ap.parse_args(argv)
    print((build or build_tiny_qwen2_5_vl)(a.out, image_tokens=a.image_tokens, value_rank=a.value_rank))
    return 0


if __name__ == "__main__":
    sys.exit(main())
