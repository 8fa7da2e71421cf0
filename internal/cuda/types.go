package cuda

// DevicePtr is a CUdeviceptr: a virtual address in the unified address space.
type DevicePtr uint64

// HostPtr is the address of page-locked host memory from MemAllocHost: outside Go's heap, so an
// integer, not a pointer Go's collector would follow.
type HostPtr uintptr

// MemHandle is a CUmemGenericAllocationHandle: a physical allocation made by cuMemCreate.
type MemHandle uint64

// Stream is a CUstream. The zero Stream is the legacy default stream.
type Stream uintptr

// Event is a CUevent.
type Event uintptr

// Module is a CUmodule.
type Module uintptr

// Function is a CUfunction.
type Function uintptr

// Values from cuda.h (CUDA 13.0) that the mirrored structs and calls use.
const (
	memAllocationTypePinned      = 1
	memLocationTypeDevice        = 1
	memLocationTypeHost          = 2
	memAccessFlagsProtReadWrite  = 3
	memHandleTypeNone            = 0
	granularityMinimum           = 0
	granularityRecommended       = 1
	AttrComputeCapabilityMajor   = 75
	AttrComputeCapabilityMinor   = 76
	AttrVirtualMemoryManagement  = 102
	AttrMultiprocessorCount      = 16
	AttrGPUDirectRDMAWithCUDAVMM = 112
	FuncAttrMaxThreadsPerBlock   = 0
	EventDefault                 = 0
	EventDisableTiming           = 2
	StreamNonBlocking            = 1
)

// memLocation mirrors CUmemLocation { int type; int id; } (8 bytes).
type memLocation struct {
	Type int32
	ID   int32
}

// memAllocationProp mirrors CUmemAllocationProp (32 bytes on 64-bit; offsets 0, 4, 8, 16, 24).
type memAllocationProp struct {
	Type                 int32
	RequestedHandleTypes int32
	Location             memLocation
	Win32HandleMetaData  uintptr
	AllocFlags           memAllocFlags
}

// memAllocFlags mirrors the anonymous allocFlags struct inside CUmemAllocationProp (8 bytes).
type memAllocFlags struct {
	CompressionType      uint8
	GPUDirectRDMACapable uint8
	Usage                uint16
	Reserved             [4]uint8
}

// memAccessDesc mirrors CUmemAccessDesc { CUmemLocation location; int flags; } (12 bytes).
type memAccessDesc struct {
	Location memLocation
	Flags    int32
}

// hostProp describes a pinned host allocation (CU_MEM_LOCATION_TYPE_HOST: no particular NUMA
// node; its id is ignored, and it can have no shareable handle).
func hostProp() memAllocationProp {
	return memAllocationProp{Type: memAllocationTypePinned, Location: memLocation{Type: memLocationTypeHost}}
}

func deviceProp(ordinal int) memAllocationProp {
	return memAllocationProp{
		Type:                 memAllocationTypePinned,
		RequestedHandleTypes: memHandleTypeNone,
		Location:             memLocation{Type: memLocationTypeDevice, ID: int32(ordinal)},
	}
}
