package kvcache_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
)

// A truncation the window and chunk groups both bound is refused with the most that may go in
// every group: the tighter group's limit, whichever group refuses first. At 129 tokens the
// window (32 tokens, 2 sinks) lets 2 go, the chunk (64 tokens) only 1.
func TestHybridTruncateNamesTheTightestGroup(t *testing.T) {
	dev := hostDevice(t, 64<<10)
	h := newHybrid(t, dev, smallHybrid(true))
	dst := make([][]int64, h.Groups())
	_, err := h.AppendTokens(1, 128, dst)
	require.NoError(t, err)
	_, err = h.AppendTokens(1, 1, make([][]int64, h.Groups())) // drops what token 128 no longer reads
	require.NoError(t, err)
	for _, n := range []int{2, 3, 50, 129, 130} {
		err := h.Truncate(1, n)
		var ce *kvcache.CountError
		require.ErrorAs(t, err, &ce, "truncate %d", n)
		require.Equal(t, 1, ce.Max, "truncate %d: only 1 token may go in every group: %v", n, err)
		var ge *kvcache.GroupOpError
		require.ErrorAs(t, err, &ge)
		require.Equal(t, 2, ge.Group, "the chunk group bounds it: %v", err)
		got, err := h.Len(1)
		require.NoError(t, err)
		require.Equal(t, 129, got)
	}
	require.NoError(t, h.Truncate(1, 1))
	require.NoError(t, h.Verify())
}

// A plain manager names the same Max for a truncation past the sequence's length as for one into
// its dropped past: the most that may go, not the length.
func TestTruncatePastLengthNamesWhatMayGo(t *testing.T) {
	m := newManager(t, hostDevice(t, 4096), windowConfig(8, 0))
	_, err := m.AppendTokens(1, 40, nil)
	require.NoError(t, err)
	_, err = m.AppendTokens(1, 1, nil) // 41 tokens: 2 may go (see TestTruncateIntoDroppedWindow)
	require.NoError(t, err)
	for _, n := range []int{5, 41, 42} {
		var ce *kvcache.CountError
		require.ErrorAs(t, m.Truncate(1, n), &ce, "truncate %d", n)
		require.Equal(t, 2, ce.Max, "truncate %d", n)
	}
	var ce *kvcache.CountError
	require.ErrorAs(t, m.Truncate(1, -1), &ce)
	require.Equal(t, -1, ce.N)
	require.NoError(t, m.Verify())
}

// Swapped on a closed Hybrid, or a closed manager, is ErrClosed, as Len is: not the state of a
// sequence Close dropped.
func TestSwappedAfterClose(t *testing.T) {
	dev := hostDevice(t, 64<<10)
	h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: smallHybrid(true), Limit: 256 << 20, Capacity: 64 << 20,
		NoBackground: true, HostTokens: 256, HostSequences: 2})
	require.NoError(t, err)
	_, err = h.AppendTokens(1, 10, make([][]int64, h.Groups()))
	require.NoError(t, err)
	sw, err := h.SwapOut([]kvcache.SeqID{1}, 0)
	require.NoError(t, err)
	require.NoError(t, sw.Wait())
	require.NoError(t, sw.Close())
	require.NoError(t, h.Close())
	_, err = h.Swapped(1)
	require.ErrorIs(t, err, kvcache.ErrClosed)
	_, err = h.Len(1)
	require.ErrorIs(t, err, kvcache.ErrClosed)

	m, err := kvcache.New(dev, swapConfig())
	require.NoError(t, err)
	_, err = m.AppendTokens(1, 10, nil)
	require.NoError(t, err)
	require.NoError(t, m.Close())
	_, err = m.Swapped(1)
	require.ErrorIs(t, err, kvcache.ErrClosed)
}
