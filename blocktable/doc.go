// Package blocktable writes block tables in the formats attention kernels already read, into
// caller-owned buffers, without allocating:
//
//   - vLLM: block_tables int32 [num_seqs, max_blocks_per_seq] (rows padded with a pad value),
//     seq_lens int32 [num_seqs], and slot_mapping int64 [num_new_tokens] where
//     slot = block_id*block_size + offset.
//   - FlashInfer's paged KV CSR: kv_indptr int32 [num_seqs+1], kv_indices int32 [nnz],
//     kv_last_page_len int32 [num_seqs] (1..block_size).
//
// DeviceTables holds the same tables in device memory at addresses that never change, so that a
// runtime can capture its decode step in a CUDA graph once and update the tables in place.
//
// The package knows nothing of CUDA: device memory is reached through vmm.Device.
// Concurrency: a table or DeviceTables must not be used from several goroutines at once.
package blocktable
