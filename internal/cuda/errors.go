package cuda

import (
	"fmt"

	"github.com/pagedkv/pagedkv/internal/errdefs"
)

// Result is a CUresult code. It never leaves this package except inside an *Error.
type Result int32

// The CUresult codes this package names (cuda.h, CUDA 13.0).
const (
	Success             Result = 0
	ErrorInvalidValue   Result = 1
	ErrorOutOfMemory    Result = 2
	ErrorNotInitialized Result = 3
	ErrorDeinitialized  Result = 4
	ErrorNoDevice       Result = 100
	ErrorInvalidDevice  Result = 101
	ErrorInvalidImage   Result = 200
	ErrorInvalidContext Result = 201
	ErrorNoBinaryForGPU Result = 209
	ErrorInvalidPTX     Result = 218
	ErrorUnsupportedPTX Result = 222
	ErrorInvalidHandle  Result = 400
	ErrorNotFound       Result = 500
	ErrorNotReady       Result = 600
	ErrorIllegalAddress Result = 700
	ErrorLaunchFailed   Result = 719
	ErrorNotPermitted   Result = 800
	ErrorNotSupported   Result = 801
	ErrorInsufficientDr Result = 35
	ErrorStubLibrary    Result = 34
	ErrorUnknown        Result = 999
)

var resultNames = map[Result]string{
	ErrorInvalidValue:   "CUDA_ERROR_INVALID_VALUE",
	ErrorOutOfMemory:    "CUDA_ERROR_OUT_OF_MEMORY",
	ErrorNotInitialized: "CUDA_ERROR_NOT_INITIALIZED",
	ErrorDeinitialized:  "CUDA_ERROR_DEINITIALIZED",
	ErrorNoDevice:       "CUDA_ERROR_NO_DEVICE",
	ErrorInvalidDevice:  "CUDA_ERROR_INVALID_DEVICE",
	ErrorInvalidImage:   "CUDA_ERROR_INVALID_IMAGE",
	ErrorInvalidContext: "CUDA_ERROR_INVALID_CONTEXT",
	ErrorNoBinaryForGPU: "CUDA_ERROR_NO_BINARY_FOR_GPU",
	ErrorInvalidPTX:     "CUDA_ERROR_INVALID_PTX",
	ErrorUnsupportedPTX: "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
	ErrorInvalidHandle:  "CUDA_ERROR_INVALID_HANDLE",
	ErrorNotFound:       "CUDA_ERROR_NOT_FOUND",
	ErrorNotReady:       "CUDA_ERROR_NOT_READY",
	ErrorIllegalAddress: "CUDA_ERROR_ILLEGAL_ADDRESS",
	ErrorLaunchFailed:   "CUDA_ERROR_LAUNCH_FAILED",
	ErrorNotPermitted:   "CUDA_ERROR_NOT_PERMITTED",
	ErrorNotSupported:   "CUDA_ERROR_NOT_SUPPORTED",
	ErrorInsufficientDr: "CUDA_ERROR_INSUFFICIENT_DRIVER",
	ErrorStubLibrary:    "CUDA_ERROR_STUB_LIBRARY",
	ErrorUnknown:        "CUDA_ERROR_UNKNOWN",
}

// String returns the cuda.h name of the code.
// String returns a readable form.
func (r Result) String() string {
	if n, ok := resultNames[r]; ok {
		return n
	}
	return fmt.Sprintf("CUresult(%d)", int32(r))
}

// Error is a failed driver call: which call and what it returned.
type Error struct {
	Call string // the driver symbol, e.g. "cuMemCreate"
	Code Result
}

// Error describes the failure with its numbers.
func (e *Error) Error() string {
	if e == nil {
		return "<nil>"
	}
	return fmt.Sprintf("cuda: %s: %s (%d)", e.Call, e.Code, int32(e.Code))
}

// Is matches the sentinel of internal/errdefs that the code stands for.
func (e *Error) Is(target error) bool {
	if e == nil {
		return false
	}
	switch target {
	case errdefs.ErrDriver:
		return true
	case errdefs.ErrOutOfMemory:
		return e.Code == ErrorOutOfMemory
	case errdefs.ErrNotSupported:
		return e.Code == ErrorNotSupported || e.Code == ErrorNotPermitted
	case errdefs.ErrNoDriver:
		switch e.Code {
		case ErrorNoDevice, ErrorInsufficientDr, ErrorStubLibrary, ErrorNotInitialized, ErrorDeinitialized:
			return true
		}
	case errdefs.ErrInvalidArgument:
		return e.Code == ErrorInvalidValue
	case errdefs.ErrWrongDevice:
		return e.Code == ErrorInvalidDevice
	}
	return false
}

func check(call string, r uintptr) error {
	if Result(int32(r)) == Success {
		return nil
	}
	return &Error{Call: call, Code: Result(int32(r))}
}
