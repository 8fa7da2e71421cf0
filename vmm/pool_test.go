package vmm_test

import (
	"bytes"
	"fmt"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/vmm"
)

const gib = 1 << 30

// fill writes a page-distinct pattern at the start, middle and end of each page of [a, a+size).
func probe(page uint64, i int, off uint64) []byte {
	return []byte(fmt.Sprintf("page %06d at %09d", i, off))
}

func writeProbes(t *testing.T, dev vmm.Device, a vmm.Addr, size, page uint64) {
	t.Helper()
	for i := 0; uint64(i)*page < size; i++ {
		for _, off := range []uint64{0, page / 2, page - 32} {
			require.NoError(t, dev.CopyIn(a+vmm.Addr(uint64(i)*page+off), probe(page, i, off)))
		}
	}
}

func checkProbes(t *testing.T, dev vmm.Device, a vmm.Addr, size, page uint64) {
	t.Helper()
	for i := 0; uint64(i)*page < size; i++ {
		for _, off := range []uint64{0, page / 2, page - 32} {
			want := probe(page, i, off)
			got := make([]byte, len(want))
			require.NoError(t, dev.CopyOut(got, a+vmm.Addr(uint64(i)*page+off)))
			require.Equal(t, string(want), string(got), "page %d offset %d", i, off)
		}
	}
}

// The seed's quick start, checked: reserve 128 GiB with no physical memory, map 1 GiB on demand,
// use it, unmap it, and see the device's free memory come back.
func TestPoolMapOneGiBOnDemand(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device) {
		free0, _, err := dev.MemInfo()
		require.NoError(t, err)
		pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: 128 * gib})
		require.NoError(t, err)
		page := pool.PageSize()
		assert.Equal(t, dev.Info().Granularity, page)
		assert.EqualValues(t, 128*gib, pool.Capacity())
		st := pool.Stats()
		assert.Zero(t, st.PhysicalBytes, "a reservation holds no physical memory")
		assert.False(t, pool.IsMapped(0, page))

		// Map 1 GiB one page at a time at an offset in the middle of the reservation.
		off := uint64(64 * gib)
		for o := off; o < off+gib; o += page {
			a, err := pool.Map(o, page)
			require.NoError(t, err)
			require.Equal(t, pool.Base()+vmm.Addr(o), a)
		}
		require.True(t, pool.IsMapped(off, gib))
		assert.False(t, pool.IsMapped(off-page, page))
		st = pool.Stats()
		assert.EqualValues(t, gib, st.MappedBytes)
		assert.EqualValues(t, gib/page, st.Mappings)
		free1, _, err := dev.MemInfo()
		require.NoError(t, err)
		assert.GreaterOrEqual(t, free0-free1, uint64(gib), "the device must report the mapped GiB as used")

		// Memset the whole GiB, then write and read back distinct probes in every page.
		a := pool.Base() + vmm.Addr(off)
		require.NoError(t, dev.Memset(a, 0xAB, gib))
		tail := make([]byte, 4096)
		require.NoError(t, dev.CopyOut(tail, a+gib-4096))
		assert.Equal(t, bytes.Repeat([]byte{0xAB}, 4096), tail)
		writeProbes(t, dev, a, gib, page)
		checkProbes(t, dev, a, gib, page)
		require.NoError(t, dev.Copy(a, a+gib/2, 4096))
		require.NoError(t, dev.CopyOut(tail, a))
		assert.Equal(t, probe(page, int(gib/2/page), 0), tail[:len(probe(page, 0, 0))])

		for o := off; o < off+gib; o += page {
			require.NoError(t, pool.Unmap(o, page))
		}
		assert.False(t, pool.IsMapped(off, page))
		assert.Zero(t, pool.Stats().PhysicalBytes)
		require.NoError(t, pool.Close())
		free2, _, err := dev.MemInfo()
		require.NoError(t, err)
		t.Logf("%s: free before %d MiB, with 1 GiB mapped %d MiB, after Close %d MiB", dev.Info().Name, free0>>20, free1>>20, free2>>20)
		assert.InDelta(t, float64(free0), float64(free2), float64(dev.Info().Granularity), "free memory must come back after Close")
	})
}

// A run of pages mapped as one is one driver mapping, usable as one range, and must be unmapped
// whole.
func TestPoolRunMappedAsOne(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device) {
		pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: gib})
		require.NoError(t, err)
		defer func() { require.NoError(t, pool.Close()) }()
		page := pool.PageSize()
		a, err := pool.Map(4*page, 8*page)
		require.NoError(t, err)
		st := pool.Stats()
		assert.Equal(t, 1, st.Mappings)
		assert.Equal(t, 8, st.MappedPages)
		assert.EqualValues(t, 1, st.Creates)
		assert.EqualValues(t, 1, st.Maps)
		writeProbes(t, dev, a, 8*page, page)
		checkProbes(t, dev, a, 8*page, page)

		err = pool.Unmap(4*page, page)
		require.ErrorIs(t, err, vmm.ErrInvalidArgument, "part of a mapping cannot be unmapped")
		err = pool.Unmap(6*page, 2*page)
		require.ErrorIs(t, err, vmm.ErrInvalidArgument)
		assert.True(t, pool.IsMapped(4*page, 8*page))
		checkProbes(t, dev, a, 8*page, page)

		// Two adjacent mappings can be unmapped in one call.
		_, err = pool.Map(12*page, page)
		require.NoError(t, err)
		require.NoError(t, pool.Unmap(4*page, 9*page))
		assert.Zero(t, pool.Stats().MappedPages)
	})
}

func TestPoolHandleCache(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device) {
		page := dev.Info().Granularity
		pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: gib, CacheLimit: 2 * page})
		require.NoError(t, err)
		defer func() { require.NoError(t, pool.Close()) }()
		require.NoError(t, pool.Precreate(page, 3))
		st := pool.Stats()
		assert.Equal(t, 3, st.CachedHandles)
		assert.Equal(t, 3*page, st.PhysicalBytes)
		for i := range 3 {
			_, err := pool.Map(uint64(i)*page, page)
			require.NoError(t, err)
		}
		st = pool.Stats()
		assert.EqualValues(t, 3, st.CacheHits)
		assert.EqualValues(t, 3, st.Creates, "maps from the cache create nothing")
		assert.Zero(t, st.CachedHandles)
		for i := range 3 {
			require.NoError(t, pool.Unmap(uint64(i)*page, page))
		}
		st = pool.Stats()
		assert.Equal(t, 2, st.CachedHandles, "the cache keeps up to its limit")
		assert.EqualValues(t, 1, st.Releases)
		require.NoError(t, pool.Trim())
		assert.Zero(t, pool.Stats().PhysicalBytes)
	})
}

func TestPoolBadInput(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device) {
		g := dev.Info().Granularity
		_, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: gib, PageSize: g + 4096})
		require.ErrorIs(t, err, vmm.ErrInvalidArgument)
		var ae *vmm.AlignmentError
		require.ErrorAs(t, err, &ae)
		assert.Equal(t, g, ae.Align)
		_, err = vmm.NewPool(dev, vmm.PoolConfig{})
		require.ErrorIs(t, err, vmm.ErrInvalidArgument)

		pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: 16 * g})
		require.NoError(t, err)
		_, err = pool.Map(0, g)
		require.NoError(t, err)
		before := pool.Stats()

		var re *vmm.RangeError
		cases := []struct {
			name string
			do   func() error
			want error
		}{
			{"zero size", func() error { _, err := pool.Map(g, 0); return err }, vmm.ErrInvalidArgument},
			{"unaligned size", func() error { _, err := pool.Map(g, g/2); return err }, vmm.ErrInvalidArgument},
			{"unaligned offset", func() error { _, err := pool.Map(g/2, g); return err }, vmm.ErrInvalidArgument},
			{"offset past the end", func() error { _, err := pool.Map(16*g, g); return err }, vmm.ErrOutOfRange},
			{"range past the end", func() error { _, err := pool.Map(15*g, 2*g); return err }, vmm.ErrOutOfRange},
			{"overflowing range", func() error { _, err := pool.Map(g, ^uint64(0)-g+1); return err }, vmm.ErrOutOfRange},
			{"double map", func() error { _, err := pool.Map(0, g); return err }, vmm.ErrAlreadyMapped},
			{"overlapping map", func() error { _, err := pool.Map(0, 2*g); return err }, vmm.ErrAlreadyMapped},
			{"unmap of unmapped", func() error { return pool.Unmap(g, g) }, vmm.ErrNotMapped},
			{"unmap past mapped", func() error { return pool.Unmap(0, 2*g) }, vmm.ErrNotMapped},
			{"unmap out of range", func() error { return pool.Unmap(32*g, g) }, vmm.ErrOutOfRange},
			{"precreate negative", func() error { return pool.Precreate(g, -1) }, vmm.ErrInvalidArgument},
			{"precreate unaligned", func() error { return pool.Precreate(g+1, 1) }, vmm.ErrInvalidArgument},
		}
		for _, c := range cases {
			err := c.do()
			require.ErrorIs(t, err, c.want, c.name)
			if c.want == vmm.ErrOutOfRange {
				require.ErrorAs(t, err, &re, c.name)
			}
			require.Equal(t, before, pool.Stats(), "%s changed the pool", c.name)
		}
		assert.False(t, pool.IsMapped(0, 0))
		assert.False(t, pool.IsMapped(16*g, g))

		require.NoError(t, pool.Close())
		_, err = pool.Map(0, g)
		require.ErrorIs(t, err, vmm.ErrClosed)
		require.ErrorIs(t, pool.Unmap(0, g), vmm.ErrClosed)
		require.ErrorIs(t, pool.Trim(), vmm.ErrClosed)
		require.ErrorIs(t, pool.Close(), vmm.ErrClosed)
	})
}

// Objects of one device are refused by another, by the same typed error on both backends.
func TestWrongDevice(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device) {
		other, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: dev.Info().Granularity})
		require.NoError(t, err)
		defer other.Close()
		g := dev.Info().Granularity
		h, err := other.Create(g)
		require.NoError(t, err)
		defer other.Release(h)
		a, err := dev.Reserve(4 * g)
		require.NoError(t, err)
		defer dev.FreeReservation(a, 4*g)
		// Handles are small integers on the host backend, so the foreign handle must be one the
		// device does not know.
		require.ErrorIs(t, dev.Map(a, g, h+1000), vmm.ErrWrongDevice)
		require.ErrorIs(t, dev.Release(h+1000), vmm.ErrWrongDevice)
		require.ErrorIs(t, dev.FreeReservation(a+vmm.Addr(g), g), vmm.ErrWrongDevice)
		oa, err := other.Reserve(g)
		require.NoError(t, err)
		defer other.FreeReservation(oa, g)
		own, err := dev.Create(g)
		require.NoError(t, err)
		require.ErrorIs(t, dev.Map(oa, g, own), vmm.ErrOutOfRange, "an address of another device")
		require.NoError(t, dev.Release(own))
	})
	t.Run("cuda ordinal", func(t *testing.T) {
		_, err := vmm.NewCUDADevice(1 << 20)
		if vmm.Probe(0).Err != nil && !vmm.Supported(0) {
			require.Error(t, err)
			return
		}
		require.ErrorIs(t, err, vmm.ErrWrongDevice)
	})
}

func TestDeviceRefusesToCloseWhileInUse(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device) {
		pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: gib})
		require.NoError(t, err)
		require.ErrorIs(t, dev.Close(), vmm.ErrInvalidArgument)
		require.NoError(t, pool.Close())
	})
}

func TestPoolFragmentation(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device) {
		pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: gib})
		require.NoError(t, err)
		defer func() { require.NoError(t, pool.Close()) }()
		g := pool.PageSize()
		assert.Zero(t, pool.Stats().Fragmentation)
		for i := range 4 {
			_, err := pool.Map(uint64(i)*g, g)
			require.NoError(t, err)
		}
		assert.Zero(t, pool.Stats().Fragmentation, "packed at the bottom")
		require.NoError(t, pool.Unmap(g, g))
		require.NoError(t, pool.Unmap(2*g, g))
		assert.InDelta(t, 0.5, pool.Stats().Fragmentation, 1e-9, "2 holes under a 4-page high-water mark")
		var pages []int
		pool.MappedPages(func(p int) bool { pages = append(pages, p); return true })
		assert.Equal(t, []int{0, 3}, pages)
	})
}

func TestPoolConcurrentUse(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device) {
		pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: 64 * dev.Info().Granularity, CacheLimit: 8 * dev.Info().Granularity})
		require.NoError(t, err)
		defer func() { require.NoError(t, pool.Close()) }()
		g := pool.PageSize()
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for w := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for round := range 20 {
					off := uint64(w*8+round%8) * g
					a, err := pool.Map(off, g)
					if err != nil {
						errs <- err
						return
					}
					msg := []byte(fmt.Sprintf("w%d r%d", w, round))
					if err := dev.CopyIn(a, msg); err != nil {
						errs <- err
						return
					}
					got := make([]byte, len(msg))
					if err := dev.CopyOut(got, a); err != nil || !bytes.Equal(got, msg) {
						errs <- fmt.Errorf("worker %d round %d: read %q, %v", w, round, got, err)
						return
					}
					if err := pool.Unmap(off, g); err != nil {
						errs <- err
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		assert.Zero(t, pool.Stats().MappedPages)
	})
}

// Host memory maps into a reservation beside device memory and reads back through the device;
// it is never cached, and a device without host memory says so.
func TestPoolMapHost(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device) {
		g := dev.Info().Granularity
		pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: 4 * g, CacheLimit: 4 * g})
		require.NoError(t, err)
		defer func() { require.NoError(t, pool.Close()) }()
		devFree, _, err := dev.MemInfo()
		require.NoError(t, err)
		a, err := pool.MapHost(2*g, g)
		require.NoError(t, err)
		_, err = pool.Map(0, g) // device memory beside it
		require.NoError(t, err)
		writeProbes(t, dev, a, g, g)
		require.NoError(t, dev.Copy(pool.Base(), a, 64), "the device copies host memory by address")
		checkProbes(t, dev, a, g, g)
		got := make([]byte, 64)
		require.NoError(t, dev.CopyOut(got, pool.Base()))
		assert.Equal(t, string(probe(g, 0, 0)), string(got[:len(probe(g, 0, 0))]))
		free, _, err := dev.MemInfo()
		require.NoError(t, err)
		assert.InDelta(t, float64(devFree-g), float64(free), float64(g)/2, "host memory is not device memory")
		require.NoError(t, pool.Unmap(2*g, g))
		assert.Zero(t, pool.Stats().CachedBytes, "a host handle is released, never cached")
	})
	f := vmm.InjectFaults(struct{ vmm.Device }{hostOnlyDevice(t)})
	_, err := f.CreateHost(2 << 20)
	require.ErrorIs(t, err, vmm.ErrNotSupported)
}

func hostOnlyDevice(t *testing.T) vmm.Device {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, dev.Close()) })
	return dev
}
