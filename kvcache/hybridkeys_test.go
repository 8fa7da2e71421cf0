package kvcache_test

import (
	"errors"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/vmm"
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

// A Hybrid append whose copy-on-write in one group succeeded into a block it took by evicting
// an idle cached block, and whose copy in a later group failed, is undone; but the first
// group's cache entry for the evicted block does not come back, since the copy replaced its
// content: a later prompt with that block's tokens does not hit wrong K/V.
func TestHybridAbortedCopyDropsTheOverwrittenBlock(t *testing.T) {
	fd := vmm.InjectFaults(hostDevice(t, 64<<10))
	// Group a: 16-token blocks of 4 KiB, 16 to a 64 KiB page. Group b: 32-token blocks of 4 KiB,
	// also 16 to a page. The limit is one page a group.
	g := kvcache.Geometry{Model: "two", Layers: 2, Groups: []kvcache.LayerGroup{
		{Name: "a", Layers: []int{0}, KVHeads: 1, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
		{Name: "b", Layers: []int{1}, KVHeads: 1, KHeadDim: 32, VHeadDim: 32, DType: kvcache.BF16, BlockTokens: 32},
	}}
	h, err := kvcache.NewHybrid(fd, kvcache.HybridConfig{Geometry: g, Limit: 128 << 10, Capacity: 1 << 20, NoBackground: true})
	require.NoError(t, err)
	defer func() { require.NoError(t, h.Close()) }()
	for i := range 2 {
		require.EqualValues(t, 16, h.Group(i).Stats().BlocksPerPage)
	}
	d := &hybridData{dev: fd, h: h, val: map[kvcache.SeqID][]uint64{}}
	dst := func() [][]int64 { return make([][]int64, 2) }

	p := promptOf(32, 7) // two blocks of a, one of b: cached, then idle
	slots, err := h.AppendTokenIDs(10, p, dst())
	require.NoError(t, err)
	d.write(t, 10, 0, slots)
	want := d.val[10]
	require.NoError(t, h.FreeSequence(10))
	// 14 blocks of a (its page is full with the 2 idle ones), 7 of b (8 of its 16 are free).
	slots, err = h.AppendTokenIDs(1, promptOf(13*16+8, 8), dst())
	require.NoError(t, err)
	d.write(t, 1, 0, slots)
	require.NoError(t, h.Fork(1, 2)) // the partial tail is shared in both groups
	require.NoError(t, fd.FailNth(vmm.OpCopy, 2, nil))
	// Group a copies its tail into a block it evicts an idle one for; group b's copy, into a free
	// block, fails.
	_, err = h.AppendTokenIDs(2, []kvcache.TokenID{1}, dst())
	require.ErrorIs(t, err, vmm.ErrInjected)
	var ge *kvcache.GroupOpError
	require.ErrorAs(t, err, &ge)
	require.Equal(t, 1, ge.Group)
	require.NoError(t, h.Verify())
	require.EqualValues(t, 1, h.Group(0).Stats().Prefix.Evictions, "the block the copy overwrote left the cache")

	hit, err := h.StartSequence(3, kvcache.Prompt{Tokens: append(slices.Clone(p), 99)})
	require.NoError(t, err)
	if hit > 0 { // then its blocks must still hold what sequence 10 wrote
		d.val[3] = want[:hit]
		d.check(t, []kvcache.SeqID{3})
	}
	require.Zero(t, hit)
	require.NoError(t, h.FreeSequence(3))
	_, err = h.AppendTokenIDs(2, []kvcache.TokenID{1}, dst()) // and the append goes through now
	require.NoError(t, err)
	require.NoError(t, h.Verify())
}
