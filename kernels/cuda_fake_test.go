package kernels_test

import (
	"testing"

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

