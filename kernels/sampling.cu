// Sampling on the GPU for vllm-rs: the CUDA side of crates/kernels/src/sample.rs (same
// algorithm, same results up to float summation order). One thread block per row:
//   temperature 0   -> first index of the largest logit
//   otherwise       -> p_i = exp((l_i - max) / T); top-k threshold = largest t with
//                      count(p >= t) >= k; top-p threshold = largest t >= t_k with
//                      mass(p >= t) >= top_p * mass(p >= t_k); both by binary search over
//                      the bit patterns of non-negative floats; then inverse CDF in index order
//                      with the host's uniform draw u.
// p is recomputed from the logits in every pass (no scratch memory).

#include <stdint.h>

constexpr int THREADS = 1024;

__device__ __forceinline__ float block_sum(float v, float* s) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) s[warp] = v;
  __syncthreads();
  float t = 0.f;
  for (int w = 0; w < THREADS / 32; ++w) t += s[w];
  return t;
}

__device__ __forceinline__ float block_max(float v, float* s) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) s[warp] = v;
  __syncthreads();
  float t = -INFINITY;
  for (int w = 0; w < THREADS / 32; ++w) t = fmaxf(t, s[w]);
  return t;
}

// First index of the largest value (NaN never wins).
__device__ int block_argmax(const float* row, int vocab, float* sv, int* si) {
  float best = -INFINITY;
  int idx = 0x7fffffff;
  for (int i = threadIdx.x; i < vocab; i += THREADS) {
    const float v = row[i];
    if (v > best || (v == best && i < idx)) { best = v; idx = i; }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffff, best, o);
    const int oi = __shfl_xor_sync(0xffffffff, idx, o);
    if (ob > best || (ob == best && oi < idx)) { best = ob; idx = oi; }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) { sv[warp] = best; si[warp] = idx; }
  __syncthreads();
  best = -INFINITY; idx = 0x7fffffff;
  for (int w = 0; w < THREADS / 32; ++w)
    if (sv[w] > best || (sv[w] == best && si[w] < idx)) { best = sv[w]; idx = si[w]; }
  return idx == 0x7fffffff ? 0 : idx;
}

extern "C" __global__ void __launch_bounds__(THREADS)
    sample_rows(uint32_t* out, const float* __restrict__ logits, const float* __restrict__ temperature,
                const uint32_t* __restrict__ top_k, const float* __restrict__ top_p,
                const float* __restrict__ uniform, int vocab) {
  __shared__ float sv[THREADS / 32];
  __shared__ int si[THREADS / 32];
  const int64_t r = blockIdx.x;
  const float* row = logits + r * vocab;
  const float temp = temperature[r];
  if (temp <= 0.f) {
    const int i = block_argmax(row, vocab, sv, si);
    if (threadIdx.x == 0) out[r] = i;
    return;
  }
  float m = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += THREADS) m = fmaxf(m, row[i]);
  m = block_max(m, sv);
  if (!isfinite(m)) {
    const int i = block_argmax(row, vocab, sv, si);
    if (threadIdx.x == 0) out[r] = i;
    return;
  }
  const float inv_t = 1.f / temp;
  auto prob = [&](int i) { return __expf((row[i] - m) * inv_t); };
  auto count_at_least = [&](float t) {
    float c = 0.f;
    for (int i = threadIdx.x; i < vocab; i += THREADS) c += prob(i) >= t ? 1.f : 0.f;
    return block_sum(c, sv);
  };
  auto mass_at_least = [&](float t) {
    float c = 0.f;
    for (int i = threadIdx.x; i < vocab; i += THREADS) { const float q = prob(i); c += q >= t ? q : 0.f; }
    return block_sum(c, sv);
  };
  float t_k = 0.f;
  const uint32_t k = top_k[r];
  if (k > 0 && k < (uint32_t)vocab) {
    uint32_t lo = 0, hi = __float_as_uint(1.f) + 1;
    while (hi - lo > 1) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if (count_at_least(__uint_as_float(mid)) >= (float)k) lo = mid; else hi = mid;
    }
    t_k = __uint_as_float(lo);
  }
  float t = t_k;
  const float tp = top_p[r];
  if (tp < 1.f) {
    const float target = tp * mass_at_least(t_k);
    uint32_t lo = 0, hi = __float_as_uint(1.f) + 1;
    while (hi - lo > 1) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if (mass_at_least(fmaxf(__uint_as_float(mid), t_k)) >= target) lo = mid; else hi = mid;
    }
    t = fmaxf(__uint_as_float(lo), t_k);
  }
  const float target = uniform[r] * mass_at_least(t);
  // Inverse CDF in index order, one chunk of THREADS tokens at a time.
  __shared__ float run;
  __shared__ int found, last;
  if (threadIdx.x == 0) { run = 0.f; found = -1; last = -1; }
  __syncthreads();
  for (int base = 0; base < vocab; base += THREADS) {
    const int i = base + threadIdx.x;
    float q = 0.f;
    if (i < vocab) { q = prob(i); if (!(q >= t && q > 0.f)) q = 0.f; }
    const float chunk = block_sum(q, sv);
    if (threadIdx.x == 0) {
      if (run + chunk > target) {
        // The token is in this chunk: walk it in order.
        float acc = run;
        for (int j = base; j < min(base + THREADS, vocab); ++j) {
          float pj = prob(j);
          if (!(pj >= t && pj > 0.f)) continue;
          acc += pj;
          last = j;
          if (acc > target) { found = j; break; }
        }
      } else if (chunk > 0.f) {
        for (int j = min(base + THREADS, vocab) - 1; j >= base; --j) {
          const float pj = prob(j);
          if (pj >= t && pj > 0.f) { last = j; break; }
        }
      }
      run += chunk;
    }
    __syncthreads();
    if (found >= 0) break;
  }
  if (threadIdx.x == 0) out[r] = found >= 0 ? found : (last >= 0 ? last : 0);
}
