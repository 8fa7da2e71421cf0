package main

import (
	"fmt"
	"time"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// benchGrowth compares growing an L-layer KV arena by one page index as ONE mapping (the
// manager's layout) with one mapping per layer and K|V (a per-layer allocator's layout, as in
// kvcached), and times the manager itself crossing into a new page with no reserve.
func benchGrowth(dev vmm.Device, scale int) ([]Table, error) {
	t := Table{
		Title: "Growing a KV arena by one page index (one granule per layer and K|V)",
		Note: "p50 (mean) in µs of create+map+access, for 2L granules as one mapping vs 2L mappings; " +
			"'manager' is AppendTokens crossing into an unmapped page with no reserve (ReservePages -1), 32-layer geometry.",
		Columns: []string{"layers", "one mapping", "2L mappings", "2L / one", "manager append needing a page", "mappings it made"},
	}
	r := rawFor(dev)
	g := dev.Info().Granularity
	n := 20
	if scale == 0 {
		n = 3
	}
	for _, layers := range []int{16, 32, 80} {
		granules := uint64(2 * layers)
		size := granules * g
		va, err := r.reserve(size)
		if err != nil {
			return nil, err
		}
		var one, many sample
		hs := make([]vmm.Handle, granules)
		for range n {
			t0 := time.Now()
			h, err := r.create(size)
			if err != nil {
				return nil, err
			}
			if err := r.mapAccess(va, size, h); err != nil {
				return nil, err
			}
			one = append(one, time.Since(t0))
			if err := r.unmap(va, size); err != nil {
				return nil, err
			}
			if err := r.release(h); err != nil {
				return nil, err
			}
			t0 = time.Now()
			for i := range hs {
				if hs[i], err = r.create(g); err != nil {
					return nil, err
				}
				if err := r.mapAccess(va+vmm.Addr(uint64(i)*g), g, hs[i]); err != nil {
					return nil, err
				}
			}
			many = append(many, time.Since(t0))
			for i := range hs {
				if err := r.unmap(va+vmm.Addr(uint64(i)*g), g); err != nil {
					return nil, err
				}
				if err := r.release(hs[i]); err != nil {
					return nil, err
				}
			}
		}
		if err := r.free(va, size); err != nil {
			return nil, err
		}
		mgr, maps := "", ""
		if layers == 32 {
			d, mappings, err := managerPageCrossing(dev, n)
			if err != nil {
				return nil, err
			}
			mgr, maps = fmt.Sprintf("%s (%s)", us(d.p50()), us(d.mean())), fmt.Sprint(mappings)
		}
		t.Rows = append(t.Rows, []string{fmt.Sprint(layers), fmt.Sprintf("%s (%s)", us(one.p50()), us(one.mean())),
			fmt.Sprintf("%s (%s)", us(many.p50()), us(many.mean())), ratio(many.p50(), one.p50()), mgr, maps})
	}
	return []Table{t}, nil
}

// managerPageCrossing times AppendTokens calls that each need one new page of a 32-layer,
// 8-head, 128-dim fp16 model (128 MiB pages), and counts the driver mappings they made.
func managerPageCrossing(dev vmm.Device, n int) (sample, int, error) {
	m, err := kvcache.New(dev, kvcache.Config{
		Layers: 32, KVHeads: 8, HeadDim: 128, ElemSize: 2, BlockTokens: 16,
		Capacity: uint64(n+1) * 32 * 2 * dev.Info().Granularity * 2, ReservePages: -1, HighWatermark: n + 1, NoBackground: true,
	})
	if err != nil {
		return nil, 0, err
	}
	defer m.Close()
	perPage := m.Stats().BlocksPerPage * m.Config().BlockTokens
	var s sample
	slots := make([]int64, 0, perPage)
	for i := range n {
		t0 := time.Now()
		if slots, err = m.AppendTokens(kvcache.SeqID(i), perPage, slots[:0]); err != nil {
			return nil, 0, err
		}
		s = append(s, time.Since(t0))
	}
	st := m.Stats()
	if st.MappedPages != n {
		return nil, 0, fmt.Errorf("manager mapped %d pages for %d page-sized sequences", st.MappedPages, n)
	}
	return s, int(st.SyncMaps) / n, m.Close()
}
