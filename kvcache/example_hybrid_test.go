package kvcache_test

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/tier/disk"
	"github.com/pagedkv/pagedkv/vmm"
)

// A model of two layer groups, full attention and a 64-token sliding window, whose cache
// outlives the process: each group writes what its host cache takes to a directory of its
// own, and a restarted process finds the prompt there. The window group brings back only the
// blocks its next token reads.
func ExampleNewHybrid_tiers() {
	root, err := os.MkdirTemp("", "pagedkv-example-")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(root)
	geom := kvcache.Geometry{Model: "two-groups", Layers: 2, Groups: []kvcache.LayerGroup{
		{Name: "global", Layers: []int{0}, KVHeads: 2, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
		{Name: "local", Layers: []int{1}, Kind: kvcache.SlidingWindow, Window: 64, KVHeads: 2, KHeadDim: 64, VHeadDim: 64,
			DType: kvcache.BF16, BlockTokens: 16},
	}}
	prompt := make([]kvcache.TokenID, 1000)
	for i := range prompt {
		prompt[i] = kvcache.TokenID(i*7 + 1)
	}

	// run is one process's life: a Hybrid whose groups each keep a disk store in root.
	run := func(work func(h *kvcache.Hybrid)) {
		dev, err := vmm.Open("host")
		if err != nil {
			panic(err)
		}
		defer dev.Close()
		var stores []*disk.Store
		defer func() {
			for _, s := range stores {
				s.Close()
			}
		}()
		h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: geom, Capacity: 1 << 30, NoBackground: true,
			HostCacheTokens: 4096, TierTimeout: time.Minute, // a disk read a busy machine delays still counts here
			Tiers: func(i int, g kvcache.LayerGroup, fp tier.Fingerprint, blockBytes int) ([]kvcache.Tier, error) {
				s, err := disk.Open(fmt.Sprintf("%s/%s", root, g.Name), disk.Options{Fingerprint: fp, BlockBytes: blockBytes, LimitBytes: 64 << 20})
				if err != nil {
					return nil, err
				}
				stores = append(stores, s)
				return []kvcache.Tier{{Store: s, Medium: "DISK"}}, nil
			}})
		if err != nil {
			panic(err)
		}
		defer h.Close()
		work(h)
	}

	run(func(h *kvcache.Hybrid) {
		hit, _ := h.StartSequence(1, kvcache.Prompt{Tokens: prompt})
		_, _ = h.AppendTokenIDs(1, prompt[hit:], make([][]int64, h.Groups())) // the runtime's prefill
		_ = h.FreeSequence(1)
		_ = h.SyncTiers(context.Background()) // before a planned exit
		fmt.Println("first process: hit", hit)
	})
	run(func(h *kvcache.Hybrid) {
		hit, _ := h.StartSequence(1, kvcache.Prompt{Tokens: prompt})
		fmt.Println("restarted: hit", hit)
		for g := range h.Groups() {
			st := h.Group(g).Stats().Prefix.Tiers[0]
			fmt.Printf("group %d (%s): %d tokens from disk\n", g, geom.Groups[g].Name, st.HitTokens)
		}
	})
	// Output:
	// first process: hit 0
	// restarted: hit 992
	// group 0 (global): 992 tokens from disk
	// group 1 (local): 64 tokens from disk
}

// A scheduler asks before it admits a long prompt: a sliding-window group needs the blocks of
// one prefill call and of its window (an append first frees what the length before it no longer
// reads), so the same 16k-token prompt that does not fit in one call fits in calls of 2,048
// tokens. The groups share one budget of 16 MiB.
func ExampleHybrid_Admit() {
	dev, err := vmm.Open("host")
	if err != nil {
		panic(err)
	}
	defer dev.Close()
	geom := kvcache.Geometry{Model: "gemma-like", Layers: 6, Groups: []kvcache.LayerGroup{
		{Name: "global", Layers: []int{0}, KVHeads: 1, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
		{Name: "local", Layers: []int{1, 2, 3, 4, 5}, Kind: kvcache.SlidingWindow, Window: 512, KVHeads: 1, KHeadDim: 64,
			VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
	}}
	h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: geom, Limit: 16 << 20, Capacity: 1 << 30, NoBackground: true})
	if err != nil {
		panic(err)
	}
	defer h.Close()
	prompt := make([]kvcache.TokenID, 16384)
	for i := range prompt {
		prompt[i] = kvcache.TokenID(i)
	}
	var groups []kvcache.Admission // reused: Admit allocates nothing then
	for _, chunk := range []int{0, 2048} {
		ad, err := h.Admit(kvcache.Prompt{Tokens: prompt}, chunk, groups)
		if err != nil {
			panic(err)
		}
		groups = ad.Groups
		fmt.Printf("calls of %5d tokens: blocks %d global, %d local; %d MiB of %d: fits %v\n", chunk,
			ad.Groups[0].NeedBlocks, ad.Groups[1].NeedBlocks, ad.NeedBytes>>20, ad.HeadroomBytes>>20, ad.Fits)
	}
	// Output:
	// calls of     0 tokens: blocks 1024 global, 1024 local; 24 MiB of 16: fits false
	// calls of  2048 tokens: blocks 1024 global, 160 local; 14 MiB of 16: fits true
}
