package kvcache

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
)

// fastGeometry has a group of every kind: full attention, a window with sinks, chunks, an MLA
// latent in 32-token blocks (no chain to the 16-token groups) and a recurrent state.
func fastGeometry() Geometry {
	return Geometry{Model: "fast", Layers: 5, Groups: []LayerGroup{
		{Name: "full", Layers: []int{0}, KVHeads: 1, KHeadDim: 64, VHeadDim: 64, DType: F16, BlockTokens: 16},
		{Name: "window", Layers: []int{1}, Kind: SlidingWindow, Window: 32, Sinks: 2, KVHeads: 1, KHeadDim: 64, VHeadDim: 64, DType: F16, BlockTokens: 16},
		{Name: "chunk", Layers: []int{2}, Kind: ChunkedAttention, Window: 64, KVHeads: 1, KHeadDim: 64, VHeadDim: 64, DType: F16, BlockTokens: 16},
		{Name: "mla", Layers: []int{3}, KVHeads: 1, KHeadDim: 96, RopeDim: 16, DType: F16, BlockTokens: 32},
		{Name: "state", Layers: []int{4}, Kind: RecurrentState, StateBytes: 4096},
	}}
}

// slowAppend is append with every group on the transaction path (appendSlow: a group that
// fastAppend allows prepares with prepareFast and commits with fastSlots), the reference that
// Hybrid.fastStep inlines.
func (h *Hybrid) slowAppend(seq SeqID, n int, ids []TokenID, dst [][]int64) ([][]int64, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.appendSlow(h.index.get(seq), seq, n, ids, dst)
}

// hybridView is what a caller sees of h: each group's stats, and each sequence's length and
// blocks in each group.
func hybridView(t *testing.T, h *Hybrid, seqs int) string {
	v := ""
	for g, m := range h.groups {
		s := m.Stats()
		s.ReserveErr = nil
		v += fmt.Sprintf("group %d %+v\n", g, s)
	}
	for seq := range SeqID(seqs) {
		n, err := h.Len(seq)
		v += fmt.Sprintf("seq %d: %d %v", seq, n, err)
		if err == nil {
			for _, m := range h.groups {
				b, err := m.Blocks(seq, nil)
				require.NoError(t, err)
				v += fmt.Sprint(" ", b)
			}
		}
		v += "\n"
	}
	return v
}

// The Hybrid's fast path (fastStep: every group's checks and slots from the lanes) does what
// the transaction path does when every group takes the step on its fast path: two Hybrids
// driven by one random trace, one through append and one through appendSlow alone, return the
// same slots and errors and end every step with the same groups and sequences. The trace
// decodes (one token, with ids or without), prefills, forks, truncates, frees, sleeps, and runs
// the groups out of memory, so that steps fall on either path, windows and chunks drop blocks
// on both, and a failing group aborts the ones before it.
func TestHybridFastStepMatchesSlowPath(t *testing.T) {
	for _, seed := range []uint64{1, 2, 3} {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			cfg := HybridConfig{Limit: 1 << 20, Capacity: 16 << 20, NoBackground: true}
			g := fastGeometry()
			fast := newHostHybrid(t, "fast", cfg, g.Groups...)
			slow := newHostHybrid(t, "slow", cfg, g.Groups...)
			r := rand.New(rand.NewPCG(seed, 7))
			const seqs = 6
			fdst, sdst := make([][]int64, len(g.Groups)), make([][]int64, len(g.Groups))
			steps, fastSteps := 4000, 0
			appendBoth := func(step int, seq SeqID, n int, ids []TokenID) (ferr, serr error) {
				for i := range fdst {
					fdst[i], sdst[i] = fdst[i][:0], sdst[i][:0]
				}
				if ids == nil {
					fdst, ferr = fast.AppendTokens(seq, n, fdst)
				} else {
					fdst, ferr = fast.AppendTokenIDs(seq, ids, fdst)
				}
				sdst, serr = slow.slowAppend(seq, n, ids, sdst)
				require.Equal(t, sdst, fdst, "step %d: slots of %d tokens of sequence %d", step, n, seq)
				return ferr, serr
			}
			for step := range steps {
				seq := SeqID(r.IntN(seqs))
				var ferr, serr error
				switch op := r.IntN(100); {
				case op < 84: // append: mostly a decode step
					n := 1
					if r.IntN(8) == 0 {
						n = r.IntN(40)
					}
					var ids []TokenID
					if seq%3 != 0 || r.IntN(10) == 0 { // sequences 0 and 3 mostly count
						ids = make([]TokenID, n)
						for i := range ids {
							ids[i] = TokenID(r.IntN(2)) // few distinct blocks: hits, cached tails
						}
					}
					if rec := fast.index.get(seq); rec != nil && allFast(fast, rec, n, ids != nil) {
						fastSteps++
					}
					ferr, serr = appendBoth(step, seq, n, ids)
				case op < 89:
					to := SeqID(r.IntN(seqs))
					ferr, serr = fast.Fork(seq, to), slow.Fork(seq, to)
				case op < 93:
					n, _ := fast.Len(seq)
					n = max(0, n-r.IntN(20))
					ferr, serr = fast.Truncate(seq, n), slow.Truncate(seq, n)
				case op < 98:
					ferr, serr = fast.FreeSequence(seq), slow.FreeSequence(seq)
				case op < 99: // an append while asleep changes nothing
					_, ferr = fast.Sleep()
					require.NoError(t, ferr)
					_, serr = slow.Sleep()
					require.NoError(t, serr)
					ferr, serr = appendBoth(step, seq, 1, nil)
					require.ErrorIs(t, ferr, ErrAsleep)
					require.Equal(t, fmt.Sprint(serr), fmt.Sprint(ferr), "step %d", step)
					require.Equal(t, hybridView(t, slow, seqs), hybridView(t, fast, seqs), "step %d", step)
					ferr, serr = fast.Wake(), slow.Wake()
				default: // runs the groups out of memory: a step fails in some group, after others prepared
					ferr, serr = appendBoth(step, seq, 200+r.IntN(1000), nil)
				}
				require.Equal(t, fmt.Sprint(serr), fmt.Sprint(ferr), "step %d", step)
				require.Equal(t, hybridView(t, slow, seqs), hybridView(t, fast, seqs), "step %d", step)
				if step%50 == 0 {
					require.NoError(t, fast.Verify())
				}
			}
			require.NoError(t, fast.Verify())
			require.NoError(t, slow.Verify())
			require.Greater(t, fastSteps, steps/4, "the trace takes the fast path")
		})
	}
}

// allFast reports whether every group takes n tokens of rec's sequence on its fast path (the
// test the Hybrid made before fastStep fused it in): room in a tail it alone holds, the
// manager open and awake, keyed as the append.
func allFast(h *Hybrid, rec *hybridSeq, n int, keyed bool) bool {
	for i, m := range h.groups {
		if s := rec.seqs[i]; s.Keyed != keyed || !m.fastAppend(s, n) {
			return false
		}
	}
	return true
}
