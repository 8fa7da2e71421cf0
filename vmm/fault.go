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

// InjectFaults wraps dev. The wrapper does not own dev: closing it closes dev.
func InjectFaults(dev Device) *FaultDevice {
	return &FaultDevice{Device: dev, calls: make(map[Op]int), fail: make(map[Op]fault)}
}

// FailNth makes the nth call of op from now on (1 = the next) return err (ErrInjected if nil).
func (f *FaultDevice) FailNth(op Op, n int, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil {
		err = ErrInjected
	}
	f.fail[op] = fault{nth: f.calls[op] + n, err: err}
}

// FailAlways makes every call of op fail until Clear.
func (f *FaultDevice) FailAlways(op Op, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil {
		err = ErrInjected
	}
	f.fail[op] = fault{every: true, err: err}
}

// Clear removes every planned fault.
func (f *FaultDevice) Clear() {
	f.mu.Lock()
	defer f.mu.Unlock()
	clear(f.fail)
}

// Calls returns how many times op was called, failed calls included.
func (f *FaultDevice) Calls(op Op) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[op]
}

func (f *FaultDevice) enter(op Op) error {
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
