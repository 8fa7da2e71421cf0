package kvbench

import (
	"testing"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/vmm"
)

// HybridGeometry is the geometry of the hybrid benchmarks: the layout of Config (one layer, one
// head of 64) in three groups of one layer each, full attention, a 128-token sliding window and
// 8,192-token chunks, all in 16-token blocks.
func HybridGeometry() kvcache.Geometry {
	grp := func(name string, layer int, kind kvcache.AttentionKind, window int) kvcache.LayerGroup {
		return kvcache.LayerGroup{Name: name, Layers: []int{layer}, Kind: kind, Window: window, KVHeads: 1, KHeadDim: 64, VHeadDim: 64,
			DType: kvcache.F16, BlockTokens: 16}
	}
	return kvcache.Geometry{Model: "bench-hybrid", Layers: 3, Groups: []kvcache.LayerGroup{
		grp("full", 0, kvcache.FullAttention, 0), grp("window", 1, kvcache.SlidingWindow, 128), grp("chunk", 2, kvcache.ChunkedAttention, 8192),
	}}
}

// newHybrid returns a Hybrid of HybridGeometry on a host device, closed when b ends: each
// group's page is Config's (64 blocks in 256 KiB), and the reserve and the watermark are c's
// (the yardstick's configuration, so that both sides keep the same pages mapped).
func newHybrid(b *testing.B, prefixBytes uint64, c kvcache.Config) *kvcache.Hybrid {
	b.Helper()
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 256 << 10, Capacity: 1 << 40})
	if err != nil {
		b.Fatal(err)
	}
	h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: HybridGeometry(), Limit: 1 << 40, Capacity: c.Capacity,
		PrefixCacheBytes: prefixBytes, ReservePages: c.ReservePages, HighWatermark: c.HighWatermark})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if err := h.Close(); err != nil {
			b.Error(err)
		}
		if err := dev.Close(); err != nil {
			b.Error(err)
		}
	})
	return h
}

// HybridDecode times the decode step of a batch of 256 sequences across the three groups of
// HybridGeometry: one AppendTokens of the Hybrid, whose windows drop a block every 16 tokens.
// Compare it with Decode(b, 0, false), the same step on one manager of one group. Every 1,024
// tokens a sequence ends and another takes its place (untimed).
func HybridDecode(b *testing.B) { hybridDecode(b, false) }

// HybridDecodeIDs is HybridDecode with ids (AppendTokenIDs, every id new: each filled block is
// keyed, cached and later evicted in every group). Compare it with Decode(b, 0, true).
func HybridDecodeIDs(b *testing.B) { hybridDecode(b, true) }

// OneGroupDecode is the yardstick of HybridDecode (withIDs false) and HybridDecodeIDs: Decode's
// step on one full-attention manager whose watermark, as the Hybrid's groups', keeps the
// batch's pages mapped (HeldConfig), so that neither side maps or unmaps in the timed steps.
func OneGroupDecode(b *testing.B, withIDs bool) { decodeWith(b, 0, withIDs, HeldConfig()) }

func hybridDecode(b *testing.B, withIDs bool) {
	h := newHybrid(b, 0, HeldConfig()) // as OneGroupDecode
	dst := make([][]int64, h.Groups())
	id := make([]prefix.Token, 1)
	next := prefix.Token(1)
	step := func(s kvcache.SeqID) {
		for g := range dst {
			dst[g] = dst[g][:0]
		}
		var err error
		if withIDs {
			id[0] = next
			next++
			dst, err = h.AppendTokenIDs(s, id, dst)
		} else {
			dst, err = h.AppendTokens(s, 1, dst)
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	decodeLoop(b, step, h.FreeSequence)
}

// HybridStartCached times StartSequence of a 4,096-token prompt cached whole in every group of
// HybridGeometry (the keys given when withKeys); compare it with StartCached on one
// full-attention manager.
func HybridStartCached(b *testing.B, withKeys bool) {
	h := newHybrid(b, 1<<30, Config()) // as StartCached
	p := make([]prefix.Token, PromptTokens)
	for i := range p {
		p[i] = prefix.Token(i*7919 + 13)
	}
	if _, err := h.AppendTokenIDs(0, p, make([][]int64, h.Groups())); err != nil {
		b.Fatal(err)
	}
	if err := h.FreeSequence(0); err != nil {
		b.Fatal(err)
	}
	prompt := kvcache.Prompt{Tokens: p}
	if withKeys {
		prompt.Keys = prefix.Keys(nil, prefix.Namespace{}, 16, p)
	}
	b.ReportAllocs()
	for b.Loop() {
		hit, err := h.StartSequence(1, prompt)
		if err != nil || hit != PromptTokens-16 {
			b.Fatalf("start: %d tokens hit, %v", hit, err)
		}
		b.StopTimer()
		if err := h.FreeSequence(1); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/1e3, "us/start")
}
