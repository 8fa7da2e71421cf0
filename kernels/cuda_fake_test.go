package kernels_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/cuda"
	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/vmm"
)

// The module lives in the device's context: closing the device first must not leave the
// Kernels unloading its module, or waiting on its events, in a context already released.
func TestFakeCUDADeviceClosedBeforeKernels(t *testing.T) {
	f := &cuda.Fake{}
	t.Cleanup(cuda.InstallFake(f))
	dev, err := vmm.NewCUDADevice(0)
	require.NoError(t, err)
	k, err := kernels.For(dev)
	require.NoError(t, err)
	assert.Equal(t, kernels.ImageSM90, k.Image())
	mk, err := k.Mark(0)
	require.NoError(t, err)
	require.NoError(t, mk.Wait())
	require.NoError(t, mk.Close())
	require.NoError(t, dev.Close())
	require.NoError(t, k.Close())
	assert.Empty(t, f.Misuse())
	assert.Equal(t, 0, f.Live("module"))
	assert.Equal(t, 0, f.Live("event"))
	assert.Equal(t, 0, f.Live("context"))
}

// A CopyBlocks that passed usable before a concurrent Close must neither fall back to the Go
// implementation (one synchronous cuMemcpyDtoD per pair, out of the stream's order) nor stage
// its pairs in a new scratch buffer after Close gave the old one up.
func TestFakeCUDACopyBlocksRacingClose(t *testing.T) {
	f := &cuda.Fake{}
	t.Cleanup(cuda.InstallFake(f))
	dev, err := vmm.NewCUDADevice(0)
	require.NoError(t, err)
	// Checking this many pairs takes milliseconds: Close comes while CopyBlocks checks them.
	pairs := make([]int64, 1<<22)
	for i := range pairs {
		pairs[i] = int64(i)
	}
	for range 5 {
		k, err := kernels.For(dev)
		require.NoError(t, err)
		done := make(chan error)
		go func() { done <- k.CopyBlocks(0, 1<<40, pairs, 16) }()
		time.Sleep(time.Millisecond)
		require.NoError(t, k.Close())
		if err := <-done; err != nil {
			require.ErrorIs(t, err, vmm.ErrClosed)
		}
		require.Zero(t, k.ScratchBytes(), "scratch mapped after Close")
		require.Zero(t, f.Live("event"), "event made after Close")
		require.Zero(t, f.Calls("cuMemcpyDtoD"), "Go implementation run on the CUDA device")
	}
	require.NoError(t, dev.Close())
	assert.Empty(t, f.Misuse())
}

// Close waits for a launch under way: it must not unload the module while Write is in the
// driver with one of its functions.
func TestFakeCUDACloseWaitsForLaunch(t *testing.T) {
	entered, unblock := make(chan struct{}), make(chan struct{})
	f := &cuda.Fake{}
	t.Cleanup(cuda.InstallFake(f))
	dev, err := vmm.NewCUDADevice(0)
	require.NoError(t, err)
	k, err := kernels.For(dev)
	require.NoError(t, err)
	f.Hook = func(name string) cuda.Result {
		if name == "cuLaunchKernel" {
			close(entered)
			<-unblock
		}
		return cuda.Success
	}
	wrote := make(chan error)
	go func() {
		wrote <- k.Write(0, kernels.KVWrite{KBase: 1 << 40, Key: 1 << 41, SlotMapping: 1 << 42, NumTokens: 1,
			RowBytes: 16, BlockTokens: 1, BlockStride: 16})
	}()
	<-entered
	closed := make(chan error)
	go func() { closed <- k.Close() }()
	select {
	case err := <-closed: // a fault of the code under test: the rest must not wait for it again
		t.Errorf("Close returned (%v) while Write was launching", err)
		go func() { closed <- err }()
	case <-time.After(50 * time.Millisecond):
	}
	close(unblock)
	require.NoError(t, <-wrote)
	require.NoError(t, <-closed)
	require.ErrorIs(t, k.Write(0, kernels.KVWrite{}), vmm.ErrClosed)
	require.NoError(t, dev.Close())
	assert.Empty(t, f.Misuse())
	assert.Equal(t, 0, f.Live("module"))
}
