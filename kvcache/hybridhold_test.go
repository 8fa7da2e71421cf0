package kvcache

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// holdHybrid is a Hybrid of a full-attention group and a 32-token window, both in 16-token
// blocks of 4 KiB, 16 blocks (256 tokens) a page, with one reserve page and a watermark of 2,
// under limit. Its reserve runs only when the test calls settle, at the times the test gives.
func holdHybrid(t *testing.T, limit uint64) *Hybrid {
	t.Helper()
	h := newHostHybrid(t, "hold", HybridConfig{Limit: limit, Capacity: 16 << 20, NoBackground: true, ReservePages: 1, HighWatermark: 2},
		oneLayerGroup("full", 0, FullAttention, 0, 0), oneLayerGroup("window", 1, SlidingWindow, 32, 0))
	require.Equal(t, 16, h.groups[0].Stats().BlocksPerPage)
	return h
}

// holdBatch starts sequences [0, n) of 256 tokens each (a page each in the full group), then
// frees them.
func holdBatch(t *testing.T, h *Hybrid, n int) {
	t.Helper()
	dst := make([][]int64, h.Groups())
	for s := range n {
		var err error
		dst, err = h.AppendTokens(SeqID(s), 256, dst)
		require.NoError(t, err)
	}
	for s := range n {
		require.NoError(t, h.FreeSequence(SeqID(s)))
	}
	require.NoError(t, h.Verify())
}

// A Hybrid's group keeps its spare pages beyond the watermark until a whole period found them
// unused: a batch that frees its pages finds them mapped for the next, and what a period left
// unused goes back when it ends, all of it within two periods of the last use.
func TestHybridHoldReturnsWhatAPeriodLeftUnused(t *testing.T) {
	h := holdHybrid(t, 64<<20)
	full := h.groups[0]
	settle := func(at time.Duration, free int, msg string) {
		t.Helper()
		require.NoError(t, full.settle(time.Unix(1000, 0).Add(at), false))
		require.Equal(t, free, full.Stats().FreePages, msg)
	}
	holdBatch(t, h, 10)
	require.Equal(t, 10, full.Stats().FreePages)
	settle(0, 10, "a period begins: nothing goes back yet")
	settle(500*time.Millisecond, 10, "within the period")
	holdBatch(t, h, 4) // the next batch takes 4 of the 10 spare pages, and frees them
	settle(time.Second, 6, "the period ends: the 6 pages unused throughout it, less the watermark's 2, go back")
	settle(1500*time.Millisecond, 6, "within the next period")
	settle(2*time.Second, 2, "the next period used none: all but the watermark's go back")
	settle(3*time.Second, 2, "no period runs at the watermark")
	require.EqualValues(t, 8, full.Stats().Unmaps)
	require.NoError(t, h.Verify())
}

// Settle returns the pages a hold keeps at once, as a Manager's does.
func TestHybridSettleReturnsHeldPages(t *testing.T) {
	h := holdHybrid(t, 64<<20)
	full := h.groups[0]
	holdBatch(t, h, 10)
	require.NoError(t, full.settle(time.Unix(1000, 0), false))
	require.Equal(t, 10, full.Stats().FreePages, "held")
	require.NoError(t, h.Settle())
	require.Equal(t, 2, full.Stats().FreePages)
	require.Equal(t, 2, h.groups[1].Stats().FreePages)
}

// A group holds no more pages beyond the watermark than the budget has room for besides: its
// siblings, short of memory, cannot take them back while the Hybrid holds their lock.
func TestHybridHoldWithinTheBudget(t *testing.T) {
	const page = 64 << 10
	h := holdHybrid(t, 24*page)
	full := h.groups[0]
	holdBatch(t, h, 10) // 10 pages in the full group, the rest in the window's
	room := 24 - int(h.Stats().MappedBytes/page)
	require.Equal(t, 10, full.Stats().FreePages)
	require.Positive(t, room)
	require.Less(t, 2+room, 10)
	require.NoError(t, full.settle(time.Unix(1000, 0), false))
	require.Equal(t, 2+room, full.Stats().FreePages, "the watermark's pages and as many as the budget has room for")
	require.NoError(t, h.Verify())
}
