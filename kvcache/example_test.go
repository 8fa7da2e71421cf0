package kvcache_test

import (
	"fmt"

	"github.com/pagedkv/pagedkv/blocktable"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// A runtime's step: append the new tokens of each sequence, export the block tables for the
// attention kernel, free finished sequences. It runs on the host backend; on a GPU open
// "cuda" instead.
func Example() {
	dev, err := vmm.Open("host")
	if err != nil {
		panic(err)
	}
	defer dev.Close()
	m, err := kvcache.New(dev, kvcache.Config{
		Layers: 2, KVHeads: 2, HeadDim: 64, ElemSize: 2, BlockTokens: 16,
		Capacity: 1 << 30, NoBackground: true,
	})
	if err != nil {
		panic(err)
	}
	defer m.Close()

	// Prefill: 40 prompt tokens for request 7 and 10 for request 8. The slots are where the
	// runtime's write_kv kernel stores each token's K and V (vLLM's slot_mapping).
	slots, _ := m.AppendTokens(7, 40, nil)
	slots, _ = m.AppendTokens(8, 10, slots)
	fmt.Println("slots:", len(slots), "first:", slots[0], "last:", slots[len(slots)-1])

	// Decode one token each, then export the tables in vLLM's layout.
	slots, _ = m.AppendTokens(7, 1, slots[:0])
	slots, _ = m.AppendTokens(8, 1, slots)
	t, _ := blocktable.NewVLLM(2, 4, -1)
	_ = m.ExportVLLM([]kvcache.SeqID{7, 8}, t)
	fmt.Println("block_tables:", t.Table())
	fmt.Println("seq_lens:", t.Lens(), "slot_mapping:", slots)

	_ = m.FreeSequence(7)
	st := m.Stats()
	fmt.Println("live blocks:", st.LiveBlocks, "mapped pages:", st.MappedPages)
	// Output:
	// slots: 50 first: 0 last: 57
	// block_tables: [0 1 2 -1 3 -1 -1 -1]
	// seq_lens: [41 11] slot_mapping: [40 58]
	// live blocks: 1 mapped pages: 1
}

// Fork shares a prompt between two samples; the shared partial block is copied on the first
// append of either.
func ExampleManager_Fork() {
	dev, _ := vmm.Open("host")
	defer dev.Close()
	m, _ := kvcache.New(dev, kvcache.Config{Layers: 1, KVHeads: 1, HeadDim: 64, ElemSize: 2, BlockTokens: 16, Capacity: 1 << 30, NoBackground: true})
	defer m.Close()
	_, _ = m.AppendTokens(1, 20, nil) // one full block, one partial
	_ = m.Fork(1, 2)
	_, _ = m.AppendTokens(2, 1, nil)
	a, _ := m.Blocks(1, nil)
	b, _ := m.Blocks(2, nil)
	st := m.Stats()
	fmt.Println(a, b, "copied:", st.CopyOnWrites, "live blocks:", st.LiveBlocks)
	// Output:
	// [0 1] [0 2] copied: 1 live blocks: 3
}
