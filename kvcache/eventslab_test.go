package kvcache

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/prefix"
)

// A long run of removals joined into one event grows it by doubling: 100,000 keys cost a few
// dozen allocations, not one per array's worth of keys (which would copy the run each time).
// Slices handed out before keep their content.
func TestEventSlabLongRun(t *testing.T) {
	var s eventSlab
	first := s.keys([]prefix.Key{{1}, {2}})
	var run []prefix.Key
	allocs := testing.AllocsPerRun(1, func() {
		run = nil
		for i := range 100000 {
			run = s.appendKey(run, prefix.Key{byte(i), byte(i >> 8), byte(i >> 16)})
		}
	})
	assert.LessOrEqual(t, allocs, 40.0)
	require.Len(t, run, 100000)
	for i, k := range run {
		require.Equal(t, prefix.Key{byte(i), byte(i >> 8), byte(i >> 16)}, k)
	}
	assert.Equal(t, []prefix.Key{{1}, {2}}, first)
	tokens := s.tokens([]TokenID{7, 8})
	more := s.tokens([]TokenID{9})
	assert.Equal(t, []TokenID{7, 8}, tokens)
	assert.Equal(t, 2, cap(tokens), "a handed-out slice cannot grow into the next")
	assert.Equal(t, []TokenID{9}, more)
}
