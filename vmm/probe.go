package vmm

import (
	"fmt"

	"github.com/pagedkv/pagedkv/internal/cuda"
)

// ProbeResult says whether elastic (VMM) memory works on a CUDA device, and why not.
type ProbeResult struct {
	Supported     bool
	Err           error // why not: matches ErrNoDriver, ErrWrongDevice or ErrNotSupported
	DriverVersion int   // 1000*major + 10*minor
	Name          string
	ComputeMajor  int
	ComputeMinor  int
	TotalMemory   uint64
}

// Probe checks a CUDA device for virtual memory management support: a loadable driver of CUDA
// 10.2 or newer, an existing ordinal, and CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED.
// It never panics and creates nothing.
func Probe(ordinal int) ProbeResult {
	var r ProbeResult
	fail := func(err error) ProbeResult { r.Err = err; return r }
	v, err := cuda.DriverVersion()
	if err != nil {
		return fail(err)
	}
	r.DriverVersion = v
	if v < 10020 {
		return fail(fmt.Errorf("%w: driver CUDA %d.%d has no VMM API (needs 10.2)", ErrNotSupported, v/1000, v%1000/10))
	}
	n, err := cuda.DeviceCount()
	if err != nil {
		return fail(err)
	}
	if ordinal < 0 || ordinal >= n {
		return fail(fmt.Errorf("%w: device %d of %d", ErrWrongDevice, ordinal, n))
	}
	if r.Name, err = cuda.DeviceName(ordinal); err != nil {
		return fail(err)
	}
	r.ComputeMajor, _ = cuda.DeviceAttribute(ordinal, cuda.AttrComputeCapabilityMajor)
	r.ComputeMinor, _ = cuda.DeviceAttribute(ordinal, cuda.AttrComputeCapabilityMinor)
	r.TotalMemory, _ = cuda.DeviceTotalMem(ordinal)
	vmmOK, err := cuda.DeviceAttribute(ordinal, cuda.AttrVirtualMemoryManagement)
	if err != nil {
		return fail(err)
	}
	if vmmOK == 0 {
		return fail(fmt.Errorf("%w: %s reports no virtual memory management", ErrNotSupported, r.Name))
	}
	r.Supported = true
	return r
}

// Supported reports whether VMM works on the CUDA device with the given ordinal.
func Supported(ordinal int) bool { return Probe(ordinal).Supported }
