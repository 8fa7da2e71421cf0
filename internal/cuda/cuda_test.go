package cuda

import (
	"errors"
	"os"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/errdefs"
)

func TestStructLayoutMatchesCudaH(t *testing.T) {
	var p memAllocationProp
	assert.EqualValues(t, 32, unsafe.Sizeof(p))
	assert.EqualValues(t, 0, unsafe.Offsetof(p.Type))
	assert.EqualValues(t, 4, unsafe.Offsetof(p.RequestedHandleTypes))
	assert.EqualValues(t, 8, unsafe.Offsetof(p.Location))
	assert.EqualValues(t, 16, unsafe.Offsetof(p.Win32HandleMetaData))
	assert.EqualValues(t, 24, unsafe.Offsetof(p.AllocFlags))
	var f memAllocFlags
	assert.EqualValues(t, 8, unsafe.Sizeof(f))
	assert.EqualValues(t, 1, unsafe.Offsetof(f.GPUDirectRDMACapable))
	assert.EqualValues(t, 2, unsafe.Offsetof(f.Usage))
	var a memAccessDesc
	assert.EqualValues(t, 12, unsafe.Sizeof(a))
	assert.EqualValues(t, 8, unsafe.Offsetof(a.Flags))
	assert.EqualValues(t, 8, unsafe.Sizeof(memLocation{}))
}

func TestErrorsMatchSentinels(t *testing.T) {
	oom := check("cuMemCreate", uintptr(ErrorOutOfMemory))
	require.Error(t, oom)
	assert.ErrorIs(t, oom, errdefs.ErrOutOfMemory)
	assert.ErrorIs(t, oom, errdefs.ErrDriver)
	assert.NotErrorIs(t, oom, errdefs.ErrNotSupported)
	assert.Contains(t, oom.Error(), "cuMemCreate")
	assert.Contains(t, oom.Error(), "CUDA_ERROR_OUT_OF_MEMORY")

	assert.ErrorIs(t, check("cuMemMap", uintptr(ErrorNotSupported)), errdefs.ErrNotSupported)
	assert.ErrorIs(t, check("cuInit", uintptr(ErrorNoDevice)), errdefs.ErrNoDriver)
	assert.ErrorIs(t, check("cuMemMap", uintptr(ErrorInvalidValue)), errdefs.ErrInvalidArgument)
	assert.NoError(t, check("cuInit", 0))

	var ce *Error
	require.True(t, errors.As(check("x", 12345), &ce))
	assert.Equal(t, "CUresult(12345)", ce.Code.String())
}

// On a machine without a driver Load must fail with ErrNoDriver, never panic; with a driver it
// must succeed and the basic queries must answer.
func TestLoad(t *testing.T) {
	err := Load()
	if err != nil {
		require.ErrorIs(t, err, errdefs.ErrNoDriver)
		if os.Getenv("PAGEDKV_REQUIRE_GPU") == "1" {
			t.Fatalf("driver required: %v", err)
		}
		_, err = DeviceCount()
		require.ErrorIs(t, err, errdefs.ErrNoDriver)
		return
	}
	v, err := DriverVersion()
	require.NoError(t, err)
	assert.GreaterOrEqual(t, v, 11020, "VMM needs a CUDA 11.2+ driver")
	n, err := DeviceCount()
	require.NoError(t, err)
	require.Positive(t, n)
	name, err := DeviceName(0)
	require.NoError(t, err)
	assert.NotEmpty(t, name)
	t.Logf("driver %d, %d device(s), device 0: %s", v, n, name)
}

func TestMissingLibraryIsNoDriver(t *testing.T) {
	// load() is re-run directly with a path that cannot exist; the process-wide Load result is
	// untouched.
	t.Setenv(LibraryEnv, "/nonexistent/libcuda.so.1")
	err := load()
	require.ErrorIs(t, err, errdefs.ErrNoDriver)
}

// A library that loads but lacks the driver's symbols (an old or a wrong libcuda) is
// ErrNoDriver, not a panic, and leaves no half-resolved table behind.
func TestLibraryWithoutSymbolsIsNoDriver(t *testing.T) {
	before := procs
	t.Setenv(LibraryEnv, "libc.so.6")
	err := load()
	require.ErrorIs(t, err, errdefs.ErrNoDriver)
	assert.Contains(t, err.Error(), "lacks")
	assert.Equal(t, before, procs)
}
