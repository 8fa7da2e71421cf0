package main

import (
	"errors"
	"fmt"
	"io"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// runMulti is the multi-model quick start: two models of a 32-layer, 8-KV-head, 128-dim fp16
// geometry (128 MiB pages) register with one shared physical limit; each reserves virtual
// capacity for the whole limit, and the memory goes where the work is.
func runMulti(w io.Writer, device string, limit uint64) error {
	dev, err := vmm.Open(device)
	if err != nil {
		return err
	}
	defer dev.Close()
	sp, err := kvcache.NewShared(dev, kvcache.SharedConfig{Limit: limit, CompactOnPressure: true})
	if err != nil {
		return err
	}
	defer sp.Close()
	cfg := kvcache.Config{Layers: 32, KVHeads: 8, HeadDim: 128, ElemSize: 2, BlockTokens: 16,
		Capacity: 2 * limit, ReservePages: 1, HighWatermark: 2, NoBackground: true}
	a, err := sp.Register("chat-8b", cfg)
	if err != nil {
		return err
	}
	b, err := sp.Register("code-8b", cfg)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "device: %s; shared limit %d MiB; two models, %d MiB virtual each\n", dev.Info().Name, limit>>20, a.Config().Capacity>>20)
	report := func(step string) {
		st := sp.Stats()
		fmt.Fprintf(w, "%-44s used %5d / %d MiB", step, st.Used>>20, st.Limit>>20)
		for _, m := range st.Models {
			fmt.Fprintf(w, "  | %s: %3d seqs %3d pages %5d MiB", m.Name, m.Sequences, m.MappedPages, m.MappedBytes>>20)
		}
		fmt.Fprintln(w)
	}
	report("registered:")

	// chat-8b takes requests of 512 tokens until the limit refuses one.
	n := 0
	for ; ; n++ {
		if _, err := a.AppendTokens(kvcache.SeqID(n), 512, nil); err != nil {
			if !errors.Is(err, kvcache.ErrOutOfMemory) {
				return err
			}
			fmt.Fprintf(w, "chat-8b is refused its request %d: %v\n", n, err)
			break
		}
	}
	report(fmt.Sprintf("chat-8b admitted %d requests:", n))

	// Every other request finishes: holes in chat-8b's pages, nothing to give back yet.
	for i := 0; i < n; i += 2 {
		if err := a.FreeSequence(kvcache.SeqID(i)); err != nil {
			return err
		}
	}
	report("chat-8b finished half of them:")

	// code-8b needs memory: the budget takes chat-8b's free pages, then compacts it.
	m := 0
	for ; m < n/2; m++ {
		if _, err := b.AppendTokens(kvcache.SeqID(m), 512, nil); err != nil {
			if !errors.Is(err, kvcache.ErrOutOfMemory) {
				return err
			}
			break
		}
	}
	report(fmt.Sprintf("code-8b admitted %d requests:", m))
	if st := a.Stats(); st.BlocksMoved > 0 {
		fmt.Fprintf(w, "chat-8b was compacted to make room: %d blocks moved\n", st.BlocksMoved)
	}

	// The limit shrinks at run time; chat-8b goes to sleep and gives back what it can.
	rep, err := sp.SetLimit(int64(limit / 2))
	if err != nil {
		return err
	}
	report(fmt.Sprintf("limit lowered to %d MiB (short %d MiB):", rep.Limit>>20, rep.Shortfall>>20))
	for i := 1; i < n; i += 2 {
		if err := a.FreeSequence(kvcache.SeqID(i)); err != nil {
			return err
		}
	}
	if _, err := a.Sleep(); err != nil {
		return err
	}
	report("chat-8b idle and asleep:")
	if err := sp.Unregister("code-8b"); err != nil {
		return err
	}
	report("code-8b unregistered:")
	return nil
}
