package vmm_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/cuda"
	"github.com/pagedkv/pagedkv/vmm"
)

// fakeCUDA opens a CUDADevice on the fake driver.
func fakeCUDA(t *testing.T, f *cuda.Fake) *vmm.CUDADevice {
	t.Helper()
	t.Cleanup(cuda.InstallFake(f))
	dev, err := vmm.NewCUDADevice(0)
	require.NoError(t, err)
	return dev
}

// Close must not release the context under a data call that already passed its check: the
// driver would run that call in a destroyed context.
func TestCUDACloseWaitsForDataCalls(t *testing.T) {
	entered, unblock := make(chan struct{}), make(chan struct{})
	f := &cuda.Fake{}
	dev := fakeCUDA(t, f)
	f.Hook = func(name string) cuda.Result {
		if name == "cuMemGetInfo" {
			close(entered)
			<-unblock
		}
		return cuda.Success
	}
	infoDone := make(chan error)
	go func() { _, _, err := dev.MemInfo(); infoDone <- err }()
	<-entered
	closed := make(chan error)
	go func() { closed <- dev.Close() }()
	select {
	case err := <-closed: // a fault of the code under test: the rest must not wait for it again
		t.Errorf("Close returned (%v) while MemInfo was in the driver", err)
		go func() { closed <- err }()
	case <-time.After(50 * time.Millisecond):
	}
	close(unblock)
	require.NoError(t, <-infoDone)
	require.NoError(t, <-closed)
	assert.Empty(t, f.Misuse())
	assert.Equal(t, 0, f.Live("context"))
	_, _, err := dev.MemInfo()
	assert.ErrorIs(t, err, vmm.ErrClosed)
}
