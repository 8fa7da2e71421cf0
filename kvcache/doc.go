// Package kvcache is the KV-cache manager a Go LLM runtime calls: AppendTokens(seq, n) each
// step, FreeSequence(seq) when a request ends, Fork for parallel sampling and prefix sharing,
// Truncate to roll back speculative tokens, and ExportVLLM/ExportFlashInfer for the tables
// attention kernels read.
//
// A Manager maps tokens to fixed-size blocks in an elastic arena: a virtual range reserved once
// (Config.Capacity) whose pages are mapped only as sequences grow. Config documents the arena
// layout and the address formula; one page index grows every layer's K and V with one driver
// mapping. Placement is sequence-aware: a sequence's next block goes into the page of its last
// block while that has room, else into the lowest page with room for all the blocks the append
// still needs, else into the lowest page with room. So a prompt lands in one page, long
// sequences fill pages of their own, freeing them empties whole pages, and live data drifts to
// the bottom of the arena where free pages at the top can be returned. Free and partially free pages are indexed in
// B-trees (github.com/google/btree).
//
// Elasticity: when no mapped page has a free block, a page is mapped; a background goroutine
// keeps Config.ReservePages free pages mapped ahead so that appends rarely wait for the driver,
// and unmaps free pages beyond Config.HighWatermark from the top.
//
// Errors: every failing call returns a *SequenceError (or a plain error for whole-manager calls)
// wrapping a sentinel (ErrUnknownSequence, ErrSequenceExists, ErrInvalidArgument, ErrClosed,
// ErrAsleep), a *CountError, or a *BlocksError that matches ErrTooLarge (the request can never
// fit) or wraps ErrOutOfMemory (it does not fit now), and leaves the manager exactly as it was.
// No method panics on any argument, a nil or zero Manager included; the limits (MaxBlocks,
// MaxSequenceTokens, MaxPages, MaxBlockStride) are checked where numbers enter.
//
// Concurrency: Manager is safe for concurrent use. Its hot path (an append inside the last
// block) takes one lock and allocates nothing. A copy on write after a Fork runs on the
// device's default stream and is done when the call returns. The host prefix cache's copies
// (Config.HostPrefixCache) are queued on the legacy default stream, stream 0, and not waited
// for.
package kvcache
