// Package vmm manages physical memory: devices, virtual reservations, elastic pools.
//
// A Device is the small interface every other package is written against. Two real backends
// implement it: CUDADevice drives a GPU through the CUDA driver's virtual memory management API
// (cuMemAddressReserve, cuMemCreate, cuMemMap, cuMemSetAccess, cuMemUnmap, cuMemRelease), and
// HostDevice does the same with memfd and mmap, so the whole library runs on a machine without a
// GPU. FaultDevice wraps either and fails chosen calls, for tests.
//
// A Pool reserves a large virtual range once and maps physical pages into it on demand. The
// range's base address never changes, so pointers into it stay valid while memory grows and
// shrinks. A run of pages can be mapped as ONE driver mapping: on an H100 the cost of growing is
// per mapping (about 35 µs), not per byte, so mapping a 32-layer model's page index as one
// 128 MiB mapping instead of 64 of 2 MiB is 31-36 times faster (docs/performance.md).
// Pre-created handles take cuMemCreate off the hot path.
//
// Errors are the sentinels of this package (ErrOutOfMemory, ErrInvalidArgument, ...) and the
// struct errors CapacityError, AlignmentError and RangeError that match them; every operation
// that fails leaves its object exactly as it was.
//
// Concurrency: Device implementations, Pool and FaultDevice are safe for concurrent use. A Pool
// borrows its Device, which must outlive it; whoever creates a Device or Pool closes it.
package vmm
