// Paged KV cache kernels for vllm-rs (CUDA), the GPU side of crates/kernels/src/cpu.rs.
//
// Cache layouts are the CPU ones, so one KvCache type serves both devices:
//   key   [num_blocks, num_kv_heads, head_dim, block_size]  (each block transposed: the keys of
//         one dimension are contiguous, so lanes reading consecutive tokens coalesce)
//   value [num_blocks, block_size, num_kv_heads, head_dim]
// Element types: float, __half, __nv_bfloat16 (queries, keys, values and output alike);
// arithmetic in float.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// reshape_and_cache, one launch per cache: token i's keys or values go to slot
// slot_mapping[i] (block = slot / block_size, offset = slot % block_size); negative slots
// (padding) are skipped. grid: num_tokens; block: any size, striding over kv_heads * head_dim.
template <typename T>
__device__ void cache_keys(const T* __restrict__ src, T* __restrict__ key_cache,
                           const int64_t* __restrict__ slot_mapping, int num_kv_heads,
                           int head_dim, int block_size) {
  const int i = blockIdx.x;
  const int64_t slot = slot_mapping[i];
  if (slot < 0) return;
  const int64_t block = slot / block_size, off = slot % block_size;
  const int width = num_kv_heads * head_dim;
  for (int j = threadIdx.x; j < width; j += blockDim.x) {
    const int h = j / head_dim, d = j % head_dim;
    key_cache[((block * num_kv_heads + h) * head_dim + d) * block_size + off] = src[(int64_t)i * width + j];
  }
}

// Values: [num_blocks, block_size, kv_heads, head_dim] is slot-major, so slot s's row starts at
// s * width (block_size is not needed).
template <typename T>
__device__ void cache_values(const T* __restrict__ src, T* __restrict__ value_cache,
                             const int64_t* __restrict__ slot_mapping, int num_kv_heads,
                             int head_dim) {
  const int i = blockIdx.x;
  const int64_t slot = slot_mapping[i];
  if (slot < 0) return;
  const int width = num_kv_heads * head_dim;
  for (int j = threadIdx.x; j < width; j += blockDim.x)
    value_cache[slot * width + j] = src[(int64_t)i * width + j];
}

constexpr int WARPS = 4;

// Attention over the paged cache for every query row of a step (prefill and decode rows
// alike; flash-decoding within a thread block): grid (num_heads, num_rows), WARPS warps. Row
// r belongs to sequence row_seq[r] and sees its first row_ctx[r] tokens (causal: a prompt
// token at position p sees p + 1). Each warp takes tiles of 32 context
// tokens in turn: lane j scores token j (keys read coalesced across lanes), the warp updates
// its running max / sum / accumulator (ceil(HEAD_DIM / 32) dimensions per lane: lane j owns
// dimensions j, j + 32, ...) online; the warps'
// partial results are merged through shared memory at the end.
//   q        [num_rows, num_heads, HEAD_DIM]; out like q
//   block_tables [num_seqs, max_blocks] int32; row_seq, row_ctx [num_rows] int32
//   window   > 0: only the last `window` tokens are seen; softcap > 0: cap * tanh(s / cap)
template <typename T, int HEAD_DIM>
__device__ void paged_attention(T* __restrict__ out, const T* __restrict__ q,
                                       const T* __restrict__ key_cache,
                                       const T* __restrict__ value_cache,
                                       const int32_t* __restrict__ block_tables,
                                       const int32_t* __restrict__ row_seq,
                                       const int32_t* __restrict__ row_ctx, int max_blocks,
                                       int num_heads, int num_kv_heads, int block_size,
                                       float scale, int window, float softcap) {
  constexpr int PER_LANE = (HEAD_DIM + 31) / 32;
  const int head = blockIdx.x;
  const int64_t row = blockIdx.y;
  const int seq = row_seq[row];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kv_head = head / (num_heads / num_kv_heads);
  const int ctx = row_ctx[row];
  const int start = window > 0 && ctx > window ? ctx - window : 0;

  __shared__ float q_s[HEAD_DIM];
  for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x)
    q_s[d] = to_f(q[(row * num_heads + head) * HEAD_DIM + d]) * scale;
  __syncthreads();

  const int32_t* table = block_tables + (int64_t)seq * max_blocks;
  float m = -INFINITY, l = 0.f, acc[PER_LANE];
#pragma unroll
  for (int r = 0; r < PER_LANE; ++r) acc[r] = 0.f;

  for (int tile = start + warp * 32; tile < ctx; tile += WARPS * 32) {
    const int t = tile + lane;
    float s = -INFINITY;
    if (t < ctx) {
      const int64_t block = table[t / block_size];
      const int off = t % block_size;
      const T* k = key_cache + (block * num_kv_heads + kv_head) * HEAD_DIM * block_size + off;
      float dot = 0.f;
#pragma unroll 8
      for (int d = 0; d < HEAD_DIM; ++d) dot += q_s[d] * to_f(k[d * block_size]);
      s = softcap > 0.f ? softcap * tanhf(dot / softcap) : dot;
    }
    float tile_max = s;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, o));
    const float m_new = fmaxf(m, tile_max);
    const float p = t < ctx ? __expf(s - m_new) : 0.f;
    float p_sum = p;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) p_sum += __shfl_xor_sync(0xffffffff, p_sum, o);
    const float correction = m == -INFINITY ? 0.f : __expf(m - m_new);
    l = l * correction + p_sum;
#pragma unroll
    for (int r = 0; r < PER_LANE; ++r) acc[r] *= correction;
    // Values: every lane walks the tile's tokens, owning HEAD_DIM / 32 dimensions.
    const int n = min(32, ctx - tile);
    for (int j = 0; j < n; ++j) {
      const float pj = __shfl_sync(0xffffffff, p, j);
      const int tj = tile + j;
      const int64_t block = table[tj / block_size];
      const T* v = value_cache + ((block * block_size + tj % block_size) * num_kv_heads + kv_head) * HEAD_DIM;
#pragma unroll
      for (int r = 0; r < PER_LANE; ++r)
        if (HEAD_DIM % 32 == 0 || lane + 32 * r < HEAD_DIM) acc[r] += pj * to_f(v[lane + 32 * r]);
    }
    m = m_new;
  }

  // Merge the warps: rescale each to the common max.
  __shared__ float m_s[WARPS], l_s[WARPS], acc_s[WARPS][HEAD_DIM];
  if (lane == 0) { m_s[warp] = m; l_s[warp] = l; }
#pragma unroll
  for (int r = 0; r < PER_LANE; ++r)
    if (HEAD_DIM % 32 == 0 || lane + 32 * r < HEAD_DIM) acc_s[warp][lane + 32 * r] = acc[r];
  __syncthreads();
  float m_all = -INFINITY;
  for (int w = 0; w < WARPS; ++w) m_all = fmaxf(m_all, m_s[w]);
  float l_all = 0.f;
  for (int w = 0; w < WARPS; ++w) l_all += m_s[w] == -INFINITY ? 0.f : l_s[w] * __expf(m_s[w] - m_all);
  for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
    float o = 0.f;
    for (int w = 0; w < WARPS; ++w)
      if (m_s[w] != -INFINITY) o += acc_s[w][d] * __expf(m_s[w] - m_all);
    out[(row * num_heads + head) * HEAD_DIM + d] = from_f<T>(l_all > 0.f ? o / l_all : 0.f);
  }
}

#define CACHE_KERNELS(SUFFIX, T)                                                              \
  extern "C" __global__ void cache_keys_##SUFFIX(const T* src, T* cache, const int64_t* slots,  \
                                                 int num_kv_heads, int head_dim,                \
                                                 int block_size) {                              \
    cache_keys<T>(src, cache, slots, num_kv_heads, head_dim, block_size);                       \
  }                                                                                             \
  extern "C" __global__ void cache_values_##SUFFIX(const T* src, T* cache,                      \
                                                   const int64_t* slots, int num_kv_heads,      \
                                                   int head_dim, int block_size) {              \
    cache_values<T>(src, cache, slots, num_kv_heads, head_dim);                                 \
  }
CACHE_KERNELS(f32, float)
CACHE_KERNELS(f16, __half)
CACHE_KERNELS(bf16, __nv_bfloat16)

#define ATTENTION_KERNEL(NAME, T, D)                                                              \
  extern "C" __global__ void __launch_bounds__(WARPS * 32)                                     \
      NAME(T* out, const T* q, const T* key_cache, const T* value_cache,                      \
           const int32_t* block_tables, const int32_t* row_seq, const int32_t* row_ctx,        \
           int max_blocks,                                                                     \
           int num_heads, int num_kv_heads, int block_size, float scale, int window,           \
           float softcap) {                                                                    \
    paged_attention<T, D>(out, q, key_cache, value_cache, block_tables, row_seq, row_ctx,    \
                                 max_blocks, num_heads, num_kv_heads,                          \
                                 block_size, scale, window, softcap);                          \
  }
#define ATTENTION_HEAD_SIZES(SUFFIX, T)                                                         \
  ATTENTION_KERNEL(paged_attention_##SUFFIX##_16, T, 16)                                         \
  ATTENTION_KERNEL(paged_attention_##SUFFIX##_32, T, 32)                                         \
  ATTENTION_KERNEL(paged_attention_##SUFFIX##_64, T, 64)                                         \
  ATTENTION_KERNEL(paged_attention_##SUFFIX##_80, T, 80)                                         \
  ATTENTION_KERNEL(paged_attention_##SUFFIX##_96, T, 96)                                         \
  ATTENTION_KERNEL(paged_attention_##SUFFIX##_128, T, 128)                                       \
  ATTENTION_KERNEL(paged_attention_##SUFFIX##_256, T, 256)
// The head sizes of crates/kernels/src/lib.rs's CUDA_HEAD_SIZES.
ATTENTION_HEAD_SIZES(f32, float)
ATTENTION_HEAD_SIZES(f16, __half)
ATTENTION_HEAD_SIZES(bf16, __nv_bfloat16)

// copy_blocks (copy-on-write of shared blocks for parallel sampling and beam search): pair p
// copies block pairs[2p] to block pairs[2p + 1] in one cache (launched for the key and the
// value cache; both hold block_len elements per block). grid: num_pairs; the pairs of one
// launch never chain (the caller splits chains into ordered launches).
template <typename T>
__device__ void copy_blocks(T* __restrict__ cache, const int64_t* __restrict__ pairs, int64_t block_len) {
  const int64_t src = pairs[2 * blockIdx.x] * block_len, dst = pairs[2 * blockIdx.x + 1] * block_len;
  for (int64_t j = threadIdx.x; j < block_len; j += blockDim.x) cache[dst + j] = cache[src + j];
}
#define COPY_KERNEL(SUFFIX, T)                                                                   \
  extern "C" __global__ void copy_blocks_##SUFFIX(T* cache, const int64_t* pairs, int64_t block_len) { \
    copy_blocks<T>(cache, pairs, block_len);                                                     \
  }
COPY_KERNEL(f32, float)
COPY_KERNEL(f16, __half)
COPY_KERNEL(bf16, __nv_bfloat16)
