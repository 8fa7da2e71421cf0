package kvcache_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/devtest"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// smallHybrid is a hybrid geometry small enough for the host backend, with one group of each
// kind: full attention and a window of 32 tokens (2 sinks) in 16-token blocks, chunks of 64, an
// MLA latent of 80 + 16 elements in 32-token blocks, and a recurrent state of 4 KiB a layer.
func smallHybrid(recurrent bool) kvcache.Geometry {
	g := kvcache.Geometry{Model: "small", Layers: 7, Groups: []kvcache.LayerGroup{
		{Name: "full", Layers: []int{0, 4}, KVHeads: 2, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
		{Name: "window", Layers: []int{1, 5}, Kind: kvcache.SlidingWindow, Window: 32, Sinks: 2, KVHeads: 2, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
		{Name: "chunk", Layers: []int{2}, Kind: kvcache.ChunkedAttention, Window: 64, KVHeads: 2, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
		{Name: "mla", Layers: []int{3}, KVHeads: 1, KHeadDim: 96, RopeDim: 16, DType: kvcache.BF16, BlockTokens: 32},
	}}
	if recurrent {
		g.Layers = 9
		g.Groups = append(g.Groups, kvcache.LayerGroup{Name: "state", Layers: []int{6, 7, 8}, Kind: kvcache.RecurrentState, StateBytes: 4096})
	} else {
		g.Groups[0].Layers = append(g.Groups[0].Layers, 6)
	}
	return g
}

func newHybrid(t testing.TB, dev vmm.Device, g kvcache.Geometry) *kvcache.Hybrid {
	t.Helper()
	h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: g, Limit: 256 << 20, Capacity: 64 << 20, NoBackground: true})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, h.Close()) })
	return h
}

// hybridData writes, for every group that has slots, a marker per token into layer 0's K at the
// token's slot, and reads them back through the group's exported table.
type hybridData struct {
	dev vmm.Device
	h   *kvcache.Hybrid
	val map[kvcache.SeqID][]uint64 // the value of each token, by position
}

func (d *hybridData) write(t *testing.T, seq kvcache.SeqID, from int, slots [][]int64) {
	for len(d.val[seq]) < from+len(slots[0]) {
		d.val[seq] = append(d.val[seq], uint64(seq)<<32|uint64(len(d.val[seq]))|1<<63)
	}
	for g := range d.h.Groups() {
		m := d.h.Group(g)
		c := m.Config()
		if c.StateBytes > 0 {
			continue
		}
		require.Len(t, slots[g], len(slots[0]), "group %d", g)
		for i, s := range slots[g] {
			a := m.BlockAddr(0, 0, int32(s/int64(c.BlockTokens))) + vmm.Addr(uint64(s%int64(c.BlockTokens))*c.TokenBytes())
			require.NoError(t, d.dev.CopyIn(a, binary.LittleEndian.AppendUint64(nil, d.val[seq][from+i])))
		}
	}
}

// check reads every token each group still holds through the group's vLLM table.
func (d *hybridData) check(t *testing.T, seqs []kvcache.SeqID) {
	for g := range d.h.Groups() {
		m := d.h.Group(g)
		c := m.Config()
		if c.StateBytes > 0 {
			continue
		}
		rowBlocks := 64 // a row as long as the longest sequence's table, which a fuzzed trace can make long
		for _, seq := range seqs {
			rowBlocks = max(rowBlocks, (len(d.val[seq])+c.BlockTokens-1)/c.BlockTokens)
		}
		vt := devtest.VLLM(t, max(len(seqs), 1), rowBlocks, -1)
		require.NoError(t, m.ExportVLLM(seqs, vt))
		for row, seq := range seqs {
			line := vt.Table()[row*vt.MaxBlocks : (row+1)*vt.MaxBlocks]
			n := int(vt.Lens()[row])
			for pos := range n {
				b := line[pos/c.BlockTokens]
				if b == kvcache.NullBlock {
					continue
				}
				var buf [8]byte
				a := m.BlockAddr(0, 0, b) + vmm.Addr(uint64(pos%c.BlockTokens)*c.TokenBytes())
				require.NoError(t, d.dev.CopyOut(buf[:], a))
				require.Equal(t, d.val[seq][pos], binary.LittleEndian.Uint64(buf[:]), "group %d sequence %d token %d", g, seq, pos)
			}
		}
	}
}

// Each group gets an arena of its own layout and page, and an append gives every attention group
// its slots; a window, a chunk and a recurrent state hold only what they need, the data of every
// group reads back through its own table after a compaction, and a decode step allocates nothing.
func TestHybridGroups(t *testing.T) {
	dev := hostDevice(t, 64<<10)
	h := newHybrid(t, dev, smallHybrid(true))
	require.Equal(t, 5, h.Groups())
	mla := h.Group(3).Config()
	require.True(t, mla.KOnly)
	require.EqualValues(t, 32*96*2, mla.BlockStride()-mla.BlockPadding, "K only: one latent row a token")
	state := h.Group(4).Config()
	require.EqualValues(t, 3*4096, state.BlockStride()-state.BlockPadding)
	for g := range h.Groups() {
		c := h.Group(g).Config()
		require.Zero(t, c.PageSize%(64<<10), "group %d: whole granules", g)
		require.Zero(t, c.PageSize%c.BlockStride(), "group %d: whole blocks", g)
	}
	d := &hybridData{dev: dev, h: h, val: map[kvcache.SeqID][]uint64{}}
	dst := make([][]int64, h.Groups())
	require.NoError(t, h.AddSequence(1))
	var err error
	dst, err = h.AppendTokens(1, 100, dst)
	require.NoError(t, err)
	d.write(t, 1, 0, dst)
	for range 100 { // decode
		for g := range dst {
			dst[g] = dst[g][:0]
		}
		n, _ := h.Len(1)
		dst, err = h.AppendTokens(1, 1, dst)
		require.NoError(t, err)
		d.write(t, 1, n, dst)
	}
	st := h.Stats()
	require.Equal(t, 13, st.Groups[0].LiveBlocks, "full attention: all 200 tokens")
	require.LessOrEqual(t, st.Groups[1].LiveBlocks, 1+3, "the sink block and the window's")
	require.LessOrEqual(t, st.Groups[2].LiveBlocks, 4+1, "the chunk's")
	require.Equal(t, 7, st.Groups[3].LiveBlocks, "MLA: 200 tokens in 32-token blocks")
	require.Equal(t, 1, st.Groups[4].LiveBlocks, "one state")
	_, err = h.Compact(kvcache.CompactOptions{})
	require.NoError(t, err)
	d.check(t, []kvcache.SeqID{1})
	require.NoError(t, h.Verify())

	for g := range dst {
		dst[g] = dst[g][:0]
	}
	allocs := testing.AllocsPerRun(100, func() {
		for g := range dst {
			dst[g] = dst[g][:0]
		}
		if n, _ := h.Len(1); n%16 == 15 { // stay inside blocks: the fast path
			require.NoError(t, h.Truncate(1, 1))
		}
		if _, err := h.AppendTokens(1, 1, dst); err != nil {
			t.Fatal(err)
		}
	})
	require.Zero(t, allocs, "a decode step across five groups")
}

// One group that cannot take its part (a driver failing, memory short) leaves every group as
// it was.
func TestHybridAllOrNothing(t *testing.T) {
	fd := vmm.InjectFaults(hostDevice(t, 64<<10))
	h := newHybrid(t, fd, smallHybrid(true))
	dst := make([][]int64, h.Groups())
	_, err := h.AppendTokens(1, 40, dst)
	require.NoError(t, err)
	for seq := kvcache.SeqID(10); seq < 25; seq++ { // the recurrent group's page full: 16 states
		_, err = h.AppendTokens(seq, 1, dst)
		require.NoError(t, err)
	}
	before := hybridShape(t, h)
	_, err = h.AppendTokens(2, 1<<24, make([][]int64, h.Groups())) // more than the full group's arena
	require.ErrorIs(t, err, kvcache.ErrTooLarge)
	_, err = h.Len(2)
	require.ErrorIs(t, err, kvcache.ErrUnknownSequence, "no group kept the sequence")
	_, err = h.AppendTokens(1, 1, make([][]int64, 2))
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument, "a slot list per group")
	require.Equal(t, before, hybridShape(t, h))
	failedIn := map[int]bool{}
	for call := 1; call <= 100; call++ {
		fd.Clear()
		require.NoError(t, fd.FailNth(vmm.OpMap, call, nil))
		_, err = h.AppendTokens(3, 2000, make([][]int64, h.Groups())) // a new sequence: maps pages in every group
		if err == nil {
			break
		}
		require.ErrorIs(t, err, vmm.ErrInjected, "call %d", call)
		var ge *kvcache.GroupOpError
		require.ErrorAs(t, err, &ge)
		require.Equal(t, before, hybridShape(t, h), "a failed map in group %d (call %d) changed something", ge.Group, call)
		failedIn[ge.Group] = true
		require.NoError(t, h.Verify())
	}
	require.Len(t, failedIn, 5, "a failure in every group: %v", failedIn)
}

// hybridShape is what a failed call must leave alone: every group's statistics, sequences and
// regions. (MapGeneration counts a page mapped and unmapped again by the rollback: it is left
// out.)
func hybridShape(t *testing.T, h *kvcache.Hybrid) []managerState {
	var out []managerState
	for g := range h.Groups() {
		st := stateOf(h.Group(g))
		st.Gen = 0
		out = append(out, st)
	}
	return out
}

// A prefix hit is the longest prefix every group holds, in whole blocks of each; a recurrent
// group, which keeps no states at block boundaries, shortens it to nothing.
func TestHybridPrefixHit(t *testing.T) {
	for _, recurrent := range []bool{false, true} {
		t.Run(fmt.Sprint("recurrent=", recurrent), func(t *testing.T) {
			dev := hostDevice(t, 64<<10)
			h := newHybrid(t, dev, smallHybrid(recurrent))
			d := &hybridData{dev: dev, h: h, val: map[kvcache.SeqID][]uint64{}}
			p := promptOf(150, 7)
			hit, err := h.StartSequence(1, kvcache.Prompt{Tokens: p})
			require.NoError(t, err)
			require.Zero(t, hit)
			dst, err := h.AppendTokenIDs(1, p, make([][]int64, h.Groups()))
			require.NoError(t, err)
			d.write(t, 1, 0, dst)
			require.NoError(t, h.FreeSequence(1))
			hit, err = h.StartSequence(2, kvcache.Prompt{Tokens: p})
			require.NoError(t, err)
			want := 128 // 149 tokens at most, in whole 32-token (MLA) and 16-token blocks
			if recurrent {
				want = 0
			}
			require.Equal(t, want, hit)
			d.val[2] = append([]uint64(nil), d.val[1][:hit]...)
			dst, err = h.AppendTokenIDs(2, p[hit:], make([][]int64, h.Groups()))
			require.NoError(t, err)
			d.write(t, 2, hit, dst)
			d.check(t, []kvcache.SeqID{2})
			require.NoError(t, h.Verify())
		})
	}
}

// Fork shares blocks (a recurrent state is copied by the first append to either); truncation
// back into a window's dropped past is refused in every group; a random trace keeps the groups
// consistent and every token readable.
func TestHybridRandomTrace(t *testing.T) {
	dev := hostDevice(t, 64<<10)
	h := newHybrid(t, dev, smallHybrid(true))
	d := &hybridData{dev: dev, h: h, val: map[kvcache.SeqID][]uint64{}}
	r := rand.New(rand.NewPCG(3, 4))
	live := map[kvcache.SeqID]bool{}
	dst := make([][]int64, h.Groups())
	forks, refused := 0, 0
	for step := range 400 {
		seq := kvcache.SeqID(r.IntN(6))
		for g := range dst {
			dst[g] = dst[g][:0]
		}
		switch op := r.IntN(6); {
		case op <= 2: // append
			n := 1
			if op == 0 {
				n = r.IntN(40)
			}
			from, _ := h.Len(seq)
			var err error
			dst, err = h.AppendTokens(seq, n, dst)
			if err != nil {
				require.True(t, errors.Is(err, kvcache.ErrOutOfMemory), "step %d: %v", step, err)
				continue
			}
			live[seq] = true
			if len(d.val[seq]) > from {
				d.val[seq] = d.val[seq][:from]
			}
			d.write(t, seq, from, dst)
		case op == 3 && live[seq]: // fork
			other := kvcache.SeqID(6 + r.IntN(3))
			if err := h.Fork(seq, other); err == nil {
				forks++
				live[other] = true
				d.val[other] = append([]uint64(nil), d.val[seq]...)
			} else {
				require.ErrorIs(t, err, kvcache.ErrSequenceExists)
			}
		case op == 4 && live[seq]: // truncate
			n, _ := h.Len(seq)
			k := r.IntN(n + 1)
			err := h.Truncate(seq, k)
			if err != nil {
				var ce *kvcache.CountError
				require.ErrorAs(t, err, &ce, "step %d", step)
				refused++
				continue
			}
			d.val[seq] = d.val[seq][:n-k]
		case op == 5 && live[seq]:
			require.NoError(t, h.FreeSequence(seq))
			delete(live, seq)
			delete(d.val, seq)
		}
		require.NoError(t, h.Verify(), "step %d", step)
	}
	var seqs []kvcache.SeqID
	for s := range live {
		seqs = append(seqs, s)
	}
	d.check(t, seqs)
	require.Positive(t, forks)
	require.Positive(t, refused, "truncations into a dropped window")
	require.Positive(t, h.Group(4).Stats().CopyOnWrites, "a forked recurrent state copied by its first append")
}

// A window group serves a hit from the blocks its next token reads alone: with the prompt's
// early blocks evicted (a full-attention group would find nothing), a window group finds the
// whole prompt, and the hit holds only the window's blocks.
func TestHybridWindowHit(t *testing.T) {
	dev := hostDevice(t, 64<<10)
	g := smallHybrid(false)
	g.Groups = g.Groups[1:2] // the window group alone: 32 tokens, 16-token blocks of 8 KiB
	g.Groups[0].Layers, g.Groups[0].Sinks, g.Layers = []int{0}, 0, 1
	h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: g, Limit: 128 << 10, Capacity: 4 << 20, NoBackground: true})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, h.Close()) })
	require.EqualValues(t, 64<<10, h.Group(0).Config().PageSize, "8 blocks a page, 2 pages under the limit")
	p := promptOf(150, 9)
	_, err = h.StartSequence(1, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	_, err = h.AppendTokenIDs(1, p, make([][]int64, 1))
	require.NoError(t, err)
	_, err = h.AppendTokenIDs(1, []kvcache.TokenID{7}, make([][]int64, 1)) // token 150 reads [119, 150]: blocks 0-6 go idle
	require.NoError(t, err)
	_, err = h.AppendTokens(3, 13*16, make([][]int64, 1)) // 6 free blocks and the 7 idle ones, oldest first
	require.NoError(t, err)
	require.EqualValues(t, 7, h.Group(0).Stats().Prefix.Evictions)
	require.NoError(t, h.FreeSequence(3))
	require.NoError(t, h.FreeSequence(1))
	hit, err := h.StartSequence(2, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	require.Equal(t, 144, hit, "token 144 reads [113, 144]: blocks 7 and 8 are cached")
	require.Equal(t, 2, h.Group(0).Stats().LiveBlocks)
	b, err := h.Group(0).Blocks(2, nil)
	require.NoError(t, err)
	require.Len(t, b, 9)
	require.Equal(t, int32(kvcache.NullBlock), b[6])
	require.NotEqual(t, int32(kvcache.NullBlock), b[7])
	require.NoError(t, h.Verify())
}

// A Hybrid's group refuses, through its own Manager, every call that would change its sequences
// (the Hybrid keeps one record of each sequence across all groups, which such a call would leave
// pointing at a freed or changed sequence), and nothing changes; reads go on, and the Hybrid
// changes them.
func TestHybridGroupRefusesSequenceChanges(t *testing.T) {
	h := newHybrid(t, hostDevice(t, 64<<10), smallHybrid(true))
	dst := make([][]int64, h.Groups())
	_, err := h.AppendTokenIDs(1, promptOf(40, 1), dst)
	require.NoError(t, err)
	before := hybridShape(t, h)
	for g := range h.Groups() {
		m := h.Group(g)
		calls := map[string]error{}
		calls["add"] = m.AddSequence(2)
		_, calls["append"] = m.AppendTokens(1, 1, nil)
		_, calls["append ids"] = m.AppendTokenIDs(1, promptOf(1, 9), nil)
		_, calls["start"] = m.StartSequence(2, kvcache.Prompt{Tokens: promptOf(40, 1)})
		calls["free"] = m.FreeSequence(1)
		calls["fork"] = m.Fork(1, 2)
		calls["truncate"] = m.Truncate(1, 16)
		calls["mark"] = m.MarkWritten(1, 16)
		_, calls["swap out"] = m.SwapOut([]kvcache.SeqID{1}, 0)
		_, calls["swap in"] = m.SwapIn([]kvcache.SeqID{1}, 0)
		for name, err := range calls {
			require.ErrorIs(t, err, kvcache.ErrInvalidArgument, "group %d: %s", g, name)
		}
		n, err := m.Len(1)
		require.NoError(t, err)
		require.Equal(t, 40, n, "group %d reads on", g)
	}
	require.Equal(t, before, hybridShape(t, h))
	require.NoError(t, h.Verify())
	_, err = h.AppendTokenIDs(1, promptOf(1, 9), dst)
	require.NoError(t, err)
	require.NoError(t, h.FreeSequence(1))
	require.NoError(t, h.Verify())
}
