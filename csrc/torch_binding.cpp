// torch op around the span decode launcher (span_decode.h):
//
//   torch.ops.ap_vllm_csrc.span_decode(qp, cache, block_table, meta, inst, thresholds, lse_ref, part_a,
//                                      part_alse, tokens_per_split, scale, softcap, omega, hq, coeff_type,
//                                      update, block_t)
//
// Checks dtypes, shapes and contiguity, then launches on the current CUDA stream of qp's device.
// The instance count and hq_pad, brk are qp's sizes, brv part_a's last, the split count part_a's
// second; an empty `inst` means the decode instances (span i read by its sequence's row, once).
// Loaded by ap_vllm.kernels.cuda_span (prebuilt ap_vllm._span_decode_C or a JIT build).

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "span_decode.h"

namespace {

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), "span_decode: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == device, "span_decode: ", name, " is on ", t.device(), ", qp on ", device);
  TORCH_CHECK(t.scalar_type() == dtype, "span_decode: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "span_decode: ", name, " must have ", dim, " dims, got ", t.sizes());
}

void span_decode(const at::Tensor& qp, at::Tensor& cache, const at::Tensor& block_table, const at::Tensor& meta,
                 const at::Tensor& inst, const at::Tensor& thresholds, const at::Tensor& lse_ref, at::Tensor& part_a,
                 at::Tensor& part_alse,
                 int64_t tokens_per_split, double scale, double softcap, double omega, int64_t hq, int64_t coeff_type,
                 bool update, int64_t block_t) {
  const at::Device device = qp.device();
  check_tensor(qp, "qp", at::kFloat, 3, device);
  TORCH_CHECK(qp.is_contiguous(), "span_decode: qp must be contiguous");
  const int64_t num_inst = qp.size(0), hq_pad = qp.size(1), brk = qp.size(2);

  check_tensor(cache, "cache", at::kByte, 2, device);
  TORCH_CHECK(cache.stride(1) == 1 && (cache.size(0) <= 1 || cache.stride(0) == cache.size(1)),
              "span_decode: cache must be the [num_blocks, block_bytes] byte view of the KV cache "
              "(ap_vllm.core.paged_layout.cache_bytes), blocks back to back; got strides ", cache.strides());
  check_tensor(block_table, "block_table", at::kInt, 2, device);
  TORCH_CHECK(block_table.stride(1) == 1, "span_decode: block_table rows must be contiguous");
  check_tensor(meta, "meta", at::kLong, 2, device);
  TORCH_CHECK(meta.is_contiguous() && meta.size(1) == AP_SPAN_NUM_META,
              "span_decode: meta must be contiguous [spans, ", AP_SPAN_NUM_META, "], got ", meta.sizes());
  const int64_t num_spans = meta.size(0);
  const bool has_inst = inst.numel() > 0;
  if (has_inst) {
    check_tensor(inst, "inst", at::kInt, 2, device);
    TORCH_CHECK(inst.is_contiguous() && inst.size(0) == num_inst && inst.size(1) == 3,
                "span_decode: inst must be contiguous [", num_inst, ", 3], got ", inst.sizes());
  } else {
    TORCH_CHECK(num_spans == num_inst, "span_decode: without inst, qp must hold one row block per span (",
                num_spans, "), got ", num_inst);
  }
  check_tensor(thresholds, "thresholds", at::kFloat, 1, device);
  TORCH_CHECK(thresholds.is_contiguous() && thresholds.size(0) == num_spans,
              "span_decode: thresholds must be contiguous [", num_spans, "], got ", thresholds.sizes());
  check_tensor(part_a, "part_a", at::kFloat, 4, device);
  TORCH_CHECK(part_a.is_contiguous() && part_a.size(0) == num_inst && part_a.size(2) == hq_pad,
              "span_decode: part_a must be contiguous [", num_inst, ", splits, ", hq_pad, ", brv], got ",
              part_a.sizes());
  const int64_t num_splits = part_a.size(1), brv = part_a.size(3);
  check_tensor(part_alse, "part_alse", at::kFloat, 3, device);
  TORCH_CHECK(part_alse.is_contiguous() && part_alse.size(0) == num_inst && part_alse.size(1) == num_splits &&
                  part_alse.size(2) == hq_pad,
              "span_decode: part_alse must be contiguous [", num_inst, ", ", num_splits, ", ", hq_pad, "], got ",
              part_alse.sizes());
  if (update) {
    check_tensor(lse_ref, "lse_ref", at::kFloat, 2, device);
    TORCH_CHECK(lse_ref.is_contiguous() && lse_ref.size(1) == hq,
                "span_decode: lse_ref must be contiguous [rows, ", hq, "], got ", lse_ref.sizes());
  }
  TORCH_CHECK(hq >= 1 && hq <= hq_pad, "span_decode: hq=", hq, " must be in [1, ", hq_pad, "]");
  TORCH_CHECK(tokens_per_split >= 1, "span_decode: tokens_per_split must be >= 1");
  TORCH_CHECK(ap_span_decode_supported((int)hq_pad, (int)brk, (int)brv, (int)coeff_type, (int)block_t),
              "span_decode: hq_pad=", hq_pad, " brk=", brk, " brv=", brv, " coeff_type=", coeff_type,
              " block_t=", block_t, ": ", ap_span_decode_strerror(AP_SPAN_EINVAL));
  if (num_inst == 0 || num_splits == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const int rc = ap_span_decode_launch(
      qp.data_ptr<float>(), cache.data_ptr<uint8_t>(), block_table.data_ptr<int32_t>(), meta.data_ptr<int64_t>(),
      has_inst ? inst.data_ptr<int32_t>() : nullptr, thresholds.data_ptr<float>(),
      update ? lse_ref.data_ptr<float>() : nullptr, part_a.data_ptr<float>(), part_alse.data_ptr<float>(),
      (int)num_inst, (int)num_splits, block_table.stride(0), cache.size(1),
      (int)tokens_per_split, (float)scale, (float)softcap, (float)omega, (int)hq, (int)hq_pad, (int)brk, (int)brv,
      (int)coeff_type, update ? 1 : 0, (int)block_t, stream);
  TORCH_CHECK(rc == 0, "span_decode: ap_span_decode_launch failed: ", ap_span_decode_strerror(rc));
}

}  // namespace

TORCH_LIBRARY(ap_vllm_csrc, m) {
  m.def(
      "span_decode(Tensor qp, Tensor(a!) cache, Tensor block_table, Tensor meta, Tensor inst, "
      "Tensor thresholds, Tensor lse_ref, Tensor(b!) part_a, Tensor(c!) part_alse, int tokens_per_split, float scale, "
      "float softcap, float omega, int hq, int coeff_type, bool update, int block_t) -> ()");
  m.impl("span_decode", torch::dispatch(c10::DispatchKey::CUDA, TORCH_FN(span_decode)));
}
