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

// benchMultiCalls times growing by one page (cuMemCreate + cuMemMap + cuMemSetAccess of 128 MiB)
// and shrinking by one (cuMemUnmap + cuMemRelease) on one device alone, on two one after the
// other, and on two at once from a goroutine per device: whether the driver calls of two GPUs
// overlap when one Go process makes them. Each condition runs its own loop of pages.
func benchMultiCalls(dev vmm.Device, scale int) ([]Table, error) {
	second, err := secondDevice(dev)
	if err != nil {
		return []Table{{Title: "Driver calls on two devices", Note: "skipped: " + err.Error()}}, nil
	}
	defer second.Close()
	n := 40
	if scale == 0 {
		n = 4
	}
	const size = 128 << 20
	devs := []vmm.Device{dev, second}
	bases := make([]vmm.Addr, 2)
	for i, d := range devs {
		if bases[i], err = d.Reserve(uint64(n) * size); err != nil {
			return nil, err
		}
		defer d.FreeReservation(bases[i], uint64(n)*size)
	}
	handles := make([][]vmm.Handle, 2)
	for d := range handles {
		handles[d] = make([]vmm.Handle, n)
	}
	grow := func(d, i int) error {
		h, err := devs[d].Create(size)
		if err != nil {
			return err
		}
		handles[d][i] = h
		a := bases[d] + vmm.Addr(i*size)
		if err := devs[d].Map(a, size, h); err != nil {
			return err
		}
		return devs[d].SetAccess(a, size)
	}
	shrink := func(d, i int) error {
		if err := devs[d].Unmap(bases[d]+vmm.Addr(i*size), size); err != nil {
			return err
		}
		return devs[d].Release(handles[d][i])
	}
	// run times fn over n pages: on device 0, on both in turn, or on both at once.
	run := func(fn func(d, i int) error, how string) (sample, error) {
		var s sample
		for i := range n {
			t0 := time.Now()
			switch how {
			case "alone":
				if err := fn(0, i); err != nil {
					return nil, err
				}
			case "in turn":
				for d := range 2 {
					if err := fn(d, i); err != nil {
						return nil, err
					}
				}
			case "at once":
				errs := make(chan error, 2)
				for d := range 2 {
					go func() { errs <- fn(d, i) }()
				}
				if e1, e2 := <-errs, <-errs; e1 != nil || e2 != nil {
					return nil, fmt.Errorf("at once: %v, %v", e1, e2)
				}
			}
			s = append(s, time.Since(t0))
		}
		return s, nil
	}
	t := Table{
		Title: "Growing and shrinking by one 128 MiB page: one device, two in turn, two at once",
		Note: fmt.Sprintf("%d pages per condition, p50 (mean) in µs. Grow: cuMemCreate + cuMemMap + cuMemSetAccess; shrink: cuMemUnmap + "+
			"cuMemRelease. 'At once': a goroutine per device for each page.", n),
		Columns: []string{"", "device 0 alone", "two in turn", "two at once", "in turn / alone", "at once / alone"},
	}
	var res [2][3]sample
	for k, how := range []string{"alone", "in turn", "at once"} {
		if res[0][k], err = run(grow, how); err != nil {
			return nil, err
		}
		if how == "alone" { // device 1 too, so that shrink alone has the same state to undo
			for i := range n {
				if err := grow(1, i); err != nil {
					return nil, err
				}
			}
		}
		if res[1][k], err = run(shrink, how); err != nil {
			return nil, err
		}
		if how == "alone" {
			for i := range n {
				if err := shrink(1, i); err != nil {
					return nil, err
				}
			}
		}
	}
	for r, name := range []string{"grow", "shrink"} {
		cell := func(s sample) string { return fmt.Sprintf("%s (%s)", us(s.p50()), us(s.mean())) }
		t.Rows = append(t.Rows, []string{name, cell(res[r][0]), cell(res[r][1]), cell(res[r][2]),
			ratio(res[r][1].p50(), res[r][0].p50()), ratio(res[r][2].p50(), res[r][0].p50())})
	}
	return []Table{t}, nil
}
