// Package errdefs defines, once, the sentinel errors that every pagedkv package returns.
//
// The public packages re-export these values (vmm.ErrOutOfMemory is errdefs.ErrOutOfMemory), so
// errors.Is works the same whichever package a caller imports. Driver errors from internal/cuda
// match them through their Is method; raw CUresult codes never escape.
package errdefs

import (
	"errors"
	"fmt"
)

var (
	// ErrNoDriver reports that libcuda.so.1 could not be loaded or initialised.
	ErrNoDriver = errors.New("CUDA driver not available")
	// ErrNotSupported reports a feature the device or driver lacks (for example VMM).
	ErrNotSupported = errors.New("not supported")
	// ErrOutOfMemory reports that physical memory (device, host or budget) is exhausted.
	ErrOutOfMemory = errors.New("out of memory")
	// ErrInvalidArgument reports a malformed request: zero, negative or unaligned sizes and the like.
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrOutOfRange reports an offset or range outside a reservation or arena.
	ErrOutOfRange = errors.New("out of range")
	// ErrAlreadyMapped reports a map request over pages that are already mapped.
	ErrAlreadyMapped = errors.New("already mapped")
	// ErrNotMapped reports an unmap or access of pages that are not mapped.
	ErrNotMapped = errors.New("not mapped")
	// ErrClosed reports use of an object after Close.
	ErrClosed = errors.New("closed")
	// ErrWrongDevice reports an object used with a device other than the one it belongs to.
	ErrWrongDevice = errors.New("wrong device")
	// ErrDriver reports a driver failure that has no more specific sentinel.
	ErrDriver = errors.New("driver error")
	// ErrUnknownSequence reports a sequence id the manager does not hold.
	ErrUnknownSequence = errors.New("unknown sequence")
	// ErrSequenceExists reports an attempt to create a sequence id that is already live.
	ErrSequenceExists = errors.New("sequence exists")
	// ErrExists reports a name (of a model, say) that is already registered.
	ErrExists = errors.New("already exists")
	// ErrNotFound reports a name that is not registered.
	ErrNotFound = errors.New("not found")
	// ErrAsleep reports an append to a manager put to sleep; Wake it first.
	ErrAsleep = errors.New("asleep")
	// ErrTooLarge reports a request that can never fit: a batch larger than the buffers it is
	// written into, an append larger than the whole arena or than a sequence may grow, a size
	// whose arithmetic would overflow.
	ErrTooLarge = errors.New("does not fit")
	// ErrInjected is the error a fault-injecting device returns by default.
	ErrInjected = errors.New("injected fault")
)

// The stores below the host tier (package tier and its stores).
var (
	// ErrUnavailable reports a store that cannot answer now: a server down, a deadline passed,
	// a disk failing. The caller treats it as a miss.
	ErrUnavailable = errors.New("store unavailable")
	// ErrCorrupt reports a stored block that failed its checks.
	ErrCorrupt = errors.New("corrupt block")
	// ErrMismatch reports a stored block of another model, geometry or namespace.
	ErrMismatch = errors.New("block of another model or namespace")
	// ErrDenied reports a store that refused the credentials or the command.
	ErrDenied = errors.New("access denied")
)

// ErrDamaged reports a shared file (the ledger's) changed under its mapping by another
// process: cut short, so that reading it faults.
var ErrDamaged = errors.New("file damaged")

// CountError reports a count (of tokens, pairs, rows, ...) that is negative or larger than
// allowed; it matches ErrInvalidArgument. Public packages re-export it as a type alias.
type CountError struct {
	What   string // what was counted; "" reads as "count"
	N, Max int
	Min    int // the least allowed, when above 0 (a queue of at least one event, say)
}

// Error describes the failure with its numbers.
func (e *CountError) Error() string {
	if e == nil {
		return "<nil>"
	}
	what := e.What
	if what == "" {
		what = "count"
	}
	if e.Min > 0 && e.N < e.Min {
		return fmt.Sprintf("invalid argument: %s %d is below %d", what, e.N, e.Min)
	}
	if e.N < 0 {
		return fmt.Sprintf("invalid argument: %s %d is negative", what, e.N)
	}
	return fmt.Sprintf("invalid argument: %s %d exceeds %d", what, e.N, e.Max)
}

// Is reports whether target is ErrInvalidArgument.
func (e *CountError) Is(target error) bool { return e != nil && target == ErrInvalidArgument }

// ErrNeedsTokenIDs reports a count-only append (AppendTokens) to a keyed sequence under a strict
// manager: its blocks are cached by their token ids, so append with AppendTokenIDs.
var ErrNeedsTokenIDs = errors.New("keyed sequence needs token ids")

// ErrNotClosed reports objects the caller should have closed and did not (a manager's Swaps,
// found by its Close).
var ErrNotClosed = errors.New("not closed")

// ErrSwapped reports an operation a sequence swapped out to the host tier cannot take (an
// append, a fork, a truncation, an export): SwapIn it first.
var ErrSwapped = errors.New("sequence swapped out")

// NameError reports a name (of a model, a ledger member, a metrics object) that breaks the
// naming rule of internal/names; it matches ErrInvalidArgument. Public packages re-export it as
// a type alias. Its text quotes at most the name's first bytes, so a huge name stays readable.
type NameError struct {
	What   string // whose name: "model", "member", ...; "" reads as "a"
	Name   string // the name as given
	Reason string // what is wrong with it: "is empty", "is not valid UTF-8", ...
}

// Error describes the name and what is wrong with it, without naming a layer: the caller's
// wrapping names its own.
func (e *NameError) Error() string {
	if e == nil {
		return "<nil>"
	}
	what := e.What
	if what == "" {
		what = "a"
	}
	const shown = 24
	q := fmt.Sprintf("%q", e.Name)
	if len(e.Name) > shown {
		q = fmt.Sprintf("%q... (%d bytes)", e.Name[:shown], len(e.Name))
	}
	return fmt.Sprintf("%s name %s %s", what, q, e.Reason)
}

// Is reports whether target is ErrInvalidArgument.
func (e *NameError) Is(target error) bool { return e != nil && target == ErrInvalidArgument }
