package vmm_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/vmm"
)

// The host backend follows the driver's rules: memory outside accessible mappings is refused
// with a typed error (never a fault), release before unmap keeps the memory until the unmap,
// and Create is bounded by the capacity.
func TestHostDeviceSemantics(t *testing.T) {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10, Capacity: 4 * (64 << 10)})
	require.NoError(t, err)
	defer func() { require.NoError(t, dev.Close()) }()
	g := dev.Info().Granularity
	a, err := dev.Reserve(8 * g)
	require.NoError(t, err)
	assert.Zero(t, uint64(a)%g, "reservations are aligned to the granularity")
	buf := []byte("hello")
	require.ErrorIs(t, dev.CopyIn(a, buf), vmm.ErrNotMapped)

	h, err := dev.Create(2 * g)
	require.NoError(t, err)
	free, total, err := dev.MemInfo()
	require.NoError(t, err)
	assert.Equal(t, 4*g, total)
	assert.Equal(t, 2*g, free)
	require.ErrorIs(t, dev.Map(a, g, h), vmm.ErrInvalidArgument, "a handle is mapped whole")
	require.NoError(t, dev.Map(a+vmm.Addr(g), 2*g, h))
	require.ErrorIs(t, dev.CopyIn(a+vmm.Addr(g), buf), vmm.ErrNotMapped, "no access before SetAccess")
	require.NoError(t, dev.SetAccess(a+vmm.Addr(g), 2*g))
	require.NoError(t, dev.CopyIn(a+vmm.Addr(2*g)-2, buf), "a write may straddle pages of one mapping")
	require.ErrorIs(t, dev.CopyIn(a+vmm.Addr(3*g)-2, buf), vmm.ErrNotMapped, "a write past the mapping is refused")

	require.NoError(t, dev.Release(h))
	got := make([]byte, len(buf))
	require.NoError(t, dev.CopyOut(got, a+vmm.Addr(2*g)-2))
	assert.Equal(t, buf, got, "released memory stays until unmapped")
	free, _, _ = dev.MemInfo()
	assert.Equal(t, 2*g, free)

	_, err = dev.Create(4 * g)
	var ce *vmm.CapacityError
	require.ErrorAs(t, err, &ce)
	require.ErrorIs(t, err, vmm.ErrOutOfMemory)
	assert.Equal(t, 4*g, ce.Need)
	assert.Equal(t, 2*g, ce.Free)

	require.ErrorIs(t, dev.FreeReservation(a, 8*g), vmm.ErrAlreadyMapped)
	require.ErrorIs(t, dev.Unmap(a+vmm.Addr(g), g), vmm.ErrNotMapped, "unmap covers whole mappings")
	require.NoError(t, dev.Unmap(a+vmm.Addr(g), 2*g))
	free, _, _ = dev.MemInfo()
	assert.Equal(t, 4*g, free)
	require.NoError(t, dev.FreeReservation(a, 8*g))

	_, err = vmm.NewHostDevice(vmm.HostOptions{Granularity: 1000})
	require.ErrorIs(t, err, vmm.ErrInvalidArgument)
}

// A closed host device refuses every call with ErrClosed, as the CUDA backend does.
func TestHostDeviceClosed(t *testing.T) {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10, Capacity: 4 * (64 << 10)})
	require.NoError(t, err)
	require.NoError(t, dev.Close())
	g := dev.Info().Granularity
	_, err = dev.Reserve(g)
	require.ErrorIs(t, err, vmm.ErrClosed, "reserve")
	_, err = dev.Create(g)
	require.ErrorIs(t, err, vmm.ErrClosed, "create")
	_, err = dev.CreateHost(g)
	require.ErrorIs(t, err, vmm.ErrClosed, "create host")
	_, _, err = dev.MemInfo()
	require.ErrorIs(t, err, vmm.ErrClosed, "mem info")
	require.ErrorIs(t, dev.Memset(0, 0, 1), vmm.ErrClosed, "memset")
	require.ErrorIs(t, dev.Close(), vmm.ErrClosed, "close")
}
