package kvcache_test

import (
	"context"
	"fmt"
	"os"

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
			HostCacheTokens: 4096,
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
