"""The CUDA C++ span decode kernel (csrc/span_decode.cu, ap_vllm.kernels.cuda_span).

1. nvcc builds the plain CUDA translation unit for sm_80 and sm_90a without register spills
   (skipped only when nvcc is not on PATH);
2. without CUDA, the loader and the configuration refuse it with a message saying why;
3. on a GPU, its partials match a float64 torch reference of the span partials and the Triton
   kernel's, with and without the two-level read, FP8 and the importance update.
"""

import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ap_vllm.core.paged_layout import META, cache_bytes, paged_span_block_ids, unpack_span
from ap_vllm.kernels import cuda_span

ROOT = Path(__file__).resolve().parents[1]
CU = ROOT / "csrc" / "span_decode.cu"
ARCHS = ("sm_80", "sm_90a")
# coefficient type x head lanes (16, 32, 64) x padded value rank, as dispatched by ap_span_decode_launch
NUM_INSTANTIATIONS = 3 * (4 + 4 + 3)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --------------------------------------------------------------------------------------
# 1. nvcc
# --------------------------------------------------------------------------------------
def parse_ptxas(log: str) -> list[dict]:
    """Kernels of an ``nvcc -Xptxas -v`` log: name, arch, registers, spill store / load bytes."""
    out, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line)
        if m:
            cur = {"name": m.group(1), "arch": m.group(2), "registers": None, "spill_stores": 0, "spill_loads": 0}
            out.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["spill_stores"], cur["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
    return out


def _short(name: str) -> str:
    m = re.search(r"span_decode_kernelI(\d+)(\w+?)Li(\d+)ELi(\d+)E", name)
    if not m:
        return name
    ctype = m.group(2)[: int(m.group(1))]
    return f"<{ctype}, HL={m.group(3)}, BRV={m.group(4)}>"


@pytest.mark.parametrize("arch", ARCHS)
def test_nvcc_builds_without_spills(arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources are not compiled here")
    cmd = [nvcc, "-std=c++17", "-O3", f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o",
           str(tmp_path / f"span_decode_{arch}.cubin"), str(CU)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}"
    kernels = parse_ptxas(res.stderr)
    assert len(kernels) == NUM_INSTANTIATIONS, [k["name"] for k in kernels]
    for k in kernels:
        print(f"{arch} {_short(k['name']):45s} registers {k['registers']:3d}  spill stores {k['spill_stores']} "
              f"loads {k['spill_loads']}")
    assert all(k["arch"] == arch and k["registers"] is not None for k in kernels)
    spilled = [(_short(k["name"]), k["spill_stores"], k["spill_loads"]) for k in kernels
               if k["spill_stores"] or k["spill_loads"]]
    assert not spilled, f"register spills on {arch}: {spilled}"


def test_sources_ship_with_the_package():
    """cuda_span finds the sources next to it (csrc/ of a checkout = ap_vllm/csrc when installed)."""
    names = {p.name for p in cuda_span.source_paths()}
    assert {"span_decode.cu", "span_decode.h", "torch_binding.cpp"} <= names
    setup = (ROOT / "setup.py").read_text()
    assert '"ap_vllm.csrc": "csrc"' in setup and '"ap_vllm.csrc": ["*.cu", "*.h", "*.cpp"]' in setup


# --------------------------------------------------------------------------------------
# 2. refusal without CUDA
# --------------------------------------------------------------------------------------
def test_loader_refuses_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert cuda_span.runtime_problem() is not None
    assert cuda_span.available() is False
    why = cuda_span.unavailable_reason()
    assert why and "CUDA" in why, why
    t = torch.zeros(1)
    with pytest.raises(cuda_span.CudaSpanUnavailable, match="not available.*CUDA"):
        cuda_span.span_decode_cuda(torch.zeros(1, 32, 64), torch.zeros(1, 64, dtype=torch.uint8),
                                   torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 17, dtype=torch.int64),
                                   t, None, torch.zeros(1, 1, 32, 64), torch.zeros(1, 1, 32), tokens_per_split=64,
                                   scale=0.125, softcap=None, omega=0.25, hq=28, hq_pad=32, brk=64, brv=64,
                                   fp8=False, update=False, block_t=64, dtype=torch.bfloat16)


def test_unsupported_launches_are_refused_with_the_reason():
    args = (torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), None, torch.zeros(1),
            torch.zeros(1))
    common = dict(tokens_per_split=64, scale=0.125, softcap=None, omega=0.25, hq=28, hq_pad=32, brk=64, brv=64,
                  fp8=False, update=False, block_t=64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="post-RoPE spans only.*pre_rope"):
        cuda_span.span_decode_cuda(*args, **common, pre_rope=True)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        cuda_span.span_decode_cuda(*args, **{**common, "dtype": torch.float32})
    with pytest.raises(ValueError, match="hq_pad=128"):
        cuda_span.span_decode_cuda(*args, **{**common, "hq": 96, "hq_pad": 128})
    with pytest.raises(ValueError, match="brv=128"):
        cuda_span.span_decode_cuda(*args, **{**common, "hq": 40, "hq_pad": 64, "brv": 128})
    with pytest.raises(ValueError, match="block_t=48"):
        cuda_span.span_decode_cuda(*args, **{**common, "block_t": 48})


def test_config_refuses_cuda_kernel_without_cuda():
    from ap_vllm.config import AttentionPackConfigError, parse_config

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(AttentionPackConfigError) as err:
        parse_config({"kernel": "cuda"})
    msg = str(err.value)
    for text in ("attentionpack.kernel", "'cuda'", "CUDA"):
        assert text in msg, (text, msg)


def test_config_cuda_kernel_with_pre_rope_is_refused():
    from ap_vllm.config import AttentionPackConfigError, parse_config

    with pytest.raises(AttentionPackConfigError) as err:
        parse_config({"kernel": "cuda", "key_space": "pre_rope"})
    assert "attentionpack.kernel" in str(err.value)
    if cuda_span.runtime_problem() is None:
        assert "pre_rope" in str(err.value)


# --------------------------------------------------------------------------------------
# 3. partials on a GPU: float64 reference, Triton kernel, CUDA kernel
# --------------------------------------------------------------------------------------
def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(x) - 1).bit_length())


def _span_data(pb):
    return [unpack_span(pb.kv_cache, paged_span_block_ids(pb.block_table, sp), sp.layout) for sp in pb.spans]


def projected_queries(pb, hq_pad: int, brk: int) -> torch.Tensor:
    """q_proj [S, hq_pad, brk] float32 of the decode instances, as _span_qproj_kernel writes it:
    q_proj[s, h, r] = B_k[r, j*d:(j+1)*d] . q[seq(s), h] (r < R_k; 0 up to brk). The padded rows
    h >= Hq are left unset by that kernel: NaN here, which the CUDA kernel must never read into a result."""
    bsz, hq, d = pb.q.shape
    hkv = pb.kv_cache.shape[3]
    qp = torch.full((len(pb.spans), hq_pad, brk), math.nan, dtype=torch.float32)
    for s, (sp, cs) in enumerate(zip(pb.spans, _span_data(pb))):
        bk = cs.basis_k.float().cpu().view(cs.key_rank, hkv, d)
        qh = pb.q[sp.seq].float().cpu().view(hkv, hq // hkv, d)
        qp[s, :hq] = 0.0
        qp[s, :hq, : cs.key_rank] = torch.einsum("jgd,rjd->jgr", qh, bk).reshape(hq, cs.key_rank)
    return qp.to(pb.q.device)


def reference_partials(pb, meta, thresholds, qp, lse_ref, *, tokens_per_split, num_splits, scale, softcap, omega,
                       hq, brv, update):
    """float64 torch reference of the decode span partials (what the span kernels compute).

    Returns part_a [S, splits, hq_pad, brv], part_alse [S, splits, hq_pad] (rows h >= hq and empty
    splits: a = 0, lse = -inf) and the importance of every span after the step (float32 [T]).
    """
    num_spans, hq_pad, _ = qp.shape
    part_a = torch.zeros(num_spans, num_splits, hq_pad, brv, dtype=torch.float64)
    part_alse = torch.full((num_spans, num_splits, hq_pad), -math.inf, dtype=torch.float64)
    meta = meta.cpu()
    new_imp = []
    for s, (sp, cs) in enumerate(zip(pb.spans, _span_data(pb))):
        rk, rv, t_len = cs.key_rank, cs.value_rank, cs.num_tokens
        imp = cs.importance.double().cpu()
        full = imp >= float(thresholds[s])
        ck = cs.coeff_k.double().cpu()
        cv = cs.coeff_v.double().cpu()
        ck[~full, int(meta[s, META["key_rank_low"]]):] = 0
        cv[~full, int(meta[s, META["value_rank_low"]]):] = 0
        sc = qp[s, :hq, :rk].double().cpu() @ ck.T  # [hq, T]
        if cs.scale_k is not None:
            sc = sc * cs.scale_k.double().cpu()[None, :]
            cv = cv * cs.scale_v.double().cpu()[:, None]
        sc = sc * scale
        if softcap:
            sc = softcap * torch.tanh(sc / softcap)
        for k in range(num_splits):
            b, e = k * tokens_per_split, min(t_len, (k + 1) * tokens_per_split)
            if e <= b:
                continue
            lse = torch.logsumexp(sc[:, b:e], dim=1)
            part_alse[s, k, :hq] = lse
            part_a[s, k, :hq, :rv] = torch.exp(sc[:, b:e] - lse[:, None]) @ cv[b:e]
        if update:
            ref = lse_ref[sp.seq, :hq].double().cpu()
            imp = (1 - omega) * imp + omega * torch.exp(sc - ref[:, None]).mean(0)
        new_imp.append(imp.float())
    return part_a, part_alse, new_imp


def merge_splits(part_a, part_alse, hq):
    """Partials of all splits merged per instance and head h < hq: a [I, hq, brv], lse [I, hq] (float64)."""
    lse = part_alse[:, :, :hq].double().cpu()
    tot = torch.logsumexp(lse, dim=1)
    w = torch.exp(lse - tot[:, None]).nan_to_num(0.0)
    return (w[..., None] * part_a[:, :, :hq].double().cpu()).sum(1), tot


def span_importances(pb, cache):
    return [unpack_span(cache, paged_span_block_ids(pb.block_table, sp), sp.layout).importance.cpu()
            for sp in pb.spans]


def importance_byte_mask(pb, cache) -> torch.Tensor:
    """bool [num_blocks, block_bytes]: the bytes of every span's importance section."""
    nb, bb = cache_bytes(cache).shape
    mask = torch.zeros(nb, bb, dtype=torch.bool)
    bt = pb.block_table.cpu().long()
    for sp in pb.spans:
        sec = sp.layout.sections["importance"]
        rows = torch.arange(sec.num_rows)
        blocks = bt[sp.seq, sp.storage_block + sec.block + rows // sec.rows_per_block]
        offs = (rows % sec.rows_per_block) * 4
        for i in range(4):
            mask[blocks, offs + i] = True
    return mask


def launch_sizes(pb, plan, *, block_t, tokens_per_split=None):
    hq = pb.q.shape[1]
    hq_pad, brk, brv = _pow2(hq, 1), _pow2(plan.key_rank_max), _pow2(plan.value_rank_max)
    tps = tokens_per_split or block_t * max(1, -(-plan.max_span_tokens // (4 * block_t)))
    return dict(hq=hq, hq_pad=hq_pad, brk=brk, brv=brv, tokens_per_split=tps,
                num_splits=-(-plan.max_span_tokens // tps))


def triton_partials(pb, plan, cache, lse_ref, *, scale, softcap, omega, update, fp8):
    """The Triton span launches of a decode step (ap_vllm.kernels.lowrank_decode.span_partials)."""
    from ap_vllm.kernels import lowrank_decode as ld

    inst = ld.decode_instances(plan.meta)
    part_a, part_alse, _ = ld.span_partials(
        pb.q.contiguous(), ld.CacheViews(cache, fp8), pb.block_table.contiguous(), plan.meta, plan.thresholds, inst,
        inst.shape[0], 1, scale, max_span_tokens=plan.max_span_tokens, key_rank_max=plan.key_rank_max,
        value_rank_max=plan.value_rank_max, fp8=fp8, softcap=softcap, lse_ref=lse_ref if update else None,
        importance_ema=omega if update else None)
    return part_a, part_alse


def cuda_partials(pb, plan, cache, qp, lse_ref, sz, *, scale, softcap, omega, update, fp8, block_t, inst=None):
    dev = pb.q.device
    num_inst, splits = qp.shape[0], sz["num_splits"]
    part_a = torch.full((num_inst, splits, sz["hq_pad"], sz["brv"]), math.nan, dtype=torch.float32, device=dev)
    part_alse = torch.full((num_inst, splits, sz["hq_pad"]), math.nan, dtype=torch.float32, device=dev)
    cuda_span.span_decode_cuda(
        qp, cache_bytes(cache), pb.block_table.contiguous(), plan.meta, plan.thresholds,
        lse_ref.float().contiguous() if update else None, part_a, part_alse,
        tokens_per_split=sz["tokens_per_split"], scale=scale, softcap=softcap, omega=omega, hq=sz["hq"],
        hq_pad=sz["hq_pad"], brk=sz["brk"], brv=sz["brv"], fp8=fp8, update=update, block_t=block_t,
        dtype=cache.dtype, inst=inst)
    return part_a, part_alse


# dtype, coefficients, importance fraction (None: all full rank), two-level keys, update, softcap,
# Hq, Hkv, d, R_k, R_v, block_t  (head lanes 16 / 32 / 64; brk 16 .. 128; brv 16 .. 128)
GPU_CASES = [
    (torch.bfloat16, "model", None, False, False, None, 28, 4, 128, 64, 64, 64),
    (torch.bfloat16, "model", 0.25, False, True, None, 28, 4, 128, 64, 64, 64),
    (torch.bfloat16, "model", 0.25, True, True, 30.0, 8, 2, 64, 16, 24, 32),
    (torch.bfloat16, "fp8_e4m3", None, False, True, None, 28, 4, 128, 64, 64, 64),
    (torch.bfloat16, "fp8_e4m3", 0.25, True, True, None, 40, 8, 64, 24, 40, 128),
    (torch.bfloat16, "fp8_e4m3", 0.25, False, False, 30.0, 4, 1, 128, 96, 100, 16),
    (torch.float16, "model", 0.25, True, True, None, 16, 4, 64, 64, 128, 64),
]
GPU_IDS = [f"{str(c[0])[6:]}-{c[1]}-{'twolevel' if c[2] else 'full'}{'+keys' if c[3] else ''}-"
           f"{'update' if c[4] else 'noupdate'}-hq{c[6]}-rk{c[9]}-rv{c[10]}-bt{c[11]}" for c in GPU_CASES]


def make_case(dtype, cdt, frac, tlk, hq, hkv, d, rk, rv, device):
    from ap_vllm.core.synthetic import make_paged_batch

    return make_paged_batch([900, 150, 1300], [[(37, 800)], [], [(0, 500), (530, 700)]], num_q_heads=hq,
                            num_kv_heads=hkv, head_size=d, key_rank=rk, value_rank=rv, importance_fraction=frac,
                            dtype=dtype, coefficient_dtype=cdt, two_level_keys=tlk, device=device)


def check_against_reference(pb, plan, qp, lse_ref, sz, cache, part_a, part_alse, *, scale, softcap, omega, update):
    """Split partials of every row (padded rows included) and the importance against the float64 reference;
    every byte of the cache outside the importance sections untouched."""
    ra, rl, rimp = reference_partials(pb, plan.meta, plan.thresholds.cpu(), qp, lse_ref,
                                      tokens_per_split=sz["tokens_per_split"], num_splits=sz["num_splits"],
                                      scale=scale, softcap=softcap, omega=omega, hq=sz["hq"], brv=sz["brv"],
                                      update=update)
    ca, cl = part_a.cpu().double(), part_alse.cpu().double()
    assert not torch.isnan(ca).any() and not torch.isnan(cl).any()
    assert torch.equal(torch.isinf(cl), torch.isinf(rl))
    fin = torch.isfinite(rl)
    assert torch.allclose(cl[fin], rl[fin], atol=1e-4, rtol=1e-5), (cl[fin] - rl[fin]).abs().max()
    assert torch.allclose(ca, ra, atol=1e-4, rtol=1e-4), (ca - ra).abs().max()
    for got, ref in zip(span_importances(pb, cache), rimp):
        assert torch.allclose(got, ref, atol=1e-6, rtol=1e-4), (got - ref).abs().max()
    other = ~importance_byte_mask(pb, pb.kv_cache)
    assert torch.equal(cache_bytes(cache).cpu()[other], cache_bytes(pb.kv_cache).cpu()[other])
    if not update:
        assert torch.equal(cache_bytes(cache).cpu(), cache_bytes(pb.kv_cache).cpu())


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,cdt,frac,tlk,update,softcap,hq,hkv,d,rk,rv,block_t", GPU_CASES, ids=GPU_IDS)
def test_cuda_partials_match_reference_and_triton(dtype, cdt, frac, tlk, update, softcap, hq, hkv, d, rk, rv,
                                                  block_t):
    from ap_vllm.core.paged_decode import build_decode_plan
    from ap_vllm.kernels.lowrank_decode import decode_instances

    assert cuda_span.available(), cuda_span.unavailable_reason()
    pb = make_case(dtype, cdt, frac, tlk, hq, hkv, d, rk, rv, "cuda")
    plan = build_decode_plan(pb.spans, 3, device="cuda")
    fp8, scale, omega = cdt == "fp8_e4m3", d ** -0.5, 0.25
    kw = dict(scale=scale, softcap=softcap, omega=omega, update=update)
    lse_ref = torch.randn(3, hq, device="cuda") + 5.0
    sz = launch_sizes(pb, plan, block_t=block_t)
    assert sz["num_splits"] > 1
    qp = projected_queries(pb, sz["hq_pad"], sz["brk"])

    cache_cu = pb.kv_cache.clone()
    ca, cl = cuda_partials(pb, plan, cache_cu, qp, lse_ref, sz, fp8=fp8, block_t=block_t,
                           inst=decode_instances(plan.meta), **kw)
    torch.cuda.synchronize()
    check_against_reference(pb, plan, qp, lse_ref, sz, cache_cu, ca, cl, **kw)

    # against the Triton kernel (its own splits and q_proj; its dots round p to the model dtype): the
    # partials merged over splits, for the heads the merge reads
    cache_tr = pb.kv_cache.clone()
    ta, tl_ = triton_partials(pb, plan, cache_tr, lse_ref, fp8=fp8, **kw)
    (cma, cml), (tma, tml) = merge_splits(ca, cl, hq), merge_splits(ta, tl_, hq)
    assert torch.allclose(cml, tml, atol=1e-3, rtol=1e-4), (cml - tml).abs().max()
    assert torch.allclose(cma, tma, atol=1e-2, rtol=1e-2), (cma - tma).abs().max()
    for got, tri in zip(span_importances(pb, cache_cu), span_importances(pb, cache_tr)):
        assert torch.allclose(got, tri, atol=1e-5, rtol=1e-3), (got - tri).abs().max()


@gpu
@pytest.mark.gpu
def test_cuda_partials_many_splits_and_empty_splits():
    """More splits than the shorter spans have tokens for (empty splits: lse -inf, a 0), tokens_per_split
    not a multiple of the 16-token tile, every block_t, no instance table (instance i = span i)."""
    from ap_vllm.core.paged_decode import build_decode_plan

    pb = make_case(torch.bfloat16, "model", 0.25, False, 28, 4, 128, 64, 64, "cuda")
    plan = build_decode_plan(pb.spans, 3, device="cuda")
    lse_ref = torch.randn(3, 28, device="cuda") + 5.0
    kw = dict(scale=0.125, softcap=None, omega=0.25, update=True)
    for block_t, tps in ((16, 40), (32, 100), (64, 64), (128, 250)):
        sz = launch_sizes(pb, plan, block_t=block_t, tokens_per_split=tps)
        qp = projected_queries(pb, sz["hq_pad"], sz["brk"])
        cache = pb.kv_cache.clone()
        ca, cl = cuda_partials(pb, plan, cache, qp, lse_ref, sz, fp8=False, block_t=block_t, **kw)
        torch.cuda.synchronize()
        assert torch.isinf(cl[:, :, :28]).any()  # some splits of the shorter spans are empty
        check_against_reference(pb, plan, qp, lse_ref, sz, cache, ca, cl, **kw)
