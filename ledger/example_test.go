package ledger_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/ledger"
	"github.com/pagedkv/pagedkv/vmm"
)

// Two serving processes share one limit through a ledger file. Here two shared pools in one
// process stand in for them; in real use each process opens the same path (under /dev/shm).
// When the limit is spent, the ledger asks the other members for the pages they do not use.
func Example() {
	dir, err := os.MkdirTemp("", "ledger-example")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	dev, _ := vmm.Open("host")
	defer dev.Close()
	l, err := ledger.Open(filepath.Join(dir, "pagedkv-gpu0"), ledger.Options{
		Limit: 4 << 20, DeviceBytes: dev.Info().TotalMemory}) // the creator's limit: two 2 MiB pages
	if err != nil {
		panic(err)
	}
	defer l.Close() // after the pools

	cfg := kvcache.Config{Layers: 2, KVHeads: 2, HeadDim: 128, ElemSize: 2, BlockTokens: 16,
		PageSize: 2 << 20, Capacity: 1 << 30, ReservePages: -1, NoBackground: true}
	a, _ := kvcache.NewShared(dev, kvcache.SharedConfig{Ledger: l}) // process A
	defer a.Close()
	b, _ := kvcache.NewShared(dev, kvcache.SharedConfig{Ledger: l}) // process B
	defer b.Close()
	chat, _ := a.Register("chat-8b", cfg) // names are unique over all the ledger's processes
	code, _ := b.Register("code-7b", cfg)

	_, _ = chat.AppendTokens(1, 2*64*16, nil) // two pages' worth: the whole limit
	_, err = code.AppendTokens(1, 16, nil)
	fmt.Println("code-7b while chat-8b holds the limit:", errors.Is(err, kvcache.ErrOutOfMemory))

	_ = chat.FreeSequence(1) // its pages stay mapped in its reserve until someone asks
	_, err = code.AppendTokens(1, 16, nil)
	fmt.Println("code-7b after chat-8b finished:", err)

	snap, _ := l.Snapshot()
	for _, mi := range snap.Members {
		fmt.Printf("%s: %d MiB\n", mi.Name, mi.Mapped>>20)
	}
	fmt.Printf("limit %d MiB, used %d MiB\n", snap.Limit>>20, snap.Used>>20)
	// Output:
	// code-7b while chat-8b holds the limit: true
	// code-7b after chat-8b finished: <nil>
	// chat-8b: 2 MiB
	// code-7b: 2 MiB
	// limit 4 MiB, used 4 MiB
}
