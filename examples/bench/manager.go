package main

import (
	"fmt"
	"testing"

	"github.com/pagedkv/pagedkv/internal/workload/churn"
	"github.com/pagedkv/pagedkv/internal/workload/kvbench"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// benchManager runs the manager's hot-path benchmarks on the host backend (they measure
// bookkeeping, which does not touch the device) with 1k and 100k idle live sequences.
func benchManager(_ vmm.Device, scale int) ([]Table, error) {
	t := Table{
		Title: "Block manager hot paths (host backend, ns/op)",
		Note: "A working batch of 256 sequences beside 1,024 or 102,400 idle live ones (internal/workload/kvbench); " +
			"64 blocks of 16 tokens per page. 'new page' times the append together with the Truncate that returns the page.",
		Columns: []string{"operation", "1k live", "100k live", "100k / 1k", "target", "allocs/op"},
	}
	for _, c := range kvbench.Cases {
		var ns [2]float64
		allocs := int64(0)
		for i, live := range kvbench.LiveCounts {
			r := testing.Benchmark(func(b *testing.B) { c.Fn(b, live) })
			if r.N == 0 {
				return nil, fmt.Errorf("%s: benchmark failed", c.Name)
			}
			ns[i] = float64(r.T.Nanoseconds()) / float64(r.N)
			allocs = max(allocs, r.AllocsPerOp())
		}
		t.Rows = append(t.Rows, []string{c.Name, fmt.Sprintf("%.0f", ns[0]), fmt.Sprintf("%.0f", ns[1]),
			fmt.Sprintf("%.2fx", ns[1]/ns[0]), fmt.Sprintf("<= %.0f", c.TargetNs), fmt.Sprint(allocs)})
	}
	return []Table{t}, nil
}

// benchChurn replays the churn trace (no compaction) and reports the page overhead.
func benchChurn(_ vmm.Device, scale int) ([]Table, error) {
	t := Table{
		Title: "Churn trace: mapped pages / ceil(live blocks / blocks per page), no compaction",
		Note: "%d sequences, log-normal lengths (median 500 tokens, sigma 0.6), prompts 20-80%% of the length, " +
			"0.1%%/step aborts, 64 blocks per page, reserve 1 page, high watermark 2; measured every step while requests arrive.",
		Columns: []string{"running at once", "steps", "peak live blocks", "mean", "p99", "max"},
	}
	n := 10000
	if scale == 0 {
		n = 1000
	}
	t.Note = fmt.Sprintf(t.Note, n)
	for _, conc := range []int{128, 256} {
		dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10, Capacity: 1 << 40})
		if err != nil {
			return nil, err
		}
		m, err := kvcache.New(dev, kvcache.Config{
			Layers: 1, KVHeads: 1, HeadDim: 64, ElemSize: 2, BlockTokens: 16,
			PageSize: 256 << 10, Capacity: 4096 * (256 << 10), ReservePages: 1, HighWatermark: 2, NoBackground: true,
		})
		if err != nil {
			return nil, err
		}
		res, err := churn.Run(m, churn.Options{Sequences: n, Concurrent: conc, MedianTokens: 500, Sigma: 0.6, AbortRate: 0.001, Seed: 1, Step: m.Settle})
		if err != nil {
			return nil, err
		}
		if err := m.Close(); err != nil {
			return nil, err
		}
		if err := dev.Close(); err != nil {
			return nil, err
		}
		t.Rows = append(t.Rows, []string{fmt.Sprint(conc), fmt.Sprint(res.Steps), fmt.Sprint(res.PeakLiveBlocks),
			fmt.Sprintf("%.3f", res.MeanOverhead), fmt.Sprintf("%.3f", res.P99Overhead), fmt.Sprintf("%.3f", res.MaxOverhead)})
	}
	return []Table{t}, nil
}
