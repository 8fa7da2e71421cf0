package ledger

import (
	"fmt"
	"runtime/debug"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/pagedkv/pagedkv/internal/errdefs"
)

// ErrDamaged is matched by the error of a call that found the ledger's file cut short under
// its mapping (see FaultError).
var ErrDamaged = errdefs.ErrDamaged

// FaultError reports a read or write of the ledger's mapping that faulted. Another process
// truncated the file (with ftruncate or `: > file`, say), so the pages past its new end raise
// SIGBUS. The ledger recovers the fault instead of letting it kill the process. The call
// that met it leaves the ledger as the fault found it: counts in the lost pages are gone for
// every process. The handle stays damaged: every later call through it fails with a
// *FaultError too, even once the file is whole again (its members' slots are not theirs in a
// ledger made anew), and its members' goroutines end; Leave and Close still release
// everything. Close the handle and open the file again once it is whole. Size is the file's
// size when the call failed (-1 when it could not be read); Want is a ledger's size.
type FaultError struct {
	Op, Path   string
	Size, Want int64
}

// Error names the call, the file and its sizes.
func (e *FaultError) Error() string {
	if e == nil {
		return "<nil>"
	}
	return fmt.Sprintf("ledger: %s: %s: %v: the file has %d bytes, a ledger %d (cut short by another process?)",
		e.Op, e.Path, ErrDamaged, e.Size, e.Want)
}

// Is makes a *FaultError match ErrDamaged.
func (e *FaultError) Is(target error) bool { return target == ErrDamaged }

// guard is what enter saves and exit restores: the goroutine's debug.SetPanicOnFault setting
// and the name of the call.
type guard struct {
	op  string
	old bool
}

// protect makes a fault on memory in this goroutine a panic until unprotect. Only faults
// inside the ledger's mapping are then recovered (caught); any other panic goes on.
func protect(op string) guard { return guard{op: op, old: debug.SetPanicOnFault(true)} }

func unprotect(g guard) { debug.SetPanicOnFault(g.old) }

// caught stores the *FaultError of r, a value recovered under protect, in *errp (unless errp is
// nil) and marks l damaged; it panics again with r unless r is a fault at an address of l's
// mapping.
func (l *Ledger) caught(g guard, r any, errp *error) {
	f, ok := r.(interface{ Addr() uintptr })
	if !ok || len(l.mem) == 0 {
		panic(r)
	}
	base := uintptr(unsafe.Pointer(unsafe.SliceData(l.mem)))
	if a := f.Addr(); a < base || a-base >= uintptr(len(l.mem)) {
		panic(r)
	}
	l.damaged.Store(true)
	if errp != nil {
		*errp = l.faultError(g.op)
	}
}

// faultError returns the *FaultError of call op, with the file's size now.
func (l *Ledger) faultError(op string) *FaultError {
	e := &FaultError{Op: op, Path: l.path, Size: -1, Want: fileSize}
	var st unix.Stat_t
	if unix.Fstat(l.fd, &st) == nil {
		e.Size = st.Size
	}
	return e
}

// catch turns a fault on the mapping, recovered under protect, into *errp. It must be the
// deferred call itself, for recover to see the panic. The goroutine stays protected.
func (l *Ledger) catch(g guard, errp *error) {
	if r := recover(); r != nil {
		l.caught(g, r, errp)
	}
}
