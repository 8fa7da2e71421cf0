package vmm

import (
	"fmt"
	"math"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// HostOptions configures a host-memory device.
type HostOptions struct {
	// Granularity is the size unit of every reservation, allocation and mapping; 0 means 2 MiB,
	// the granularity of the CUDA backend on current GPUs. It must be a multiple of the OS page.
	Granularity uint64
	// Capacity bounds the physical bytes Create hands out, like a GPU's memory; 0 means the
	// machine's total RAM.
	Capacity uint64
}

// HostDevice is the host-memory backend: the same reserve/create/map/access/unmap/release
// sequence as the CUDA driver, done with the kernel's primitives. Reserve is an anonymous
// PROT_NONE mapping, Create a memfd of the requested size, Map an mmap(MAP_SHARED|MAP_FIXED) of
// that memfd over the reservation with PROT_NONE, SetAccess an mprotect to read-write, Unmap a
// PROT_NONE anonymous mapping back over the range, and Release closes the memfd (the kernel frees
// the memory when it is also unmapped, exactly as CUDA does).
//
// It is a product feature, not a mock: the whole library runs on it on machines without a GPU.
// Memory outside accessible mappings is never touched: data calls check the range first and
// return ErrNotMapped instead of faulting. Safe for concurrent use.
type HostDevice struct {
	opts HostOptions
	l    *ledger
	fds  map[Handle]int
	next atomic.Uint64
}

// NewHostDevice returns a host-memory device.
func NewHostDevice(opts HostOptions) (*HostDevice, error) {
	if opts.Granularity == 0 {
		opts.Granularity = 2 << 20
	}
	if opts.Granularity > 1<<40 {
		return nil, fmt.Errorf("host device: %w: granularity %d is over 1 TiB", ErrInvalidArgument, opts.Granularity)
	}
	if opts.Granularity%uint64(unix.Getpagesize()) != 0 {
		return nil, &AlignmentError{What: "granularity", Value: opts.Granularity, Align: uint64(unix.Getpagesize())}
	}
	if opts.Capacity == 0 {
		var si unix.Sysinfo_t
		if err := unix.Sysinfo(&si); err != nil {
			return nil, fmt.Errorf("host device: sysinfo: %w: %v", ErrDriver, err)
		}
		opts.Capacity = uint64(si.Totalram) * uint64(si.Unit)
	}
	return &HostDevice{opts: opts, l: newLedger(opts.Granularity), fds: make(map[Handle]int)}, nil
}

// Info describes the host device.
func (d *HostDevice) Info() DeviceInfo {
	if d == nil {
		return DeviceInfo{}
	}
	return DeviceInfo{Name: "host", Kind: MemoryHost, Granularity: d.opts.Granularity, TotalMemory: d.opts.Capacity}
}

// Reserve reserves size bytes of address space, aligned to the granularity, with no memory.
func (d *HostDevice) Reserve(size uint64) (Addr, error) {
	if err := d.lock(); err != nil {
		return 0, err
	}
	defer d.l.mu.Unlock()
	if err := d.l.checkSize(size); err != nil {
		return 0, fmt.Errorf("reserve: %w", err)
	}
	// Over-reserve by one granule and trim, so the reservation is aligned like cuMemAddressReserve's.
	g := d.opts.Granularity
	if size > math.MaxInt-g {
		return 0, fmt.Errorf("reserve %d bytes: %w", size, &CapacityError{Need: size, Free: math.MaxInt - g})
	}
	raw, err := unix.MmapPtr(-1, 0, nil, uintptr(size+g), unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return 0, fmt.Errorf("reserve %d bytes: %w: %v", size, ErrOutOfMemory, err)
	}
	rawAddr := uint64(uintptr(raw))
	lead := (g - rawAddr%g) % g
	base := unsafe.Add(raw, lead)
	if lead > 0 {
		_ = unix.MunmapPtr(raw, uintptr(lead))
	}
	if tail := g - lead; tail > 0 {
		_ = unix.MunmapPtr(unsafe.Add(base, size), uintptr(tail))
	}
	a := Addr(rawAddr + lead)
	d.l.commitReserve(a, size, base)
	return a, nil
}

// FreeReservation unmaps the reservation's address space.
func (d *HostDevice) FreeReservation(a Addr, size uint64) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.l.mu.Unlock()
	if err := d.l.checkFreeReservation(a, size); err != nil {
		return err
	}
	r, _ := d.l.res.Get(span{addr: a})
	if err := unix.MunmapPtr(r.base, uintptr(size)); err != nil {
		return fmt.Errorf("free reservation: munmap: %w: %v", ErrDriver, err)
	}
	d.l.commitFreeReservation(a)
	return nil
}

// Create makes a memfd of size bytes. It fails with a *CapacityError when the device's capacity
// would be exceeded.
func (d *HostDevice) Create(size uint64) (Handle, error) {
	if err := d.lock(); err != nil {
		return 0, err
	}
	defer d.l.mu.Unlock()
	if err := d.l.checkSize(size); err != nil {
		return 0, fmt.Errorf("create: %w", err)
	}
	if d.l.physical > d.opts.Capacity || size > d.opts.Capacity-d.l.physical {
		return 0, fmt.Errorf("create: %w", &CapacityError{Need: size, Free: d.opts.Capacity - d.l.physical})
	}
	return d.memfd(size, false)
}

// CreateHost makes a memfd of size bytes for the host tier: the same memory as Create's on
// this backend, counted apart from the device's Capacity.
func (d *HostDevice) CreateHost(size uint64) (Handle, error) {
	if err := d.lock(); err != nil {
		return 0, fmt.Errorf("create host: %w", err)
	}
	defer d.l.mu.Unlock()
	if err := d.l.checkSize(size); err != nil {
		return 0, fmt.Errorf("create host: %w", err)
	}
	return d.memfd(size, true)
}

// memfd makes a handle of size bytes; the caller holds the ledger lock and checked the size.
func (d *HostDevice) memfd(size uint64, host bool) (Handle, error) {
	fd, err := unix.MemfdCreate("pagedkv", unix.MFD_CLOEXEC)
	if err != nil { // EMFILE, ENFILE, ENOMEM: the host ran out of what a handle needs
		return 0, fmt.Errorf("create: memfd_create: %w: %v", ErrOutOfMemory, err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return 0, fmt.Errorf("create: ftruncate: %w: %v", ErrOutOfMemory, err)
	}
	h := Handle(d.next.Add(1))
	d.fds[h] = fd
	d.l.commitCreateOn(h, size, host)
	return h, nil
}

// Release closes the handle's memfd.
func (d *HostDevice) Release(h Handle) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.l.mu.Unlock()
	if _, err := d.l.handle(h); err != nil {
		return fmt.Errorf("release: %w", err)
	}
	if err := unix.Close(d.fds[h]); err != nil {
		return fmt.Errorf("release: close: %w: %v", ErrDriver, err)
	}
	delete(d.fds, h)
	d.l.commitRelease(h)
	return nil
}

// Map maps the memfd behind h at a with no access.
func (d *HostDevice) Map(a Addr, size uint64, h Handle) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.l.mu.Unlock()
	r, err := d.l.checkMap(a, size, h)
	if err != nil {
		return fmt.Errorf("map: %w", err)
	}
	p := unsafe.Add(r.base, uint64(a-r.addr))
	if _, err := unix.MmapPtr(d.fds[h], 0, p, uintptr(size), unix.PROT_NONE, unix.MAP_SHARED|unix.MAP_FIXED); err != nil {
		return fmt.Errorf("map: mmap: %w: %v", ErrOutOfMemory, err)
	}
	d.l.commitMap(a, size, h)
	return nil
}

// SetAccess makes whole mappings readable and writable.
func (d *HostDevice) SetAccess(a Addr, size uint64) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.l.mu.Unlock()
	ms, err := d.l.mappingsIn(a, size)
	if err != nil {
		return fmt.Errorf("set access: %w", err)
	}
	if err := unix.Mprotect(d.bytes(a, size), unix.PROT_READ|unix.PROT_WRITE); err != nil {
		return fmt.Errorf("set access: mprotect: %w: %v", ErrDriver, err)
	}
	d.l.commitAccess(ms)
	return nil
}

// Unmap puts a PROT_NONE reservation back over whole mappings.
func (d *HostDevice) Unmap(a Addr, size uint64) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.l.mu.Unlock()
	ms, err := d.l.mappingsIn(a, size)
	if err != nil {
		return fmt.Errorf("unmap: %w", err)
	}
	r, _ := containing(d.l.res, a, size)
	p := unsafe.Add(r.base, uint64(a-r.addr))
	if _, err := unix.MmapPtr(-1, 0, p, uintptr(size), unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED|unix.MAP_NORESERVE); err != nil {
		return fmt.Errorf("unmap: mmap: %w: %v", ErrDriver, err)
	}
	d.l.commitUnmap(ms)
	return nil
}

// MemInfo returns the capacity left and the capacity.
func (d *HostDevice) MemInfo() (free, total uint64, err error) {
	if err := d.lock(); err != nil {
		return 0, 0, err
	}
	defer d.l.mu.Unlock()
	if err := d.l.usable(); err != nil {
		return 0, 0, fmt.Errorf("mem info: %w", err)
	}
	return d.opts.Capacity - d.l.physical, d.opts.Capacity, nil
}

// bytes returns the process memory behind [a, a+n); the caller has checked a lies in a reservation.
func (d *HostDevice) bytes(a Addr, n uint64) []byte {
	if n == 0 { // an empty range need not lie in any reservation
		return nil
	}
	r, _ := containing(d.l.res, a, n)
	return unsafe.Slice((*byte)(unsafe.Add(r.base, uint64(a-r.addr))), n)
}

// Memset sets n bytes at dst to v.
func (d *HostDevice) Memset(dst Addr, v byte, n uint64) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.l.mu.Unlock()
	if err := d.l.checkAccessible(dst, n); err != nil {
		return fmt.Errorf("memset: %w", err)
	}
	b := d.bytes(dst, n)
	if len(b) == 0 {
		return nil
	}
	b[0] = v
	for i := 1; i < len(b); i *= 2 { // doubling copies run at memmove speed
		copy(b[i:], b[:i])
	}
	return nil
}

// CopyIn copies src to dst.
func (d *HostDevice) CopyIn(dst Addr, src []byte) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.l.mu.Unlock()
	if err := d.l.checkAccessible(dst, uint64(len(src))); err != nil {
		return fmt.Errorf("copy in: %w", err)
	}
	copy(d.bytes(dst, uint64(len(src))), src)
	return nil
}

// CopyOut copies len(dst) bytes from src.
func (d *HostDevice) CopyOut(dst []byte, src Addr) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.l.mu.Unlock()
	if err := d.l.checkAccessible(src, uint64(len(dst))); err != nil {
		return fmt.Errorf("copy out: %w", err)
	}
	copy(dst, d.bytes(src, uint64(len(dst))))
	return nil
}

// Copy copies n bytes from src to dst (the ranges may overlap).
func (d *HostDevice) Copy(dst, src Addr, n uint64) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.l.mu.Unlock()
	if err := d.l.checkAccessible(src, n); err != nil {
		return fmt.Errorf("copy: source: %w", err)
	}
	if err := d.l.checkAccessible(dst, n); err != nil {
		return fmt.Errorf("copy: destination: %w", err)
	}
	copy(d.bytes(dst, n), d.bytes(src, n))
	return nil
}

// Close gives the device up; it fails while reservations, handles or mappings live.
func (d *HostDevice) Close() error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.l.mu.Unlock()
	if err := d.l.checkClose(); err != nil {
		return err
	}
	d.l.closed = true
	return nil
}

// lock locks the device's ledger, or reports a nil or zero device (then nothing is locked).
func (d *HostDevice) lock() error {
	if d == nil || d.l == nil {
		return fmt.Errorf("device: %w: nil device, or one not made by its constructor", ErrInvalidArgument)
	}
	d.l.mu.Lock()
	return nil
}
