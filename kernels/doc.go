// Package kernels runs pagedkv's three device operations on any vmm.Device:
//
//   - CopyBlocks migrates N (src, dst) block pairs, every layer's K and V at once, in ONE launch
//     (the compaction and copy-on-write primitive; vLLM's copy_blocks over a [N,2] mapping).
//   - WriteKV scatters new tokens' K and V of one layer into their slots by slot_mapping (what a
//     runtime's reshape_and_cache does).
//   - PagedAttention is a reference decode attention that reads K and V only through a vLLM
//     block table, for tests and the examples.
//
// On a CUDA device they are the kernels of kernels.cu, embedded as cubins for sm_80 and sm_90
// and as PTX for any other GPU (gen/, made by scripts/gen-kernels; a test fails when they are
// stale). The module is loaded once per context and shared by every Kernels of that context.
// On any other device (the host backend, or a wrapped device such as vmm.FaultDevice) the same
// operations run in Go through the Device interface, with identical semantics.
//
// Streams: launches go on the caller's Stream (a CUstream; 0 is the legacy default stream) and
// return once queued; Synchronize waits. The Go implementation is synchronous and ignores
// streams. Concurrency: a Kernels may be shared, but CopyBlocks stages its pairs in a scratch
// buffer of the Kernels, so concurrent CopyBlocks calls on different streams need different
// Kernels (or CopyBlocksDevice with pairs of their own).
package kernels
