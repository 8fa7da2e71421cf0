package kvcache

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/vmm"
)

// Sleep unmaps the pages its DropCache frees, so it first waits for the write-backs to the host
// prefix cache that may still read their blocks on stream 0: on a GPU, an unmap under a running
// copy is an illegal address. The host backend runs copies at once, so the test looks at what
// the manager keeps: no copy between the tiers may still run when Sleep returns.
func TestSleepWaitsForWriteBacks(t *testing.T) {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 32 << 10})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, dev.Close()) })
	m, err := New(dev, Config{Layers: 1, KVHeads: 2, HeadDim: 256, ElemSize: 2, BlockTokens: 4,
		PageSize: 32 << 10, Capacity: 64 * (32 << 10), NoBackground: true, HostBlocks: 16, HostPrefixCache: true})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, m.Close()) })
	_, err = m.AppendTokenIDs(1, []prefix.Token{1, 2, 3, 4, 5, 6, 7, 8}, nil)
	require.NoError(t, err)
	require.NoError(t, m.FreeSequence(1))
	m.mu.Lock()
	queued := m.lastCopy != nil
	m.mu.Unlock()
	require.True(t, queued, "the free queued a write-back of its cached blocks")

	res, err := m.Sleep()
	require.NoError(t, err)
	require.Positive(t, res.PagesReleased)
	m.mu.Lock()
	defer m.mu.Unlock()
	require.Nil(t, m.lastCopy, "Sleep unmapped the pages with a write-back possibly reading them")
}
