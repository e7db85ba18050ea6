// Span decode of AttentionPack in CUDA C++ (post-RoPE spans, one query row per span instance): a
// second implementation of the Triton kernel _span_attn_kernel in kernels/lowrank_decode.py as a
// decode step launches it (QPT = 1, not PRE_ROPE), same inputs, same outputs.
//
// Math, per decode span instance i = (span s, query row b, 1 row) and split k, for every query head
// h < HQ (s is a compacted run of T tokens of sequence seq(s); b = seq(s) in a decode step):
//
//   tokens     t in [k * tps, min(T, (k + 1) * tps))
//   full[t]  = importance[t] >= threshold[s]
//   Rk(t)    = full[t] ? Rk : Rk_low          (Rk_low = Rk unless two-level keys)
//   Rv(t)    = full[t] ? Rv : Rv_low          (Rv_low = Rv without a threshold)
//   s[h,t]   = scale * sk[t] * sum_{r < Rk(t)} q_proj[h, r] C_k[t, r]      (sk = 1 without FP8)
//              then, with a soft-cap c > 0:  s <- c * tanh(s / c) = c * (1 - 2 / (exp(2 s / c) + 1))
//   m[h]     = max_t s[h,t],   l[h] = sum_t exp(s[h,t] - m[h])
//   a[h, r]  = (1 / l[h]) sum_t exp(s[h,t] - m[h]) sv[t] C_v[t, r]          (r < Rv(t); sv = 1 without FP8)
//   out:       part_a[i, k, h, :] = a[h, :] (0 where l = 0), part_alse[i, k, h] = m[h] + log l[h] (-inf where l = 0);
//              padded rows HQ <= h < HQ_PAD (and every row of an instance without a query row): a = 0, lse = -inf
//   update:    importance[t] <- (1 - omega) importance[t] + omega * (1 / HQ) sum_{h < HQ} exp(s[h,t] - lse_ref[b, h])
//              (the importance read for full[t] is the one before this step's update)
//
// q_proj[i, h, :] = B_k[:, j*d:(j+1)*d] q[b, h] (j = h // g) comes from _span_qproj_kernel; the merge
// projects a[h] with B_v. torch reference: ap_vllm.core.lowrank_attention.attend_compacted /
// update_importance. Byte layout of a span in the paged cache: ap_vllm/core/paged_layout.py: row i of
// a section lies in physical block block_table[b, storage_block + section_block + i // rpb] at byte
// (i % rpb) * row_bytes, rpb = block_bytes // row_bytes; coefficient rows are token-major and padded
// to whole 32-byte sectors; scales and importance are float32 rows of 4 bytes.
//
// Work decomposition. Every coefficient byte a token needs is read once, with 16-byte loads; the
// arithmetic is fp32 on the CUDA cores, HQ * (Rk(t) + Rv(t)) FMAs per token, so with many query heads
// (e.g. 28 heads at rank 64) the FMAs rather than DRAM bound the kernel:
//   * one thread block per (span instance, split) (instance i = (span id, query row, rows) from the
//     instance table, or (i, seq(i), 1) without one); the block is made of groups of GL lanes
//     (HL = 16, 32 or 64 head lanes >= HQ_PAD; GL = min(HL, 32): two groups per warp when HL = 16);
//     lane i of a group owns query heads i, i + GL, ... (HPL = HL / GL of them) with their running
//     max m, normaliser l and accumulator a[BRV] in registers;
//   * groups take the split's tiles of 16 consecutive tokens in turn. Per tile, 16 lanes read the
//     tokens' importance, decide full/low rank and look up the block-table entry of each row once
//     (rows of one block share the entry: one transaction per block and tile);
//     the group then copies the tile's C_k / C_v rows into shared memory with 16-byte vector loads
//     (fp32 after conversion), reading only the first Rk(t) / Rv(t) components of a token: the
//     sectors past them are not touched. Every lane then scores its heads against the tile
//     (q_proj rows from shared memory, coefficient rows broadcast), runs the online softmax and
//     accumulates C_v;
//   * at the end the groups' (m, l, a) are merged in shared memory and written as the partials.

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "span_decode.h"

namespace ap_span {

// metadata columns (ap_vllm.core.paged_layout.META_FIELDS)
enum MetaField {
  M_SEQ = 0, M_START, M_T, M_RK, M_RV, M_RK_LOW, M_RV_LOW, M_SB, M_BK, M_BV, M_CK, M_CV, M_SK, M_SV, M_IMP,
  M_ROWK, M_ROWV
};
static_assert(M_ROWV + 1 == AP_SPAN_NUM_META, "metadata columns");

constexpr int kTile = 16;        // tokens per group and step
constexpr int kInfoFloats = 128; // per-token info of a tile: 2 x int64[16] + 4 x 32-bit[16]
constexpr int kMaxThreads = 256; // block_t <= 128: at most 8 groups of 32 lanes

// head lanes HL of a block for hq_pad padded query heads, and lanes per group
__host__ __device__ constexpr int head_lanes(int hq_pad) { return hq_pad <= 16 ? 16 : (hq_pad <= 32 ? 32 : 64); }
__host__ __device__ constexpr int group_lanes(int hl) { return hl < 32 ? hl : 32; }

// Shared memory of one block, in floats (HL head lanes, G groups):
//   q_proj [HL][brk + 4]                                     (rows padded: conflict-free float4 reads)
//   per group: C_k [16][brk], C_v [16][BRV], token info      (groups padded apart by 4 banks)
//   after the token loop the group area is reused for the merge:
//   m, l [2][G][HL], M, L [2][HL], a [HL][BRV + 4]
__host__ __device__ inline int qp_stride(int brk) { return brk + 4; }
__host__ __device__ inline int group_floats(int brk, int brv) {
  return (kTile * (brk + brv) + kInfoFloats + 31) / 32 * 32 + 4;
}
__host__ __device__ inline size_t smem_floats(int hl, int brk, int brv, int ngroups) {
  const size_t tiles = (size_t)ngroups * group_floats(brk, brv);
  const size_t merge = (size_t)2 * hl * (ngroups + 1) + (size_t)hl * (brv + 4);
  return (size_t)hl * qp_stride(brk) + (tiles > merge ? tiles : merge);
}

// ---- coefficient conversion: 16 bytes -> 16 / sizeof(T) floats ----------------------------------
template <typename T> struct Coeff;

template <> struct Coeff<__nv_bfloat16> {
  static constexpr int kPerVec = 8;
  static constexpr bool kFp8 = false;
  __device__ __forceinline__ static void to_float(const uint4& raw, float* v) {
    const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = __bfloat1622float2(p[k]);
      v[2 * k] = f.x;
      v[2 * k + 1] = f.y;
    }
  }
};

template <> struct Coeff<__half> {
  static constexpr int kPerVec = 8;
  static constexpr bool kFp8 = false;
  __device__ __forceinline__ static void to_float(const uint4& raw, float* v) {
    const __half2* p = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = __half22float2(p[k]);
      v[2 * k] = f.x;
      v[2 * k + 1] = f.y;
    }
  }
};

template <> struct Coeff<__nv_fp8_e4m3> {
  static constexpr int kPerVec = 16;
  static constexpr bool kFp8 = true;
  __device__ __forceinline__ static void to_float(const uint4& raw, float* v) {
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int k = 0; k < 8; ++k) {  // byte 2k -> v[2k], byte 2k + 1 -> v[2k + 1] (little endian)
      const __nv_fp8x2_storage_t pair = (__nv_fp8x2_storage_t)((w[k / 2] >> (16 * (k % 2))) & 0xffffu);
      const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
      const float2 f = __half22float2(__half2(h));
      v[2 * k] = f.x;
      v[2 * k + 1] = f.y;
    }
  }
};

// ---- helpers ----------------------------------------------------------------------------------
// byte address of row `row` of a section starting at logical block `first_block` of the sequence
__device__ __forceinline__ int64_t row_addr(const int32_t* bt_row, int64_t first_block, int row, int rpb,
                                            int64_t row_bytes, int64_t block_bytes) {
  const int q = row / rpb;
  return (int64_t)bt_row[first_block + q] * block_bytes + (int64_t)(row - q * rpb) * row_bytes;
}

template <int GL> __device__ __forceinline__ unsigned group_mask(int tid) {
  return GL == 32 ? 0xffffffffu : (0xffffu << (tid & 16));
}

template <int GL> __device__ __forceinline__ float group_sum(unsigned mask, float x) {
#pragma unroll
  for (int off = GL / 2; off > 0; off /= 2) x += __shfl_xor_sync(mask, x, off);
  return x;
}

template <int GL> __device__ __forceinline__ int group_max(unsigned mask, int x) {
#pragma unroll
  for (int off = GL / 2; off > 0; off /= 2) {
    const int y = __shfl_xor_sync(mask, x, off);
    x = y > x ? y : x;
  }
  return x;
}

__device__ __forceinline__ float soft_cap(float s, float cap) {
  // cap * tanh(s / cap), written with exp like the Triton kernel (saturates to +-cap)
  const float e = expf(2.0f * s / cap);
  return cap * (1.0f - 2.0f / (e + 1.0f));
}

// Copy the 16 rows of a tile into shared memory as floats: row t gets its first ncols[t]
// components (16-byte loads, only the chunks holding them), zeros up to `row_floats`.
// Rows are sector-planar (ap_vllm/core/paged_layout.py): addr[t] is the byte address of the token's
// first 32-byte sector; sector p of its row lies `plane_bytes` (rows per block x 32) further per plane.
template <typename CT>
__device__ __forceinline__ void stage_rows(const uint8_t* __restrict__ cache, const int64_t* addr, const int* ncols,
                                           int64_t plane_bytes, float* dst, int row_floats, int chunk_shift,
                                           int lane, int lanes) {
  constexpr int V = Coeff<CT>::kPerVec;
  const int chunks = 1 << chunk_shift;  // 16-byte chunks per staged row: row_floats / V
  for (int j = lane; j < kTile * chunks; j += lanes) {
    const int t = j >> chunk_shift;
    const int c = j & (chunks - 1);
    const int keep = ncols[t] - c * V;  // components of this chunk to keep
    float v[V];
    if (keep > 0) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(cache + addr[t] + (int64_t)(c >> 1) * plane_bytes +
                                                             16 * (int64_t)(c & 1)));
      Coeff<CT>::to_float(raw, v);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = e < keep ? v[e] : 0.0f;
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = 0.0f;
    }
    float4* out = reinterpret_cast<float4*>(dst + t * row_floats + c * V);
#pragma unroll
    for (int q = 0; q < V / 4; ++q) out[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
  }
}

__host__ __device__ constexpr int log2_int(int x) { return x <= 1 ? 0 : 1 + log2_int(x / 2); }

// ---- the kernel --------------------------------------------------------------------------------
template <typename CT, int HL, int BRV>
__global__ void __launch_bounds__(kMaxThreads, 1)
span_decode_kernel(const float* __restrict__ qp, uint8_t* __restrict__ cache, const int32_t* __restrict__ block_table,
                   const int64_t* __restrict__ meta, const int32_t* __restrict__ inst,
                   const float* __restrict__ thresholds, const float* __restrict__ lse_ref,
                   float* __restrict__ part_a, float* __restrict__ part_alse, int64_t stride_bt,
                   int64_t block_bytes, int tokens_per_split, float scale, float softcap, float omega, int hq,
                   int hq_pad, int brk, int update) {
  constexpr int GL = group_lanes(HL);  // lanes per group
  constexpr int HPL = HL / GL;         // query heads per lane
  constexpr bool kFp8 = Coeff<CT>::kFp8;
  constexpr int V = Coeff<CT>::kPerVec;  // components per 16-byte chunk
  static_assert(HPL * BRV <= 128, "accumulator too large for registers");
  static_assert(BRV % V == 0 && BRV % 8 == 0, "BRV");

  const int ins = blockIdx.x;
  const int split = blockIdx.y;
  const int num_splits = gridDim.y;
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int ngroups = nthreads / GL;
  const int group = tid / GL;
  const int lane = tid % GL;
  const unsigned gmask = group_mask<GL>(tid);

  // span instance and span metadata
  const int sid = inst != nullptr ? inst[3 * ins] : ins;
  const int64_t* mrow = meta + (int64_t)sid * AP_SPAN_NUM_META;
  const int seq = (int)mrow[M_SEQ];
  const int q_row = inst != nullptr ? inst[3 * ins + 1] : seq;  // the query row (lse_ref row)
  const bool has_row = inst != nullptr ? inst[3 * ins + 2] > 0 : true;
  const int T = (int)mrow[M_T];
  const int rk_full = (int)mrow[M_RK];
  const int rv_full = (int)mrow[M_RV];
  const int rk_low = (int)mrow[M_RK_LOW];
  const int rv_low = (int)mrow[M_RV_LOW];
  const int64_t sb = mrow[M_SB];
  const int64_t blk_ck = sb + mrow[M_CK];
  const int64_t blk_cv = sb + mrow[M_CV];
  const int64_t blk_sk = sb + mrow[M_SK];
  const int64_t blk_sv = sb + mrow[M_SV];
  const int64_t blk_imp = sb + mrow[M_IMP];
  const int64_t row_k = mrow[M_ROWK];
  const int64_t row_v = mrow[M_ROWV];
  const int rpb_k = (int)(block_bytes / row_k);
  const int rpb_v = (int)(block_bytes / row_v);
  const int rpb_4 = (int)(block_bytes / 4);
  const float thr = thresholds[sid];
  const int32_t* bt_row = block_table + (int64_t)seq * stride_bt;

  // shared memory (see smem_floats)
  extern __shared__ __align__(16) unsigned char ap_span_smem[];
  float* smem = reinterpret_cast<float*>(ap_span_smem);
  const int qs = qp_stride(brk);
  float* qp_s = smem;
  float* groups_s = smem + HL * qs;
  float* ck_s = groups_s + group * group_floats(brk, BRV);  // [16][brk]
  float* cv_s = ck_s + kTile * brk;                          // [16][BRV]
  int64_t* tk_kaddr = reinterpret_cast<int64_t*>(cv_s + kTile * BRV);
  int64_t* tk_vaddr = tk_kaddr + kTile;
  int* tk_kn = reinterpret_cast<int*>(tk_vaddr + kTile);
  int* tk_vn = tk_kn + kTile;
  float* tk_sk = reinterpret_cast<float*>(tk_vn + kTile);
  float* tk_sv = tk_sk + kTile;

  {  // q_proj rows of this instance -> shared memory (rows past hq_pad: zero)
    const float4* src = reinterpret_cast<const float4*>(qp + (int64_t)ins * hq_pad * brk);
    const int c4 = brk / 4;
    for (int i = tid; i < HL * c4; i += nthreads) {
      const int h = i / c4;
      reinterpret_cast<float4*>(qp_s + h * qs)[i - h * c4] =
          h < hq_pad ? src[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  }

  bool active[HPL];  // a real query head of a real query row
  float lref[HPL];
  float m[HPL], l[HPL];
  float acc[HPL][BRV];
#pragma unroll
  for (int i = 0; i < HPL; ++i) {
    const int h = i * GL + lane;
    active[i] = has_row && h < hq;
    lref[i] = (update && active[i]) ? lse_ref[(int64_t)q_row * hq + h] : 0.0f;
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int r = 0; r < BRV; ++r) acc[i][r] = 0.0f;
  }
  __syncthreads();

  const int t_begin = split * tokens_per_split;
  const int t_end = min(T, t_begin + tokens_per_split);
  for (int t0 = t_begin + group * kTile; t0 < t_end; t0 += ngroups * kTile) {
    // 1. per token of the tile (lane t): importance, full/low rank, row addresses, FP8 scales
    const int tok = t0 + lane;
    const bool valid = lane < kTile && tok < t_end;
    float imp = 0.0f;
    int64_t iaddr = 0;
    int kn = 0;
    if (lane < kTile) {
      int vn = 0;
      float sk = 0.0f, sv = 0.0f;
      int64_t ka = 0, va = 0;
      if (valid) {
        iaddr = row_addr(bt_row, blk_imp, tok, rpb_4, 4, block_bytes);
        imp = *reinterpret_cast<const float*>(cache + iaddr);
        const bool full = imp >= thr;
        kn = min(full ? rk_full : rk_low, brk);  // (ranks are <= brk / BRV; the clamp keeps reads in the rows)
        vn = min(full ? rv_full : rv_low, BRV);
        ka = row_addr(bt_row, blk_ck, tok, rpb_k, 32, block_bytes);  // (sector-planar rows: plane 0)
        va = row_addr(bt_row, blk_cv, tok, rpb_v, 32, block_bytes);
        if (kFp8) {
          sk = *reinterpret_cast<const float*>(cache + row_addr(bt_row, blk_sk, tok, rpb_4, 4, block_bytes));
          sv = *reinterpret_cast<const float*>(cache + row_addr(bt_row, blk_sv, tok, rpb_4, 4, block_bytes));
        }
      }
      tk_kaddr[lane] = ka;
      tk_vaddr[lane] = va;
      tk_kn[lane] = kn;
      tk_vn[lane] = vn;
      tk_sk[lane] = sk;
      tk_sv[lane] = sv;
    }
    const int kmax = group_max<GL>(gmask, kn);  // most key components any token of the tile reads
    __syncwarp(gmask);

    // 2. the tile's coefficient rows -> shared memory (fp32, zero past each token's components)
    stage_rows<CT>(cache, tk_kaddr, tk_kn, (int64_t)rpb_k * 32, ck_s, brk, log2_int(brk / V), lane, GL);
    stage_rows<CT>(cache, tk_vaddr, tk_vn, (int64_t)rpb_v * 32, cv_s, BRV, log2_int(BRV / V), lane, GL);
    __syncwarp(gmask);

    // 3. scores s[h, t] of this lane's heads
    float s[HPL][kTile];
#pragma unroll
    for (int i = 0; i < HPL; ++i)
#pragma unroll
      for (int t = 0; t < kTile; ++t) s[i][t] = 0.0f;
    const int kq = (kmax + 3) / 4;  // float4 columns holding any non-zero component
    for (int c = 0; c < kq; ++c) {
      float4 q[HPL];
#pragma unroll
      for (int i = 0; i < HPL; ++i) q[i] = reinterpret_cast<const float4*>(qp_s + (i * GL + lane) * qs)[c];
#pragma unroll
      for (int t = 0; t < kTile; ++t) {
        const float4 k = reinterpret_cast<const float4*>(ck_s + t * brk)[c];
#pragma unroll
        for (int i = 0; i < HPL; ++i) {
          s[i][t] = fmaf(q[i].x, k.x, s[i][t]);
          s[i][t] = fmaf(q[i].y, k.y, s[i][t]);
          s[i][t] = fmaf(q[i].z, k.z, s[i][t]);
          s[i][t] = fmaf(q[i].w, k.w, s[i][t]);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kTile; ++t) {
      const bool in_split = t0 + t < t_end;
      const float skt = kFp8 ? tk_sk[t] : 1.0f;
#pragma unroll
      for (int i = 0; i < HPL; ++i) {
        float x = s[i][t];
        if (kFp8) x *= skt;
        x *= scale;
        if (softcap > 0.0f) x = soft_cap(x, softcap);
        s[i][t] = (in_split && active[i]) ? x : -INFINITY;
      }
    }

    // 4. importance EMA (from the scores, before they become probabilities)
    if (update) {
      float mine = 0.0f;
#pragma unroll
      for (int t = 0; t < kTile; ++t) {
        float e = 0.0f;
#pragma unroll
        for (int i = 0; i < HPL; ++i)
          if (active[i]) e += expf(s[i][t] - lref[i]);
        e = group_sum<GL>(gmask, e);
        if (lane == t) mine = e;
      }
      if (valid) *reinterpret_cast<float*>(cache + iaddr) = (1.0f - omega) * imp + omega * (mine / (float)hq);
    }

    // 5. online softmax over the tile (s becomes p); rows without a score keep m = -inf, l = 0
#pragma unroll
    for (int i = 0; i < HPL; ++i) {
      float mt = s[i][0];
#pragma unroll
      for (int t = 1; t < kTile; ++t) mt = fmaxf(mt, s[i][t]);
      const float m_new = fmaxf(m[i], mt);
      const float m_safe = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = expf(m[i] - m_safe);
      float psum = 0.0f;
#pragma unroll
      for (int t = 0; t < kTile; ++t) {
        s[i][t] = expf(s[i][t] - m_safe);
        psum += s[i][t];
      }
      l[i] = l[i] * alpha + psum;
      m[i] = m_new;
#pragma unroll
      for (int r = 0; r < BRV; ++r) acc[i][r] *= alpha;
    }

    // 6. a[h] += p[h, t] sv[t] C_v[t, :Rv(t)]  (8 components at a time, only those the token has)
#pragma unroll
    for (int t = 0; t < kTile; ++t) {
      const int vn = tk_vn[t];
      const float svt = kFp8 ? tk_sv[t] : 1.0f;
      float pv[HPL];
#pragma unroll
      for (int i = 0; i < HPL; ++i) pv[i] = kFp8 ? s[i][t] * svt : s[i][t];
      const float4* row = reinterpret_cast<const float4*>(cv_s + t * BRV);
#pragma unroll
      for (int c = 0; c < BRV / 8; ++c) {
        if (8 * c < vn) {
          const float4 x = row[2 * c];
          const float4 y = row[2 * c + 1];
#pragma unroll
          for (int i = 0; i < HPL; ++i) {
            acc[i][8 * c + 0] = fmaf(pv[i], x.x, acc[i][8 * c + 0]);
            acc[i][8 * c + 1] = fmaf(pv[i], x.y, acc[i][8 * c + 1]);
            acc[i][8 * c + 2] = fmaf(pv[i], x.z, acc[i][8 * c + 2]);
            acc[i][8 * c + 3] = fmaf(pv[i], x.w, acc[i][8 * c + 3]);
            acc[i][8 * c + 4] = fmaf(pv[i], y.x, acc[i][8 * c + 4]);
            acc[i][8 * c + 5] = fmaf(pv[i], y.y, acc[i][8 * c + 5]);
            acc[i][8 * c + 6] = fmaf(pv[i], y.z, acc[i][8 * c + 6]);
            acc[i][8 * c + 7] = fmaf(pv[i], y.w, acc[i][8 * c + 7]);
          }
        }
      }
    }
    __syncwarp(gmask);  // the tile's shared memory is rewritten by the next one
  }

  // 7. merge the groups: M = max_g m_g, L = sum_g l_g e^(m_g - M), a = sum_g a_g e^(m_g - M) / L
  __syncthreads();
  constexpr int RS = BRV + 4;
  float* ml_s = groups_s;                 // m [ngroups][HL], then l [ngroups][HL]
  float* fin_s = ml_s + 2 * ngroups * HL; // M [HL], then L [HL]
  float* red_s = fin_s + 2 * HL;          // [HL][RS]
#pragma unroll
  for (int i = 0; i < HPL; ++i) {
    const int h = i * GL + lane;
    ml_s[group * HL + h] = m[i];
    ml_s[(ngroups + group) * HL + h] = l[i];
  }
  __syncthreads();
  float f[HPL];
#pragma unroll
  for (int i = 0; i < HPL; ++i) {
    const int h = i * GL + lane;
    float M = -INFINITY;
    for (int g = 0; g < ngroups; ++g) M = fmaxf(M, ml_s[g * HL + h]);
    float L = 0.0f;
    for (int g = 0; g < ngroups; ++g) {
      const float mg = ml_s[g * HL + h];
      if (mg > -INFINITY) L += ml_s[(ngroups + g) * HL + h] * expf(mg - M);
    }
    f[i] = m[i] > -INFINITY ? expf(m[i] - M) : 0.0f;
    if (group == 0) {
      fin_s[h] = M;
      fin_s[HL + h] = L;
    }
  }
  for (int g = 0; g < ngroups; ++g) {  // groups add their rescaled accumulators in turn
    if (group == g) {
#pragma unroll
      for (int i = 0; i < HPL; ++i) {
        float4* dst = reinterpret_cast<float4*>(red_s + (i * GL + lane) * RS);
#pragma unroll
        for (int c = 0; c < BRV / 4; ++c) {
          float4 v = make_float4(acc[i][4 * c] * f[i], acc[i][4 * c + 1] * f[i], acc[i][4 * c + 2] * f[i],
                                 acc[i][4 * c + 3] * f[i]);
          if (g > 0) {
            const float4 o = dst[c];
            v.x += o.x;
            v.y += o.y;
            v.z += o.z;
            v.w += o.w;
          }
          dst[c] = v;
        }
      }
    }
    __syncthreads();
  }

  // 8. partials of rows h < hq_pad: a = acc / L (0 where L = 0), lse = M + log L (-inf where L = 0)
  const int64_t base = ((int64_t)ins * num_splits + split) * hq_pad;
  float4* pa = reinterpret_cast<float4*>(part_a + base * BRV);
  for (int j = tid; j < hq_pad * (BRV / 4); j += nthreads) {
    const int h = j / (BRV / 4);
    const int c = j - h * (BRV / 4);
    const float L = fin_s[HL + h];
    float4 v = reinterpret_cast<const float4*>(red_s + h * RS)[c];
    if (L > 0.0f) {
      v.x /= L;
      v.y /= L;
      v.z /= L;
      v.w /= L;
    } else {
      v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    pa[j] = v;
  }
  for (int h = tid; h < hq_pad; h += nthreads) {
    const float L = fin_s[HL + h];
    part_alse[base + h] = L > 0.0f ? fin_s[h] + logf(L) : -INFINITY;
  }
}

// ---- host side ---------------------------------------------------------------------------------
struct Args {
  const float* qp;
  uint8_t* cache;
  const int32_t* block_table;
  const int64_t* meta;
  const int32_t* inst;
  const float* thresholds;
  const float* lse_ref;
  float* part_a;
  float* part_alse;
  int num_inst, num_splits;
  int64_t stride_bt, block_bytes;
  int tokens_per_split;
  float scale, softcap, omega;
  int hq, hq_pad, brk, brv, coeff_type, update, block_t;
};

inline bool supported(int hq_pad, int brk, int brv, int coeff_type, int block_t) {
  if (hq_pad < 1 || hq_pad > 64) return false;
  if (brv != 16 && brv != 32 && brv != 64 && brv != 128) return false;
  const int hl = head_lanes(hq_pad);
  if ((hl / group_lanes(hl)) * brv > 128) return false;
  if (brk < 16 || brk > 256 || (brk & (brk - 1)) != 0) return false;
  if (coeff_type != AP_COEFF_BF16 && coeff_type != AP_COEFF_FP16 && coeff_type != AP_COEFF_FP8_E4M3) return false;
  if (block_t != 16 && block_t != 32 && block_t != 64 && block_t != 128) return false;
  return true;
}

inline size_t smem_bytes(int hq_pad, int brk, int brv, int block_t) {
  return smem_floats(head_lanes(hq_pad), brk, brv, block_t / kTile) * sizeof(float);
}

template <typename CT, int HL, int BRV>
int launch(const Args& a, cudaStream_t stream) {
  const int ngroups = a.block_t / kTile;
  const int threads = ngroups * group_lanes(HL);
  const size_t smem = smem_floats(HL, a.brk, BRV, ngroups) * sizeof(float);
  void (*kernel)(const float*, uint8_t*, const int32_t*, const int64_t*, const int32_t*, const float*, const float*,
                 float*, float*, int64_t, int64_t, int, float, float, float, int, int, int, int) =
      span_decode_kernel<CT, HL, BRV>;
  if (smem > 48 * 1024) {
    int dev = 0, limit = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return (int)err;
    err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (err != cudaSuccess) return (int)err;
    if (smem > (size_t)limit) return AP_SPAN_ESMEM;
    err = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                               (int)smem);
    if (err != cudaSuccess) return (int)err;
  }
  kernel<<<dim3((unsigned)a.num_inst, (unsigned)a.num_splits), dim3((unsigned)threads), smem, stream>>>(
      a.qp, a.cache, a.block_table, a.meta, a.inst, a.thresholds, a.lse_ref, a.part_a, a.part_alse, a.stride_bt,
      a.block_bytes, a.tokens_per_split, a.scale, a.softcap, a.omega, a.hq, a.hq_pad, a.brk, a.update);
  return (int)cudaGetLastError();
}

template <typename CT, int HL>
int dispatch_brv(const Args& a, cudaStream_t stream) {
  switch (a.brv) {
    case 16: return launch<CT, HL, 16>(a, stream);
    case 32: return launch<CT, HL, 32>(a, stream);
    case 64: return launch<CT, HL, 64>(a, stream);
    default: break;
  }
  if constexpr (HL < 64) {
    if (a.brv == 128) return launch<CT, HL, 128>(a, stream);
  }
  return AP_SPAN_EINVAL;
}

template <typename CT>
int dispatch_heads(const Args& a, cudaStream_t stream) {
  switch (head_lanes(a.hq_pad)) {
    case 16: return dispatch_brv<CT, 16>(a, stream);
    case 32: return dispatch_brv<CT, 32>(a, stream);
    case 64: return dispatch_brv<CT, 64>(a, stream);
    default: return AP_SPAN_EINVAL;
  }
}

}  // namespace ap_span

extern "C" int ap_span_decode_supported(int hq_pad, int brk, int brv, int coeff_type, int block_t) {
  return ap_span::supported(hq_pad, brk, brv, coeff_type, block_t) ? 1 : 0;
}

extern "C" size_t ap_span_decode_smem_bytes(int hq_pad, int brk, int brv, int coeff_type, int block_t) {
  if (!ap_span::supported(hq_pad, brk, brv, coeff_type, block_t)) return 0;
  return ap_span::smem_bytes(hq_pad, brk, brv, block_t);
}

extern "C" const char* ap_span_decode_strerror(int code) {
  if (code == 0) return "success";
  if (code == AP_SPAN_EINVAL)
    return "unsupported configuration (hq_pad in [1, 64]; brk a power of two in [16, 256]; brv in "
           "{16, 32, 64, 128}, <= 64 when hq_pad > 32; block_t in {16, 32, 64, 128}; tokens_per_split >= 1; "
           "hq in [1, hq_pad]; bf16 / fp16 / fp8_e4m3 coefficients; block_bytes a multiple of 16; 16-byte "
           "aligned qp, cache and part_a)";
  if (code == AP_SPAN_ESMEM) return "the configuration needs more shared memory than the device has per block";
  return cudaGetErrorString((cudaError_t)code);
}

extern "C" int ap_span_decode_launch(const float* qp, uint8_t* cache, const int32_t* block_table, const int64_t* meta,
                                     const int32_t* inst, const float* thresholds, const float* lse_ref,
                                     float* part_a, float* part_alse, int num_inst, int num_splits, int64_t stride_bt,
                                     int64_t block_bytes, int tokens_per_split, float scale, float softcap,
                                     float omega, int hq, int hq_pad, int brk, int brv, int coeff_type, int update,
                                     int block_t, cudaStream_t stream) {
  if (!ap_span::supported(hq_pad, brk, brv, coeff_type, block_t)) return AP_SPAN_EINVAL;
  if (hq < 1 || hq > hq_pad || tokens_per_split < 1 || num_inst < 0 || num_splits < 0 || block_bytes <= 0 ||
      block_bytes % 16 != 0 || (update && lse_ref == nullptr))
    return AP_SPAN_EINVAL;
  const uintptr_t aligned = (uintptr_t)qp | (uintptr_t)cache | (uintptr_t)part_a;
  if (aligned % 16 != 0) return AP_SPAN_EINVAL;
  if (num_inst == 0 || num_splits == 0) return 0;
  const ap_span::Args a{qp, cache, block_table, meta, inst, thresholds, lse_ref, part_a, part_alse, num_inst,
                        num_splits, stride_bt, block_bytes, tokens_per_split, scale, softcap, omega, hq, hq_pad, brk,
                        brv, coeff_type, update ? 1 : 0, block_t};
  switch (coeff_type) {
    case AP_COEFF_BF16: return ap_span::dispatch_heads<__nv_bfloat16>(a, stream);
    case AP_COEFF_FP16: return ap_span::dispatch_heads<__half>(a, stream);
    case AP_COEFF_FP8_E4M3: return ap_span::dispatch_heads<__nv_fp8_e4m3>(a, stream);
    default: return AP_SPAN_EINVAL;
  }
}
