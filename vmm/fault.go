package vmm

import (
	"fmt"
	"sync"
)

// Op names a Device method for fault injection.
type Op string

// The Device operations a FaultDevice can fail.
const (
	OpReserve         Op = "Reserve"
	OpFreeReservation Op = "FreeReservation"
	OpCreate          Op = "Create"
	OpCreateHost      Op = "CreateHost"
	OpRelease         Op = "Release"
	OpMap             Op = "Map"
	OpSetAccess       Op = "SetAccess"
	OpUnmap           Op = "Unmap"
	OpMemInfo         Op = "MemInfo"
	OpMemset          Op = "Memset"
	OpCopyIn          Op = "CopyIn"
	OpCopyOut         Op = "CopyOut"
	OpCopy            Op = "Copy"
)

// FaultDevice decorates any Device and fails chosen calls, so that tests can prove every
// mutating API leaves its state exactly as before when the driver fails midway. A failed call
// does not reach the wrapped device. It counts calls per operation. Safe for concurrent use.
type FaultDevice struct {
	Device
	mu    sync.Mutex
	calls map[Op]int
	fail  map[Op]fault
}

type fault struct {
	nth   int // fail the call whose count reaches nth (1-based)
	every bool
	err   error
}

// InjectFaults wraps dev. The wrapper does not own dev: closing it closes dev. Wrapping nil
// gives a device whose every call fails with ErrInvalidArgument.
func InjectFaults(dev Device) *FaultDevice {
	return &FaultDevice{Device: dev, calls: make(map[Op]int), fail: make(map[Op]fault)}
}

// ops is every operation a FaultDevice can fail.
var ops = map[Op]bool{OpReserve: true, OpFreeReservation: true, OpCreate: true, OpCreateHost: true, OpRelease: true, OpMap: true,
	OpSetAccess: true, OpUnmap: true, OpMemInfo: true, OpMemset: true, OpCopyIn: true, OpCopyOut: true, OpCopy: true}

// plan checks a planned fault; the caller holds f.mu.
func (f *FaultDevice) plan(op Op, n int) error {
	if !ops[op] {
		return fmt.Errorf("fault device: %w: unknown operation %q", ErrInvalidArgument, op)
	}
	if n < 1 {
		return fmt.Errorf("fault device: %w: call %d of %s (1 is the next)", ErrInvalidArgument, n, op)
	}
	return nil
}

// FailNth makes the nth call of op from now on (1 = the next) return err (ErrInjected if nil).
// An unknown op or an n below 1 is ErrInvalidArgument, and nothing is planned.
func (f *FaultDevice) FailNth(op Op, n int, err error) error {
	if f == nil || f.calls == nil {
		return errFaultNotMade
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if perr := f.plan(op, n); perr != nil {
		return perr
	}
	if err == nil {
		err = ErrInjected
	}
	f.fail[op] = fault{nth: f.calls[op] + n, err: err}
	return nil
}

// FailAlways makes every call of op fail until Clear. An unknown op is ErrInvalidArgument.
func (f *FaultDevice) FailAlways(op Op, err error) error {
	if f == nil || f.calls == nil {
		return errFaultNotMade
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if perr := f.plan(op, 1); perr != nil {
		return perr
	}
	if err == nil {
		err = ErrInjected
	}
	f.fail[op] = fault{every: true, err: err}
	return nil
}

// Clear removes every planned fault.
func (f *FaultDevice) Clear() {
	if f == nil || f.calls == nil {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	clear(f.fail)
}

// Calls returns how many times op was called, failed calls included.
func (f *FaultDevice) Calls(op Op) int {
	if f == nil || f.calls == nil {
		return 0
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[op]
}

var errFaultNotMade = fmt.Errorf("fault device: %w: nil device, or one not made by InjectFaults", ErrInvalidArgument)

// Info describes the wrapped device (the zero DeviceInfo if there is none).
func (f *FaultDevice) Info() DeviceInfo {
	if f == nil || f.Device == nil {
		return DeviceInfo{}
	}
	return f.Device.Info()
}

// Close closes the wrapped device.
func (f *FaultDevice) Close() error {
	if f == nil || f.Device == nil {
		return errFaultNotMade
	}
	return f.Device.Close()
}

func (f *FaultDevice) enter(op Op) error {
	if f == nil || f.calls == nil || f.Device == nil {
		return errFaultNotMade
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls[op]++
	ft, ok := f.fail[op]
	if !ok {
		return nil
	}
	if ft.every || f.calls[op] == ft.nth {
		if !ft.every {
			delete(f.fail, op)
		}
		return fmt.Errorf("%s (injected): %w", op, ft.err)
	}
	return nil
}

// Reserve fails as planned or calls the wrapped device.
func (f *FaultDevice) Reserve(size uint64) (Addr, error) {
	if err := f.enter(OpReserve); err != nil {
		return 0, err
	}
	return f.Device.Reserve(size)
}

// FreeReservation fails as planned or calls the wrapped device.
func (f *FaultDevice) FreeReservation(a Addr, size uint64) error {
	if err := f.enter(OpFreeReservation); err != nil {
		return err
	}
	return f.Device.FreeReservation(a, size)
}

// Create fails as planned or calls the wrapped device.
func (f *FaultDevice) Create(size uint64) (Handle, error) {
	if err := f.enter(OpCreate); err != nil {
		return 0, err
	}
	return f.Device.Create(size)
}

// CreateHost fails as planned or calls the wrapped device, which must be a HostAllocator
// (ErrNotSupported otherwise).
func (f *FaultDevice) CreateHost(size uint64) (Handle, error) {
	if err := f.enter(OpCreateHost); err != nil {
		return 0, err
	}
	ha, ok := f.Device.(HostAllocator)
	if !ok {
		return 0, fmt.Errorf("create host: %w: %s has no host memory", ErrNotSupported, f.Device.Info().Name)
	}
	return ha.CreateHost(size)
}

// Release fails as planned or calls the wrapped device.
func (f *FaultDevice) Release(h Handle) error {
	if err := f.enter(OpRelease); err != nil {
		return err
	}
	return f.Device.Release(h)
}

// Map fails as planned or calls the wrapped device.
func (f *FaultDevice) Map(a Addr, size uint64, h Handle) error {
	if err := f.enter(OpMap); err != nil {
		return err
	}
	return f.Device.Map(a, size, h)
}

// SetAccess fails as planned or calls the wrapped device.
func (f *FaultDevice) SetAccess(a Addr, size uint64) error {
	if err := f.enter(OpSetAccess); err != nil {
		return err
	}
	return f.Device.SetAccess(a, size)
}

// Unmap fails as planned or calls the wrapped device.
func (f *FaultDevice) Unmap(a Addr, size uint64) error {
	if err := f.enter(OpUnmap); err != nil {
		return err
	}
	return f.Device.Unmap(a, size)
}

// MemInfo fails as planned or calls the wrapped device.
func (f *FaultDevice) MemInfo() (free, total uint64, err error) {
	if err := f.enter(OpMemInfo); err != nil {
		return 0, 0, err
	}
	return f.Device.MemInfo()
}

// Memset fails as planned or calls the wrapped device.
func (f *FaultDevice) Memset(dst Addr, v byte, n uint64) error {
	if err := f.enter(OpMemset); err != nil {
		return err
	}
	return f.Device.Memset(dst, v, n)
}

// CopyIn fails as planned or calls the wrapped device.
func (f *FaultDevice) CopyIn(dst Addr, src []byte) error {
	if err := f.enter(OpCopyIn); err != nil {
		return err
	}
	return f.Device.CopyIn(dst, src)
}

// CopyOut fails as planned or calls the wrapped device.
func (f *FaultDevice) CopyOut(dst []byte, src Addr) error {
	if err := f.enter(OpCopyOut); err != nil {
		return err
	}
	return f.Device.CopyOut(dst, src)
}

// Copy fails as planned or calls the wrapped device.
func (f *FaultDevice) Copy(dst, src Addr, n uint64) error {
	if err := f.enter(OpCopy); err != nil {
		return err
	}
	return f.Device.Copy(dst, src, n)
}
