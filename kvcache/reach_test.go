package kvcache_test

import (
	"encoding/binary"
	"math"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// windowConfig is tinyConfig (4-token blocks, 4 to a page) with a sliding window.
func windowConfig(window, sinks int) kvcache.Config {
	c := tinyConfig()
	c.Window, c.Sinks = window, sinks
	return c
}

// nulls returns which of a sequence's blocks are dropped.
func nulls(t *testing.T, m *kvcache.Manager, seq kvcache.SeqID) []bool {
	b, err := m.Blocks(seq, nil)
	require.NoError(t, err)
	out := make([]bool, len(b))
	for i, x := range b {
		out[i] = x == kvcache.NullBlock
	}
	return out
}

// A sliding window holds only the blocks its next token reads: decoding a long sequence keeps
// its live blocks bounded by the window, the dropped places stay NullBlock, and the data of the
// blocks kept reads back after a compaction moves them.
func TestSlidingWindowDropsBlocks(t *testing.T) {
	dev := hostDevice(t, 4096)
	m := newManager(t, dev, windowConfig(8, 0))
	c := m.Config()
	var slots []int64
	written := map[int]uint64{}
	for pos := range 200 {
		var err error
		slots, err = m.AppendTokens(1, 1, slots[:0])
		require.NoError(t, err)
		v := uint64(pos)*0x9e3779b97f4a7c15 | 1
		a := m.BlockAddr(0, 0, int32(slots[0]/int64(c.BlockTokens))) + vmm.Addr(uint64(slots[0]%int64(c.BlockTokens))*c.TokenBytes())
		require.NoError(t, dev.CopyIn(a, binary.LittleEndian.AppendUint64(nil, v)))
		written[pos] = v
		// The next token (at pos+1) reads [pos+2-8, pos+1]: blocks before (pos-6)/4 are dropped.
		st := m.Stats()
		require.LessOrEqual(t, st.LiveBlocks, 3, "a window of 8 tokens spans at most 3 blocks of 4 at %d", pos)
	}
	n := nulls(t, m, 1)
	require.Len(t, n, 50)
	for i, dropped := range n {
		require.Equal(t, i < (199+1-8)/4, dropped, "block %d", i)
	}
	require.NoError(t, m.Verify())
	_, err := m.Compact(kvcache.CompactOptions{})
	require.NoError(t, err)
	slots, err = m.Slots(1, 192, 200, slots[:0])
	require.NoError(t, err)
	for i, s := range slots {
		var buf [8]byte
		a := m.BlockAddr(0, 0, int32(s/int64(c.BlockTokens))) + vmm.Addr(uint64(s%int64(c.BlockTokens))*c.TokenBytes())
		require.NoError(t, dev.CopyOut(buf[:], a))
		require.Equal(t, written[192+i], binary.LittleEndian.Uint64(buf[:]), "token %d", 192+i)
	}
	_, err = m.Slots(1, 180, 200, nil)
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument, "token 180's block is dropped")
	require.Contains(t, err.Error(), "token 180 is in block 45, freed")
}

// Sink tokens' blocks stay; a chunk drops the blocks of earlier chunks when the next begins.
func TestSinksAndChunks(t *testing.T) {
	dev := hostDevice(t, 4096)
	m := newManager(t, dev, windowConfig(8, 5)) // sinks: tokens 0-4, blocks 0 and 1
	_, err := m.AppendTokens(1, 40, nil)
	require.NoError(t, err)
	_, err = m.AppendTokens(1, 1, nil) // drops what token 40 no longer reads
	require.NoError(t, err)
	require.Equal(t, []bool{false, false, true, true, true, true, true, true, false, false, false}, nulls(t, m, 1))

	cc := tinyConfig()
	cc.Chunk = 8
	ch := newManager(t, dev, cc)
	_, err = ch.AppendTokens(1, 15, nil)
	require.NoError(t, err)
	_, err = ch.AppendTokens(1, 1, nil) // token 15: chunk [8, 16)
	require.NoError(t, err)
	require.Equal(t, []bool{true, true, false, false}, nulls(t, ch, 1))
	_, err = ch.AppendTokens(1, 1, nil) // token 16: chunk [16, 24) begins; token 15's chunk is done
	require.NoError(t, err)
	require.Equal(t, []bool{true, true, true, true, false}, nulls(t, ch, 1))
	require.Equal(t, 1, ch.Stats().LiveBlocks)
	require.NoError(t, ch.Verify())
}

// A truncation back into the dropped past is refused with the numbers; one that stays within
// what is held works. A fork shares the held blocks and keeps the dropped places.
func TestTruncateIntoDroppedWindow(t *testing.T) {
	m := newManager(t, hostDevice(t, 4096), windowConfig(8, 0))
	_, err := m.AppendTokens(1, 40, nil)
	require.NoError(t, err)
	_, err = m.AppendTokens(1, 1, nil) // 41 tokens; token 40 read [33, 40]: blocks 0-7 dropped
	require.NoError(t, err)
	var ce *kvcache.CountError
	err = m.Truncate(1, 5) // to 36 tokens: token 36 would read [29, 36], block 7 is gone
	require.ErrorAs(t, err, &ce)
	require.Equal(t, 2, ce.Max, "41 tokens down to 39, whose next token reads from 32")
	require.Contains(t, err.Error(), "the blocks before token 32 are freed")
	n, _ := m.Len(1)
	require.Equal(t, 41, n, "nothing changed")
	require.NoError(t, m.Truncate(1, 2))
	require.NoError(t, m.Fork(1, 2))
	require.Equal(t, nulls(t, m, 1), nulls(t, m, 2))
	st := m.Stats()
	require.Equal(t, 2*2, st.BlockRefs, "39 tokens: blocks 8 and 9 held twice, the dropped places no references")
	require.NoError(t, m.FreeSequence(1))
	require.NoError(t, m.FreeSequence(2))
	require.Zero(t, m.Stats().LiveBlocks)
	require.NoError(t, m.Verify())
}

// A keyed window sequence's dropped blocks stay cached (idle) for later prompts, and a
// started sequence holds only the hit's blocks its next token reads.
func TestWindowPrefixHit(t *testing.T) {
	m := newManager(t, hostDevice(t, 4096), windowConfig(8, 0))
	p := promptOf(41, 3)
	_, err := m.StartSequence(1, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	_, err = m.AppendTokenIDs(1, p, nil)
	require.NoError(t, err)
	require.NoError(t, m.FreeSequence(1))
	require.Equal(t, 10, m.Stats().Prefix.CachedBlocks)
	hit, err := m.StartSequence(2, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	require.Equal(t, 40, hit)
	require.Equal(t, []bool{true, true, true, true, true, true, true, true, false, false}, nulls(t, m, 2),
		"token 40 reads [33, 40]: the hit holds blocks 8 and 9")
	require.Equal(t, 2, m.Stats().LiveBlocks)
	require.NoError(t, m.Verify())
}

// A window arena's host prefix cache: the blocks a freed sequence still held are written back,
// and a prompt whose blocks the host holds from the first one is served from there once the
// device cache lost them. A prompt whose first blocks fell out of the window before its
// sequence was freed (a decode step after it) is served by neither.
func TestWindowHostCache(t *testing.T) {
	cfg := windowConfig(8, 0)
	cfg.HostBlocks, cfg.HostPrefixCache = 8, true
	m := newManager(t, hostDevice(t, 4096), cfg)
	for seq, n := range map[kvcache.SeqID]int{1: 9, 2: 41} {
		p := promptOf(n, uint32(seq))
		_, err := m.StartSequence(seq, kvcache.Prompt{Tokens: p})
		require.NoError(t, err)
		_, err = m.AppendTokenIDs(seq, p, nil)
		require.NoError(t, err)
		_, err = m.AppendTokenIDs(seq, []kvcache.TokenID{5}, nil) // the long one drops blocks 0-7
		require.NoError(t, err)
		require.NoError(t, m.FreeSequence(seq))
	}
	st := m.Stats().Prefix
	require.Equal(t, 4, st.HostCachedBlocks, "blocks 0-1 of the short prompt, 8-9 of the long one")
	require.Zero(t, st.HostEvictions)
	_, err := m.Sleep() // the device cache goes, the host's stays
	require.NoError(t, err)
	require.NoError(t, m.Wake())
	hit, err := m.StartSequence(3, kvcache.Prompt{Tokens: promptOf(9, 1)})
	require.NoError(t, err)
	require.Equal(t, 8, hit, "token 8 reads [1, 8]: blocks 0 and 1, from the host")
	require.EqualValues(t, 8, m.Stats().Prefix.HostHitTokens)
	hit, err = m.StartSequence(4, kvcache.Prompt{Tokens: promptOf(41, 2)})
	require.NoError(t, err)
	require.Zero(t, hit, "block 0 of the long prompt was never written back")
	require.NoError(t, m.Verify())
}

// Window and chunk settings that contradict each other are refused.
func TestWindowConfigRefused(t *testing.T) {
	bad := windowConfig(8, 0)
	bad.Chunk = 4
	require.ErrorIs(t, bad.Validate(), kvcache.ErrInvalidArgument)
	bad = tinyConfig()
	bad.Sinks = 4
	require.ErrorIs(t, bad.Validate(), kvcache.ErrInvalidArgument)
	// Past any sequence: the length at which a block falls out of reach would wrap.
	for _, c := range []kvcache.Config{windowConfig(math.MaxInt, 0), windowConfig(8, math.MaxInt), tinyConfig()} {
		if c.Window == 0 {
			c.Chunk = math.MaxInt
		}
		var ce *kvcache.ConfigError
		require.ErrorAs(t, c.Validate(), &ce, "window %d, sinks %d, chunk %d", c.Window, c.Sinks, c.Chunk)
		require.Equal(t, "Window/Sinks/Chunk", ce.Field)
	}
	require.NoError(t, windowConfig(kvcache.MaxSequenceTokens, 0).Validate())
}

// An append drops what its first token no longer reads before it takes its own blocks, so a
// window prefilled in chunks holds one chunk's blocks beside the window, not two: under a limit
// of 12 blocks, 32-token chunks (8 blocks) beside a window of 8 tokens go in, with ids or without.
func TestWindowPrefillFreesBeforeTaking(t *testing.T) {
	for _, withIDs := range []bool{false, true} {
		dev := hostDevice(t, 4096)
		cfg := windowConfig(8, 0)
		cfg.MemoryLimit = 3 * cfg.PageSize // 12 blocks of 4 tokens
		m := newManager(t, dev, cfg)
		p := promptOf(400, 3)
		for t0 := 0; t0 < len(p); t0 += 32 {
			var err error
			if withIDs {
				_, err = m.AppendTokenIDs(1, p[t0:t0+min(32, len(p)-t0)], nil)
			} else {
				_, err = m.AppendTokens(1, min(32, len(p)-t0), nil)
			}
			require.NoError(t, err, "ids %v: the chunk at %d", withIDs, t0)
			require.LessOrEqual(t, m.Stats().LiveBlocks, 3+8)
		}
		require.NoError(t, m.Verify())
	}
}

// An append that fails after its early drop puts every dropped block back as it was: shared
// ones referenced again, cached ones held again (after the take evicted them), private ones
// taken again; the sequence's table and every count are as before.
func TestEarlyDropUndone(t *testing.T) {
	fd := vmm.InjectFaults(hostDevice(t, 4096))
	m := newManager(t, fd, windowConfig(8, 0))
	_, err := m.AppendTokenIDs(1, promptOf(20, 5), nil) // blocks 0-4 cached as they fill
	require.NoError(t, err)
	hit, err := m.StartSequence(2, kvcache.Prompt{Tokens: promptOf(20, 5)}) // shares blocks 0-3
	require.NoError(t, err)
	require.Equal(t, 16, hit)
	_, err = m.AppendTokens(1, 20, nil) // drops blocks 0-2 first (token 20 reads back to 13); blocks 5-9, private and uncached
	require.NoError(t, err)
	before := stateOf(m)
	require.Equal(t, []bool{true, true, true, false, false, false, false, false, false, false}, nulls(t, m, 1))
	// The next append first drops blocks 3-7 (token 40 reads back to 33): one shared, one cached
	// (idle then, and evicted by the take, the cache bound being 0), three freed.
	for call := 1; call <= 3; call++ {
		fd.Clear()
		require.NoError(t, fd.FailNth(vmm.OpMap, call, nil))
		_, err = m.AppendTokens(1, 64, nil)
		if err == nil {
			break
		}
		require.ErrorIs(t, err, vmm.ErrInjected)
		after := stateOf(m)
		after.Gen = before.Gen
		require.Equal(t, before, after, "map %d failed", call)
		require.NoError(t, m.Verify())
	}
	fd.Clear()
	_, err = m.AppendTokens(1, 64, nil)
	require.NoError(t, err)
	require.Equal(t, append(slices.Repeat([]bool{true}, 8), make([]bool, 18)...), nulls(t, m, 1))
	require.NoError(t, m.Verify())
}

// A sleeping manager keeps no reserve: pages a free empties while it sleeps go back at the next
// Settle, down to what its live sequences need, whatever its HighWatermark.
func TestAsleepFreeReturnsPages(t *testing.T) {
	cfg := tinyConfig() // 4 blocks of 4 tokens a page
	cfg.HighWatermark, cfg.ReservePages = 8, 2
	m := newManager(t, hostDevice(t, 32<<10), cfg)
	for s := range 4 {
		_, err := m.AppendTokens(kvcache.SeqID(s), 16, nil) // a page each
		require.NoError(t, err)
	}
	_, err := m.Sleep()
	require.NoError(t, err)
	require.Equal(t, 4, m.Stats().MappedPages)
	for s := range 3 {
		require.NoError(t, m.FreeSequence(kvcache.SeqID(s)))
	}
	require.NoError(t, m.Settle())
	require.Equal(t, 1, m.Stats().MappedPages, "the one live sequence's page")
	require.NoError(t, m.Verify())
	require.NoError(t, m.Wake())
	_, err = m.AppendTokens(5, 16, nil)
	require.NoError(t, err)
	require.NoError(t, m.Verify())
}
