package main

import (
	"fmt"

	"github.com/pagedkv/pagedkv/internal/workload/chattrace"
	"github.com/pagedkv/pagedkv/internal/workload/preempt"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// benchPreempt replays the multi-turn chat trace with the device holding half its working set,
// preempting on out-of-memory by freeing (the yardstick: vLLM v1 recomputes), by swapping, and
// by freeing with the host prefix cache on, and counts the prompt tokens computed again. On the
// host backend: it counts tokens and bytes, not time.
func benchPreempt(_ vmm.Device, scale int) ([]Table, error) {
	o := chattrace.Issue()
	if scale == 0 {
		o.Conversations, o.Concurrent = 200, 32
	}
	t := Table{
		Columns: []string{"policy", "preemptions", "prompt tokens computed", "computed again", "after a preemption", "at a new turn",
			"vs preempt by free", "host tier traffic MiB"},
	}
	var base int64
	for _, p := range []preempt.Policy{preempt.Recompute, preempt.Swap, preempt.HostCache} {
		cfg, ws := preempt.Config(o, p)
		dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10, Capacity: 1 << 40})
		if err != nil {
			return nil, err
		}
		m, err := kvcache.New(dev, cfg)
		if err != nil {
			return nil, err
		}
		r, err := preempt.Run(m, p, o)
		if err == nil {
			err = m.Close()
		}
		if err != nil {
			return nil, err
		}
		if err := dev.Close(); err != nil {
			return nil, err
		}
		if p == preempt.Recompute {
			base = r.RecomputedTokens
			t.Title = "Preemption with the device holding half the working set: tokens recomputed"
			t.Note = fmt.Sprintf("The chat trace (%d conversations, %d running at once, each turn re-sending the whole conversation) on a device arena "+
				"of %d blocks, half its working set of %d blocks (16-token blocks); host tier, for swap and the host cache, of the whole working set. "+
				"A decode step out of memory preempts the newest running request; the queue's head is admitted while memory lasts. "+
				"'Computed again': prompt tokens of a conversation whose K/V had been computed before (the time lost to recompute), "+
				"at the restart of a preempted request or at a new turn whose context left the cache. Host tier traffic: blocks swapped, "+
				"written back and fetched, in bytes of a 4 KiB block; scale by the model's block bytes.",
				o.Conversations, o.Concurrent, cfg.Capacity/cfg.BlockStride(), ws)
		}
		t.Rows = append(t.Rows, []string{p.String(), fmt.Sprint(r.Preemptions), fmt.Sprint(r.PrefillTokens), fmt.Sprint(r.RecomputedTokens),
			fmt.Sprint(r.RecomputedPreempted), fmt.Sprint(r.RecomputedTurns), fmt.Sprintf("%.3fx", float64(r.RecomputedTokens)/float64(base)),
			fmt.Sprintf("%.0f", float64(r.HostBytes)/(1<<20))})
	}
	return []Table{t}, nil
}
