// pagedkv's device kernels. Build (on a machine with nvcc 12 or later, for cuda_fp8.h; see
// scripts/gen-kernels):
//   nvcc -ptx   -arch=compute_80 kernels.cu      (fallback for any GPU, JIT-compiled at load)
//   nvcc -cubin -arch=sm_80      kernels.cu      (A100 and other 8.x GPUs)
//   nvcc -cubin -arch=sm_90      kernels.cu      (H100)
// The Go launchers are in kernels.go; keep the parameter lists in step.
//
// Arena layout (kvcache.Config): block b of layer l, K (kv=0) or V (kv=1), is at
//   base + b*block_stride + (2*l + kv)*block_bytes,
// NHD within the block: [block_tokens, kv_heads, head_dim]. A block's whole data is
// block_stride contiguous bytes. Element formats (kernels.Format): 0 fp16, 1 fp8 e4m3fn,
// 2 fp8 e5m2. On sm_80 the cuda_fp8.h conversions are emulated in software; from sm_89 they are
// cvt instructions with the same results for finite inputs.
#include <cuda_fp16.h>
#include <cuda_fp8.h>
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
// (kvcache.Manager.LayerBase). A null v_base writes K only (MLA's latent rows); value is then
// not read. A negative slot (padding) is skipped, and so is a slot at or past max_slot (the
// arena's blocks times block_tokens: a runtime's bad slot never writes outside the arena). One
// CTA per token; token_bytes is a multiple of 16, and the bases and block_stride are 16-byte
// aligned.
extern "C" __global__ void write_kv(char *k_base, char *v_base, const char *key, const char *value,
                                    const int64_t *slot_mapping, int64_t token_bytes,
                                    int32_t block_tokens, int64_t block_stride, int64_t max_slot) {
    const int64_t t = blockIdx.x;
    const int64_t slot = slot_mapping[t];
    if (slot < 0 || slot >= max_slot) {
        return;
    }
    const int64_t block = slot / block_tokens;
    const int64_t off = block * block_stride + (slot % block_tokens) * token_bytes;
    const uint4 *ks = reinterpret_cast<const uint4 *>(key + t * token_bytes);
    uint4 *kd = reinterpret_cast<uint4 *>(k_base + off);
    for (int64_t i = threadIdx.x; i < token_bytes / 16; i += blockDim.x) {
        kd[i] = ks[i];
    }
    if (v_base == nullptr) {
        return;
    }
    const uint4 *vs = reinterpret_cast<const uint4 *>(value + t * token_bytes);
    uint4 *vd = reinterpret_cast<uint4 *>(v_base + off);
    for (int64_t i = threadIdx.x; i < token_bytes / 16; i += blockDim.x) {
        vd[i] = vs[i];
    }
}

// fp8_of converts one fp16 element (its bits in the low half of h) to fp8 of x/scale: a float
// division, then round to nearest even with saturation to the largest finite value, as vLLM's
// scaled_convert does. NaN becomes NaN.
__device__ __forceinline__ uint32_t fp8_of(uint32_t h, float scale, __nv_fp8_interpretation_t kind) {
    __half_raw r;
    r.x = (unsigned short)(h & 0xffffu);
    return __nv_cvt_float_to_fp8(__half2float(__half(r)) / scale, __NV_SATFINITE, kind);
}

// store_fp8_row converts one row of fp16 (vecs 16-byte vectors at src) to fp8 at dst, 8 bytes
// per vector. Little-endian: element 2j of a word is its low half and lands in the lower byte.
__device__ __forceinline__ void store_fp8_row(char *dst, const char *src, int64_t vecs, float scale,
                                              __nv_fp8_interpretation_t kind) {
    const uint4 *s = reinterpret_cast<const uint4 *>(src);
    uint2 *d = reinterpret_cast<uint2 *>(dst);
    for (int64_t i = threadIdx.x; i < vecs; i += blockDim.x) {
        const uint4 in = s[i];
        const uint32_t w[4] = {in.x, in.y, in.z, in.w};
        uint32_t o[2] = {0u, 0u};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const uint32_t pair = fp8_of(w[j], scale, kind) | fp8_of(w[j] >> 16, scale, kind) << 8;
            o[j / 2] |= pair << (16 * (j % 2));
        }
        d[i] = make_uint2(o[0], o[1]);
    }
}

// write_kv_fp8 is write_kv into an fp8 cache: each fp16 element x of a K row is stored as
// fp8(x / k_scale), of a V row as fp8(x / v_scale) (vLLM's reshape_and_cache_flash with
// kv_cache_dtype fp8). in_bytes is an input row (a multiple of 16); a row takes in_bytes/2 in
// the cache, so the bases and block_stride are 8-byte aligned. format is 1 (e4m3fn) or 2 (e5m2).
// A null v_base writes K only. A non-null k_scale_at (v_scale_at) is where the scale is in
// device memory, read when the kernel runs (vLLM passes k_scale and v_scale as tensors); it
// replaces k_scale (v_scale). Slots are skipped as in write_kv. One CTA per token.
extern "C" __global__ void write_kv_fp8(char *k_base, char *v_base, const char *key, const char *value,
                                        const int64_t *slot_mapping, int64_t in_bytes,
                                        int32_t block_tokens, int64_t block_stride, int32_t format,
                                        float k_scale, float v_scale, const float *k_scale_at,
                                        const float *v_scale_at, int64_t max_slot) {
    if (k_scale_at != nullptr) k_scale = *k_scale_at;
    if (v_scale_at != nullptr) v_scale = *v_scale_at;
    const int64_t t = blockIdx.x;
    const int64_t slot = slot_mapping[t];
    if (slot < 0 || slot >= max_slot) {
        return;
    }
    const __nv_fp8_interpretation_t kind = format == 1 ? __NV_E4M3 : __NV_E5M2;
    const int64_t row = in_bytes / 2;
    const int64_t off = (slot / block_tokens) * block_stride + (slot % block_tokens) * row;
    store_fp8_row(k_base + off, key + t * in_bytes, in_bytes / 16, k_scale, kind);
    if (v_base != nullptr) {
        store_fp8_row(v_base + off, value + t * in_bytes, in_bytes / 16, v_scale, kind);
    }
}

// kv_elem reads element d of a K or V row as float: fp16, or fp8 (format 1 e4m3fn, 2 e5m2)
// converted exactly; an fp8 scale is applied by the caller.
__device__ __forceinline__ float kv_elem(const char *row, int d, int32_t format) {
    if (format == 0) {
        return __half2float(reinterpret_cast<const __half *>(row)[d]);
    }
    const __nv_fp8_storage_t x = reinterpret_cast<const __nv_fp8_storage_t *>(row)[d];
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(x, format == 1 ? __NV_E4M3 : __NV_E5M2)));
}

// kv_row returns the row of KV head kvh of the token at position t, read through the table.
__device__ __forceinline__ const char *kv_row(const char *base, const int32_t *table, int t,
                                              int32_t block_tokens, int64_t block_stride,
                                              int32_t kv_heads, int kvh, int32_t head_dim, int esize) {
    const int64_t blk = table[t / block_tokens];
    return base + blk * block_stride + ((int64_t)(t % block_tokens) * kv_heads + kvh) * head_dim * esize;
}

// paged_attention_decode is a reference decode attention that reads K and V only through a
// vLLM block table: for each sequence s and query head h, out[s,h,:] = softmax(scale * q.K^T) V
// over the attended tokens of the sequence's seq_lens[s] = L, fp16 Q, fp32 accumulation and fp32
// output. Grouped-query attention: query head h reads KV head h / (num_heads / kv_heads).
//
// Masks: window > 0 attends positions >= L-window, and sinks > 0 positions < sinks as well;
// chunk > 0 attends positions >= floor((L-1)/chunk)*chunk (the launcher never sets both). The
// attended positions are the sinks [0, ns) then the tail [lo, L): attended index j is position
// j below ns and lo+j-ns from there on.
//
// Formats: K and V elements are fp16 or fp8 (format as in write_kv_fp8). The launcher folds the K
// scale into scale; v_scale multiplies the output (1 in fp16). Scales in device memory: a non-null
// k_scale_at multiplies scale by the fp32 there, a non-null v_scale_at replaces v_scale. V has
// v_dim elements per row (the first v_dim of its head_dim), so MLA's absorbed form is v_base ==
// k_base, kv_heads 1, v_dim the latent dim; out is [num_seqs, num_heads, v_dim].
//
// Bad tables: a sequence whose length is past its table row (max_blocks *
// block_tokens), or one of whose attended table entries is negative or at or past num_blocks
// (the arena's blocks), reads nothing through its table: its outputs are NaN (the Go
// implementation refuses such a launch instead; a kernel has no error to return).
//
// Grid: (num_seqs, num_heads); blockDim.x >= head_dim, a power of two up to 1024 (the launch
// bound keeps a 1024-thread CTA within the register file); dynamic shared memory
// (head_dim + 2*blockDim.x) floats. It streams over the attended tokens a CTA-width at a time
// with an online softmax, so any length works. Clarity over speed: it is for tests and the
// example.
extern "C" __global__ void __launch_bounds__(1024) paged_attention_decode(
    float *out, const __half *q, const char *k_base, const char *v_base,
    const int32_t *block_tables, const int32_t *seq_lens, int32_t max_blocks,
    int32_t num_heads, int32_t kv_heads, int32_t head_dim, int32_t block_tokens,
    int64_t block_stride, float scale, int32_t v_dim, int32_t window, int32_t sinks,
    int32_t chunk, int32_t format, float v_scale, const float *k_scale_at, const float *v_scale_at,
    int64_t num_blocks) {
    if (k_scale_at != nullptr) scale *= *k_scale_at;
    if (v_scale_at != nullptr) v_scale = *v_scale_at;
    extern __shared__ float sh[];
    float *qs = sh;
    float *p = sh + head_dim;
    float *red = p + blockDim.x;
    const int seq = blockIdx.x, head = blockIdx.y, tid = threadIdx.x;
    const int kvh = head / (num_heads / kv_heads);
    const int esize = format == 0 ? 2 : 1;
    const int len = seq_lens[seq];
    int lo = 0;
    if (window > 0 && len > window) lo = len - window;
    if (chunk > 0 && len > 0) lo = (len - 1) / chunk * chunk;
    const int ns = sinks < lo ? sinks : lo;
    const int n = len > 0 ? ns + len - lo : 0;
    const int32_t *table = block_tables + (int64_t)seq * max_blocks;
    // The attended entries are those of blocks [0, ceil(ns/bt)) and [lo/bt, ceil(len/bt)).
    bool bad = (int64_t)len > (int64_t)max_blocks * block_tokens; // a negative length is empty
    if (!bad) {
        const int64_t sink_end = ((int64_t)ns + block_tokens - 1) / block_tokens;
        const int64_t tail_lo = lo / block_tokens, tail_end = ((int64_t)len + block_tokens - 1) / block_tokens;
        const int64_t count = sink_end + (len > 0 ? tail_end - tail_lo : 0);
        for (int64_t i = tid; i < count; i += blockDim.x) {
            const int64_t b = i < sink_end ? i : tail_lo + i - sink_end;
            const int64_t id = table[b];
            bad = bad || id < 0 || id >= num_blocks;
        }
    }
    if (__syncthreads_or(bad)) {
        for (int d = tid; d < v_dim; d += blockDim.x) {
            out[((int64_t)seq * num_heads + head) * v_dim + d] = __int_as_float(0x7fc00000); // NaN
        }
        return;
    }
    for (int d = tid; d < head_dim; d += blockDim.x) {
        qs[d] = __half2float(q[((int64_t)seq * num_heads + head) * head_dim + d]);
    }
    __syncthreads();
    float m = -INFINITY, l = 0.f, acc = 0.f;
    for (int j0 = 0; j0 < n; j0 += blockDim.x) {
        const int j = j0 + tid;
        float s = -INFINITY;
        if (j < n) {
            const int t = j < ns ? j : lo + j - ns;
            const char *k = kv_row(k_base, table, t, block_tokens, block_stride, kv_heads, kvh, head_dim, esize);
            float dot = 0.f;
            for (int d = 0; d < head_dim; d++) {
                dot += qs[d] * kv_elem(k, d, format);
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
        const float pt = j < n ? __expf(s - m_new) : 0.f;
        p[tid] = pt;
        red[tid] = pt;
        __syncthreads();
        for (int w = blockDim.x / 2; w > 0; w /= 2) {
            if (tid < w) red[tid] += red[tid + w];
            __syncthreads();
        }
        const float alpha = m == -INFINITY ? 0.f : __expf(m - m_new);
        l = l * alpha + red[0];
        if (tid < v_dim) {
            acc *= alpha;
            const int cnt = n - j0 < (int)blockDim.x ? n - j0 : blockDim.x;
            for (int i = 0; i < cnt; i++) {
                const int ji = j0 + i;
                const int t = ji < ns ? ji : lo + ji - ns;
                const char *v = kv_row(v_base, table, t, block_tokens, block_stride, kv_heads, kvh, head_dim, esize);
                acc += p[i] * kv_elem(v, tid, format);
            }
        }
        m = m_new;
        __syncthreads();
    }
    if (tid < v_dim) {
        out[((int64_t)seq * num_heads + head) * v_dim + tid] = n > 0 ? acc / l * v_scale : 0.f;
    }
}
