/* Span decode kernel of AttentionPack (CUDA C++): C interface of the launcher.
 *
 * One thread block per (span instance, split) reads a compacted span from vLLM's paged KV cache
 * (layout: ap_vllm/core/paged_layout.py) and writes the instance's partial attention in coefficient
 * space, like the Triton kernel _span_attn_kernel (kernels/lowrank_decode.py) launched for a decode
 * step (one query row per instance, post-RoPE spans). See span_decode.cu for the math.
 */
#ifndef AP_VLLM_SPAN_DECODE_H_
#define AP_VLLM_SPAN_DECODE_H_

#include <stdint.h>

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Columns of the int64 metadata rows (ap_vllm.core.paged_layout.META_FIELDS). */
#define AP_SPAN_NUM_META 17

/* Coefficient storage (coeff_type). */
#define AP_COEFF_BF16 0     /* model dtype bfloat16 */
#define AP_COEFF_FP16 1     /* model dtype float16 */
#define AP_COEFF_FP8_E4M3 2 /* float8_e4m3fn with float32 per-token scales (any model dtype) */

/* Return codes besides 0 (success) and a positive cudaError_t of the launch. */
#define AP_SPAN_EINVAL (-1) /* unsupported configuration: hq_pad, brk, brv, coeff_type, block_t, ... */
#define AP_SPAN_ESMEM (-2)  /* the shared memory the configuration needs exceeds the device's limit */

/* Launch the span decode kernel on `stream`: grid (num_inst, num_splits).
 *
 *   qp           float32 [num_inst, hq_pad, brk]    query row projected into each span's key basis
 *   cache        uint8   [num_blocks, block_bytes]  the layer's paged cache as bytes; the importance
 *                                                   section is updated in place when `update`
 *   block_table  int32   [B, stride_bt]             physical block ids per sequence
 *   meta         int64   [num_spans, AP_SPAN_NUM_META]
 *   inst         int32   [num_inst, 3] or NULL      span instances (span id, query row, rows <= 1);
 *                                                   NULL: instance i = (i, seq of span i, 1)
 *   thresholds   float32 [num_spans]                importance threshold of the full-rank read
 *   lse_ref      float32 [rows, hq]                 importance normaliser of each query row (read
 *                                                   only when `update`; may be NULL otherwise)
 *   part_a       float32 [num_inst, num_splits, hq_pad, brv]   out: normalised partial a[h]
 *   part_alse    float32 [num_inst, num_splits, hq_pad]        out: partial log-sum-exp
 *
 * tokens_per_split: tokens of a span per split (split k reads [k * tps, min(T, (k + 1) * tps)));
 * scale: softmax scale; softcap > 0: scores are soft-capped at that value (0: off); omega: EMA
 * weight of the importance update; hq: query heads, hq_pad (in [hq, 64]): rows per instance of qp
 * and the partials (rows h >= hq get a = 0, lse = -inf); brk in {16, 32, ..., 256} (power of two),
 * brv in {16, 32, 64, 128} (<= 64 when hq_pad > 32); block_t in {16, 32, 64, 128}: tokens a block
 * stages per step (16 per group of lanes). qp, cache and part_a must be 16-byte aligned,
 * block_bytes a multiple of 16.
 *
 * Returns 0, AP_SPAN_EINVAL, AP_SPAN_ESMEM or the cudaError_t of the launch. */
int ap_span_decode_launch(const float* qp, uint8_t* cache, const int32_t* block_table, const int64_t* meta,
                          const int32_t* inst, const float* thresholds, const float* lse_ref, float* part_a,
                          float* part_alse, int num_inst, int num_splits, int64_t stride_bt, int64_t block_bytes,
                          int tokens_per_split, float scale, float softcap, float omega, int hq, int hq_pad,
                          int brk, int brv, int coeff_type, int update, int block_t, cudaStream_t stream);

/* Whether a configuration is supported (1) or not (0); no device call. */
int ap_span_decode_supported(int hq_pad, int brk, int brv, int coeff_type, int block_t);

/* Bytes of dynamic shared memory a configuration needs (0 if unsupported). */
size_t ap_span_decode_smem_bytes(int hq_pad, int brk, int brv, int coeff_type, int block_t);

/* A message for a return code of ap_span_decode_launch. */
const char* ap_span_decode_strerror(int code);

#ifdef __cplusplus
}
#endif

#endif /* AP_VLLM_SPAN_DECODE_H_ */
