package kvevents

import (
	"fmt"

	"github.com/pagedkv/pagedkv/internal/errdefs"
)

// Sentinel errors; the same values as in every pagedkv package. Match them with errors.Is.
var (
	ErrInvalidArgument = errdefs.ErrInvalidArgument
	ErrClosed          = errdefs.ErrClosed
)

// EndpointError reports an endpoint that could not be bound or connected at Start; it matches
// ErrInvalidArgument and unwraps to the cause (errors.Is(err, syscall.EADDRINUSE) for a port in
// use).
type EndpointError struct {
	Endpoint string
	Op       string // "bind" or "connect"
	Err      error
}

// Error describes the failure.
func (e *EndpointError) Error() string {
	if e == nil {
		return "<nil>"
	}
	return fmt.Sprintf("invalid argument: %s %s: %v", e.Op, e.Endpoint, e.Err)
}

// Is reports whether target is ErrInvalidArgument.
func (e *EndpointError) Is(target error) bool {
	return e != nil && target == errdefs.ErrInvalidArgument
}

// Unwrap returns the cause.
func (e *EndpointError) Unwrap() error {
	if e == nil {
		return nil
	}
	return e.Err
}

// RequestError reports a malformed replay request, which gets no answer: the request must be
// three frames (the peer's identity, an empty delimiter, the start sequence number as 8 bytes
// big-endian), as a DEALER that sends the empty delimiter first, or a REQ socket, makes it. It
// matches ErrInvalidArgument.
type RequestError struct {
	Frames int // frames received, the identity included
	Start  int // length of the start frame (-1 when there is none)
	Reason string
}

// Error describes the request.
func (e *RequestError) Error() string {
	if e == nil {
		return "<nil>"
	}
	return fmt.Sprintf("kvevents: replay: invalid argument: %s (%d frames, start frame of %d bytes)", e.Reason, e.Frames, e.Start)
}

// Is reports whether target is ErrInvalidArgument.
func (e *RequestError) Is(target error) bool {
	return e != nil && target == errdefs.ErrInvalidArgument
}
