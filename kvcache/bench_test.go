package kvcache_test

import (
	"fmt"
	"testing"

	"github.com/pagedkv/pagedkv/internal/workload/kvbench"
)

// BenchmarkManager runs the manager's hot paths with 1,024 and 102,400 idle live sequences
// beside a working batch of 256 (see internal/workload/kvbench). The bench program prints the same
// figures with their targets and the 100k/1k ratios.
func BenchmarkManager(b *testing.B) {
	for _, c := range kvbench.Cases {
		for _, live := range kvbench.LiveCounts {
			b.Run(fmt.Sprintf("%s/live=%d", c.Name, live), func(b *testing.B) { c.Fn(b, live) })
		}
	}
}

// BenchmarkPrefixStart times starting a 4,096-token prompt that is cached whole, with the keys
// given and hashed (targets: 10 and 60 us), beside the yardsticks: Go-map lookups of the same
// keys and SHA-256 of the same blocks.
func BenchmarkPrefixStart(b *testing.B) {
	b.Run("keys", func(b *testing.B) { kvbench.StartCached(b, true) })
	b.Run("map-lookups", kvbench.MapLookups)
	b.Run("hash", func(b *testing.B) { kvbench.StartCached(b, false) })
	b.Run("sha256", kvbench.HashBlocks)
}

// BenchmarkPrefixDecode times the decode step with ids (0% hits: every block hashed, cached and
// later evicted) against AppendTokens (target: at most 50 ns per token more, 0 allocs).
func BenchmarkPrefixDecode(b *testing.B) {
	for _, live := range kvbench.LiveCounts {
		b.Run(fmt.Sprintf("count/live=%d", live), func(b *testing.B) { kvbench.Decode(b, live, false) })
		b.Run(fmt.Sprintf("ids/live=%d", live), func(b *testing.B) { kvbench.Decode(b, live, true) })
		b.Run(fmt.Sprintf("ids-subscribed/live=%d", live), func(b *testing.B) { kvbench.DecodeSubscribed(b, live) })
	}
}
