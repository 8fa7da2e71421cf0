package disk

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/pagedkv/pagedkv/internal/errdefs"
	"github.com/pagedkv/pagedkv/tier"
)

// Sentinel errors of package disk besides those of package tier; each matches with errors.Is.
var (
	// ErrNotSupported reports ModeDirect asked of a filesystem that refuses O_DIRECT.
	ErrNotSupported = errdefs.ErrNotSupported
	// ErrTooLarge reports a Put whose blocks can never fit under Options.LimitBytes.
	ErrTooLarge = errdefs.ErrTooLarge
	// ErrLocked reports a directory another open Store holds (in this process or another).
	ErrLocked = fmt.Errorf("%w: directory held by another store", tier.ErrUnavailable)
	// ErrNoSpace reports a write the filesystem refused for want of space or quota (ENOSPC,
	// EDQUOT); it matches tier.ErrUnavailable too.
	ErrNoSpace = fmt.Errorf("%w: no space left on the filesystem", tier.ErrUnavailable)
	// ErrReadOnly reports a file the store may not create, write or rename (EROFS, EACCES,
	// EPERM): a read-only filesystem or a directory without write permission. It matches
	// tier.ErrUnavailable too.
	ErrReadOnly = fmt.Errorf("%w: directory not writable", tier.ErrUnavailable)
)

// ioError wraps a failed file operation in the sentinel its errno names: ErrNoSpace,
// ErrReadOnly, or tier.ErrUnavailable for any other. The errno stays in the chain (errors.Is
// finds syscall.ENOSPC too).
func ioError(err error) error {
	cause := tier.ErrUnavailable
	switch {
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		cause = ErrNoSpace
	case errors.Is(err, syscall.EROFS), errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		cause = ErrReadOnly
	}
	return fmt.Errorf("%w: %w", cause, err)
}

// ArgumentError reports an argument out of its range, an Options field or a call's; it matches
// ErrInvalidArgument.
type ArgumentError struct {
	Name     string // the argument: "BlockBytes", "LimitBytes", "ctx", "len(dst)", ...
	Value    int64  // the value given
	Min, Max int64  // the range it takes, both inclusive; Max 0 above a Min of 1 or more: none
	Reason   string // set where no range applies: "is empty"
}

// Error describes the argument, its value and its range.
func (e *ArgumentError) Error() string {
	if e == nil {
		return "<nil>"
	}
	if e.Reason != "" {
		return fmt.Sprintf("invalid argument: %s: %s", e.Name, e.Reason)
	}
	if e.Max == 0 && e.Min > 0 {
		return fmt.Sprintf("invalid argument: %s %d, want at least %d", e.Name, e.Value, e.Min)
	}
	return fmt.Sprintf("invalid argument: %s %d, want %d to %d", e.Name, e.Value, e.Min, e.Max)
}

// Is reports whether target is ErrInvalidArgument.
func (e *ArgumentError) Is(target error) bool { return e != nil && target == tier.ErrInvalidArgument }

// SizeError reports a block of the wrong size: a Put's Data or a Get's dst entry whose length
// is not Options.BlockBytes. It matches ErrInvalidArgument.
type SizeError struct {
	What  string // "block" (a Put's) or "dst" (a Get's)
	Index int    // its index in the call's slice
	Len   int    // its length
	Want  int    // Options.BlockBytes
}

// Error describes the block and both sizes.
func (e *SizeError) Error() string {
	if e == nil {
		return "<nil>"
	}
	return fmt.Sprintf("invalid argument: %s %d holds %d bytes, want %d", e.What, e.Index, e.Len, e.Want)
}

// Is reports whether target is ErrInvalidArgument.
func (e *SizeError) Is(target error) bool { return e != nil && target == tier.ErrInvalidArgument }

// FitError reports a Put whose blocks need more disk than the store may ever hold; it matches
// ErrTooLarge. Need counts headers and padding as stored.
type FitError struct {
	Blocks int
	Need   uint64
	Limit  uint64 // the room for blocks: Options.LimitBytes less Options.SpareBytes
}

// Error describes the request and the bound.
func (e *FitError) Error() string {
	if e == nil {
		return "<nil>"
	}
	return fmt.Sprintf("does not fit: %d blocks need %d bytes on disk, the limit is %d", e.Blocks, e.Need, e.Limit)
}

// Is reports whether target is ErrTooLarge.
func (e *FitError) Is(target error) bool { return e != nil && target == ErrTooLarge }
