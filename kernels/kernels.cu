// pagedkv's device kernels. Build (on a machine with nvcc; see scripts/gen-kernels):
//   nvcc -ptx   -arch=compute_80 kernels.cu      (fallback for any GPU, JIT-compiled at load)
//   nvcc -cubin -arch=sm_80      kernels.cu      (A100 and other 8.x GPUs)
//   nvcc -cubin -arch=sm_90      kernels.cu      (H100)
// The Go launchers are in kernels.go; keep the parameter lists in step.
//
// Arena layout (kvcache.Config): block b of layer l, K (kv=0) or V (kv=1), is at
//   base + b*block_stride + (2*l + kv)*block_bytes,
// NHD within the block: [block_tokens, kv_heads, head_dim]. A block's whole data is
// block_stride contiguous bytes.
#include <cuda_fp16.h>
#include <stdint.h>

// copy_blocks copies n_pairs blocks of block_stride bytes: block mapping[2i] to block
// mapping[2i+1], every layer's K and V at once since a block is contiguous. Grid: (n_pairs,
// chunks); each CTA copies a chunk of one block with 16-byte loads. block_stride is a multiple
// of 16 and base is 16-byte aligned (the arena is page aligned). Pairs must not overlap in
// destination or read a destination of another pair. Each thread issues four independent 16-byte
// loads before its stores, so small batches keep enough bytes in flight.
extern "C" __global__ void copy_blocks(char *base, const int64_t *mapping, int64_t block_stride) {
    const int64_t src = mapping[2 * blockIdx.x];
    const int64_t dst = mapping[2 * blockIdx.x + 1];
    const uint4 *s = reinterpret_cast<const uint4 *>(base + src * block_stride);
    uint4 *d = reinterpret_cast<uint4 *>(base + dst * block_stride);
    const int64_t n = block_stride / 16;
    const int64_t chunk = (n + gridDim.y - 1) / gridDim.y;
    const int64_t begin = blockIdx.y * chunk;
    const int64_t end = begin + chunk < n ? begin + chunk : n;
    for (int64_t i = begin + threadIdx.x; i < end; i += 4 * (int64_t)blockDim.x) {
        uint4 r[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int64_t j = i + u * (int64_t)blockDim.x;
            if (j < end) r[u] = s[j];
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int64_t j = i + u * (int64_t)blockDim.x;
            if (j < end) d[j] = r[u];
        }
    }
}

// write_kv stores each new token's K and V (token_bytes each, one layer) at its slot:
// slot = block*block_tokens + offset, as vLLM's reshape_and_cache does. key and value are
// [num_tokens, token_bytes] contiguous; k_base and v_base are the layer's K and V bases
// (kvcache.Manager.LayerBase). A negative slot (padding) is skipped. One CTA per token;
// token_bytes is a multiple of 16.
extern "C" __global__ void write_kv(char *k_base, char *v_base, const char *key, const char *value,
                                    const int64_t *slot_mapping, int64_t token_bytes,
                                    int32_t block_tokens, int64_t block_stride) {
    const int64_t t = blockIdx.x;
    const int64_t slot = slot_mapping[t];
    if (slot < 0) {
        return;
    }
    const int64_t block = slot / block_tokens;
    const int64_t off = block * block_stride + (slot % block_tokens) * token_bytes;
    const uint4 *ks = reinterpret_cast<const uint4 *>(key + t * token_bytes);
    const uint4 *vs = reinterpret_cast<const uint4 *>(value + t * token_bytes);
    uint4 *kd = reinterpret_cast<uint4 *>(k_base + off);
    uint4 *vd = reinterpret_cast<uint4 *>(v_base + off);
    for (int64_t i = threadIdx.x; i < token_bytes / 16; i += blockDim.x) {
        kd[i] = ks[i];
        vd[i] = vs[i];
    }
}

// paged_attention_decode is a reference decode attention that reads K and V only through a
// vLLM block table: for each sequence s and query head h, out[s,h,:] = softmax(scale * q.K^T) V
// over the sequence's seq_lens[s] tokens, fp16 inputs, fp32 accumulation and fp32 output.
// Grouped-query attention: query head h reads KV head h / (num_heads / kv_heads).
// Grid: (num_seqs, num_heads); blockDim.x >= head_dim, a multiple of 32; dynamic shared memory
// (head_dim + 2*blockDim.x) floats. It streams over the tokens a CTA-width at a time with an
// online softmax, so any length works. Clarity over speed: it is for tests and the example.
extern "C" __global__ void paged_attention_decode(
    float *out, const __half *q, const char *k_base, const char *v_base,
    const int32_t *block_tables, const int32_t *seq_lens, int32_t max_blocks,
    int32_t num_heads, int32_t kv_heads, int32_t head_dim, int32_t block_tokens,
    int64_t block_stride, float scale) {
    extern __shared__ float sh[];
    float *qs = sh;
    float *p = sh + head_dim;
    float *red = p + blockDim.x;
    const int seq = blockIdx.x, head = blockIdx.y, tid = threadIdx.x;
    const int kvh = head / (num_heads / kv_heads);
    const int len = seq_lens[seq];
    const int32_t *table = block_tables + (int64_t)seq * max_blocks;
    for (int d = tid; d < head_dim; d += blockDim.x) {
        qs[d] = __half2float(q[((int64_t)seq * num_heads + head) * head_dim + d]);
    }
    __syncthreads();
    float m = -INFINITY, l = 0.f, acc = 0.f;
    for (int t0 = 0; t0 < len; t0 += blockDim.x) {
        const int t = t0 + tid;
        float s = -INFINITY;
        if (t < len) {
            const int64_t blk = table[t / block_tokens];
            const __half *k = reinterpret_cast<const __half *>(k_base + blk * block_stride) +
                              ((int64_t)(t % block_tokens) * kv_heads + kvh) * head_dim;
            float dot = 0.f;
            for (int d = 0; d < head_dim; d++) {
                dot += qs[d] * __half2float(k[d]);
            }
            s = dot * scale;
        }
        red[tid] = s;
        __syncthreads();
        for (int w = blockDim.x / 2; w > 0; w /= 2) {
            if (tid < w) red[tid] = fmaxf(red[tid], red[tid + w]);
            __syncthreads();
        }
        const float m_new = fmaxf(m, red[0]);
        __syncthreads();
        const float pt = t < len ? __expf(s - m_new) : 0.f;
        p[tid] = pt;
        red[tid] = pt;
        __syncthreads();
        for (int w = blockDim.x / 2; w > 0; w /= 2) {
            if (tid < w) red[tid] += red[tid + w];
            __syncthreads();
        }
        const float alpha = m == -INFINITY ? 0.f : __expf(m - m_new);
        l = l * alpha + red[0];
        if (tid < head_dim) {
            acc *= alpha;
            const int n = len - t0 < (int)blockDim.x ? len - t0 : blockDim.x;
            for (int j = 0; j < n; j++) {
                const int tj = t0 + j;
                const int64_t blk = table[tj / block_tokens];
                const __half *v = reinterpret_cast<const __half *>(v_base + blk * block_stride) +
                                  ((int64_t)(tj % block_tokens) * kv_heads + kvh) * head_dim;
                acc += p[j] * __half2float(v[tid]);
            }
        }
        m = m_new;
        __syncthreads();
    }
    if (tid < head_dim) {
        out[((int64_t)seq * num_heads + head) * head_dim + tid] = len > 0 ? acc / l : 0.f;
    }
}
