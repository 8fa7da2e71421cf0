package kvcache_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/vmm"
)

// contentOf returns the value a token's K holds in hit tests: a hash of the namespace and every
// id up to and including it, what a model's K/V depend on. A hit must read these back.
func contentOf(ns prefix.Namespace, ids []kvcache.TokenID) []uint64 {
	v := uint64(14695981039346656037) ^ ns.Adapter*0x9e3779b97f4a7c15
	for _, c := range []byte(ns.Salt) {
		v = (v ^ uint64(c)) * 1099511628211
	}
	out := make([]uint64, len(ids))
	for i, id := range ids {
		v = (v ^ uint64(id) ^ uint64(i)<<40) * 1099511628211
		out[i] = v | 1<<63
	}
	return out
}

// edgeHybrid is a geometry of the corners a hit must meet: a window smaller than a block with
// sinks, chunks not a multiple of the block, an MLA latent in 64-token blocks, and a recurrent
// state with checkpoints every 64 tokens.
func edgeHybrid() kvcache.Geometry {
	return kvcache.Geometry{Model: "edge", Layers: 6, Groups: []kvcache.LayerGroup{
		{Name: "full", Layers: []int{0}, KVHeads: 1, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
		{Name: "window", Layers: []int{1}, Kind: kvcache.SlidingWindow, Window: 8, Sinks: 20, KVHeads: 1, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
		{Name: "chunk", Layers: []int{2}, Kind: kvcache.ChunkedAttention, Window: 40, KVHeads: 1, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
		{Name: "mla", Layers: []int{3}, KVHeads: 1, KHeadDim: 96, RopeDim: 16, DType: kvcache.BF16, BlockTokens: 64},
		{Name: "state", Layers: []int{4, 5}, Kind: kvcache.RecurrentState, StateBytes: 4096, Checkpoints: 64},
	}}
}

// hitModel is what a runtime knows of a Hybrid in hit tests: each sequence's namespace and ids.
type hitModel struct {
	t     *testing.T
	dev   vmm.Device
	h     *kvcache.Hybrid
	d     *hybridData
	ns    map[kvcache.SeqID]prefix.Namespace
	ids   map[kvcache.SeqID][]kvcache.TokenID
	hits  uint64 // tokens all starts found
	query uint64
}

// append appends ids to seq in pieces that end at each multiple of 32 tokens (where a
// recurrent group checkpoints), writing each piece's content into every group and the recurrent
// groups' state, and marking it written.
func (hm *hitModel) append(seq kvcache.SeqID, ids []kvcache.TokenID) error {
	for len(ids) > 0 {
		n := min(len(ids), 32-len(hm.ids[seq])%32)
		if err := hm.appendPiece(seq, ids[:n]); err != nil {
			return err
		}
		ids = ids[n:]
	}
	return nil
}

func (hm *hitModel) appendPiece(seq kvcache.SeqID, ids []kvcache.TokenID) error {
	t := hm.t
	before := hybridStateOf(t, hm.h, hitSeqs)
	dst, err := hm.h.AppendTokenIDs(seq, ids, make([][]int64, hm.h.Groups()))
	if err != nil {
		hm.failed(before, err)
		return err
	}
	from := len(hm.ids[seq])
	hm.ids[seq] = append(hm.ids[seq], ids...)
	hm.d.val[seq] = contentOf(hm.ns[seq], hm.ids[seq])
	hm.d.write(t, seq, from, dst)
	hm.writeState(seq)
	before = hybridStateOf(t, hm.h, hitSeqs)
	if err := hm.h.MarkWritten(seq, len(hm.ids[seq])); err != nil {
		hm.failed(before, err)
		return err
	}
	return nil
}

// failed checks that a call that returned err is typed and changed nothing since before.
func (hm *hitModel) failed(before hybridState, err error) {
	t := hm.t
	var ce *kvcache.CountError
	require.True(t, errors.Is(err, kvcache.ErrOutOfMemory) || errors.Is(err, kvcache.ErrSequenceExists) ||
		errors.Is(err, vmm.ErrInjected) || errors.As(err, &ce), "an untyped error: %v", err)
	require.Equal(t, before, hybridStateOf(t, hm.h, hitSeqs), "the failed call changed something: %v", err)
}

// hitSeqs are the sequence ids of hit tests.
var hitSeqs = []kvcache.SeqID{0, 1, 2, 3, 4, 5}

// writeState writes into each recurrent group's state of seq the content of its last token.
func (hm *hitModel) writeState(seq kvcache.SeqID) {
	t := hm.t
	for g := range hm.h.Groups() {
		m := hm.h.Group(g)
		if m.Config().StateBytes == 0 || len(hm.ids[seq]) == 0 {
			continue
		}
		b, err := m.Blocks(seq, nil)
		require.NoError(t, err)
		v := hm.d.val[seq][len(hm.ids[seq])-1]
		require.NoError(t, hm.dev.CopyIn(m.BlockAddr(0, 0, b[len(b)-1]), binary.LittleEndian.AppendUint64(nil, v)))
	}
}

// checkState checks that each recurrent group's state of seq is the state after its tokens.
func (hm *hitModel) checkState(seq kvcache.SeqID) {
	t := hm.t
	for g := range hm.h.Groups() {
		m := hm.h.Group(g)
		if m.Config().StateBytes == 0 || len(hm.ids[seq]) == 0 {
			continue
		}
		b, err := m.Blocks(seq, nil)
		require.NoError(t, err)
		var buf [8]byte
		require.NoError(t, hm.dev.CopyOut(buf[:], m.BlockAddr(0, 0, b[len(b)-1])))
		require.Equal(t, hm.d.val[seq][len(hm.ids[seq])-1], binary.LittleEndian.Uint64(buf[:]), "group %d sequence %d: the resumed state", g, seq)
	}
}

// start starts seq on p in ns and checks that what the hit holds is p's content in ns.
func (hm *hitModel) start(seq kvcache.SeqID, p []kvcache.TokenID, ns prefix.Namespace) (int, error) {
	t := hm.t
	hit, err := hm.h.StartSequence(seq, kvcache.Prompt{Tokens: p, Namespace: ns})
	if err != nil {
		return 0, err
	}
	require.Less(t, hit, max(len(p), 1), "the last prompt token is never a hit")
	hm.hits += uint64(hit)
	hm.query += uint64(len(p))
	hm.ns[seq], hm.ids[seq] = ns, slices.Clone(p[:hit])
	hm.d.val[seq] = contentOf(ns, hm.ids[seq])
	hm.d.check(t, []kvcache.SeqID{seq})
	hm.checkState(seq)
	for g := range hm.h.Groups() {
		st := hm.h.Group(g).Stats().Prefix
		require.Equal(t, hm.hits, st.HitTokens, "group %d: the hits every start returned", g)
		require.Equal(t, hm.query, st.QueryTokens, "group %d", g)
		require.LessOrEqual(t, st.HostHitTokens+st.UnheldHitTokens, st.HitTokens, "group %d", g)
	}
	return hit, nil
}

func (hm *hitModel) free(seq kvcache.SeqID) {
	if err := hm.h.FreeSequence(seq); err == nil {
		delete(hm.ids, seq)
		delete(hm.d.val, seq)
	}
}

// hitTrace drives h through random starts on shared prefixes in a few namespaces, prefills,
// decode steps, frees, a group's DropCache, Sleep and Wake, and compactions: every hit reads
// back the prompt's own content in every group, the recurrent state included, and every
// failure is typed and changes nothing.
func hitTrace(t *testing.T, dev vmm.Device, fd *vmm.FaultDevice, h *kvcache.Hybrid, tiered bool, rng *rand.Rand, steps int) {
	hm := &hitModel{t: t, dev: dev, h: h, d: &hybridData{dev: dev, h: h, val: map[kvcache.SeqID][]uint64{}},
		ns: map[kvcache.SeqID]prefix.Namespace{}, ids: map[kvcache.SeqID][]kvcache.TokenID{}}
	bases := [][]kvcache.TokenID{promptOf(400, 1), promptOf(400, 2)}
	namespaces := []prefix.Namespace{{}, {Adapter: 1}, {Salt: "x"}}
	all := hitSeqs
	for step := range steps {
		seq := kvcache.SeqID(rng.IntN(len(all)))
		before := hybridStateOf(t, h, all)
		var err error
		op := rng.IntN(12)
		switch {
		case op < 5:
			base := bases[rng.IntN(2)]
			p := slices.Clone(base[:1+rng.IntN(len(base))])
			if rng.IntN(3) == 0 { // a prompt that leaves the shared prefix
				p = append(p[:len(p)/2], promptOf(1+len(p)/2, uint32(7+rng.IntN(3)))...)
			}
			ns := namespaces[rng.IntN(len(namespaces))]
			if fd != nil && rng.IntN(2) == 0 { // a driver call of the start fails
				ops := []vmm.Op{vmm.OpCopy, vmm.OpMap, vmm.OpCreate, vmm.OpSetAccess}
				require.NoError(t, fd.FailNth(ops[rng.IntN(len(ops))], 1+rng.IntN(3), nil))
			}
			var hit int
			hit, err = hm.start(seq, p, ns)
			if fd != nil {
				fd.Clear()
			}
			if err != nil {
				hm.failed(before, err)
			} else if rng.IntN(4) > 0 {
				err = hm.append(seq, p[hit:])
			}
		case op < 7:
			if _, ok := hm.ids[seq]; ok {
				ids := make([]kvcache.TokenID, 1+rng.IntN(20))
				for i := range ids {
					ids[i] = kvcache.TokenID(rng.IntN(4))
				}
				err = hm.append(seq, ids)
			}
		case op < 10:
			hm.free(seq)
		case op == 10:
			_, err = h.Group(rng.IntN(h.Groups())).DropCache()
		default:
			if rng.IntN(2) == 0 {
				_, err = h.Compact(kvcache.CompactOptions{})
			} else {
				_, err = h.Sleep()
				require.NoError(t, err)
				err = h.Wake()
			}
		}
		if err != nil {
			if op >= 7 {
				hm.failed(before, err)
			}
			if _, ok := hm.ids[seq]; ok && op < 7 {
				// A failed prefill or append: the runtime frees the sequence.
				hm.free(seq)
			}
		}
		require.NoError(t, h.Verify(), "step %d (op %d)", step, op)
		if tiered {
			require.NoError(t, h.SyncTiers(context.Background()))
		}
		live := make([]kvcache.SeqID, 0, len(hm.ids))
		for _, s := range all {
			if _, ok := hm.ids[s]; ok {
				live = append(live, s)
			}
		}
		hm.d.check(t, live)
	}
}

// Every hit of a Hybrid serves the prompt's own K/V in every group, and a recurrent group the
// state after exactly the hit: starts on shared prefixes in three namespaces, with host caches
// and tiers or not, for the small geometry and one of edges (a window smaller than a block,
// sinks over a block, chunks across blocks, 64-token MLA blocks and checkpoints).
func TestHybridHitsServeThePromptsContent(t *testing.T) {
	small := smallHybrid(true)
	small.Groups[4].Checkpoints = 32
	tiny := edgeHybrid() // a window of one token reads no cached block
	tiny.Groups[1].Window, tiny.Groups[1].Sinks = 1, 0
	for _, tc := range []struct {
		name      string
		g         kvcache.Geometry
		hostCache int
		tiers     bool
		limit     uint64
		faults    bool
	}{
		{"small", small, 0, false, 256 << 20, false},
		{"small host", small, 256, false, 256 << 20, false},
		{"small tiers", small, 256, true, 256 << 20, false},
		{"small tight", small, 256, true, 2 << 20, false},
		{"edge", edgeHybrid(), 0, false, 256 << 20, false},
		{"edge host", edgeHybrid(), 512, false, 256 << 20, false},
		{"edge tiers", edgeHybrid(), 128, true, 256 << 20, false},
		{"edge tight", edgeHybrid(), 256, true, 2 << 20, false},
		{"tiny window", tiny, 256, true, 256 << 20, false},
		{"small faults", small, 256, true, 256 << 20, true},
		{"edge faults", edgeHybrid(), 256, true, 3 << 20, true},
	} {
		for seed := range uint64(6) {
			t.Run(fmt.Sprintf("%s/%d", tc.name, seed), func(t *testing.T) {
				dev := hostDevice(t, 64<<10)
				var fd *vmm.FaultDevice
				onDev := dev
				if tc.faults {
					fd = vmm.InjectFaults(dev)
					onDev = fd
				}
				var tiers func(int, kvcache.LayerGroup, tier.Fingerprint, int) ([]kvcache.Tier, error)
				if tc.tiers {
					tiers = newGroupStores().tiers
				}
				h, err := kvcache.NewHybrid(onDev, kvcache.HybridConfig{Geometry: tc.g, Limit: tc.limit, Capacity: 16 << 20,
					NoBackground: true, PrefixCacheBytes: 512 << 10, HostCacheTokens: tc.hostCache, Tiers: tiers, TierTimeout: time.Minute})
				require.NoError(t, err)
				defer func() { require.NoError(t, h.Close()) }()
				hitTrace(t, dev, fd, h, tc.tiers, rand.New(rand.NewPCG(seed, 7)), 150)
			})
		}
	}
}
