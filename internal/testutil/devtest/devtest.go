// Package devtest holds helpers for tests: device memory outside any arena, and tables.
package devtest

import (
	"testing"

	"github.com/pagedkv/pagedkv/blocktable"
	"github.com/pagedkv/pagedkv/vmm"
)

// Mapped maps size bytes (rounded up to the granularity) of dev as one mapping and returns its
// address; the memory is returned when the test ends. Tests use it for staging buffers and for
// memory "the runtime" owns.
func Mapped(tb testing.TB, dev vmm.Device, size uint64) vmm.Addr {
	tb.Helper()
	g := dev.Info().Granularity
	size = (size + g - 1) / g * g
	p, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: size, PageSize: size})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := p.Close(); err != nil {
			tb.Error(err)
		}
	})
	a, err := p.Map(0, size)
	if err != nil {
		tb.Fatal(err)
	}
	return a
}

// VLLM returns a vLLM table of maxSeqs rows of maxBlocks, failing the test if it cannot be made.
func VLLM(tb testing.TB, maxSeqs, maxBlocks int, pad int32) *blocktable.VLLM {
	tb.Helper()
	v, err := blocktable.NewVLLM(maxSeqs, maxBlocks, pad)
	if err != nil {
		tb.Fatal(err)
	}
	return v
}

// FlashInfer returns a FlashInfer table, failing the test if it cannot be made.
func FlashInfer(tb testing.TB, maxSeqs, maxBlocks, blockTokens int) *blocktable.FlashInfer {
	tb.Helper()
	f, err := blocktable.NewFlashInfer(maxSeqs, maxBlocks, blockTokens)
	if err != nil {
		tb.Fatal(err)
	}
	return f
}
