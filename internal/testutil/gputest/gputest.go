// Package gputest gates tests that need a CUDA GPU.
//
// Require skips a test when no driver or device is present, and fails it instead when the
// environment sets PAGEDKV_REQUIRE_GPU=1, so that a green run on the GPU machine proves the GPU
// path ran.
package gputest

import (
	"os"
	"strconv"
	"testing"

	"github.com/pagedkv/pagedkv/internal/cuda"
)

// RequireEnv is the variable that turns a missing GPU from a skip into a failure.
const RequireEnv = "PAGEDKV_REQUIRE_GPU"

// Required reports whether the environment demands the GPU path.
func Required() bool { return os.Getenv(RequireEnv) == "1" }

// SanitizerEnv is set to 1 by scripts/gpu-run when the tests run under compute-sanitizer.
const SanitizerEnv = "PAGEDKV_SANITIZER"

// Sanitized reports a run under compute-sanitizer, which takes device memory of its own: a
// test that compares the manager's mapped bytes with the device's free memory cannot hold then.
func Sanitized() bool { return os.Getenv(SanitizerEnv) == "1" }

// Require returns the ordinal of the first CUDA device, or skips (fails under
// PAGEDKV_REQUIRE_GPU=1) when none can be used.
func Require(tb testing.TB) int {
	tb.Helper()
	err := cuda.Load()
	if err == nil {
		var n int
		n, err = cuda.DeviceCount()
		if err == nil && n > 0 {
			return 0
		}
	}
	if Required() {
		tb.Fatalf("%s=1 but no usable CUDA device: %v", RequireEnv, err)
	}
	tb.Skipf("no CUDA device (%v); set %s=1 to fail instead", err, RequireEnv)
	return -1
}

// RequireNEnv is the variable that turns fewer than N GPUs from a skip into a failure for tests
// that need several (PAGEDKV_REQUIRE_GPUS=2 on a two-GPU machine).
const RequireNEnv = "PAGEDKV_REQUIRE_GPUS"

// RequireN returns the ordinals of the first n CUDA devices, or skips when there are fewer (and
// fails instead when PAGEDKV_REQUIRE_GPUS is n or more).
func RequireN(tb testing.TB, n int) []int {
	tb.Helper()
	err := cuda.Load()
	count := 0
	if err == nil {
		count, err = cuda.DeviceCount()
	}
	if err == nil && count >= n {
		out := make([]int, n)
		for i := range out {
			out[i] = i
		}
		return out
	}
	if want, _ := strconv.Atoi(os.Getenv(RequireNEnv)); want >= n {
		tb.Fatalf("%s=%d but %d CUDA devices usable (%v)", RequireNEnv, want, count, err)
	}
	tb.Skipf("needs %d CUDA devices, found %d (%v); set %s=%d to fail instead", n, count, err, RequireNEnv, n)
	return nil
}
