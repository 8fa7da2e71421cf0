// Package kernels runs pagedkv's three device operations on any vmm.Device:
//
//   - CopyBlocks migrates N (src, dst) block pairs, every layer's K and V at once, in ONE launch
//     (the compaction and copy-on-write primitive; vLLM's copy_blocks over a [N,2] mapping).
//   - Write scatters new tokens' rows of one layer into their slots by slot_mapping (what a
//     runtime's reshape_and_cache_flash does). A KVWrite says what is written: K and V, or K
//     alone (MLA's latent rows: Value and VBase 0), in fp16 as given or in fp8 (Format FP8E4M3
//     or FP8E5M2) as fp8(x/scale) with the caller's per-layer KScale and VScale. WriteKV is the
//     fp16 K and V write with positional arguments.
//   - PagedAttention is a reference decode attention that reads K and V only through a vLLM
//     block table, for tests and the examples. Its Attention describes the hybrid models' layers
//     too: a sliding window (gpt-oss, Gemma 3) with optional sink tokens, chunked attention
//     (Llama 4), fp8 K and V dequantised by their scales, and MLA's absorbed form over one
//     latent row per token (DeepSeek). The zero value of those fields is full attention over
//     fp16 K and V.
//
// The fp8 conversions are exported (E4M3FromFloat32, E5M2FromFloat32 and their inverses) and
// give CUDA's __nv_cvt_float_to_fp8 results with __NV_SATFINITE bit for bit: round to nearest
// even, saturation to the largest finite value, NaN as 0x7f.
//
// On a CUDA device they are the kernels of kernels.cu, embedded as cubins for sm_80 and sm_90
// and as PTX for any other GPU (gen/, made by scripts/gen-kernels; a test fails when they are
// stale). The module is loaded once per context and shared by every Kernels of that context.
// On any other device (the host backend, or a wrapped device such as vmm.FaultDevice) the same
// operations run in Go through the Device interface, with identical semantics. Every argument
// is validated before anything is read or launched; an invalid one is ErrInvalidArgument with
// the numbers, and the device is not touched.
//
// What lies in device memory (slots, table entries, lengths) a kernel reads only when it runs.
// Given the arena's size (KVWrite.Blocks, Attention.Blocks: kvcache.Layout.Blocks), a bad slot
// or table entry never reaches memory outside the arena: write_kv skips the slot, and the
// attention gives the sequence NaN outputs. The Go implementation refuses such a call before it
// writes anything. CopyBlocksDevice's pairs are not checked on the device.
//
// Streams: launches go on the caller's Stream (a CUstream; 0 is the legacy default stream) and
// return once queued; Synchronize waits. The Go implementation is synchronous and ignores
// streams. Concurrency: a Kernels may be shared, but CopyBlocks stages its pairs in a scratch
// buffer of the Kernels, so concurrent CopyBlocks calls on different streams need different
// Kernels (or CopyBlocksDevice with pairs of their own).
package kernels
