package redis

import (
	"fmt"

	"github.com/pagedkv/pagedkv/internal/errdefs"
	"github.com/pagedkv/pagedkv/tier"
)

// Sentinel errors a Store returns; each matches with errors.Is.
var (
	// ErrClosed reports a call after Close.
	ErrClosed = tier.ErrClosed
	// ErrUnavailable reports a server that did not answer in time, is down or refused the call.
	ErrUnavailable = tier.ErrUnavailable
	// ErrOutOfMemory reports a server that is full and evicts nothing (maxmemory-policy
	// noeviction); it comes with ErrUnavailable.
	ErrOutOfMemory = errdefs.ErrOutOfMemory
	// ErrDenied reports a server that refused the credentials (WRONGPASS, NOAUTH) or the
	// command (NOPERM): a configuration to fix, not a fault that passes. It comes with
	// ErrUnavailable.
	ErrDenied = errdefs.ErrDenied
	// ErrInvalidArgument reports invalid Options or a malformed call.
	ErrInvalidArgument = tier.ErrInvalidArgument
)

// CallError reports a call the servers did not complete: a dial or I/O error, a deadline, an
// error reply. It matches ErrUnavailable, ErrOutOfMemory when Full and ErrDenied when Denied;
// it unwraps to the client's error (context.DeadlineExceeded for a deadline, for example).
type CallError struct {
	Op     string // "put", "get", "has", "drop", "ping", or "subscribe" and "config" (Options.Evictions)
	Keys   int    // the keys the call asked for
	Full   bool   // the server answered OOM: it is full and evicts nothing
	Denied bool   // the server refused the credentials or the command
	Err    error
}

// Error describes the failed call.
func (e *CallError) Error() string {
	if e == nil {
		return "<nil>"
	}
	what := ErrUnavailable.Error()
	switch {
	case e.Full:
		what = "server full"
	case e.Denied:
		what = ErrDenied.Error()
	}
	if e.Keys == 0 { // a call on no key: ping, or the subscription of Options.Evictions
		return fmt.Sprintf("%s: %s: %v", e.Op, what, e.Err)
	}
	return fmt.Sprintf("%s %d keys: %s: %v", e.Op, e.Keys, what, e.Err)
}

// Is reports whether target is ErrUnavailable, ErrOutOfMemory for a full server or ErrDenied
// for refused credentials.
func (e *CallError) Is(target error) bool {
	return e != nil && (target == ErrUnavailable || e.Full && target == ErrOutOfMemory || e.Denied && target == ErrDenied)
}

// Unwrap returns the client's error.
func (e *CallError) Unwrap() error {
	if e == nil {
		return nil
	}
	return e.Err
}

// SizeError reports a buffer or a list of the wrong size; it matches ErrInvalidArgument.
type SizeError struct {
	What      string // "dst", "dst[3]", "blocks[2].Data", ...
	Unit      string // "buffers", "bytes"
	Got, Want int
}

// Error describes the size mismatch with its numbers.
func (e *SizeError) Error() string {
	if e == nil {
		return "<nil>"
	}
	return fmt.Sprintf("invalid argument: %s has %d %s, want %d", e.What, e.Got, e.Unit, e.Want)
}

// Is reports whether target is ErrInvalidArgument.
func (e *SizeError) Is(target error) bool { return e != nil && target == ErrInvalidArgument }
