package kvcache_test

import (
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
)

// The groups of a Hybrid that share a block size share one key chain: each block is hashed
// once and the other groups take its key. On random appends with ids (one at a time and in
// runs), prompts started in several namespaces on shared prefixes, marks, forks, truncations
// and frees, every group's keys stay the hash chain of its own ids from its own root (Verify
// recomputes them), and the groups agree on the hits they serve. The MLA group (32-token
// blocks) keeps a chain of its own.
func TestHybridGroupsShareTheKeyChain(t *testing.T) {
	for _, wait := range []bool{false, true} {
		dev := hostDevice(t, 64<<10)
		h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: smallHybrid(false), Limit: 256 << 20, Capacity: 64 << 20,
			NoBackground: true, WaitForWrites: wait, PrefixCacheBytes: 1 << 20})
		require.NoError(t, err)
		r := rand.New(rand.NewPCG(7, 8))
		namespaces := []prefix.Namespace{{}, {Salt: "tenant-a"}, {Adapter: 3}}
		bases := [][]kvcache.TokenID{promptOf(400, 1), promptOf(400, 2)}
		live := map[kvcache.SeqID]bool{}
		dst := make([][]int64, h.Groups())
		hits := 0
		for step := range 500 {
			seq := kvcache.SeqID(r.IntN(8))
			switch op := r.IntN(8); {
			case op == 0 && !live[seq]: // start on a shared prefix, then append the rest with ids
				p := bases[r.IntN(len(bases))][:1+r.IntN(300)]
				hit, err := h.StartSequence(seq, kvcache.Prompt{Tokens: p, Namespace: namespaces[r.IntN(len(namespaces))]})
				require.NoError(t, err, "step %d", step)
				hits += hit
				live[seq] = true
				if _, err := h.AppendTokenIDs(seq, p[hit:], dst); err != nil {
					require.True(t, errors.Is(err, kvcache.ErrOutOfMemory), "step %d: %v", step, err)
				}
			case op <= 3 && live[seq]: // decode steps, or a run of ids
				n := 1
				if op == 1 {
					n = 1 + r.IntN(40)
				}
				ids := make([]kvcache.TokenID, n)
				for i := range ids {
					ids[i] = kvcache.TokenID(r.IntN(50)) // few distinct ids: blocks repeat across sequences
				}
				if _, err := h.AppendTokenIDs(seq, ids, dst); err != nil {
					require.True(t, errors.Is(err, kvcache.ErrOutOfMemory), "step %d: %v", step, err)
				}
			case op == 4 && live[seq]:
				n, err := h.Len(seq)
				require.NoError(t, err)
				require.NoError(t, h.MarkWritten(seq, r.IntN(n+1)), "step %d", step)
			case op == 5 && live[seq]:
				other := kvcache.SeqID(8 + r.IntN(3))
				if err := h.Fork(seq, other); err == nil {
					live[other] = true
				}
			case op == 6 && live[seq]:
				n, err := h.Len(seq)
				require.NoError(t, err)
				_ = h.Truncate(seq, r.IntN(n+1)) // into a dropped window is refused, changing nothing
			case op == 7 && live[seq]:
				require.NoError(t, h.FreeSequence(seq))
				delete(live, seq)
			}
			require.NoError(t, h.Verify(), "step %d", step)
		}
		require.Positive(t, hits, "prompts on shared prefixes hit")
		require.NoError(t, h.Close())
	}
}

// A start of a cached prompt allocates nothing once warm, with the prompt's keys given and
// hashed: its chains go into scratch the Hybrid keeps (a hot path, as one manager's start is).
func TestHybridStartAllocatesNothing(t *testing.T) {
	dev := hostDevice(t, 64<<10)
	h := newHybrid(t, dev, smallHybrid(false))
	p := promptOf(512, 4)
	_, err := h.AppendTokenIDs(1, p, make([][]int64, h.Groups()))
	require.NoError(t, err)
	require.NoError(t, h.FreeSequence(1))
	for _, prompt := range []kvcache.Prompt{{Tokens: p}, {Tokens: p, Keys: prefix.Keys(nil, prefix.Namespace{}, 16, p)}} {
		start := func() { // no testify inside: boxing the hit to compare it would allocate
			hit, err := h.StartSequence(2, prompt)
			if err != nil || hit != 480 { // the last token is computed: the MLA group's 32-token blocks end the hit at 480
				t.Fatalf("start: hit %d, want 480: %v", hit, err)
			}
			if err := h.FreeSequence(2); err != nil {
				t.Fatal(err)
			}
		}
		start()
		require.Zero(t, testing.AllocsPerRun(50, start), "keys given: %v", prompt.Keys != nil)
	}
}
