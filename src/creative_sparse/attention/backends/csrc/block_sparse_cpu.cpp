// Block-sparse attention forward on CPU: the way PyTorch's own CPU flash
// attention works (per-tile GEMMs, online softmax, one OpenMP task per
// (batch, head, query block)), but visiting only the kept key blocks.
//
// Inputs are fp32 and contiguous ([B, H, L, D]); the Python wrapper converts.
// Kept key blocks of one query block are visited in chunks of up to
// kChunkKeys keys: runs of consecutive blocks are read in place, scattered
// ones are first copied into a per-thread buffer so that each chunk is a single
// pair of GEMMs (small per-block GEMMs waste most of the machine).
//
// Nothing here may crash the process on bad input: the per-thread buffers are
// sized by what a block can hold (never more rows or keys than the sequence
// has), allocated before the parallel region, block lists are range-checked as
// they are read, and an exception inside the OpenMP region is caught there and
// rethrown after it (one escaping a parallel region calls std::terminate).
#if defined(__AVX512F__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__)
#define CPU_CAPABILITY_AVX2
#endif

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <vector>

// The Fortran BLAS entry point that PyTorch's bundled MKL exports. Weak: a torch
// build without it falls back to at::mm on borrowed buffers.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

namespace {

constexpr int64_t kChunkKeys = 512;
using Vec = at::vec::Vectorized<float>;

// Row-major C[M,N] = alpha * A[M,K] * op(B) + beta * C, where op(B) is B[K,N]
// (trans_b = false) or B[N,K] transposed (trans_b = true).
void gemm_rm(bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
             int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (sgemm_ != nullptr) {
    // Column-major view: C^T[N,M] = op(B)^T * A^T.
    const char tb = trans_b ? 'T' : 'N';
    const char ta = 'N';
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    sgemm_(&tb, &ta, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
    return;
  }
  auto opts = torch::TensorOptions().dtype(torch::kFloat32);
  auto A = torch::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, opts);
  auto B = trans_b ? torch::from_blob(const_cast<float*>(b), {n, k}, {ldb, 1}, opts).t()
                   : torch::from_blob(const_cast<float*>(b), {k, n}, {ldb, 1}, opts);
  auto C = torch::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::addmm_out(C, C, A, B, beta, alpha);
}

struct Scratch {
  std::vector<float> k, v, s, acc, row_max, row_sum;
};

}  // namespace

// q [B,H,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv] fp32 contiguous;
// counts int32 [B,H,nq]; indices int32 [B,H,nq,nk] (first counts[] entries
// are the kept key blocks, ascending). Returns fp32 [B,H,Lq,Dv]; a query row
// with no allowed key is zero.
torch::Tensor block_sparse_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor counts, torch::Tensor indices,
                                   int64_t block_q, int64_t block_k, double scale,
                                   bool causal) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 &&
                  v.scalar_type() == torch::kFloat32, "block_sparse_forward: fp32 inputs expected");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
                  counts.is_contiguous() && indices.is_contiguous(),
              "block_sparse_forward: contiguous inputs expected");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && counts.dim() == 3 &&
                  indices.dim() == 4, "block_sparse_forward: wrong ranks");
  TORCH_CHECK(counts.scalar_type() == torch::kInt32 && indices.scalar_type() == torch::kInt32,
              "block_sparse_forward: int32 block lists expected");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3);
  const int64_t nq = counts.size(2), nk = indices.size(3);
  TORCH_CHECK(block_q > 0 && block_k > 0, "block_sparse_forward: block sizes must be positive");
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(3) == D && v.size(1) == Hkv &&
                  v.size(2) == Lk && Hkv > 0 && H % Hkv == 0,
              "block_sparse_forward: q/k/v shapes do not match");
  TORCH_CHECK(Lq > 0 && Lk > 0, "block_sparse_forward: empty sequences");
  // (L - 1) / block + 1 is ceil(L / block) without the overflow of L + block - 1.
  TORCH_CHECK(counts.size(0) == B && counts.size(1) == H && nq == (Lq - 1) / block_q + 1 &&
                  indices.size(0) == B && indices.size(1) == H && indices.size(2) == nq &&
                  nk == (Lk - 1) / block_k + 1,
              "block_sparse_forward: block lists do not match the shapes of q and k");
  const int64_t group = H / Hkv;
  const int64_t offset = Lk - Lq;  // bottom-right causal alignment
  auto out = torch::zeros({B, H, Lq, Dv}, q.options());

  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int32_t* cp = counts.data_ptr<int32_t>();
  const int32_t* ip = indices.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // A block holds at most min(block, L) rows or keys: buffers are sized by that,
  // so a block size far past the sequence costs nothing.
  const int64_t max_rows = std::min(block_q, Lq);
  const int64_t chunk_keys = std::max<int64_t>(kChunkKeys, std::min(block_k, Lk));

  const int64_t items = B * H * nq;
  const int threads = std::max(1, at::get_num_threads());
  std::vector<Scratch> scratch(threads);
  for (Scratch& ws : scratch) {  // allocated here, where a bad_alloc is an ordinary error
    ws.k.resize(chunk_keys * D);
    ws.v.resize(chunk_keys * Dv);
    ws.s.resize(max_rows * chunk_keys);
    ws.acc.resize(max_rows * Dv);
    ws.row_max.resize(max_rows);
    ws.row_sum.resize(max_rows);
  }
  std::atomic<int64_t> bad_list(-1);  // first item whose block list is out of range
  std::exception_ptr error;           // first exception thrown inside the region

  // One (batch, head, query block): online softmax over its kept key blocks.
  auto attend = [&](int64_t item) {
    // Visit the last query blocks first: under causal masking they hold the
    // most work, and dynamic scheduling balances the rest.
    const int64_t qb = nq - 1 - (item % nq);
    const int64_t bh = item / nq;
    const int64_t b = bh / H, h = bh % H;
    const int64_t hk = h / group;
    Scratch& ws = scratch[omp_get_thread_num()];
    std::fill(ws.acc.begin(), ws.acc.end(), 0.f);
    std::fill(ws.row_max.begin(), ws.row_max.end(), neg_inf);
    std::fill(ws.row_sum.begin(), ws.row_sum.end(), 0.f);

    const int64_t r0 = qb * block_q;
    const int64_t rows = std::min(block_q, Lq - r0);
    const float* qrow = qp + ((b * H + h) * Lq + r0) * D;
    const float* kbase = kp + (b * Hkv + hk) * Lk * D;
    const float* vbase = vp + (b * Hkv + hk) * Lk * Dv;
    const int64_t cnt = cp[(b * H + h) * nq + qb];
    const int32_t* list = ip + ((b * H + h) * nq + qb) * nk;
    bool in_range = cnt >= 0 && cnt <= nk;
    for (int64_t t = 0; in_range && t < cnt; ++t) in_range = list[t] >= 0 && list[t] < nk;
    if (!in_range) {  // BlockMap checks the lists; this guards direct calls
      int64_t none = -1;
      bad_list.compare_exchange_strong(none, item);
      return;
    }

    int64_t j = 0;
    while (j < cnt) {
      // Gather up to chunk_keys keys of kept blocks j..j_end-1.
      int64_t j_end = j, keys = 0;
      bool contiguous = true;
      while (j_end < cnt) {
        const int64_t blk = list[j_end];
        const int64_t n = std::min(block_k, Lk - blk * block_k);
        if (keys + n > chunk_keys) break;
        if (j_end > j && list[j_end] != list[j_end - 1] + 1) contiguous = false;
        keys += n;
        ++j_end;
      }
      const int64_t first_key = static_cast<int64_t>(list[j]) * block_k;
      const float* kc;
      const float* vc;
      if (contiguous) {
        kc = kbase + first_key * D;
        vc = vbase + first_key * Dv;
      } else {
        int64_t filled = 0;
        for (int64_t t = j; t < j_end; ++t) {
          const int64_t start = static_cast<int64_t>(list[t]) * block_k;
          const int64_t n = std::min(block_k, Lk - start);
          std::memcpy(ws.k.data() + filled * D, kbase + start * D, n * D * sizeof(float));
          std::memcpy(ws.v.data() + filled * Dv, vbase + start * Dv, n * Dv * sizeof(float));
          filled += n;
        }
        kc = ws.k.data();
        vc = ws.v.data();
      }
      float* s = ws.s.data();
      gemm_rm(true, rows, keys, D, fscale, qrow, D, kc, D, 0.f, s, keys);

      if (causal) {
        // Mask keys past each query's position, only in blocks that reach it.
        int64_t col = 0;
        for (int64_t t = j; t < j_end; ++t) {
          const int64_t start = static_cast<int64_t>(list[t]) * block_k;
          const int64_t n = std::min(block_k, Lk - start);
          if (start + n - 1 > r0 + offset) {
            for (int64_t i = 0; i < rows; ++i) {
              const int64_t limit = r0 + i + offset;  // last visible key
              for (int64_t c = 0; c < n; ++c) {
                if (start + c > limit) s[i * keys + col + c] = neg_inf;
              }
            }
          }
          col += n;
        }
      }

      for (int64_t i = 0; i < rows; ++i) {
        float* srow = s + i * keys;
        float mx = ws.row_max[i];
        for (int64_t c = 0; c < keys; ++c) mx = std::max(mx, srow[c]);
        if (mx == neg_inf) {  // everything masked so far: nothing to add
          std::fill(srow, srow + keys, 0.f);
          continue;
        }
        const float correction = std::exp(ws.row_max[i] - mx);  // exp(-inf) = 0
        const Vec vmx(mx);
        Vec vsum(0.f);
        int64_t c = 0;
        for (; c + Vec::size() <= keys; c += Vec::size()) {
          Vec e = (Vec::loadu(srow + c) - vmx).exp_u20();
          e.store(srow + c);
          vsum = vsum + e;
        }
        float lanes[Vec::size()];
        vsum.store(lanes);
        float sum = 0.f;
        for (int64_t t = 0; t < Vec::size(); ++t) sum += lanes[t];
        for (; c < keys; ++c) {
          srow[c] = std::exp(srow[c] - mx);
          sum += srow[c];
        }
        ws.row_sum[i] = ws.row_sum[i] * correction + sum;
        ws.row_max[i] = mx;
        if (correction != 1.f) {
          float* arow = ws.acc.data() + i * Dv;
          for (int64_t d = 0; d < Dv; ++d) arow[d] *= correction;
        }
      }
      gemm_rm(false, rows, Dv, keys, 1.f, s, keys, vc, Dv, 1.f, ws.acc.data(), Dv);
      j = j_end;
    }

    float* orow = op + ((b * H + h) * Lq + r0) * Dv;
    for (int64_t i = 0; i < rows; ++i) {
      const float l = ws.row_sum[i];
      if (l > 0.f) {
        const float inv = 1.f / l;
        for (int64_t d = 0; d < Dv; ++d) orow[i * Dv + d] = ws.acc[i * Dv + d] * inv;
      }
    }
  };

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t item = 0; item < items; ++item) {
    try {
      attend(item);
    } catch (...) {
#pragma omp critical(block_sparse_forward_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
  const int64_t bad = bad_list.load();
  TORCH_CHECK(bad < 0, "block_sparse_forward: the block list of (batch, head, query block) (",
              bad / nq / H, ", ", bad / nq % H, ", ", nq - 1 - bad % nq,
              ") has a count outside [0, ", nk, "] or a key block outside [0, ", nk, ")");
  return out;
}

bool has_bundled_blas() { return sgemm_ != nullptr; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_sparse_forward", &block_sparse_forward,
        "Block-sparse attention forward (fp32, CPU)");
  m.def("has_bundled_blas", &has_bundled_blas, "True when MKL's sgemm_ is linked directly");
}
