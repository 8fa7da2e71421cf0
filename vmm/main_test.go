package vmm_test

import (
	"testing"

	"github.com/pagedkv/pagedkv/internal/leakcheck"
	"github.com/pagedkv/pagedkv/internal/testutil/gputest"
	"github.com/pagedkv/pagedkv/vmm"
)

func TestMain(m *testing.M) { leakcheck.Main(m) }

const mib = 1 << 20

// backends runs fn once per real backend: the host always, CUDA when a GPU is present (and, with
// PAGEDKV_REQUIRE_GPU=1, failing when it is not).
func backends(t *testing.T, fn func(t *testing.T, dev vmm.Device)) {
	t.Run("host", func(t *testing.T) {
		leakcheck.Check(t)
		dev, err := vmm.NewHostDevice(vmm.HostOptions{})
		if err != nil {
			t.Fatal(err)
		}
		fn(t, dev)
		if err := dev.Close(); err != nil {
			t.Errorf("close device: %v", err)
		}
	})
	t.Run("cuda", func(t *testing.T) {
		ord := gputest.Require(t)
		leakcheck.Check(t)
		dev, err := vmm.NewCUDADevice(ord)
		if err != nil {
			t.Fatal(err)
		}
		fn(t, dev)
		if err := dev.Close(); err != nil {
			t.Errorf("close device: %v", err)
		}
	})
}
