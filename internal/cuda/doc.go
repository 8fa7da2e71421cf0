// Package cuda is the only package in pagedkv that touches the CUDA driver ABI.
//
// It loads libcuda.so.1 at run time through purego (so it builds and runs with CGO_ENABLED=0 and
// needs no CUDA toolkit at build time), resolves every versioned symbol in one table (symbols.go),
// mirrors the few C structs the VMM calls take (with size and offset tests), and turns CUresult
// codes into *Error values that match the sentinels of internal/errdefs through errors.Is.
//
// A machine without a driver gets errdefs.ErrNoDriver from Load, never a panic.
//
// Concurrency: the driver is thread-safe; a Context makes itself current on the calling OS thread
// (locked for the duration of each call), so its methods may be called from any goroutine.
package cuda
