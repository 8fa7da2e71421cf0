package main

import (
	"fmt"
	"time"

	"github.com/pagedkv/pagedkv/internal/cuda"
	"github.com/pagedkv/pagedkv/vmm"
)

// raw is the yardstick: the bare create/map/access/unmap/release calls of the backend, with
// none of the pool's bookkeeping. On the GPU these are the driver entry points themselves.
type raw interface {
	reserve(size uint64) (vmm.Addr, error)
	free(a vmm.Addr, size uint64) error
	create(size uint64) (vmm.Handle, error)
	release(h vmm.Handle) error
	mapAccess(a vmm.Addr, size uint64, h vmm.Handle) error
	unmap(a vmm.Addr, size uint64) error
}

type rawCUDA struct{ ctx *cuda.Context }

func (r rawCUDA) reserve(size uint64) (vmm.Addr, error) {
	p, err := r.ctx.MemAddressReserve(size, 0)
	return vmm.Addr(p), err
}
func (r rawCUDA) free(a vmm.Addr, size uint64) error {
	return r.ctx.MemAddressFree(cuda.DevicePtr(a), size)
}
func (r rawCUDA) create(size uint64) (vmm.Handle, error) {
	h, err := r.ctx.MemCreate(size)
	return vmm.Handle(h), err
}
func (r rawCUDA) release(h vmm.Handle) error { return r.ctx.MemRelease(cuda.MemHandle(h)) }
func (r rawCUDA) mapAccess(a vmm.Addr, size uint64, h vmm.Handle) error {
	if err := r.ctx.MemMap(cuda.DevicePtr(a), size, cuda.MemHandle(h)); err != nil {
		return err
	}
	return r.ctx.MemSetAccess(cuda.DevicePtr(a), size)
}
func (r rawCUDA) unmap(a vmm.Addr, size uint64) error {
	return r.ctx.MemUnmap(cuda.DevicePtr(a), size)
}

// rawDevice is the yardstick on the host backend: the device's own calls.
type rawDevice struct{ d vmm.Device }

func (r rawDevice) reserve(size uint64) (vmm.Addr, error)  { return r.d.Reserve(size) }
func (r rawDevice) free(a vmm.Addr, size uint64) error     { return r.d.FreeReservation(a, size) }
func (r rawDevice) create(size uint64) (vmm.Handle, error) { return r.d.Create(size) }
func (r rawDevice) release(h vmm.Handle) error             { return r.d.Release(h) }
func (r rawDevice) mapAccess(a vmm.Addr, size uint64, h vmm.Handle) error {
	if err := r.d.Map(a, size, h); err != nil {
		return err
	}
	return r.d.SetAccess(a, size)
}
func (r rawDevice) unmap(a vmm.Addr, size uint64) error { return r.d.Unmap(a, size) }

func rawFor(dev vmm.Device) raw {
	if c, ok := dev.(*vmm.CUDADevice); ok {
		return rawCUDA{c.Context()}
	}
	return rawDevice{dev}
}

// benchVMM times, interleaved in one loop so drift hits both alike, the raw driver sequences and
// the pool's Map/Unmap with pre-created handles, for a 2 MiB and a 128 MiB page.
func benchVMM(dev vmm.Device, scale int) ([]Table, error) {
	t := Table{
		Title: "Elastic pool vs the raw driver sequence (one page)",
		Note: "p50 (mean) in µs. Raw: the backend's bare calls. Pool: Pool.Map/Unmap with a pre-created " +
			"handle (Precreate + CacheLimit), i.e. the hot path. Ratio: pool p50 / raw p50 of the same work (map+access, unmap).",
		Columns: []string{"page", "raw create+map+access", "raw unmap+release", "raw map+access", "raw unmap",
			"pool Map", "pool Unmap", "Map / raw map+access", "Unmap / raw unmap"},
	}
	r := rawFor(dev)
	for _, size := range []uint64{2 << 20, 128 << 20} {
		n := 200
		if size > 2<<20 {
			n = 60
		}
		if scale == 0 {
			n = 5
		}
		va, err := r.reserve(size)
		if err != nil {
			return nil, err
		}
		pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: size, PageSize: size, CacheLimit: size})
		if err != nil {
			return nil, err
		}
		if err := pool.Precreate(size, 1); err != nil {
			return nil, err
		}
		pre, err := r.create(size)
		if err != nil {
			return nil, err
		}
		var cma, ur, ma, um, pm, pu sample
		for range n {
			// raw create+map+access / unmap+release
			t0 := time.Now()
			h, err := r.create(size)
			if err != nil {
				return nil, err
			}
			if err := r.mapAccess(va, size, h); err != nil {
				return nil, err
			}
			t1 := time.Now()
			if err := r.unmap(va, size); err != nil {
				return nil, err
			}
			if err := r.release(h); err != nil {
				return nil, err
			}
			t2 := time.Now()
			cma, ur = append(cma, t1.Sub(t0)), append(ur, t2.Sub(t1))
			// raw map+access / unmap of a pre-created handle
			t0 = time.Now()
			if err := r.mapAccess(va, size, pre); err != nil {
				return nil, err
			}
			t1 = time.Now()
			if err := r.unmap(va, size); err != nil {
				return nil, err
			}
			t2 = time.Now()
			ma, um = append(ma, t1.Sub(t0)), append(um, t2.Sub(t1))
			// pool
			t0 = time.Now()
			if _, err := pool.Map(0, size); err != nil {
				return nil, err
			}
			t1 = time.Now()
			if err := pool.Unmap(0, size); err != nil {
				return nil, err
			}
			t2 = time.Now()
			pm, pu = append(pm, t1.Sub(t0)), append(pu, t2.Sub(t1))
		}
		st := pool.Stats()
		if st.Creates != 1 || st.CacheHits != uint64(n) {
			return nil, fmt.Errorf("pool created %d handles and hit the cache %d times; the measurement is not of the hot path", st.Creates, st.CacheHits)
		}
		if err := pool.Close(); err != nil {
			return nil, err
		}
		if err := r.release(pre); err != nil {
			return nil, err
		}
		if err := r.free(va, size); err != nil {
			return nil, err
		}
		f := func(s sample) string { return fmt.Sprintf("%s (%s)", us(s.p50()), us(s.mean())) }
		t.Rows = append(t.Rows, []string{fmt.Sprintf("%d MiB", size>>20), f(cma), f(ur), f(ma), f(um), f(pm), f(pu),
			ratio(pm.p50(), ma.p50()), ratio(pu.p50(), um.p50())})
	}
	return []Table{t}, nil
}
