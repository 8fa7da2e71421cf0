package kvcache_test

import (
	"errors"
	"fmt"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// Two models share one physical limit: memory one model frees goes to the other.
func ExampleSharedPool() {
	dev, _ := vmm.Open("host")
	defer dev.Close()
	cfg := kvcache.Config{Layers: 2, KVHeads: 2, HeadDim: 128, ElemSize: 2, BlockTokens: 16,
		PageSize: 2 << 20, Capacity: 1 << 30, ReservePages: -1, NoBackground: true}
	sp, _ := kvcache.NewShared(dev, kvcache.SharedConfig{Limit: 4 << 20}) // two pages
	defer sp.Close()
	a, _ := sp.Register("a", cfg)
	b, _ := sp.Register("b", cfg)

	_, _ = a.AppendTokens(1, 2*64*16, nil) // two pages' worth
	_, err := b.AppendTokens(1, 16, nil)
	fmt.Println("b while a holds everything:", errors.Is(err, kvcache.ErrOutOfMemory))

	_ = a.FreeSequence(1) // a's pages are now free, still mapped in a's reserve
	_, err = b.AppendTokens(1, 16, nil)
	st := sp.Stats()
	fmt.Println("b after a finished:", err, st.Models[0].MappedPages, st.Models[1].MappedPages)
	// Output:
	// b while a holds everything: true
	// b after a finished: <nil> 1 1
}

// A manager over memory the runtime allocated: same API, nothing mapped or freed.
func ExampleNewStatic() {
	dev, _ := vmm.Open("host")
	defer dev.Close()
	region, _ := vmm.NewPool(dev, vmm.PoolConfig{Capacity: 8 << 20, PageSize: 8 << 20}) // the runtime's memory
	defer region.Close()
	addr, _ := region.Map(0, 8<<20)

	m, _ := kvcache.NewStatic(dev, kvcache.Config{Layers: 2, KVHeads: 2, HeadDim: 128, ElemSize: 2, BlockTokens: 16},
		vmm.External{Addr: addr, Size: 8 << 20, Kind: vmm.MemoryHost})
	defer m.Close()
	slots, _ := m.AppendTokens(1, 20, nil)
	r := m.Regions(nil)[0]
	fmt.Println(len(slots), m.Stats().MappedPages, r.Addr == addr, r.Len>>20)
	// Output:
	// 20 256 true 8
}

// Compaction packs live blocks into the fewest pages and returns the rest.
func ExampleManager_Compact() {
	dev, _ := vmm.Open("host")
	defer dev.Close()
	m, _ := kvcache.New(dev, kvcache.Config{Layers: 2, KVHeads: 2, HeadDim: 128, ElemSize: 2, BlockTokens: 16,
		PageSize: 2 << 20, Capacity: 1 << 30, ReservePages: 1, HighWatermark: 8, NoBackground: true})
	defer m.Close()
	for i := range 8 { // 8 sequences of 32 blocks: two to a page
		_, _ = m.AppendTokens(kvcache.SeqID(i), 32*16, nil)
	}
	for i := 0; i < 8; i += 2 {
		_ = m.FreeSequence(kvcache.SeqID(i))
	}
	fmt.Println("before:", m.Stats().MappedPages, "pages")
	res, _ := m.Compact(kvcache.CompactOptions{})
	fmt.Println("moved", res.BlocksMoved, "blocks, released", res.PagesReleased, "pages; after:", m.Stats().MappedPages, "pages")
	// Output:
	// before: 4 pages
	// moved 64 blocks, released 1 pages; after: 3 pages
}
