package main

import (
	"fmt"
	"time"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// benchMulti times the manager growing by one page index on one device and on two in lockstep
// (KV heads divided between them), with the same mapping on each device: a 32-layer, 8-head,
// 128-dim fp16 model's 128 MiB page on one device, each GPU's 128 MiB share of it on two.
// The second device is cuda:1 beside cuda:N, or a second host device on the host backend.
func benchMulti(dev vmm.Device, scale int) ([]Table, error) {
	second, err := secondDevice(dev)
	if err != nil {
		return []Table{{Title: "Growing several devices by one page index", Note: "skipped: " + err.Error()}}, nil
	}
	defer second.Close()
	n := 40
	if scale == 0 {
		n = 4
	}
	cfg := kvcache.Config{Layers: 32, KVHeads: 8, HeadDim: 128, ElemSize: 2, BlockTokens: 16,
		ReservePages: -1, HighWatermark: n + 2, NoBackground: true}
	t := Table{
		Title: "Growing one device and two in lockstep by one page index",
		Note: fmt.Sprintf("AppendTokens of a page's worth of tokens into an unmapped page index, no reserve; %d runs after one warm-up, "+
			"p50 (mean) in µs. One device: a 32-layer, 8-head, 128-dim fp16 model (one 128 MiB mapping). Two: the same model with "+
			"its KV heads divided (TensorParallel 2), one 128 MiB mapping on each, made one device after the other.", n),
		Columns: []string{"devices", "append needing a page", "vs one device"},
	}
	one, err := growth(n, func(c kvcache.Config) (*kvcache.Manager, error) { return kvcache.New(dev, c) }, cfg)
	if err != nil {
		return nil, err
	}
	two, err := growth(n, func(c kvcache.Config) (*kvcache.Manager, error) {
		return kvcache.NewMulti([]vmm.Device{dev, second}, c, kvcache.Split{TensorParallel: 2})
	}, cfg)
	if err != nil {
		return nil, err
	}
	t.Rows = append(t.Rows,
		[]string{"1 (" + dev.Info().Name + ")", fmt.Sprintf("%s (%s)", us(one.p50()), us(one.mean())), "1.00x"},
		[]string{"2 (+ " + second.Info().Name + ")", fmt.Sprintf("%s (%s)", us(two.p50()), us(two.mean())), ratio(two.p50(), one.p50())})
	return []Table{t}, nil
}

// growth times n appends that each need one new page index (after one untimed warm-up).
func growth(n int, open func(kvcache.Config) (*kvcache.Manager, error), cfg kvcache.Config) (sample, error) {
	cfg.Capacity = 0
	m, err := open(cfg)
	if err != nil {
		return nil, err
	}
	perPage := m.Stats().BlocksPerPage * m.Config().BlockTokens
	slots := make([]int64, 0, perPage)
	var s sample
	for i := range n + 1 {
		t0 := time.Now()
		if slots, err = m.AppendTokens(kvcache.SeqID(i), perPage, slots[:0]); err != nil {
			m.Close()
			return nil, err
		}
		if i > 0 {
			s = append(s, time.Since(t0))
		}
	}
	st := m.Stats()
	if st.MappedPages != n+1 || int(st.SyncMaps) != n+1 {
		m.Close()
		return nil, fmt.Errorf("mapped %d page indexes with %d maps for %d page-sized sequences", st.MappedPages, st.SyncMaps, n+1)
	}
	return s, m.Close()
}

// secondDevice opens a device beside dev: the next CUDA ordinal, or another host device.
func secondDevice(dev vmm.Device) (vmm.Device, error) {
	info := dev.Info()
	if info.Kind == vmm.MemoryHost {
		return vmm.NewHostDevice(vmm.HostOptions{Granularity: info.Granularity})
	}
	return vmm.NewCUDADevice(info.Ordinal + 1)
}
