package kvcache_test

import (
	"errors"
	"fmt"
	"slices"

	"github.com/pagedkv/pagedkv/blocktable"
	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
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

// A runtime with a prefix cache: the second turn of a chat re-sends the conversation, finds its
// first blocks cached and computes K and V only for the rest.
func ExampleManager_StartSequence() {
	dev, _ := vmm.Open("host")
	defer dev.Close()
	m, _ := kvcache.New(dev, kvcache.Config{Layers: 1, KVHeads: 1, HeadDim: 64, ElemSize: 2, BlockTokens: 4,
		Capacity: 1 << 30, NoBackground: true})
	defer m.Close()

	turn1 := []kvcache.TokenID{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}                // system prompt and question
	turn2 := slices.Concat(turn1, []kvcache.TokenID{11, 12, 13, 14, 15, 16}) // + answer and next question
	var slots []int64
	for i, prompt := range [][]kvcache.TokenID{turn1, turn2} {
		req := kvcache.SeqID(i + 1)
		cached, err := m.StartSequence(req, kvcache.Prompt{Tokens: prompt})
		if err != nil {
			panic(err)
		}
		// The prefill computes K and V of prompt[cached:] only; write_kv stores them at slots.
		slots, err = m.AppendTokenIDs(req, prompt[cached:], slots[:0])
		if err != nil {
			panic(err)
		}
		blocks, _ := m.Blocks(req, nil)
		fmt.Printf("request %d: %d of %d tokens cached, blocks %v, slots %v\n", req, cached, len(prompt), blocks, slots)
		_ = m.FreeSequence(req) // its full blocks stay cached
	}
	p := m.Stats().Prefix
	fmt.Println("hit tokens:", p.HitTokens, "of", p.QueryTokens)
	// Output:
	// request 1: 0 of 10 tokens cached, blocks [0 1 2], slots [0 1 2 3 4 5 6 7 8 9]
	// request 2: 8 of 16 tokens cached, blocks [0 1 2 3], slots [8 9 10 11 12 13 14 15]
	// hit tokens: 8 of 26
}

// A router follows the cache through KV events. Its keys are the ones prefix.Keys computes from
// the token ids, so it can match prompts against them without asking the manager.
func ExampleManager_Subscribe() {
	dev, _ := vmm.Open("host")
	defer dev.Close()
	m, _ := kvcache.New(dev, kvcache.Config{Layers: 1, KVHeads: 1, HeadDim: 64, ElemSize: 2, BlockTokens: 4,
		Capacity: 1 << 30, NoBackground: true})
	defer m.Close()
	sub, err := m.Subscribe(64) // the queue: a subscriber further behind reads EventsLost
	if err != nil {
		panic(err)
	}
	defer sub.Close()

	ns := prefix.Namespace{Salt: "tenant-a"}
	prompt := []kvcache.TokenID{1, 2, 3, 4, 5, 6, 7, 8, 9}
	_, _ = m.StartSequence(1, kvcache.Prompt{Tokens: prompt, Namespace: ns})
	_, _ = m.AppendTokenIDs(1, prompt, nil) // two blocks fill and become cached
	_ = m.FreeSequence(1)                   // they stay cached: no event
	_, _ = m.DropCache()

	keys := prefix.Keys(nil, ns, 4, prompt)
	for _, ev := range sub.Read(nil) {
		switch ev.Kind {
		case prefix.BlockStored:
			fmt.Println(ev.Kind, len(ev.Keys), "blocks", ev.Tokens, ev.Medium, "keys as prefix.Keys:", ev.Keys[0] == keys[0] && ev.Keys[1] == keys[1])
		default:
			fmt.Println(ev.Kind, ev.Medium)
		}
	}
	// Output:
	// BlockStored 2 blocks [1 2 3 4 5 6 7 8] GPU keys as prefix.Keys: true
	// AllBlocksCleared GPU
}

// Preemption by swapping: a sequence's blocks go to pinned host memory, its device blocks serve
// another sequence, and it comes back into new blocks with its data.
func ExampleManager_SwapOut() {
	dev, _ := vmm.Open("host")
	defer dev.Close()
	m, _ := kvcache.New(dev, kvcache.Config{Layers: 1, KVHeads: 1, HeadDim: 64, ElemSize: 2, BlockTokens: 16,
		Capacity: 1 << 30, HostBlocks: 64, NoBackground: true})
	defer m.Close()
	var stream kernels.Stream // the runtime's stream; 0 is the legacy default stream

	_, _ = m.AppendTokens(1, 20, nil)
	before, _ := m.Blocks(1, nil)
	_ = dev.CopyIn(m.BlockAddr(0, 0, before[1]), []byte("token 16's K")) // what write_kv stored

	out, err := m.SwapOut([]kvcache.SeqID{1}, stream)
	if err != nil {
		panic(err)
	}
	_ = out.Close() // the copy runs on: kernels on stream run after it
	_, err = m.AppendTokens(1, 1, nil)
	fmt.Println("swapped out:", out.Blocks, "blocks; append:", errors.Is(err, kvcache.ErrSwapped))
	_, _ = m.AppendTokens(2, 16, nil) // takes a block sequence 1 freed

	in, err := m.SwapIn([]kvcache.SeqID{1}, stream)
	if err != nil {
		panic(err)
	}
	if err := in.Wait(); err != nil { // before the host reads the blocks; kernels on stream need not
		panic(err)
	}
	_ = in.Close()
	after, _ := m.Blocks(1, nil)
	buf := make([]byte, 12)
	_ = dev.CopyOut(buf, m.BlockAddr(0, 0, after[1]))
	fmt.Printf("blocks %v, then %v: %q\n", before, after, buf)
	// Output:
	// swapped out: 2 blocks; append: true
	// blocks [0 1], then [1 2]: "token 16's K"
}

// One manager over two devices in tensor parallelism: each holds half of every block's KV
// heads, and one block table serves both.
func ExampleNewMulti() {
	gpu0, _ := vmm.Open("host") // "cuda:0" and "cuda:1" on a GPU machine
	defer gpu0.Close()
	gpu1, _ := vmm.Open("host")
	defer gpu1.Close()
	m, err := kvcache.NewMulti([]vmm.Device{gpu0, gpu1}, kvcache.Config{
		Layers: 2, KVHeads: 4, HeadDim: 64, ElemSize: 2, BlockTokens: 16, Capacity: 1 << 30, NoBackground: true,
	}, kvcache.Split{TensorParallel: 2})
	if err != nil {
		panic(err)
	}
	defer m.Close()

	slots, _ := m.AppendTokens(1, 20, nil)
	for i, sh := range m.Shards() {
		// Attention on sh.Device reads layer l at sh.LayerBase(l, kv), stride sh.Config.BlockStride().
		fmt.Println("device", i, "KV heads", sh.KVHeads, "layers", sh.Layers, "block stride", sh.Config.BlockStride())
	}
	t, _ := blocktable.NewVLLM(1, 4, -1)
	_ = m.ExportVLLM([]kvcache.SeqID{1}, t)
	fmt.Println("block_tables:", t.Table(), "slots:", len(slots), "page indexes mapped:", m.Stats().MappedPages)
	// Output:
	// device 0 KV heads [0 2] layers [0 2] block stride 16384
	// device 1 KV heads [2 4] layers [0 2] block stride 16384
	// block_tables: [0 1 -1 -1] slots: 20 page indexes mapped: 1
}
