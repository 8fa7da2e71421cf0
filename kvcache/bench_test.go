package kvcache_test

import (
	"fmt"
	"testing"

	"github.com/pagedkv/pagedkv/internal/kvbench"
)

// BenchmarkManager runs the manager's hot paths with 1,024 and 102,400 idle live sequences
// beside a working batch of 256 (see internal/kvbench). The bench program prints the same
// figures with their targets and the 100k/1k ratios.
func BenchmarkManager(b *testing.B) {
	for _, c := range kvbench.Cases {
		for _, live := range kvbench.LiveCounts {
			b.Run(fmt.Sprintf("%s/live=%d", c.Name, live), func(b *testing.B) { c.Fn(b, live) })
		}
	}
}
