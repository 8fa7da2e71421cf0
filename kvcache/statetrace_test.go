package kvcache_test

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// A random trace of the recurrent state's operations in a Hybrid of every group kind: starts
// that resume from checkpoints, keyed appends that write a new state, marks, forks,
// truncations, swaps out and in, sleep and wake, frees and compactions, under a tight limit,
// with or without host prefix caches, the device failing a copy or a map in one step of eight.
// After every step Verify holds and a refused call changed nothing; each live sequence's state
// reads back as its last written one, and a start that resumes reads a state marked at exactly
// its hit by a sequence with the same prefix.
func TestHybridStateTrace(t *testing.T) {
	for seed := range uint64(16) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			fd := vmm.InjectFaults(hostDevice(t, 64<<10))
			dev := vmm.Device(fd)
			g := smallHybrid(true)
			g.Groups[stateGroup].Checkpoints = 32
			h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: g, Limit: 3 << 20, Capacity: 16 << 20, NoBackground: true,
				PrefixCacheBytes: 256 << 10, HostTokens: 1024, HostSequences: 4, HostCacheTokens: int(seed%2) * 256})
			require.NoError(t, err)
			t.Cleanup(func() { require.NoError(t, h.Close()) })
			x := newHybridModel(t, dev, h)
			r := rand.New(rand.NewPCG(seed, 11))
			ids := map[kvcache.SeqID][]kvcache.TokenID{} // keyed sequences' ids; nil: not keyed
			marked := map[string][][]byte{}              // states marked after each prefix
			bases := [][]kvcache.TokenID{promptOf(300, 1), promptOf(300, 2)}
			next := kvcache.SeqID(0)
			base := map[kvcache.SeqID][]kvcache.TokenID{} // the prompt each sequence's ids follow
			pick := func() (kvcache.SeqID, bool) {
				seqs := slices.Sorted(maps.Keys(x.val))
				if len(seqs) == 0 {
					return 0, false
				}
				return seqs[r.IntN(len(seqs))], true
			}
			resumed := 0
			for step := range 600 {
				all := slices.Sorted(maps.Keys(x.val))
				before := hybridStateOf(t, h, append(all, next+1))
				var err error
				op := r.IntN(12)
				fd.Clear()                                      // a step that was skipped left its fault armed
				faulty := r.IntN(8) == 0 && op != 9 && op != 10 // compaction and sleep are not all or nothing
				if faulty {                                     // the device fails a copy or a map during this step
					which := []vmm.Op{vmm.OpCopy, vmm.OpMap, vmm.OpCreate}[r.IntN(3)]
					require.NoError(t, fd.FailNth(which, 1+r.IntN(2), nil))
				}
				seq, ok := pick()
				if !ok {
					op = 0
				}
				switch op {
				case 0: // a start on a shared prefix, prefilled to a mark
					next++
					base[next] = bases[r.IntN(2)]
					p := base[next][:1+r.IntN(299)]
					var hit int
					hit, err = h.StartSequence(next, kvcache.Prompt{Tokens: p})
					if err != nil {
						break
					}
					x.val[next] = make([]uint64, hit)
					ids[next] = slices.Clone(p[:hit])
					if hit > 0 {
						resumed++
						got := stateOfSeq(t, dev, h, stateGroup, next)
						require.Contains(t, marked[fmt.Sprint(p[:hit])], got, "step %d: the resumed state was marked at %d tokens of this prefix", step, hit)
						x.state[next] = got
					}
				case 1, 2: // keyed append from the base the sequence started on, then perhaps a mark
					if x.swapped[seq] || ids[seq] == nil {
						continue
					}
					n := len(ids[seq])
					add := 1 + r.IntN(60)
					if op == 2 { // a prefill chunk aligned to the checkpoints
						add = 32 - n%32 + 32*r.IntN(2)
					}
					more := slices.Clone(base[seq][n:min(300, n+add)])
					if len(more) == 0 {
						continue
					}
					if err = x.append(seq, 0, more); err != nil {
						break
					}
					ids[seq] = append(ids[seq], more...)
					if op == 2 {
						n := len(ids[seq])
						before = hybridStateOf(t, h, append(all, next+1)) // the append stands
						err = h.MarkWritten(seq, n)
						if err == nil && n%32 == 0 && x.state[seq] != nil {
							k := fmt.Sprint(ids[seq][:n])
							marked[k] = append(marked[k], x.state[seq])
						}
					}
				case 3: // a count append: no longer keyed
					if err = x.append(seq, 1+r.IntN(20), nil); err == nil {
						ids[seq] = nil
					}
				case 4:
					next++
					if err = h.Fork(seq, next); err == nil {
						x.val[next] = slices.Clone(x.val[seq])
						if st, ok := x.state[seq]; ok {
							x.state[next] = st
						}
						x.swapped[next] = false
						ids[next] = slices.Clone(ids[seq])
						base[next] = base[seq]
					}
				case 5: // a truncation, then the runtime writes the state anew
					n, _ := h.Len(seq)
					k := r.IntN(n + 1)
					if err = h.Truncate(seq, k); err == nil {
						x.val[seq] = x.val[seq][:n-k]
						if ids[seq] != nil {
							ids[seq] = ids[seq][:n-k]
						}
						delete(x.state, seq) // stale until the next append writes it
					}
				case 6, 7:
					out := op == 6
					if x.swapped[seq] == out {
						continue
					}
					_, err = x.swap(out, seq)
				case 8:
					x.free(seq)
					delete(ids, seq)
				case 9:
					_, err = h.Compact(kvcache.CompactOptions{})
				case 10:
					_, err = h.Sleep()
					require.NoError(t, err)
					for _, s := range all { // a free, a fork and a truncation while asleep
						if !x.swapped[s] && r.IntN(3) == 0 {
							n, _ := h.Len(s)
							if h.Truncate(s, min(n, 1)) == nil {
								x.val[s] = x.val[s][:n-min(n, 1)]
								if ids[s] != nil {
									ids[s] = ids[s][:n-min(n, 1)]
								}
								delete(x.state, s)
							}
							break
						}
					}
					_, aerr := h.AppendTokens(seq, 1, make([][]int64, h.Groups()))
					require.ErrorIs(t, aerr, kvcache.ErrAsleep)
					require.NoError(t, h.Wake())
				case 11:
					if n, _ := h.Len(seq); x.swapped[seq] || n > 0 && x.state[seq] == nil { // a mark of a stale state would lie

						continue
					}
					n, _ := h.Len(seq) // the state is the one after all its tokens
					if r.IntN(2) == 0 {
						n += 1 + r.IntN(10)
					}
					if err = h.MarkWritten(seq, n); err == nil && n%32 == 0 && ids[seq] != nil && x.state[seq] != nil {
						k := fmt.Sprint(ids[seq][:n])
						marked[k] = append(marked[k], x.state[seq])
					}
				}
				fd.Clear()
				if err != nil {
					var ce *kvcache.CountError
					require.True(t, errors.Is(err, vmm.ErrInjected) || errors.Is(err, kvcache.ErrOutOfMemory) || errors.Is(err, kvcache.ErrSwapped) || errors.As(err, &ce),
						"step %d (op %d): %v", step, op, err)
					require.Equal(t, before, hybridStateOf(t, h, append(all, next+1)), "step %d (op %d): the refused call changed something: %v", step, op, err)
					if op == 0 {
						next--
					}
				}
				require.NoError(t, h.Verify(), "step %d (op %d)", step, op)
				for _, s := range slices.Sorted(maps.Keys(x.val)) {
					if st, ok := x.state[s]; ok && !x.swapped[s] {
						n, _ := h.Len(s)
						require.Positive(t, n, "step %d (op %d): sequence %d has a state", step, op, s)
						require.Equal(t, st, stateOfSeq(t, dev, h, stateGroup, s), "step %d (op %d): state of %d", step, op, s)
					}
				}
			}
			t.Logf("seed %d: %d resumed", seed, resumed)
		})
	}
}
