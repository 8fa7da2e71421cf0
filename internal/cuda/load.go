package cuda

import (
	"fmt"
	"os"
	"runtime"
	"sync"

	"github.com/ebitengine/purego"

	"github.com/pagedkv/pagedkv/internal/errdefs"
)

// LibraryEnv names an environment variable that, when set, overrides the path of the driver
// library (default "libcuda.so.1", found by the dynamic loader).
const LibraryEnv = "PAGEDKV_LIBCUDA"

var (
	loadOnce sync.Once
	loadErr  error
)

// Load opens the driver library, resolves every symbol and calls cuInit(0). It runs once per
// process; later calls return the first result. A machine with no driver (or no GPU) gets an
// error matching errdefs.ErrNoDriver.
func Load() error {
	if active.Load() != nil {
		return nil
	}
	loadOnce.Do(func() { loadErr = load() })
	return loadErr
}

func load() error {
	if runtime.GOOS != "linux" {
		return fmt.Errorf("%w: the CUDA backend is built for linux only", errdefs.ErrNoDriver)
	}
	path := "libcuda.so.1"
	if p := os.Getenv(LibraryEnv); p != "" {
		path = p
	}
	lib, err := purego.Dlopen(path, purego.RTLD_NOW|purego.RTLD_GLOBAL)
	if err != nil {
		return fmt.Errorf("%w: dlopen %s: %v", errdefs.ErrNoDriver, path, err)
	}
	// Resolve into a table of our own and install it only once cuInit succeeded, so that a
	// failed load leaves no half-resolved table behind.
	var t procTable
	for _, s := range symbolTable(&t) {
		for _, name := range s.names {
			if fn, err := purego.Dlsym(lib, name); err == nil && fn != 0 {
				*s.dst = fn
				break
			}
		}
		if *s.dst == 0 {
			return fmt.Errorf("%w: %s lacks %v (driver too old?)", errdefs.ErrNoDriver, path, s.names)
		}
	}
	r, _, _ := purego.SyscallN(t.cuInit, 0)
	if err := check("cuInit", r); err != nil {
		return fmt.Errorf("%w: %w", errdefs.ErrNoDriver, err)
	}
	procs = t
	return nil
}

// call invokes a resolved driver entry point with no context requirement.
//
//go:uintptrescapes
func call(name string, fn uintptr, args ...uintptr) error {
	r, _, _ := purego.SyscallN(fn, args...)
	return check(name, r)
}
