package kvcache

import (
	"testing"
	"unsafe"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/sequence"
	"github.com/pagedkv/pagedkv/vmm"
)

// recordHybrid is a Hybrid of a full-attention group and a 32-token window with 2 sink tokens,
// both in 16-token blocks, on a host device.
func recordHybrid(t *testing.T) *Hybrid {
	t.Helper()
	return newHostHybrid(t, "records", HybridConfig{Limit: 64 << 20, Capacity: 16 << 20, PrefixCacheBytes: 1 << 20, NoBackground: true},
		oneLayerGroup("full", 0, FullAttention, 0, 0), oneLayerGroup("window", 1, SlidingWindow, 32, 2))
}

// oneLayerGroup is a group of layer alone: one KV head of 64 dims (K and V, fp16), 16-token
// blocks.
func oneLayerGroup(name string, layer int, kind AttentionKind, window, sinks int) LayerGroup {
	return LayerGroup{Name: name, Layers: []int{layer}, Kind: kind, Window: window, Sinks: sinks, KVHeads: 1, KHeadDim: 64,
		VHeadDim: 64, DType: F16, BlockTokens: 16}
}

// newHostHybrid makes a Hybrid of groups (one layer each, in order) named model, with cfg's other
// fields, on a host device of 64 KiB granules; the test closes both.
func newHostHybrid(t *testing.T, model string, cfg HybridConfig, groups ...LayerGroup) *Hybrid {
	t.Helper()
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, dev.Close()) })
	cfg.Geometry = Geometry{Model: model, Layers: len(groups), Groups: groups}
	h, err := NewHybrid(dev, cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, h.Close()) })
	return h
}

// requireRecord asserts that seq's record holds each group's sequence, or that seq has none.
func requireRecord(t *testing.T, h *Hybrid, seq SeqID, live bool) {
	t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	r := h.index.get(seq)
	if !live {
		require.Nil(t, r, "sequence %d has no record", seq)
		return
	}
	require.NotNil(t, r, "sequence %d has a record", seq)
	for i, m := range h.groups {
		s, ok := m.seqs.Get(seq)
		require.True(t, ok)
		require.Same(t, s, r.seqs[i], "sequence %d, group %d", seq, i)
	}
}

// Every operation that creates or removes a group's sequence keeps the Hybrid's records in
// step, and Verify says so; a record out of step is a Verify error.
func TestHybridRecordsFollowTheGroups(t *testing.T) {
	h := recordHybrid(t)
	dst := make([][]int64, h.Groups())
	ids := make([]prefix.Token, 40)
	for i := range ids {
		ids[i] = prefix.Token(i + 1)
	}

	require.NoError(t, h.AddSequence(1))
	requireRecord(t, h, 1, true)
	_, err := h.AppendTokenIDs(2, ids, dst) // created by the append
	require.NoError(t, err)
	requireRecord(t, h, 2, true)
	require.NoError(t, h.FreeSequence(2))
	requireRecord(t, h, 2, false)
	hit, err := h.StartSequence(3, Prompt{Tokens: ids})
	require.NoError(t, err)
	require.Equal(t, 32, hit, "sequence 2's blocks stayed cached")
	requireRecord(t, h, 3, true)
	require.NoError(t, h.Fork(3, 4))
	requireRecord(t, h, 4, true)
	require.Error(t, h.Fork(3, 4), "a refused fork leaves the records as they were")
	requireRecord(t, h, 4, true)
	require.NoError(t, h.FreeSequence(3))
	requireRecord(t, h, 3, false)
	require.NoError(t, h.Verify())

	h.mu.Lock()
	h.index.remove(h.index.get(4)) // a record lost behind the Hybrid's back
	h.mu.Unlock()
	require.ErrorContains(t, h.Verify(), "sequence 4: every group holds it, the hybrid has no record")
	h.mu.Lock()
	r := h.index.add(4)
	r.seqs[0], _ = h.groups[0].seqs.Get(4)
	r.seqs[1], _ = h.groups[1].seqs.Get(1) // another sequence in group 1's place
	h.mu.Unlock()
	require.ErrorContains(t, h.Verify(), "sequence 4: the hybrid's record of group 1 is not the group's sequence")
}

// The decode step drops what falls out of the window on the fast path, at the same length as
// commit would: after an append at length t, the window group has freed every block after the
// sinks' that lies wholly before t+1-Window, and no other.
func TestHybridFastStepDropsOnTime(t *testing.T) {
	h := recordHybrid(t)
	dst := make([][]int64, h.Groups())
	win := h.groups[1]
	fast := 0
	for tokens := range 200 {
		h.mu.Lock()
		s, ok := win.seqs.Get(7)
		wasFast := ok && s.FastRoom > 0
		h.mu.Unlock()
		for g := range dst {
			dst[g] = dst[g][:0]
		}
		var err error
		dst, err = h.AppendTokens(7, 1, dst)
		require.NoError(t, err)
		if wasFast {
			fast++
		}
		blocks, err := win.Blocks(7, nil)
		require.NoError(t, err)
		end := max(0, tokens+1-32) / 16 // blocks wholly out of reach of the token at tokens
		for i, b := range blocks {
			dropped := i >= 1 && i < end // block 0 holds the sink tokens
			require.Equal(t, dropped, b == NullBlock, "after the append at %d tokens, block %d", tokens, i)
		}
		require.Len(t, dst[1], 1)
		require.NoError(t, h.Verify())
	}
	require.Equal(t, 200-(200+15)/16, fast, "every step but the first of each block takes the fast path, drops included")
}

// The fields of a Sequence that the fast append path reads lie in its first cache line: the
// size is a multiple of 64 (the allocator's size class then starts every object on a line) and
// the fields come first.
func TestSequenceFastFieldsShareALine(t *testing.T) {
	var s sequence.Sequence
	require.Zero(t, unsafe.Sizeof(s)%64, "size %d", unsafe.Sizeof(s))
	require.LessOrEqual(t, unsafe.Offsetof(s.Tokens)+unsafe.Sizeof(s.Tokens), uintptr(64))
	require.LessOrEqual(t, unsafe.Offsetof(s.Blocks)+unsafe.Sizeof(s.Blocks), uintptr(64))
	require.LessOrEqual(t, unsafe.Offsetof(s.FastRoom)+unsafe.Sizeof(s.FastRoom), uintptr(64))
	require.LessOrEqual(t, unsafe.Offsetof(s.NextDrop)+unsafe.Sizeof(s.NextDrop), uintptr(64))
	require.LessOrEqual(t, unsafe.Offsetof(s.Keyed)+unsafe.Sizeof(s.Keyed), uintptr(64))
	require.LessOrEqual(t, unsafe.Offsetof(s.Tail)+unsafe.Sizeof(s.Tail), uintptr(64))
}

// A compaction that moves the tail block of a sequence on the fast path moves its Tail too: the
// next step's slot is in the block the table names.
func TestFastPathAfterCompaction(t *testing.T) {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 32 << 10})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, dev.Close()) })
	m, err := New(dev, Config{Layers: 1, KVHeads: 2, HeadDim: 256, ElemSize: 2, BlockTokens: 4, PageSize: 32 << 10,
		Capacity: 64 * (32 << 10), NoBackground: true}) // 4 blocks a page
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, m.Close()) })
	var slots []int64
	for seq, n := range []int{16, 16, 2} { // pages 0 and 1 full, sequence 2 alone in page 2
		slots, err = m.AppendTokens(SeqID(seq), n, slots[:0])
		require.NoError(t, err)
	}
	before, err := m.Blocks(2, nil)
	require.NoError(t, err)
	require.NoError(t, m.Truncate(0, 12)) // 3 free blocks in page 0
	res, err := m.Compact(CompactOptions{})
	require.NoError(t, err)
	require.Positive(t, res.BlocksMoved)
	after, err := m.Blocks(2, nil)
	require.NoError(t, err)
	require.NotEqual(t, before, after, "the tail block moved")
	require.NoError(t, m.Verify())
	slots, err = m.AppendTokens(2, 1, slots[:0])
	require.NoError(t, err)
	require.Equal(t, []int64{int64(after[0])*4 + 2}, slots)
	require.NoError(t, m.Verify())
}
