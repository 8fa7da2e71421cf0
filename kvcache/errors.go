package kvcache

import (
	"fmt"

	"github.com/pagedkv/pagedkv/blocktable"
	"github.com/pagedkv/pagedkv/internal/errdefs"
	"github.com/pagedkv/pagedkv/sequence"
)

// Sentinel errors; the same values as in every pagedkv package that names them (vmm's, among
// others). Match them with errors.Is.
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
	ErrSwapped         = errdefs.ErrSwapped
	ErrNeedsTokenIDs   = errdefs.ErrNeedsTokenIDs
	ErrNotClosed       = errdefs.ErrNotClosed
	ErrNotSupported    = errdefs.ErrNotSupported
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
	if e == nil {
		return "<nil>"
	}
	return fmt.Sprintf("kvcache: %s sequence %d: %v", e.Op, e.Seq, e.Err)
}

// Unwrap returns the cause.
func (e *SequenceError) Unwrap() error {
	if e == nil {
		return nil
	}
	return e.Err
}

// CountError reports a count that is negative or larger than allowed; it matches
// ErrInvalidArgument. It is the same type as blocktable.CountError.
type CountError = errdefs.CountError

// NameError reports a model name that breaks the naming rule (see SharedPool.Register); it
// matches ErrInvalidArgument. It is the same type as ledger.NameError.
type NameError = errdefs.NameError

// BlocksError reports an append whose blocks cannot be had: Tokens more tokens for a sequence
// of SeqTokens need Blocks more blocks (Bytes of arena memory). Free is how many blocks the
// manager could give now, as Available counts them (free and idle blocks of mapped pages, and
// those of the pages its arena, MemoryLimit and budget's headroom still let it map; a shared
// budget may reclaim more from other models), Max how many the arena can ever hold.
//
// It matches ErrTooLarge when the request can never succeed (Blocks > Max, the sequence would
// pass MaxSequenceTokens, or Tokens is over blocktable.MaxSlots; Err is nil then), and
// otherwise wraps the cause, which matches
// ErrOutOfMemory (a *vmm.CapacityError) or is a driver failure.
type BlocksError struct {
	Tokens, SeqTokens int
	Blocks            int
	Bytes             uint64
	Free, Max         int
	// Bound names the setting that makes Max what it is ("Capacity 4194304 bytes",
	// "MemoryLimit 2097152 bytes"), so that an arena too small says which knob to turn.
	Bound string
	Err   error
}

// Error describes the failure with its numbers.
func (e *BlocksError) Error() string {
	if e == nil {
		return "<nil>"
	}
	if e.Err == nil {
		if e.Tokens > MaxSequenceTokens-e.SeqTokens {
			return fmt.Sprintf("does not fit: %d more tokens (%d blocks, %d bytes) for a sequence of %d pass the %d a sequence may hold",
				e.Tokens, e.Blocks, e.Bytes, e.SeqTokens, MaxSequenceTokens)
		}
		if e.Tokens > blocktable.MaxSlots {
			return fmt.Sprintf("does not fit: %d tokens in one append, more than %d (%d blocks, %d bytes)",
				e.Tokens, blocktable.MaxSlots, e.Blocks, e.Bytes)
		}
		return fmt.Sprintf("does not fit: %d tokens need %d blocks (%d bytes); the arena holds at most %d blocks%s",
			e.Tokens, e.Blocks, e.Bytes, e.Max, e.bound())
	}
	return fmt.Sprintf("%d tokens need %d blocks (%d bytes), %d can be had now, %d at most%s: %v",
		e.Tokens, e.Blocks, e.Bytes, e.Free, e.Max, e.bound(), e.Err)
}

// bound is the text that names Bound, if set.
func (e *BlocksError) bound() string {
	if e.Bound == "" {
		return ""
	}
	return " (" + e.Bound + ")"
}

// Is reports whether target is ErrTooLarge, for a request that can never succeed.
func (e *BlocksError) Is(target error) bool { return e != nil && e.Err == nil && target == ErrTooLarge }

// Unwrap returns the cause (nil for a request that can never succeed).
func (e *BlocksError) Unwrap() error {
	if e == nil {
		return nil
	}
	return e.Err
}

// SwapError reports a SwapOut or SwapIn that found no room: Seqs sequences needed Blocks blocks
// (Bytes) copied into Where (the host tier, or the arena), which could give Free now and holds
// at most Max. It wraps the cause, which matches ErrOutOfMemory.
type SwapError struct {
	Op        string // "swap out", "swap in"
	Seqs      int
	Blocks    int
	Bytes     uint64
	Free, Max int
	Where     string
	Err       error
}

// Error describes the failure with its numbers.
func (e *SwapError) Error() string {
	if e == nil {
		return "<nil>"
	}
	seqs := "sequences"
	if e.Seqs == 1 {
		seqs = "sequence"
	}
	return fmt.Sprintf("kvcache: %s of %d %s: %d blocks (%d bytes) to copy into %s, %d can be had now, %d at most: %v",
		e.Op, e.Seqs, seqs, e.Blocks, e.Bytes, e.Where, e.Free, e.Max, e.Err)
}

// Unwrap returns the cause.
func (e *SwapError) Unwrap() error {
	if e == nil {
		return nil
	}
	return e.Err
}
