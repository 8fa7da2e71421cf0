package kvcache

import (
	"fmt"

	"github.com/pagedkv/pagedkv/internal/errdefs"
	"github.com/pagedkv/pagedkv/sequence"
)

// Sentinel errors; the same values as in package vmm. Match them with errors.Is.
var (
	ErrUnknownSequence = errdefs.ErrUnknownSequence
	ErrSequenceExists  = errdefs.ErrSequenceExists
	ErrOutOfMemory     = errdefs.ErrOutOfMemory
	ErrInvalidArgument = errdefs.ErrInvalidArgument
	ErrClosed          = errdefs.ErrClosed
	ErrTooLarge        = errdefs.ErrTooLarge
	ErrExists          = errdefs.ErrExists
	ErrNotFound        = errdefs.ErrNotFound
	ErrAsleep          = errdefs.ErrAsleep
)

// SequenceError reports an operation on one sequence that failed; it unwraps to the cause
// (ErrUnknownSequence, ErrSequenceExists, ErrInvalidArgument, an out-of-memory error, ...).
type SequenceError struct {
	Op  string // "append", "free", "fork", "truncate", ...
	Seq sequence.ID
	Err error
}

// Error describes the failure with its numbers.
func (e *SequenceError) Error() string {
	return fmt.Sprintf("kvcache: %s sequence %d: %v", e.Op, e.Seq, e.Err)
}

// Unwrap returns the cause.
func (e *SequenceError) Unwrap() error { return e.Err }

// CountError reports a token count that is negative or larger than allowed; it matches
// ErrInvalidArgument.
type CountError struct {
	N, Max int
}

// Error describes the failure with its numbers.
func (e *CountError) Error() string {
	if e.N < 0 {
		return fmt.Sprintf("pagedkv: invalid argument: count %d is negative", e.N)
	}
	return fmt.Sprintf("pagedkv: invalid argument: count %d exceeds %d", e.N, e.Max)
}

// Is reports whether target is ErrInvalidArgument.
func (e *CountError) Is(target error) bool { return target == ErrInvalidArgument }
