package vmm

// Addr is a virtual address in a device's address space: a CUdeviceptr on the CUDA backend, a
// process address on the host backend.
type Addr uint64

// Handle is a physical allocation made by Device.Create: a CUmemGenericAllocationHandle on the
// CUDA backend, a memfd on the host backend.
type Handle uint64

// MemoryKind says where a device's memory lives; transfer engines register regions by it.
type MemoryKind int

const (
	// MemoryDevice is GPU memory.
	MemoryDevice MemoryKind = iota
	// MemoryHost is host (CPU) memory.
	MemoryHost
)

// String returns a readable form.
func (k MemoryKind) String() string {
	if k == MemoryHost {
		return "host"
	}
	return "device"
}

// DeviceInfo describes a device.
type DeviceInfo struct {
	Name        string     // "cuda:0 (NVIDIA H100 80GB HBM3)" or "host"
	Ordinal     int        // CUDA device ordinal; 0 for the host backend
	Kind        MemoryKind // where Create's memory lives
	Granularity uint64     // every Reserve, Create and Map size is a multiple of this
	TotalMemory uint64     // physical bytes the device can hand out
}

// HostAllocator is implemented by devices that can make pinned host memory mappable into their
// reservations like device memory, so that the device reaches it by address: the host tier of
// a KV cache. CreateHost allocates size bytes (a multiple of the granularity); Release frees
// them. The CUDA backend uses cuMemCreate with a host location; the host backend a memfd, as
// for any other memory (counted apart from its Capacity).
type HostAllocator interface {
	CreateHost(size uint64) (Handle, error)
}

// Device is the small hardware interface the rest of pagedkv is written against. It mirrors the
// CUDA VMM calls one to one, so that the pool's bookkeeping, the fault injector and the tests
// see exactly the sequence the driver sees.
//
// Ownership: whoever creates an object destroys it (FreeReservation, Release, Unmap). Sizes are
// positive multiples of Info().Granularity. A handle is always mapped whole. Release may come
// before Unmap: the memory is freed when it is both released and unmapped, as on CUDA.
//
// Implementations are safe for concurrent use. The data calls are synchronous with respect to
// the host (they complete before returning) and run on the device's default stream.
type Device interface {
	// Info describes the device.
	Info() DeviceInfo
	// Reserve reserves size bytes of virtual address space with no memory behind it.
	Reserve(size uint64) (Addr, error)
	// FreeReservation frees a reservation; nothing may be mapped in it.
	FreeReservation(addr Addr, size uint64) error
	// Create allocates size bytes of physical memory.
	Create(size uint64) (Handle, error)
	// Release gives up the caller's handle.
	Release(h Handle) error
	// Map maps the whole of h at addr, inside a reservation, with no access yet.
	Map(addr Addr, size uint64, h Handle) error
	// SetAccess makes [addr, addr+size), which must be mapped, readable and writable.
	SetAccess(addr Addr, size uint64) error
	// Unmap unmaps [addr, addr+size), which must cover whole mappings.
	Unmap(addr Addr, size uint64) error
	// MemInfo returns the free and total physical memory of the device.
	MemInfo() (free, total uint64, err error)
	// Memset sets n bytes at dst to v.
	Memset(dst Addr, v byte, n uint64) error
	// CopyIn copies src into device memory at dst.
	CopyIn(dst Addr, src []byte) error
	// CopyOut copies len(dst) bytes of device memory at src into dst.
	CopyOut(dst []byte, src Addr) error
	// Copy copies n bytes between device addresses.
	Copy(dst, src Addr, n uint64) error
	// Close gives the device up. It fails, changing nothing, while objects made through it live.
	Close() error
}
