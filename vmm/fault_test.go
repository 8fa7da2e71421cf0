package vmm_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/leakcheck"
	"github.com/pagedkv/pagedkv/vmm"
)

// poolState is everything a caller can observe of a pool and its device, minus the history
// counters (how many driver calls were made).
type poolState struct {
	mappedPages, mappings, cachedHandles int
	cachedBytes, physical, devFree       uint64
	pages                                []int
	live                                 leakcheck.Counts
	data                                 string
}

func stateOf(t *testing.T, pool *vmm.Pool, dev vmm.Device) poolState {
	t.Helper()
	s := pool.Stats()
	free, _, err := dev.MemInfo()
	require.NoError(t, err)
	st := poolState{
		mappedPages: s.MappedPages, mappings: s.Mappings, cachedHandles: s.CachedHandles,
		cachedBytes: s.CachedBytes, physical: s.PhysicalBytes, devFree: free, live: leakcheck.Snapshot(),
	}
	pool.MappedPages(func(p int) bool { st.pages = append(st.pages, p); return true })
	for _, p := range st.pages {
		buf := make([]byte, 16)
		require.NoError(t, dev.CopyOut(buf, pool.Base()+vmm.Addr(uint64(p)*pool.PageSize())))
		st.data += string(buf)
	}
	return st
}

// Every pool operation, with each driver call it makes failing in turn, must leave the pool,
// the device and the leak counters exactly as before, and the pool usable afterwards.
func TestPoolFaultInjection(t *testing.T) {
	backends(t, func(t *testing.T, base vmm.Device) {
		dev := vmm.InjectFaults(base)
		g := dev.Info().Granularity
		pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: 64 * g, CacheLimit: g})
		require.NoError(t, err)
		defer func() { require.NoError(t, pool.Close()) }()

		// Some mapped pages with data, and one cached handle.
		for _, p := range []uint64{0, 1, 2} {
			a, err := pool.Map(p*g, g)
			require.NoError(t, err)
			require.NoError(t, dev.CopyIn(a, []byte{byte('a' + p), 1, 2, 3}))
		}
		_, err = pool.Map(8*g, 4*g)
		require.NoError(t, err)
		require.NoError(t, pool.Precreate(g, 1))

		cases := []struct {
			name string
			op   vmm.Op
			nth  int
			do   func() error
		}{
			{"map: create fails", vmm.OpCreate, 1, func() error { _, err := pool.Map(20*g, 2*g); return err }},
			{"map: map fails (fresh handle)", vmm.OpMap, 1, func() error { _, err := pool.Map(20*g, 2*g); return err }},
			{"map: map fails (cached handle)", vmm.OpMap, 1, func() error { _, err := pool.Map(20*g, g); return err }},
			{"map: set access fails", vmm.OpSetAccess, 1, func() error { _, err := pool.Map(20*g, 2*g); return err }},
			{"map: set access fails (cached handle)", vmm.OpSetAccess, 1, func() error { _, err := pool.Map(20*g, g); return err }},
			{"unmap: unmap fails", vmm.OpUnmap, 1, func() error { return pool.Unmap(8*g, 4*g) }},
			{"unmap of 3 mappings: the second unmap fails", vmm.OpUnmap, 2, func() error { return pool.Unmap(0, 3*g) }},
			{"unmap of 3 mappings: the third unmap fails", vmm.OpUnmap, 3, func() error { return pool.Unmap(0, 3*g) }},
			{"precreate: the second create fails", vmm.OpCreate, 2, func() error { return pool.Precreate(2*g, 3) }},
		}
		for _, c := range cases {
			before := stateOf(t, pool, dev)
			dev.FailNth(c.op, c.nth, nil)
			err := c.do()
			require.ErrorIs(t, err, vmm.ErrInjected, c.name)
			dev.Clear()
			require.Equal(t, before, stateOf(t, pool, dev), "%s changed the pool", c.name)
		}

		// A failing Reserve leaves nothing behind.
		before := leakcheck.Snapshot()
		dev.FailNth(vmm.OpReserve, 1, nil)
		_, err = vmm.NewPool(dev, vmm.PoolConfig{Capacity: g})
		require.ErrorIs(t, err, vmm.ErrInjected)
		require.Equal(t, before, leakcheck.Snapshot())

		// After all that the pool still works.
		_, err = pool.Map(20*g, 2*g)
		require.NoError(t, err)
		require.NoError(t, pool.Unmap(0, 3*g))
		require.NoError(t, pool.Unmap(20*g, 2*g))
	})
}

// A release that fails after a successful unmap keeps the memory owned (cached) and counted; Trim
// retries it; nothing leaks.
func TestPoolReleaseFailureKeepsHandle(t *testing.T) {
	backends(t, func(t *testing.T, base vmm.Device) {
		dev := vmm.InjectFaults(base)
		g := dev.Info().Granularity
		pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: 8 * g})
		require.NoError(t, err)
		_, err = pool.Map(0, g)
		require.NoError(t, err)
		dev.FailNth(vmm.OpRelease, 1, nil)
		require.NoError(t, pool.Unmap(0, g))
		st := pool.Stats()
		require.False(t, pool.IsMapped(0, g))
		require.EqualValues(t, 1, st.ReleaseFailures)
		require.Equal(t, g, st.CachedBytes)
		dev.FailNth(vmm.OpRelease, 1, nil)
		require.ErrorIs(t, pool.Trim(), vmm.ErrInjected)
		require.Equal(t, g, pool.Stats().CachedBytes)
		require.NoError(t, pool.Trim())
		require.Zero(t, pool.Stats().PhysicalBytes)
		require.NoError(t, pool.Close())
	})
}

// A release that fails while Close returns a mapping is tried again by Close's trim: the handle
// is not lost, and the device can be closed afterwards.
func TestPoolCloseRetriesRefusedRelease(t *testing.T) {
	backends(t, func(t *testing.T, base vmm.Device) {
		dev := vmm.InjectFaults(base)
		g := dev.Info().Granularity
		pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: 8 * g})
		require.NoError(t, err)
		_, err = pool.Map(0, g)
		require.NoError(t, err)
		dev.FailNth(vmm.OpRelease, 1, nil)
		require.NoError(t, pool.Close())
		require.Equal(t, 2, dev.Calls(vmm.OpRelease), "the refused release is tried once more")
	})
}

// A host handle whose release fails after Unmap stays owned but apart from the cache of device
// handles: the next Map creates device memory instead of mapping the host handle, and Trim
// releases the host handle.
func TestPoolRefusedHostReleaseIsNotReused(t *testing.T) {
	backends(t, func(t *testing.T, base vmm.Device) {
		dev := vmm.InjectFaults(base)
		g := dev.Info().Granularity
		pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: 8 * g, CacheLimit: 8 * g})
		require.NoError(t, err)
		defer func() { require.NoError(t, pool.Close()) }()
		_, err = pool.MapHost(0, g)
		require.NoError(t, err)
		dev.FailNth(vmm.OpRelease, 1, nil)
		require.NoError(t, pool.Unmap(0, g))
		require.EqualValues(t, 1, pool.Stats().ReleaseFailures)

		_, err = pool.Map(g, g)
		require.NoError(t, err)
		require.Equal(t, 1, dev.Calls(vmm.OpCreate), "the device mapping has device memory of its own")
		require.Zero(t, pool.Stats().CacheHits)

		require.NoError(t, pool.Trim())
		require.Equal(t, 2, dev.Calls(vmm.OpRelease), "Trim releases the host handle")
	})
}

// A Close whose unmap or reservation free fails leaves the pool open, still owning what the
// driver refused; Close again returns it, and nothing leaks.
func TestPoolCloseAfterRefusedUnmap(t *testing.T) {
	backends(t, func(t *testing.T, base vmm.Device) {
		dev := vmm.InjectFaults(base)
		g := dev.Info().Granularity
		pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: 8 * g})
		require.NoError(t, err)
		for _, off := range []uint64{0, 2 * g} {
			_, err = pool.Map(off, g)
			require.NoError(t, err)
		}
		dev.FailNth(vmm.OpUnmap, 1, nil)
		require.ErrorIs(t, pool.Close(), vmm.ErrInjected)
		require.True(t, pool.IsMapped(0, g), "the mapping the driver kept is still the pool's")
		require.False(t, pool.IsMapped(2*g, g))
		dev.FailNth(vmm.OpFreeReservation, 1, nil)
		require.ErrorIs(t, pool.Close(), vmm.ErrInjected)
		require.Zero(t, pool.Stats().PhysicalBytes)
		require.NoError(t, pool.Close())
	})
}
