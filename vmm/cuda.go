package vmm

import (
	"fmt"
	"sync"

	"github.com/pagedkv/pagedkv/internal/cuda"
)

// CUDADevice is the CUDA backend: one GPU, driven through the driver's VMM API in the device's
// primary context. Safe for concurrent use; the driver serializes the calls anyway
// (docs/performance.md).
// Data calls are synchronous and use the legacy default stream.
type CUDADevice struct {
	ctx  *cuda.Context
	info DeviceInfo
	l    *ledger
	// inUse is held shared by a data call for the length of its driver call, which runs outside
	// the ledger's lock, and exclusively by Close: the context is never released under a call.
	inUse sync.RWMutex
}

// NewCUDADevice opens the GPU with the given ordinal. It fails with ErrNoDriver when no driver
// can be loaded, ErrWrongDevice when the ordinal does not exist, and ErrNotSupported when the
// device lacks virtual memory management (see Probe).
func NewCUDADevice(ordinal int) (*CUDADevice, error) {
	p := Probe(ordinal)
	if !p.Supported {
		return nil, fmt.Errorf("cuda device %d: %w", ordinal, p.Err)
	}
	ctx, err := cuda.RetainPrimaryContext(ordinal)
	if err != nil {
		return nil, fmt.Errorf("cuda device %d: retain primary context: %w", ordinal, err)
	}
	gran, err := ctx.AllocationGranularity(false)
	if err != nil {
		ctx.Release()
		return nil, fmt.Errorf("cuda device %d: granularity: %w", ordinal, err)
	}
	return &CUDADevice{
		ctx: ctx,
		info: DeviceInfo{
			Name:        fmt.Sprintf("cuda:%d (%s)", ordinal, p.Name),
			Ordinal:     ordinal,
			Kind:        MemoryDevice,
			Granularity: gran,
			TotalMemory: p.TotalMemory,
		},
		l: newLedger(gran),
	}, nil
}

// Context returns the driver context, for the packages of this module that launch kernels.
func (d *CUDADevice) Context() *cuda.Context {
	if d == nil {
		return nil
	}
	return d.ctx
}

// Info describes the GPU.
func (d *CUDADevice) Info() DeviceInfo {
	if d == nil {
		return DeviceInfo{}
	}
	return d.info
}

// Reserve is cuMemAddressReserve.
func (d *CUDADevice) Reserve(size uint64) (Addr, error) {
	if err := d.lock(); err != nil {
		return 0, err
	}
	defer d.l.mu.Unlock()
	if err := d.l.checkSize(size); err != nil {
		return 0, fmt.Errorf("reserve: %w", err)
	}
	p, err := d.ctx.MemAddressReserve(size, d.info.Granularity) // Map takes granule-aligned addresses only
	if err != nil {
		return 0, fmt.Errorf("reserve %d bytes: %w", size, err)
	}
	d.l.commitReserve(Addr(p), size, nil)
	return Addr(p), nil
}

// FreeReservation is cuMemAddressFree.
func (d *CUDADevice) FreeReservation(a Addr, size uint64) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.l.mu.Unlock()
	if err := d.l.checkFreeReservation(a, size); err != nil {
		return err
	}
	if err := d.ctx.MemAddressFree(cuda.DevicePtr(a), size); err != nil {
		return fmt.Errorf("free reservation: %w", err)
	}
	d.l.commitFreeReservation(a)
	return nil
}

// Create is cuMemCreate of pinned device memory.
func (d *CUDADevice) Create(size uint64) (Handle, error) {
	if err := d.lock(); err != nil {
		return 0, err
	}
	defer d.l.mu.Unlock()
	if err := d.l.checkSize(size); err != nil {
		return 0, fmt.Errorf("create: %w", err)
	}
	h, err := d.ctx.MemCreate(size)
	if err != nil {
		if free, _, e := d.ctx.MemGetInfo(); e == nil && free < size {
			return 0, fmt.Errorf("create: %w (%w)", &CapacityError{Need: size, Free: free}, err)
		}
		return 0, fmt.Errorf("create %d bytes: %w", size, err)
	}
	d.l.commitCreate(Handle(h), size)
	return Handle(h), nil
}

// CreateHost is cuMemCreate of pinned host memory (a host location): mapped into a
// reservation and granted to this GPU, the GPU reaches it by address.
func (d *CUDADevice) CreateHost(size uint64) (Handle, error) {
	if err := d.lock(); err != nil {
		return 0, fmt.Errorf("create host: %w", err)
	}
	defer d.l.mu.Unlock()
	if err := d.l.checkSize(size); err != nil {
		return 0, fmt.Errorf("create host: %w", err)
	}
	if g, err := d.ctx.HostGranularity(); err != nil || g == 0 || size%g != 0 {
		return 0, fmt.Errorf("create host %d bytes: %w (host granularity %d: %v)", size, ErrNotSupported, g, err)
	}
	h, err := d.ctx.MemCreateHost(size)
	if err != nil {
		return 0, fmt.Errorf("create host %d bytes: %w", size, err)
	}
	d.l.commitCreateOn(Handle(h), size, true)
	return Handle(h), nil
}

// Release is cuMemRelease.
func (d *CUDADevice) Release(h Handle) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.l.mu.Unlock()
	if _, err := d.l.handle(h); err != nil {
		return fmt.Errorf("release: %w", err)
	}
	if err := d.ctx.MemRelease(cuda.MemHandle(h)); err != nil {
		return fmt.Errorf("release: %w", err)
	}
	d.l.commitRelease(h)
	return nil
}

// Map is cuMemMap of the whole handle.
func (d *CUDADevice) Map(a Addr, size uint64, h Handle) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.l.mu.Unlock()
	if _, err := d.l.checkMap(a, size, h); err != nil {
		return fmt.Errorf("map: %w", err)
	}
	if err := d.ctx.MemMap(cuda.DevicePtr(a), size, cuda.MemHandle(h)); err != nil {
		return fmt.Errorf("map: %w", err)
	}
	d.l.commitMap(a, size, h)
	return nil
}

// SetAccess is cuMemSetAccess granting this device read-write access.
func (d *CUDADevice) SetAccess(a Addr, size uint64) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.l.mu.Unlock()
	ms, err := d.l.mappingsIn(a, size)
	if err != nil {
		return fmt.Errorf("set access: %w", err)
	}
	if err := d.ctx.MemSetAccess(cuda.DevicePtr(a), size); err != nil {
		return fmt.Errorf("set access: %w", err)
	}
	d.l.commitAccess(ms)
	return nil
}

// Unmap is cuMemUnmap.
func (d *CUDADevice) Unmap(a Addr, size uint64) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.l.mu.Unlock()
	ms, err := d.l.mappingsIn(a, size)
	if err != nil {
		return fmt.Errorf("unmap: %w", err)
	}
	if err := d.ctx.MemUnmap(cuda.DevicePtr(a), size); err != nil {
		return fmt.Errorf("unmap: %w", err)
	}
	d.l.commitUnmap(ms)
	return nil
}

// MemInfo is cuMemGetInfo: free and total memory of the whole GPU, all processes included.
func (d *CUDADevice) MemInfo() (free, total uint64, err error) {
	if err := d.enter(); err != nil {
		return 0, 0, fmt.Errorf("mem info: %w", err)
	}
	defer d.inUse.RUnlock()
	return d.ctx.MemGetInfo()
}

// Memset is cuMemsetD8.
func (d *CUDADevice) Memset(dst Addr, v byte, n uint64) error {
	if err := d.enter(); err != nil {
		return fmt.Errorf("memset: %w", err)
	}
	defer d.inUse.RUnlock()
	return d.ctx.MemsetD8(cuda.DevicePtr(dst), v, n)
}

// CopyIn is cuMemcpyHtoD.
func (d *CUDADevice) CopyIn(dst Addr, src []byte) error {
	if err := d.enter(); err != nil {
		return fmt.Errorf("copy in: %w", err)
	}
	defer d.inUse.RUnlock()
	return d.ctx.MemcpyHtoD(cuda.DevicePtr(dst), src)
}

// CopyOut is cuMemcpyDtoH.
func (d *CUDADevice) CopyOut(dst []byte, src Addr) error {
	if err := d.enter(); err != nil {
		return fmt.Errorf("copy out: %w", err)
	}
	defer d.inUse.RUnlock()
	return d.ctx.MemcpyDtoH(dst, cuda.DevicePtr(src))
}

// Copy is cuMemcpyDtoD.
func (d *CUDADevice) Copy(dst, src Addr, n uint64) error {
	if err := d.enter(); err != nil {
		return fmt.Errorf("copy: %w", err)
	}
	defer d.inUse.RUnlock()
	return d.ctx.MemcpyDtoD(cuda.DevicePtr(dst), cuda.DevicePtr(src), n)
}

// Close releases the primary context; it fails while reservations, handles or mappings live. It
// waits for data calls already in the driver, and every call after it is ErrClosed.
func (d *CUDADevice) Close() error {
	if d == nil || d.l == nil {
		return d.lock() // reports it, locking nothing
	}
	d.inUse.Lock()
	defer d.inUse.Unlock()
	if err := d.lock(); err != nil {
		return err
	}
	defer d.l.mu.Unlock()
	if err := d.l.checkClose(); err != nil {
		return err
	}
	d.l.closed = true
	return d.ctx.Release()
}

// lock locks the device's ledger, or reports a nil or zero device (then nothing is locked).
func (d *CUDADevice) lock() error {
	if d == nil || d.l == nil {
		return fmt.Errorf("device: %w: nil device, or one not made by its constructor", ErrInvalidArgument)
	}
	d.l.mu.Lock()
	return nil
}

// enter reports a nil, zero or closed device; otherwise it holds the device open (inUse shared)
// until the caller's d.inUse.RUnlock. The data calls do not hold the ledger's lock through the
// copy, so copies run alongside mapping calls.
func (d *CUDADevice) enter() error {
	if d == nil || d.l == nil {
		return d.lock() // reports it, locking nothing
	}
	d.inUse.RLock()
	d.l.mu.Lock()
	err := d.l.usable()
	d.l.mu.Unlock()
	if err != nil {
		d.inUse.RUnlock()
	}
	return err
}
