package kvcache_test

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/leakcheck"
	"github.com/pagedkv/pagedkv/internal/testutil/gputest"
	"github.com/pagedkv/pagedkv/internal/testutil/proctest"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

func TestMain(m *testing.M) {
	proctest.Main(map[string]proctest.Role{"grow": growRole})
	leakcheck.Main(m)
}

// tinyConfig is a geometry small enough to exercise page boundaries constantly: 4 tokens per
// block of 4 KiB per layer and K|V, 8 KiB per block, 4 blocks per 32 KiB page.
func tinyConfig() kvcache.Config {
	return kvcache.Config{
		Layers: 1, KVHeads: 2, HeadDim: 256, ElemSize: 2, BlockTokens: 4,
		PageSize: 32 << 10, Capacity: 64 * (32 << 10), NoBackground: true,
	}
}

// hostDevice returns a host device with the given granularity, closed (and checked for leaks)
// when the test ends.
func hostDevice(t testing.TB, gran uint64) vmm.Device {
	t.Helper()
	leakcheck.Check(t)
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: gran})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, dev.Close()) })
	return dev
}

func newManager(t testing.TB, dev vmm.Device, cfg kvcache.Config) *kvcache.Manager {
	t.Helper()
	m, err := kvcache.New(dev, cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, m.Close()) })
	return m
}

// backends runs fn on the host backend and, when a GPU is present (or required by
// PAGEDKV_REQUIRE_GPU=1), on the CUDA backend, both with the driver's 2 MiB granularity.
func backends(t *testing.T, fn func(t *testing.T, dev vmm.Device)) {
	t.Run("host", func(t *testing.T) { fn(t, hostDevice(t, 2<<20)) })
	t.Run("cuda", func(t *testing.T) {
		ord := gputest.Require(t)
		leakcheck.Check(t)
		dev, err := vmm.NewCUDADevice(ord)
		require.NoError(t, err)
		t.Cleanup(func() { require.NoError(t, dev.Close()) })
		fn(t, dev)
	})
}

// smallConfig is a geometry that fits the 2 MiB granularity of both backends: 2 layers, 16
// tokens per block, 32 KiB per block, 64 blocks per 2 MiB page.
func smallConfig() kvcache.Config {
	return kvcache.Config{
		Layers: 2, KVHeads: 2, HeadDim: 128, ElemSize: 2, BlockTokens: 16,
		PageSize: 2 << 20, Capacity: 8 * (2 << 20), NoBackground: true,
	}
}

var errorIs = errors.Is
