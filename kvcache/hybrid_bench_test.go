package kvcache_test

import (
	"testing"

	"github.com/pagedkv/pagedkv/internal/workload/kvbench"
)

// BenchmarkHybridDecode times a decode step across three layer groups (full, window, chunk)
// beside the same step on one manager of one group (target: at most 2x, 0 allocs), without and
// with ids (the groups share one key chain: each block hashed once). Both sides keep the batch's
// pages mapped (kvbench.HeldConfig): neither maps in the timed steps.
func BenchmarkHybridDecode(b *testing.B) {
	b.Run("one-group", func(b *testing.B) { kvbench.OneGroupDecode(b, false) })
	b.Run("three-groups", kvbench.HybridDecode)
	b.Run("one-group-ids", func(b *testing.B) { kvbench.OneGroupDecode(b, true) })
	b.Run("three-groups-ids", kvbench.HybridDecodeIDs)
}

// BenchmarkHybridStart times starting a cached 4,096-token prompt on the three-group hybrid
// beside one full-attention manager (target: at most 2x).
func BenchmarkHybridStart(b *testing.B) {
	b.Run("one-group/keys", func(b *testing.B) { kvbench.StartCached(b, true) })
	b.Run("three-groups/keys", func(b *testing.B) { kvbench.HybridStartCached(b, true) })
	b.Run("one-group/hash", func(b *testing.B) { kvbench.StartCached(b, false) })
	b.Run("three-groups/hash", func(b *testing.B) { kvbench.HybridStartCached(b, false) })
}
