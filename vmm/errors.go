package vmm

import (
	"fmt"

	"github.com/pagedkv/pagedkv/internal/errdefs"
)

// Sentinel errors. They are the same values in every pagedkv package; match them with errors.Is.
var (
	ErrNoDriver        = errdefs.ErrNoDriver
	ErrNotSupported    = errdefs.ErrNotSupported
	ErrOutOfMemory     = errdefs.ErrOutOfMemory
	ErrInvalidArgument = errdefs.ErrInvalidArgument
	ErrOutOfRange      = errdefs.ErrOutOfRange
	ErrAlreadyMapped   = errdefs.ErrAlreadyMapped
	ErrNotMapped       = errdefs.ErrNotMapped
	ErrClosed          = errdefs.ErrClosed
	ErrWrongDevice     = errdefs.ErrWrongDevice
	ErrDriver          = errdefs.ErrDriver
	ErrInjected        = errdefs.ErrInjected
	ErrExists          = errdefs.ErrExists
	ErrNotFound        = errdefs.ErrNotFound
	ErrTooLarge        = errdefs.ErrTooLarge
)

// NameError reports a member name that breaks the naming rule (see Budget.Join); it matches
// ErrInvalidArgument. It is the same type as kvcache.NameError and ledger.NameError.
type NameError = errdefs.NameError

// CapacityError reports an allocation that did not fit: Need bytes were asked for and Free
// bytes were available. It matches ErrOutOfMemory.
type CapacityError struct {
	Need, Free uint64
}

// Error describes the failure with its numbers.
func (e *CapacityError) Error() string {
	if e == nil {
		return "<nil>"
	}
	return fmt.Sprintf("out of memory: need %d bytes, %d free", e.Need, e.Free)
}

// Is reports whether target is ErrOutOfMemory.
func (e *CapacityError) Is(target error) bool { return e != nil && target == ErrOutOfMemory }

// AlignmentError reports a size or offset that is zero or not a multiple of Align. It matches
// ErrInvalidArgument.
type AlignmentError struct {
	What  string // "size", "offset", "page size"
	Value uint64
	Align uint64
}

// Error describes the failure with its numbers.
func (e *AlignmentError) Error() string {
	if e == nil {
		return "<nil>"
	}
	return fmt.Sprintf("%s %d is not a positive multiple of %d", e.What, e.Value, e.Align)
}

// Is reports whether target is ErrInvalidArgument.
func (e *AlignmentError) Is(target error) bool { return e != nil && target == ErrInvalidArgument }

// RangeError reports a request [Offset, Offset+Size) that does not lie within [0, Limit). It
// matches ErrOutOfRange.
type RangeError struct {
	Offset, Size, Limit uint64
}

// Error describes the failure with its numbers.
func (e *RangeError) Error() string {
	if e == nil {
		return "<nil>"
	}
	return fmt.Sprintf("range [%d, %d) outside [0, %d)", e.Offset, e.Offset+e.Size, e.Limit)
}

// Is reports whether target is ErrOutOfRange.
func (e *RangeError) Is(target error) bool { return e != nil && target == ErrOutOfRange }

func checkAligned(what string, v, align uint64) error {
	if v == 0 || align == 0 || v%align != 0 {
		return &AlignmentError{What: what, Value: v, Align: align}
	}
	return nil
}
