package cuda

import (
	"bytes"
	"errors"
	"fmt"
	"runtime"
	"unsafe"

	"github.com/ebitengine/purego"
)

// DriverVersion returns the driver's CUDA version as 1000*major + 10*minor (13000 for 13.0).
func DriverVersion() (int, error) {
	if err := Load(); err != nil {
		return 0, err
	}
	var v int32
	err := call("cuDriverGetVersion", procs.cuDriverGetVersion, uintptr(unsafe.Pointer(&v)))
	return int(v), err
}

// DeviceCount returns the number of CUDA devices.
func DeviceCount() (int, error) {
	if err := Load(); err != nil {
		return 0, err
	}
	var n int32
	err := call("cuDeviceGetCount", procs.cuDeviceGetCount, uintptr(unsafe.Pointer(&n)))
	return int(n), err
}

func deviceHandle(ordinal int) (int32, error) {
	if err := Load(); err != nil {
		return 0, err
	}
	var d int32
	err := call("cuDeviceGet", procs.cuDeviceGet, uintptr(unsafe.Pointer(&d)), uintptr(ordinal))
	return d, err
}

// DeviceAttribute returns one CUdevice_attribute of the device with the given ordinal.
func DeviceAttribute(ordinal, attr int) (int, error) {
	d, err := deviceHandle(ordinal)
	if err != nil {
		return 0, err
	}
	var v int32
	err = call("cuDeviceGetAttribute", procs.cuDeviceGetAttribute, uintptr(unsafe.Pointer(&v)), uintptr(attr), uintptr(d))
	return int(v), err
}

// DeviceName returns the marketing name of the device ("NVIDIA H100 80GB HBM3").
func DeviceName(ordinal int) (string, error) {
	d, err := deviceHandle(ordinal)
	if err != nil {
		return "", err
	}
	buf := make([]byte, 256)
	if err := call("cuDeviceGetName", procs.cuDeviceGetName, uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)), uintptr(d)); err != nil {
		return "", err
	}
	if i := bytes.IndexByte(buf, 0); i >= 0 {
		buf = buf[:i]
	}
	return string(buf), nil
}

// DeviceTotalMem returns the device's total memory in bytes.
func DeviceTotalMem(ordinal int) (uint64, error) {
	d, err := deviceHandle(ordinal)
	if err != nil {
		return 0, err
	}
	var v uint64
	err = call("cuDeviceTotalMem_v2", procs.cuDeviceTotalMem, uintptr(unsafe.Pointer(&v)), uintptr(d))
	return v, err
}

// Context is a retained primary context of one device. It is made current on the calling OS
// thread for each call, so a Context may be used from any goroutine. The creator calls Release
// once; the context stays valid until then.
type Context struct {
	ordinal int
	dev     int32
	ctx     uintptr
}

// RetainPrimaryContext retains the primary context of the device with the given ordinal (the
// context the CUDA runtime, and so PyTorch and most runtimes, also use).
func RetainPrimaryContext(ordinal int) (*Context, error) {
	d, err := deviceHandle(ordinal)
	if err != nil {
		return nil, err
	}
	c := &Context{ordinal: ordinal, dev: d}
	if err := call("cuDevicePrimaryCtxRetain", procs.cuDevicePrimaryCtxRetain, uintptr(unsafe.Pointer(&c.ctx)), uintptr(d)); err != nil {
		return nil, err
	}
	return c, nil
}

// Ordinal returns the device ordinal the context belongs to.
func (c *Context) Ordinal() int { return c.ordinal }

// Release releases the primary context retained by RetainPrimaryContext.
func (c *Context) Release() error {
	return call("cuDevicePrimaryCtxRelease_v2", procs.cuDevicePrimaryCtxRelease, uintptr(c.dev))
}

// do runs one driver call with the context current on a locked OS thread.
//
//go:uintptrescapes
func (c *Context) do(name string, fn uintptr, args ...uintptr) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if r, _, _ := purego.SyscallN(procs.cuCtxSetCurrent, c.ctx); Result(int32(r)) != Success {
		return check("cuCtxSetCurrent", r)
	}
	r, _, _ := purego.SyscallN(fn, args...)
	return check(name, r)
}

// Synchronize waits for all work in the context.
func (c *Context) Synchronize() error {
	return c.do("cuCtxSynchronize", procs.cuCtxSynchronize)
}

// MemGetInfo returns the free and total device memory in bytes.
func (c *Context) MemGetInfo() (free, total uint64, err error) {
	err = c.do("cuMemGetInfo_v2", procs.cuMemGetInfo, uintptr(unsafe.Pointer(&free)), uintptr(unsafe.Pointer(&total)))
	return free, total, err
}

// AllocationGranularity returns the minimum (or recommended) granularity of cuMemCreate on the
// context's device.
func (c *Context) AllocationGranularity(recommended bool) (uint64, error) {
	prop := deviceProp(c.ordinal)
	opt := uintptr(granularityMinimum)
	if recommended {
		opt = granularityRecommended
	}
	var g uint64
	err := c.do("cuMemGetAllocationGranularity", procs.cuMemGetAllocationGranularity,
		uintptr(unsafe.Pointer(&g)), uintptr(unsafe.Pointer(&prop)), opt)
	return g, err
}

// MemAddressReserve reserves size bytes of virtual address space aligned to align (0: default).
// The caller frees it with MemAddressFree after unmapping everything in it.
func (c *Context) MemAddressReserve(size, align uint64) (DevicePtr, error) {
	var p DevicePtr
	err := c.do("cuMemAddressReserve", procs.cuMemAddressReserve,
		uintptr(unsafe.Pointer(&p)), uintptr(size), uintptr(align), 0, 0)
	return p, err
}

// MemAddressFree frees a reservation made by MemAddressReserve.
func (c *Context) MemAddressFree(p DevicePtr, size uint64) error {
	return c.do("cuMemAddressFree", procs.cuMemAddressFree, uintptr(p), uintptr(size))
}

// MemCreate allocates size bytes of physical memory on the context's device. The caller owns
// the handle and releases it with MemRelease (the memory lives until it is released and unmapped).
func (c *Context) MemCreate(size uint64) (MemHandle, error) {
	prop := deviceProp(c.ordinal)
	var h MemHandle
	err := c.do("cuMemCreate", procs.cuMemCreate,
		uintptr(unsafe.Pointer(&h)), uintptr(size), uintptr(unsafe.Pointer(&prop)), 0)
	return h, err
}

// MemCreateHost allocates size bytes of pinned host memory as a VMM handle (cuMemCreate with a
// host location), to be mapped into a reservation like device memory; the device reaches it
// once MemSetAccess grants it. size is a multiple of HostGranularity.
func (c *Context) MemCreateHost(size uint64) (MemHandle, error) {
	prop := hostProp()
	var h MemHandle
	err := c.do("cuMemCreate", procs.cuMemCreate,
		uintptr(unsafe.Pointer(&h)), uintptr(size), uintptr(unsafe.Pointer(&prop)), 0)
	return h, err
}

// HostGranularity returns the minimum granularity of MemCreateHost.
func (c *Context) HostGranularity() (uint64, error) {
	prop := hostProp()
	var g uint64
	err := c.do("cuMemGetAllocationGranularity", procs.cuMemGetAllocationGranularity,
		uintptr(unsafe.Pointer(&g)), uintptr(unsafe.Pointer(&prop)), granularityMinimum)
	return g, err
}

// MemRelease releases a handle made by MemCreate.
func (c *Context) MemRelease(h MemHandle) error {
	return c.do("cuMemRelease", procs.cuMemRelease, uintptr(h))
}

// MemMap maps the whole of handle h at p (size bytes, offset 0).
func (c *Context) MemMap(p DevicePtr, size uint64, h MemHandle) error {
	return c.do("cuMemMap", procs.cuMemMap, uintptr(p), uintptr(size), 0, uintptr(h), 0)
}

// MemSetAccess grants the context's device read-write access to [p, p+size).
func (c *Context) MemSetAccess(p DevicePtr, size uint64) error {
	desc := memAccessDesc{
		Location: memLocation{Type: memLocationTypeDevice, ID: int32(c.ordinal)},
		Flags:    memAccessFlagsProtReadWrite,
	}
	return c.do("cuMemSetAccess", procs.cuMemSetAccess, uintptr(p), uintptr(size), uintptr(unsafe.Pointer(&desc)), 1)
}

// MemUnmap unmaps [p, p+size), which must be whole mappings.
func (c *Context) MemUnmap(p DevicePtr, size uint64) error {
	return c.do("cuMemUnmap", procs.cuMemUnmap, uintptr(p), uintptr(size))
}

// MemAlloc allocates size bytes with cuMemAlloc (not elastic; used for yardsticks and tables).
func (c *Context) MemAlloc(size uint64) (DevicePtr, error) {
	var p DevicePtr
	err := c.do("cuMemAlloc_v2", procs.cuMemAlloc, uintptr(unsafe.Pointer(&p)), uintptr(size))
	return p, err
}

// MemFree frees memory from MemAlloc.
func (c *Context) MemFree(p DevicePtr) error {
	return c.do("cuMemFree_v2", procs.cuMemFree, uintptr(p))
}

// MemsetD8 sets n bytes at p to v, synchronously.
func (c *Context) MemsetD8(p DevicePtr, v byte, n uint64) error {
	return c.do("cuMemsetD8_v2", procs.cuMemsetD8, uintptr(p), uintptr(v), uintptr(n))
}

// MemsetD8Async sets n bytes at p to v on stream s.
func (c *Context) MemsetD8Async(p DevicePtr, v byte, n uint64, s Stream) error {
	return c.do("cuMemsetD8Async", procs.cuMemsetD8Async, uintptr(p), uintptr(v), uintptr(n), uintptr(s))
}

// MemcpyHtoD copies src to device address dst, synchronously.
func (c *Context) MemcpyHtoD(dst DevicePtr, src []byte) error {
	if len(src) == 0 {
		return nil
	}
	return c.do("cuMemcpyHtoD_v2", procs.cuMemcpyHtoD, uintptr(dst), uintptr(unsafe.Pointer(&src[0])), uintptr(len(src)))
}

// MemcpyDtoH copies len(dst) bytes from device address src, synchronously.
func (c *Context) MemcpyDtoH(dst []byte, src DevicePtr) error {
	if len(dst) == 0 {
		return nil
	}
	return c.do("cuMemcpyDtoH_v2", procs.cuMemcpyDtoH, uintptr(unsafe.Pointer(&dst[0])), uintptr(src), uintptr(len(dst)))
}

// MemcpyDtoD copies n bytes between device addresses, synchronously with respect to the host.
func (c *Context) MemcpyDtoD(dst, src DevicePtr, n uint64) error {
	return c.do("cuMemcpyDtoD_v2", procs.cuMemcpyDtoD, uintptr(dst), uintptr(src), uintptr(n))
}

// MemcpyDtoDAsync copies n bytes between device addresses on stream s.
func (c *Context) MemcpyDtoDAsync(dst, src DevicePtr, n uint64, s Stream) error {
	return c.do("cuMemcpyDtoDAsync_v2", procs.cuMemcpyDtoDAsync, uintptr(dst), uintptr(src), uintptr(n), uintptr(s))
}

// MemcpyHtoDAsync copies src to dst on stream s. The caller keeps src alive and unchanged until
// the stream has passed the copy (pageable memory makes the driver stage it before returning).
func (c *Context) MemcpyHtoDAsync(dst DevicePtr, src []byte, s Stream) error {
	if len(src) == 0 {
		return nil
	}
	return c.do("cuMemcpyHtoDAsync_v2", procs.cuMemcpyHtoDAsync, uintptr(dst), uintptr(unsafe.Pointer(&src[0])), uintptr(len(src)), uintptr(s))
}

// MemAllocHost allocates size bytes of page-locked host memory that the device reaches by DMA
// (cuMemAllocHost); the caller frees it with MemFreeHost. The memory is outside Go's heap.
func (c *Context) MemAllocHost(size uint64) (HostPtr, error) {
	var p HostPtr
	err := c.do("cuMemAllocHost_v2", procs.cuMemAllocHost, uintptr(unsafe.Pointer(&p)), uintptr(size))
	return p, err
}

// MemFreeHost frees memory from MemAllocHost.
func (c *Context) MemFreeHost(p HostPtr) error {
	return c.do("cuMemFreeHost", procs.cuMemFreeHost, uintptr(p))
}

// MemcpyDtoHAsyncPinned copies n bytes from device address src to page-locked host memory dst on
// stream s (a DMA on a copy engine).
func (c *Context) MemcpyDtoHAsyncPinned(dst HostPtr, src DevicePtr, n uint64, s Stream) error {
	return c.do("cuMemcpyDtoHAsync_v2", procs.cuMemcpyDtoHAsync, uintptr(dst), uintptr(src), uintptr(n), uintptr(s))
}

// MemcpyHtoDAsyncPinned copies n bytes from page-locked host memory src to device address dst on
// stream s.
func (c *Context) MemcpyHtoDAsyncPinned(dst DevicePtr, src HostPtr, n uint64, s Stream) error {
	return c.do("cuMemcpyHtoDAsync_v2", procs.cuMemcpyHtoDAsync, uintptr(dst), uintptr(src), uintptr(n), uintptr(s))
}

// StreamCreate creates a stream; the caller destroys it with StreamDestroy.
func (c *Context) StreamCreate(flags uint32) (Stream, error) {
	var s Stream
	err := c.do("cuStreamCreate", procs.cuStreamCreate, uintptr(unsafe.Pointer(&s)), uintptr(flags))
	return s, err
}

// StreamDestroy destroys a stream made by StreamCreate.
func (c *Context) StreamDestroy(s Stream) error {
	return c.do("cuStreamDestroy_v2", procs.cuStreamDestroy, uintptr(s))
}

// StreamSynchronize waits for all work on s.
func (c *Context) StreamSynchronize(s Stream) error {
	return c.do("cuStreamSynchronize", procs.cuStreamSynchronize, uintptr(s))
}

// EventCreate creates an event; the caller destroys it with EventDestroy.
func (c *Context) EventCreate(flags uint32) (Event, error) {
	var e Event
	err := c.do("cuEventCreate", procs.cuEventCreate, uintptr(unsafe.Pointer(&e)), uintptr(flags))
	return e, err
}

// EventRecord records e on stream s.
func (c *Context) EventRecord(e Event, s Stream) error {
	return c.do("cuEventRecord", procs.cuEventRecord, uintptr(e), uintptr(s))
}

// StreamWaitEvent makes the work queued on s after it wait for e, without blocking the host.
func (c *Context) StreamWaitEvent(s Stream, e Event) error {
	return c.do("cuStreamWaitEvent", procs.cuStreamWaitEvent, uintptr(s), uintptr(e), 0)
}

// EventSynchronize waits for e.
func (c *Context) EventSynchronize(e Event) error {
	return c.do("cuEventSynchronize", procs.cuEventSynchronize, uintptr(e))
}

// EventElapsedTime returns the milliseconds between two recorded events.
func (c *Context) EventElapsedTime(start, end Event) (float32, error) {
	var ms float32
	err := c.do("cuEventElapsedTime", procs.cuEventElapsedTime, uintptr(unsafe.Pointer(&ms)), uintptr(start), uintptr(end))
	return ms, err
}

// EventQuery reports whether the work recorded before e has completed (CUDA_ERROR_NOT_READY
// is false, not an error).
func (c *Context) EventQuery(e Event) (bool, error) {
	err := c.do("cuEventQuery", procs.cuEventQuery, uintptr(e))
	var ce *Error
	if errors.As(err, &ce) && ce.Code == ErrorNotReady {
		return false, nil
	}
	return err == nil, err
}

// EventDestroy destroys an event.
func (c *Context) EventDestroy(e Event) error {
	return c.do("cuEventDestroy_v2", procs.cuEventDestroy, uintptr(e))
}

// ModuleLoadData loads a cubin or a NUL-terminated PTX image into the context. The caller
// unloads it with ModuleUnload.
func (c *Context) ModuleLoadData(image []byte) (Module, error) {
	if len(image) == 0 {
		return 0, fmt.Errorf("cuda: ModuleLoadData: empty image")
	}
	var m Module
	err := c.do("cuModuleLoadData", procs.cuModuleLoadData, uintptr(unsafe.Pointer(&m)), uintptr(unsafe.Pointer(&image[0])))
	return m, err
}

// ModuleUnload unloads a module.
func (c *Context) ModuleUnload(m Module) error {
	return c.do("cuModuleUnload", procs.cuModuleUnload, uintptr(m))
}

// ModuleGetFunction looks a kernel up by its (extern "C") name.
func (c *Context) ModuleGetFunction(m Module, name string) (Function, error) {
	cname := append([]byte(name), 0)
	var f Function
	err := c.do("cuModuleGetFunction", procs.cuModuleGetFunction, uintptr(unsafe.Pointer(&f)), uintptr(m), uintptr(unsafe.Pointer(&cname[0])))
	return f, err
}

// LaunchKernel launches f on stream s. params holds one pointer per kernel parameter, each to a
// value of the parameter's exact C type; they are pinned for the duration of the call (the
// driver copies them before cuLaunchKernel returns).
func (c *Context) LaunchKernel(f Function, grid, block [3]uint32, sharedMem uint32, s Stream, params []unsafe.Pointer) error {
	var pin runtime.Pinner
	defer pin.Unpin()
	var pp uintptr
	if len(params) > 0 {
		for _, p := range params {
			pin.Pin(p)
		}
		pin.Pin(&params[0])
		pp = uintptr(unsafe.Pointer(&params[0]))
	}
	return c.do("cuLaunchKernel", procs.cuLaunchKernel, uintptr(f),
		uintptr(grid[0]), uintptr(grid[1]), uintptr(grid[2]),
		uintptr(block[0]), uintptr(block[1]), uintptr(block[2]),
		uintptr(sharedMem), uintptr(s), pp, 0)
}
