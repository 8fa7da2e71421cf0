package kvcache_test

import (
	"bytes"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/vmm"
)

// ckptGeometry is full attention in 16-token blocks (8 KiB: 8 to a 64 KiB page) beside a
// recurrent group of two layers of stateBytes with a checkpoint every 32 tokens.
func ckptGeometry(stateBytes uint64) kvcache.Geometry {
	return kvcache.Geometry{Model: "ckpt", Layers: 3, Groups: []kvcache.LayerGroup{
		{Name: "full", Layers: []int{0}, KVHeads: 2, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
		{Name: "state", Layers: []int{1, 2}, Kind: kvcache.RecurrentState, StateBytes: stateBytes, Checkpoints: 32},
	}}
}

// stateBlock returns the address and size of seq's live state in recurrent group g: every
// layer's, in one block.
func stateBlock(t *testing.T, h *kvcache.Hybrid, g int, seq kvcache.SeqID) (vmm.Addr, []byte) {
	t.Helper()
	m := h.Group(g)
	b, err := m.Blocks(seq, nil)
	require.NoError(t, err)
	require.Len(t, b, 1, "one state block")
	c := m.Config()
	return m.BlockAddr(0, 0, b[0]), make([]byte, uint64(c.Layers)*c.StateBytes)
}

// stateOfSeq reads the live state of seq in recurrent group g.
func stateOfSeq(t *testing.T, dev vmm.Device, h *kvcache.Hybrid, g int, seq kvcache.SeqID) []byte {
	t.Helper()
	a, buf := stateBlock(t, h, g, seq)
	require.NoError(t, dev.CopyOut(buf, a))
	return buf
}

// writeState writes a state made of tag into seq's live state in recurrent group g, as the
// runtime's kernels would, and returns it.
func writeState(t *testing.T, dev vmm.Device, h *kvcache.Hybrid, g int, seq kvcache.SeqID, tag uint64) []byte {
	t.Helper()
	a, buf := stateBlock(t, h, g, seq)
	for i := range buf {
		buf[i] = byte(tag>>(8*(i%8))) ^ byte(i/8)
	}
	require.NoError(t, dev.CopyIn(a, buf))
	return buf
}

// prefill appends ids to seq in chunks ending at each of ends (token counts), writing a state
// tagged with the count and marking it written after each chunk.
func prefill(t *testing.T, dev vmm.Device, h *kvcache.Hybrid, seq kvcache.SeqID, ids []kvcache.TokenID, ends ...int) map[int][]byte {
	t.Helper()
	states := map[int][]byte{}
	from, _ := h.Len(seq)
	for _, end := range ends {
		_, err := h.AppendTokenIDs(seq, ids[from:end], make([][]int64, h.Groups()))
		require.NoError(t, err)
		states[end] = writeState(t, dev, h, 1, seq, uint64(seq)<<32|uint64(end))
		require.NoError(t, h.MarkWritten(seq, end))
		from = end
	}
	return states
}

func checkpoints(h *kvcache.Hybrid, g int) kvcache.CheckpointStats {
	return h.Group(g).Stats().Prefix.Checkpoints
}

// A recurrent group with checkpoints keeps the state at every marked multiple of its interval,
// and a start resumes from the latest one of its prompt that every group serves: the live state
// reads back exactly the bytes written at that length. A mark off a multiple, or one that skips
// past a multiple, leaves no checkpoint there. Fork, Truncate and FreeSequence keep them.
func TestHybridCheckpointHits(t *testing.T) {
	dev := hostDevice(t, 64<<10)
	h := newHybrid(t, dev, ckptGeometry(4096))
	p := promptOf(100, 7)
	hit, err := h.StartSequence(1, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	require.Zero(t, hit)
	states := prefill(t, dev, h, 1, p, 32, 64, 96, 100)
	require.Equal(t, kvcache.CheckpointStats{Made: 3}, checkpoints(h, 1), "at 32, 64 and 96; not at 100")
	require.NoError(t, h.FreeSequence(1))
	require.NoError(t, h.Verify())
	st := h.Group(1).Stats()
	require.Equal(t, 3, st.Prefix.IdleBlocks, "the checkpoints outlive the sequence, held by none")
	require.Zero(t, st.LiveBlocks)

	for _, c := range []struct {
		seq          kvcache.SeqID
		prompt, want int
	}{{2, 100, 96}, {3, 70, 64}, {4, 64, 32}, {5, 32, 0}} { // at most all but the last token
		hit, err := h.StartSequence(c.seq, kvcache.Prompt{Tokens: p[:c.prompt]})
		require.NoError(t, err)
		require.Equal(t, c.want, hit, "a %d-token prompt", c.prompt)
		n, err := h.Len(c.seq)
		require.NoError(t, err)
		require.Equal(t, c.want, n)
		if c.want > 0 {
			require.Equal(t, states[c.want], stateOfSeq(t, dev, h, 1, c.seq), "the state at %d", c.want)
		}
		require.NoError(t, h.Verify())
	}
	require.Equal(t, kvcache.CheckpointStats{Made: 3, Resumed: 3}, checkpoints(h, 1))
	require.EqualValues(t, 96+64+32, h.Group(1).Stats().Prefix.HitTokens)
	require.Equal(t, 3, h.Group(1).Stats().Prefix.CachedBlocks, "a resume copies the checkpoint; it stays cached")

	// The resumed state is the sequence's own: writing it leaves the checkpoint as it was.
	_, err = h.AppendTokenIDs(2, p[96:100], make([][]int64, 2))
	require.NoError(t, err)
	writeState(t, dev, h, 1, 2, 0xdead)
	require.NoError(t, h.Fork(2, 6))
	require.NoError(t, h.Truncate(2, 60))
	for _, seq := range []kvcache.SeqID{2, 3, 4, 5, 6} {
		require.NoError(t, h.FreeSequence(seq))
	}
	require.Equal(t, kvcache.CheckpointStats{Made: 3, Resumed: 3}, checkpoints(h, 1), "fork, truncate and free make none")
	require.Equal(t, 3, h.Group(1).Stats().Prefix.CachedBlocks, "and drop none")
	hit, err = h.StartSequence(7, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	require.Equal(t, 96, hit)
	require.Equal(t, states[96], stateOfSeq(t, dev, h, 1, 7))
	allocs := testing.AllocsPerRun(100, func() {
		if h.MarkWritten(7, 96) != nil || h.MarkWritten(7, 50) != nil {
			t.Fatal("mark failed")
		}
	})
	require.Zero(t, allocs, "a mark at a cached checkpoint, and one below the written mark")

	// Marks at 32, 50 and 96: the one at 96 skips past 64, so there is none at 64.
	q := promptOf(100, 8)
	_, err = h.StartSequence(8, kvcache.Prompt{Tokens: q})
	require.NoError(t, err)
	qs := prefill(t, dev, h, 8, q, 32, 50, 96)
	require.Equal(t, kvcache.CheckpointStats{Made: 5, Resumed: 4}, checkpoints(h, 1), "at 32 and 96")
	require.NoError(t, h.FreeSequence(8))
	for _, c := range []struct {
		seq          kvcache.SeqID
		prompt, want int
	}{{9, 70, 32}, {10, 100, 96}} {
		hit, err := h.StartSequence(c.seq, kvcache.Prompt{Tokens: q[:c.prompt]})
		require.NoError(t, err)
		require.Equal(t, c.want, hit, "a %d-token prompt", c.prompt)
		require.Equal(t, qs[c.want], stateOfSeq(t, dev, h, 1, c.seq))
	}
	require.NoError(t, h.Verify())

	// Another namespace shares nothing; a mark back below the written mark makes nothing.
	hit, err = h.StartSequence(11, kvcache.Prompt{Tokens: q, Namespace: prefix.Namespace{Salt: "tenant"}})
	require.NoError(t, err)
	require.Zero(t, hit)
	require.NoError(t, h.MarkWritten(10, 64))
	require.Equal(t, kvcache.CheckpointStats{Made: 5, Resumed: 6}, checkpoints(h, 1))
}

// Without Checkpoints a recurrent group keeps no state and nothing hits, as before.
func TestHybridNoCheckpoints(t *testing.T) {
	dev := hostDevice(t, 64<<10)
	g := ckptGeometry(4096)
	g.Groups[1].Checkpoints = 0
	h := newHybrid(t, dev, g)
	p := promptOf(100, 7)
	_, err := h.StartSequence(1, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	prefill(t, dev, h, 1, p, 32, 64, 96)
	require.NoError(t, h.FreeSequence(1))
	hit, err := h.StartSequence(2, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	require.Zero(t, hit)
	st := h.Group(1).Stats().Prefix
	require.Zero(t, st.CachedBlocks)
	require.Equal(t, kvcache.CheckpointStats{}, st.Checkpoints)
	require.Equal(t, 6, h.Group(0).Stats().Prefix.CachedBlocks, "the attention group caches as before")
}

// A copy that fails (the driver) leaves every group as it was, in MarkWritten and in a start
// that resumes; out of memory skips a checkpoint (counted) and fails a start that cannot take
// its state, changing nothing.
func TestHybridCheckpointFaults(t *testing.T) {
	t.Run("copy", func(t *testing.T) {
		fd := vmm.InjectFaults(hostDevice(t, 64<<10))
		h := newHybrid(t, fd, ckptGeometry(4096))
		p := promptOf(40, 3)
		_, err := h.StartSequence(1, kvcache.Prompt{Tokens: p})
		require.NoError(t, err)
		_, err = h.AppendTokenIDs(1, p, make([][]int64, 2))
		require.NoError(t, err)
		before, stats := hybridShape(t, h), h.Stats()
		require.NoError(t, fd.FailNth(vmm.OpCopy, 1, nil))
		err = h.MarkWritten(1, 32)
		require.ErrorIs(t, err, vmm.ErrInjected)
		var ge *kvcache.GroupOpError
		require.ErrorAs(t, err, &ge)
		require.Equal(t, 1, ge.Group)
		require.Equal(t, 1, strings.Count(err.Error(), "kvcache"), "each layer named once: %v", err)
		require.Equal(t, before, hybridShape(t, h))
		require.Equal(t, stats.Groups[1].Prefix, h.Stats().Groups[1].Prefix)
		require.NoError(t, h.Verify())

		fd.Clear()
		state := writeState(t, fd, h, 1, 1, 32)
		require.NoError(t, h.MarkWritten(1, 32), "the same mark again, on a working device")
		require.Equal(t, kvcache.CheckpointStats{Made: 1}, checkpoints(h, 1))
		require.NoError(t, h.FreeSequence(1))

		before, stats = hybridShape(t, h), h.Stats()
		require.NoError(t, fd.FailNth(vmm.OpCopy, 1, nil))
		_, err = h.StartSequence(2, kvcache.Prompt{Tokens: p})
		require.ErrorIs(t, err, vmm.ErrInjected)
		require.Equal(t, 1, strings.Count(err.Error(), "kvcache"), "each layer named once: %v", err)
		require.ErrorAs(t, err, &ge)
		require.Equal(t, 1, ge.Group)
		require.Equal(t, before, hybridShape(t, h))
		require.Equal(t, stats.Groups[0].Prefix, h.Stats().Groups[0].Prefix, "the attention group counted no query")
		require.Equal(t, stats.Groups[1].Prefix, h.Stats().Groups[1].Prefix)
		_, err = h.Len(2)
		require.ErrorIs(t, err, kvcache.ErrUnknownSequence, "no group kept the sequence")
		require.NoError(t, h.Verify())

		fd.Clear()
		hit, err := h.StartSequence(2, kvcache.Prompt{Tokens: p})
		require.NoError(t, err)
		require.Equal(t, 32, hit)
		require.Equal(t, state, stateOfSeq(t, fd, h, 1, 2))
	})
	t.Run("memory", func(t *testing.T) {
		// States of 2 x 32 KiB: 2 to the recurrent group's 128 KiB page, and the limit lets
		// each group map one page.
		dev := hostDevice(t, 64<<10)
		h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: ckptGeometry(32 << 10), Limit: 192 << 10, Capacity: 4 << 20, NoBackground: true})
		require.NoError(t, err)
		t.Cleanup(func() { require.NoError(t, h.Close()) })
		require.Equal(t, 2, h.Group(1).Config().BlocksPerPage())
		p := promptOf(40, 5)
		_, err = h.StartSequence(1, kvcache.Prompt{Tokens: p})
		require.NoError(t, err)
		_, err = h.AppendTokenIDs(1, p[:32], make([][]int64, 2))
		require.NoError(t, err)
		_, err = h.AppendTokens(2, 16, make([][]int64, 2)) // the second state: the page is full
		require.NoError(t, err)

		require.NoError(t, h.MarkWritten(1, 32), "no memory for a checkpoint is no error")
		require.Equal(t, kvcache.CheckpointStats{Skipped: 1}, checkpoints(h, 1))
		require.Zero(t, h.Group(1).Stats().Prefix.CachedBlocks)
		require.NoError(t, h.Verify())

		require.NoError(t, h.FreeSequence(2))
		state := writeState(t, dev, h, 1, 1, 32)
		require.NoError(t, h.MarkWritten(1, 32), "memory again: the same mark makes it")
		require.Equal(t, kvcache.CheckpointStats{Made: 1, Skipped: 1}, checkpoints(h, 1))
		require.NoError(t, h.FreeSequence(1))

		_, err = h.AppendTokens(3, 16, make([][]int64, 2)) // a state beside the checkpoint: full again
		require.NoError(t, err)
		before, stats := hybridShape(t, h), h.Stats()
		_, err = h.StartSequence(4, kvcache.Prompt{Tokens: p})
		require.ErrorIs(t, err, kvcache.ErrOutOfMemory, "the checkpoint is not evicted for its own copy")
		var be *kvcache.BlocksError
		require.ErrorAs(t, err, &be)
		require.Equal(t, 1, be.Blocks)
		require.Equal(t, before, hybridShape(t, h))
		require.Equal(t, stats.Groups[1].Prefix, h.Stats().Groups[1].Prefix)
		require.NoError(t, h.Verify())

		require.NoError(t, h.FreeSequence(3))
		hit, err := h.StartSequence(4, kvcache.Prompt{Tokens: p})
		require.NoError(t, err)
		require.Equal(t, 32, hit)
		require.Equal(t, state, stateOfSeq(t, dev, h, 1, 4))
	})
}

// Checkpoints only on a recurrent group, in [0, MaxSequenceTokens], a multiple of every
// attention group's block: each bad value is an error naming the group and the numbers.
func TestCheckpointsBadInput(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(g *kvcache.Geometry)
		group  int
		reason string
	}{
		{"on attention", func(g *kvcache.Geometry) { g.Groups[0].Checkpoints = 32 }, 0, "only a recurrent group"},
		{"negative", func(g *kvcache.Geometry) { g.Groups[1].Checkpoints = -32 }, 1, "[0, 2147483647]"},
		{"past any sequence", func(g *kvcache.Geometry) { g.Groups[1].Checkpoints = math.MaxInt32 + 1 }, 1, "[0, 2147483647]"},
		{"not a multiple of a block", func(g *kvcache.Geometry) { g.Groups[1].Checkpoints = 24 }, 1, `group 0 ("full")'s BlockTokens 16`},
		{"not a multiple of a later block", func(g *kvcache.Geometry) {
			g.Groups = append(g.Groups, kvcache.LayerGroup{Name: "mla", Layers: []int{3}, KVHeads: 1, KHeadDim: 96, RopeDim: 16, DType: kvcache.BF16, BlockTokens: 64})
			g.Layers = 4
		}, 1, `group 2 ("mla")'s BlockTokens 64`},
	}
	for _, c := range cases {
		g := ckptGeometry(4096)
		c.mutate(&g)
		err := g.Validate()
		var ge *kvcache.GroupError
		require.ErrorAs(t, err, &ge, c.name)
		require.ErrorIs(t, err, kvcache.ErrInvalidArgument, c.name)
		require.Equal(t, c.group, ge.Group, "%s: %v", c.name, err)
		require.Equal(t, "Checkpoints", ge.Field, c.name)
		require.Contains(t, err.Error(), fmt.Sprintf("layer group %d (%q): Checkpoints = %v", c.group, g.Groups[c.group].Name, g.Groups[c.group].Checkpoints), c.name)
		require.Contains(t, err.Error(), c.reason, c.name)
		_, err = kvcache.NewHybrid(hostDevice(t, 64<<10), kvcache.HybridConfig{Geometry: g, NoBackground: true})
		require.ErrorAs(t, err, &ge, c.name)
	}
	g := ckptGeometry(4096)
	g.Groups = append(g.Groups, kvcache.LayerGroup{Name: "mla", Layers: []int{3}, KVHeads: 1, KHeadDim: 96, RopeDim: 16, DType: kvcache.BF16, BlockTokens: 32})
	g.Layers = 4
	require.NoError(t, g.Validate(), "32 is a multiple of 16 and of 32")

	state := kvcache.Config{Layers: 2, StateBytes: 4096, CheckpointTokens: 32, NoBackground: true}
	require.NoError(t, state.Validate())
	for name, c := range map[string]kvcache.Config{
		"on K/V":   func() kvcache.Config { c := tinyConfig(); c.CheckpointTokens = 32; return c }(),
		"negative": func() kvcache.Config { c := state; c.CheckpointTokens = -1; return c }(),
	} {
		var ce *kvcache.ConfigError
		require.ErrorAs(t, c.Validate(), &ce, name)
		require.Equal(t, "CheckpointTokens", ce.Field, name)
	}
	withHost := state
	withHost.HostBlocks = 4
	require.NoError(t, withHost.Validate(), "swaps move the state")
	withHost.HostPrefixCache = true
	require.ErrorIs(t, withHost.Validate(), kvcache.ErrNotSupported, "checkpoints stay on the device")
}

// A Manager of recurrent states alone keeps checkpoints and resumes from them too.
func TestManagerCheckpoints(t *testing.T) {
	dev := hostDevice(t, 64<<10)
	m := newManager(t, dev, kvcache.Config{Layers: 2, StateBytes: 4096, CheckpointTokens: 32, PageSize: 64 << 10, Capacity: 1 << 20, NoBackground: true})
	p := promptOf(80, 4)
	_, err := m.StartSequence(1, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	_, err = m.AppendTokenIDs(1, p, nil)
	require.NoError(t, err)
	b, err := m.Blocks(1, nil)
	require.NoError(t, err)
	state := bytes.Repeat([]byte{7}, 2*4096)
	require.NoError(t, dev.CopyIn(m.BlockAddr(0, 0, b[0]), state))
	require.NoError(t, m.MarkWritten(1, 64))
	require.NoError(t, m.FreeSequence(1))
	hit, err := m.StartSequence(2, kvcache.Prompt{Tokens: p, Keys: prefix.Keys(nil, prefix.Namespace{}, 32, p[:64])})
	require.NoError(t, err)
	require.Equal(t, 64, hit)
	b, err = m.Blocks(2, nil)
	require.NoError(t, err)
	got := make([]byte, len(state))
	require.NoError(t, dev.CopyOut(got, m.BlockAddr(0, 0, b[0])))
	require.Equal(t, state, got)
	require.Equal(t, kvcache.CheckpointStats{Made: 1, Resumed: 1}, m.Stats().Prefix.Checkpoints)
	require.NoError(t, m.Verify())
}

// traceSeq is what the checkpoint trace knows of a live sequence: its ids, how many are
// marked written, and its live state's bytes (nil until the trace writes or resumes one).
type traceSeq struct {
	ids     []kvcache.TokenID
	written int
	state   []byte
}

// A random trace over every kind of group, with a recurrent group that keeps a checkpoint every
// 32 tokens: appends with ids (following a few shared base prompts, or not), marks on and off
// the interval, starts of prompts sharing prefixes, forks, truncations and frees. After every
// step Verify passes and every live state reads back as the reference says, each started
// sequence's the checkpoint it resumed from; every mark at a multiple of 32 makes a checkpoint,
// finds one cached, or counts a skip.
func TestHybridCheckpointTrace(t *testing.T) {
	for seed := range uint64(4) {
		t.Run(fmt.Sprint("seed=", seed), func(t *testing.T) {
			dev := hostDevice(t, 64<<10)
			g := smallHybrid(true)
			g.Groups[4].Checkpoints = 32
			cfg := kvcache.HybridConfig{Geometry: g, Limit: 256 << 20, Capacity: 64 << 20, PrefixCacheBytes: 4 << 20, NoBackground: true}
			tight := seed%2 == 1
			if tight { // appends and starts fail, checkpoints are evicted
				cfg.Limit, cfg.PrefixCacheBytes = 5<<18, 256<<10
			}
			h, err := kvcache.NewHybrid(dev, cfg)
			require.NoError(t, err)
			t.Cleanup(func() { require.NoError(t, h.Close()) })
			c := checkpointTrace(t, dev, h, rand.New(rand.NewPCG(seed, 17)))
			st := h.Group(4).Stats().Prefix
			assert.EqualValues(t, c.made, st.Checkpoints.Made)
			assert.EqualValues(t, c.resumed, st.Checkpoints.Resumed)
			assert.Positive(t, c.made)
			if tight {
				assert.Positive(t, c.refused, "out of memory")
				assert.Positive(t, st.Evictions, "checkpoints evicted")
			} else {
				assert.Positive(t, c.resumed, "starts resumed")
			}
			t.Logf("%+v; %+v, %d evicted", c, st.Checkpoints, st.Evictions)
		})
	}
}

// traceCounts are what a checkpoint trace did.
type traceCounts struct{ made, resumed, refused int }

func checkpointTrace(t *testing.T, dev vmm.Device, h *kvcache.Hybrid, r *rand.Rand) traceCounts {
	const sg, ct = 4, 32 // the recurrent group, its interval
	bases := [][]kvcache.TokenID{promptOf(300, 1), promptOf(300, 2), promptOf(300, 3)}
	ref := map[prefix.Key][]byte{} // what each checkpoint copied
	live := map[kvcache.SeqID]*traceSeq{}
	keyAt := func(ids []kvcache.TokenID, n int) prefix.Key {
		return prefix.Keys(nil, prefix.Namespace{}, ct, ids[:n])[n/ct-1]
	}
	tag := uint64(1)
	dst := make([][]int64, h.Groups())
	var c traceCounts
	for step := range 600 {
		seq := kvcache.SeqID(r.IntN(8))
		s := live[seq]
		for g := range dst {
			dst[g] = dst[g][:0]
		}
		switch op := r.IntN(10); {
		case s == nil: // start a prompt: part of a base, sometimes diverging
			p := slices.Clone(bases[r.IntN(len(bases))][:1+r.IntN(300)])
			if r.IntN(4) == 0 {
				p[r.IntN(len(p))] = kvcache.TokenID(1 << 30)
			}
			hit, err := h.StartSequence(seq, kvcache.Prompt{Tokens: p})
			if err != nil {
				require.ErrorIs(t, err, kvcache.ErrOutOfMemory, "step %d", step)
				c.refused++
				_, err = h.Len(seq)
				require.ErrorIs(t, err, kvcache.ErrUnknownSequence, "step %d", step)
				break
			}
			require.Zero(t, hit%ct, "step %d: a hit ends at a checkpoint", step)
			s = &traceSeq{ids: p[:hit], written: hit}
			if hit > 0 {
				want, ok := ref[keyAt(p, hit)]
				require.True(t, ok, "step %d: resumed from a checkpoint never made", step)
				s.state = want
				c.resumed++
			}
			live[seq] = s
		case op < 5: // append, write the state, mark
			n := 1 + r.IntN(40)
			if op < 2 { // to the next checkpoint
				n = ct - len(s.ids)%ct
			}
			base := bases[int(seq)%len(bases)]
			ids := make([]kvcache.TokenID, n)
			for i := range ids {
				if at := len(s.ids) + i; at < len(base) && r.IntN(8) > 0 {
					ids[i] = base[at]
				} else {
					ids[i] = kvcache.TokenID(r.IntN(5))
				}
			}
			if _, err := h.AppendTokenIDs(seq, ids, dst); err != nil {
				require.ErrorIs(t, err, kvcache.ErrOutOfMemory, "step %d", step)
				c.refused++
				break
			}
			s.ids = append(s.ids, ids...)
			tag++
			s.state = writeState(t, dev, h, sg, seq, tag)
			end := len(s.ids)
			before := checkpoints(h, sg)
			require.NoError(t, h.MarkWritten(seq, end), "step %d", step)
			after := checkpoints(h, sg)
			switch {
			case after.Made > before.Made:
				ref[keyAt(s.ids, end)] = s.state
				c.made++
			case end%ct == 0 && end >= s.written:
				cached := slices.Contains(h.Group(sg).CachedKeys(nil), keyAt(s.ids, end))
				require.True(t, cached || after.Skipped > before.Skipped, "step %d: a mark at %d made no checkpoint", step, end)
			default:
				require.Equal(t, before, after, "step %d: a mark at %d", step, end)
			}
			s.written = max(s.written, end)
		case op == 5: // fork
			other := kvcache.SeqID(8 + r.IntN(3))
			if err := h.Fork(seq, other); err != nil {
				require.ErrorIs(t, err, kvcache.ErrSequenceExists)
				break
			}
			live[other] = &traceSeq{ids: slices.Clone(s.ids), written: s.written, state: s.state}
		case op == 6: // truncate: the state is then the runtime's to redo
			k := r.IntN(len(s.ids) + 1)
			if err := h.Truncate(seq, k); err != nil {
				var ce *kvcache.CountError
				require.ErrorAs(t, err, &ce, "step %d", step)
				break
			}
			s.ids = s.ids[:len(s.ids)-k]
			s.written = min(s.written, len(s.ids))
			if len(s.ids) == 0 {
				s.state = nil // its state block is gone
			}
		default:
			require.NoError(t, h.FreeSequence(seq))
			delete(live, seq)
		}
		require.NoError(t, h.Verify(), "step %d", step)
		for id, q := range live {
			if q.state != nil {
				require.True(t, bytes.Equal(q.state, stateOfSeq(t, dev, h, sg, id)), "step %d: sequence %d's state", step, id)
			}
		}
	}
	return c
}
