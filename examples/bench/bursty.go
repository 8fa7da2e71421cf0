package main

import (
	"fmt"

	"github.com/pagedkv/pagedkv/internal/workload/burst"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// benchBursty replays the bursty two-model trace with the memory split statically in halves
// and with one shared elastic budget, and reports each model's peak of live sequences. On the
// GPU it runs at full size (a 32-layer, 8-KV-head, 128-dim fp16 model, 40 GiB shared); on the
// host at CI size.
func benchBursty(dev vmm.Device, scale int) ([]Table, error) {
	cfg := kvcache.Config{Layers: 1, KVHeads: 1, HeadDim: 64, ElemSize: 2, BlockTokens: 16,
		PageSize: 256 << 10, ReservePages: 1, HighWatermark: 2, NoBackground: true}
	limit := uint64(64 * (256 << 10))
	opts := burst.Options{Phases: 4, PhaseSteps: 40, AdmitPerStep: 8, PromptTokens: 200}
	what := "CI size: 1 layer, 64 blocks of 16 tokens per 256 KiB page, 16 MiB shared"
	if dev.Info().Kind == vmm.MemoryDevice {
		cfg = kvcache.Config{Layers: 32, KVHeads: 8, HeadDim: 128, ElemSize: 2, BlockTokens: 16,
			ReservePages: 1, HighWatermark: 2, NoBackground: true}
		limit = 40 << 30
		opts = burst.Options{Phases: 4, PhaseSteps: 60, AdmitPerStep: 16, PromptTokens: 500}
		what = "full size: 32 layers, 8 KV heads, 128 dims, fp16, 128 MiB pages, 40 GiB shared"
	} else {
		host, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10})
		if err != nil {
			return nil, err
		}
		defer host.Close()
		dev = host
	}
	if scale == 0 {
		opts.Phases = 2
	}
	cfg.Capacity = limit * 2

	// Static halves of one region the "runtime" allocated.
	pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: limit, PageSize: limit})
	if err != nil {
		return nil, err
	}
	base, err := pool.Map(0, limit)
	if err != nil {
		pool.Close()
		return nil, err
	}
	var static [2]*kvcache.Manager
	for i := range static {
		mem := vmm.External{Addr: base + vmm.Addr(uint64(i)*limit/2), Size: limit / 2, Device: dev.Info().Ordinal, Kind: dev.Info().Kind}
		if static[i], err = kvcache.NewStatic(dev, cfg, mem); err != nil {
			return nil, err
		}
	}
	sres, err := burst.Run(static, opts)
	if err != nil {
		return nil, err
	}
	for _, m := range static {
		if err := m.Close(); err != nil {
			return nil, err
		}
	}
	if err := pool.Close(); err != nil {
		return nil, err
	}

	sp, err := kvcache.NewShared(dev, kvcache.SharedConfig{Limit: limit, CompactOnPressure: true})
	if err != nil {
		return nil, err
	}
	var elastic [2]*kvcache.Manager
	for i := range elastic {
		if elastic[i], err = sp.Register(fmt.Sprint("model", i), cfg); err != nil {
			return nil, err
		}
	}
	eres, err := burst.Run(elastic, opts)
	if err != nil {
		return nil, err
	}
	if err := sp.Close(); err != nil {
		return nil, err
	}
	t := Table{
		Title: "Two models, bursty and out of phase: peak live sequences",
		Note: fmt.Sprintf("%s; %d phases of %d steps, up to %d new %d-token sequences a step in the busy model. "+
			"Static: the memory split in halves (static managers over external memory). Elastic: one SharedPool.",
			what, opts.Phases, opts.PhaseSteps, opts.AdmitPerStep, opts.PromptTokens),
		Columns: []string{"model", "static halves", "shared elastic", "elastic / static"},
	}
	for i := range 2 {
		t.Rows = append(t.Rows, []string{fmt.Sprint(i), fmt.Sprint(sres.PeakLive[i]), fmt.Sprint(eres.PeakLive[i]),
			fmt.Sprintf("%.2fx", float64(eres.PeakLive[i])/float64(max(1, sres.PeakLive[i])))})
	}
	return []Table{t}, nil
}
