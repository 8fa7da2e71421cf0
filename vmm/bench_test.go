package vmm_test

import (
	"fmt"
	"testing"

	"github.com/pagedkv/pagedkv/vmm"
)

// BenchmarkPoolMap compares the pool's hot path (Map + Unmap of one page with a pre-created,
// cached handle) with the bare device calls doing the same work (Map + SetAccess + Unmap), on
// the host backend and, when present, the GPU. The metric pool/raw is the ratio of the two
// measured in the same run.
func BenchmarkPoolMap(b *testing.B) {
	devs := map[string]func() (vmm.Device, error){
		"host": func() (vmm.Device, error) { return vmm.NewHostDevice(vmm.HostOptions{}) },
	}
	if vmm.Supported(0) {
		devs["cuda"] = func() (vmm.Device, error) { return vmm.NewCUDADevice(0) }
	}
	for name, open := range devs {
		for _, size := range []uint64{2 << 20, 128 << 20} {
			b.Run(fmt.Sprintf("%s/%dMiB", name, size>>20), func(b *testing.B) {
				dev, err := open()
				if err != nil {
					b.Fatal(err)
				}
				defer dev.Close()
				a, err := dev.Reserve(size)
				if err != nil {
					b.Fatal(err)
				}
				defer dev.FreeReservation(a, size)
				h, err := dev.Create(size)
				if err != nil {
					b.Fatal(err)
				}
				defer dev.Release(h)
				pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: size, PageSize: size, CacheLimit: size})
				if err != nil {
					b.Fatal(err)
				}
				defer pool.Close()
				if err := pool.Precreate(size, 1); err != nil {
					b.Fatal(err)
				}
				var rawNs, poolNs int64
				b.ReportAllocs()
				for b.Loop() {
					t := b.Elapsed()
					if err := dev.Map(a, size, h); err != nil {
						b.Fatal(err)
					}
					if err := dev.SetAccess(a, size); err != nil {
						b.Fatal(err)
					}
					if err := dev.Unmap(a, size); err != nil {
						b.Fatal(err)
					}
					t2 := b.Elapsed()
					rawNs += int64(t2 - t)
					if _, err := pool.Map(0, size); err != nil {
						b.Fatal(err)
					}
					if err := pool.Unmap(0, size); err != nil {
						b.Fatal(err)
					}
					poolNs += int64(b.Elapsed() - t2)
				}
				b.ReportMetric(float64(poolNs)/float64(b.N)/1e3, "µs-pool/op")
				b.ReportMetric(float64(rawNs)/float64(b.N)/1e3, "µs-raw/op")
				b.ReportMetric(float64(poolNs)/float64(rawNs), "pool/raw")
			})
		}
	}
}
