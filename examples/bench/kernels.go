package main

import (
	"fmt"
	"math/rand/v2"
	"os"
	"time"

	"github.com/pagedkv/pagedkv/internal/cuda"
	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/vmm"
)

// benchKernels measures copy_blocks against one large cuMemcpyDtoD and against one
// cuMemcpyDtoDAsync per block, all in the same run, and the cold module load from the embedded
// cubin against the PTX JIT. GPU only: the Go implementation is a correctness reference.
func benchKernels(dev vmm.Device, scale int) ([]Table, error) {
	cd, ok := dev.(*vmm.CUDADevice)
	if !ok {
		return nil, nil
	}
	ctx := cd.Context()
	load := Table{
		Title:   "Cold kernel module load",
		Note:    "cuModuleLoadData of the embedded image, first load in the process (CUDA_CACHE_DISABLE=1 for the PTX JIT).",
		Columns: []string{"image", "ms"},
	}
	for _, img := range []kernels.Image{kernels.ImageSM90, kernels.ImagePTX} {
		t0 := time.Now()
		if err := kernels.LoadTime(cd, img); err != nil {
			return nil, err
		}
		load.Rows = append(load.Rows, []string{string(img), fmt.Sprintf("%.2f", float64(time.Since(t0).Microseconds())/1e3)})
	}

	k, err := kernels.For(dev)
	if err != nil {
		return nil, err
	}
	defer k.Close()
	const arena = 2 << 30
	pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: arena, PageSize: arena})
	if err != nil {
		return nil, err
	}
	defer pool.Close()
	base, err := pool.Map(0, arena)
	if err != nil {
		return nil, err
	}
	if err := dev.Memset(base, 1, arena); err != nil {
		return nil, err
	}
	start, err := ctx.EventCreate(cuda.EventDefault)
	if err != nil {
		return nil, err
	}
	defer ctx.EventDestroy(start)
	stop, err := ctx.EventCreate(cuda.EventDefault)
	if err != nil {
		return nil, err
	}
	defer ctx.EventDestroy(stop)
	timed := func(reps int, f func() error) (float64, error) { // best of reps, seconds, GPU time
		best := 1e9
		for range reps {
			if err := ctx.EventRecord(start, 0); err != nil {
				return 0, err
			}
			if err := f(); err != nil {
				return 0, err
			}
			if err := ctx.EventRecord(stop, 0); err != nil {
				return 0, err
			}
			if err := ctx.EventSynchronize(stop); err != nil {
				return 0, err
			}
			ms, err := ctx.EventElapsedTime(start, stop)
			if err != nil {
				return 0, err
			}
			best = min(best, float64(ms)/1e3)
		}
		return best, nil
	}
	reps := 10
	if scale == 0 {
		reps = 2
	}
	const big = 1 << 30
	memcpyS, err := timed(reps, func() error {
		return ctx.MemcpyDtoDAsync(cuda.DevicePtr(base+big), cuda.DevicePtr(base), big, 0)
	})
	if err != nil {
		return nil, err
	}
	memcpyBW := 2 * big / memcpyS / 1e9

	t := Table{
		Title: "copy_blocks vs cuMemcpyDtoD (read+write GB/s)",
		Note: fmt.Sprintf("Yardstick in the same run: one 1 GiB cuMemcpyDtoDAsync moved %.0f GB/s read+write. copy_blocks: one launch, "+
			"pairs already on the device, destinations a random permutation; per-block memcpy: one cuMemcpyDtoDAsync per pair, "+
			"host wall time from the first enqueue to completion; 'one memcpy of the same bytes' copies the batch's total as one range, the ceiling at that size. Best of %d.", memcpyBW, reps),
		Columns: []string{"block", "pairs", "copy_blocks GB/s", "vs 1 GiB memcpy", "one memcpy of the same bytes GB/s", "vs it", "per-block memcpy GB/s", "copy_blocks / per-block"},
	}
	pairsBuf, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: 2 << 20, PageSize: 2 << 20})
	if err != nil {
		return nil, err
	}
	defer pairsBuf.Close()
	pairsAddr, err := pairsBuf.Map(0, 2<<20)
	if err != nil {
		return nil, err
	}
	r := rand.New(rand.NewPCG(1, 1))
	for _, c := range []struct{ block, pairs int }{{16 << 10, 512}, {16 << 10, 16384}, {64 << 10, 512}, {64 << 10, 4096}, {256 << 10, 512}, {256 << 10, 1024}} {
		n := c.pairs
		half := arena / 2 / c.block
		perm := r.Perm(half)
		pairs := make([]int64, 2*n)
		for i := range n {
			pairs[2*i], pairs[2*i+1] = int64(i), int64(half+perm[i])
		}
		b := make([]byte, 16*n)
		for i, v := range pairs {
			for j := range 8 {
				b[8*i+j] = byte(uint64(v) >> (8 * j))
			}
		}
		if err := dev.CopyIn(pairsAddr, b); err != nil {
			return nil, err
		}
		kernS, err := timed(reps, func() error {
			return k.CopyBlocksDevice(0, base, pairsAddr, n, uint64(c.block))
		})
		if err != nil {
			return nil, err
		}
		total := uint64(n) * uint64(c.block)
		sameS, err := timed(reps, func() error {
			return ctx.MemcpyDtoDAsync(cuda.DevicePtr(base+arena/2), cuda.DevicePtr(base), total, 0)
		})
		if err != nil {
			return nil, err
		}
		var perS float64
		best := time.Hour
		for range min(reps, 3) {
			t0 := time.Now()
			for i := range n {
				src, dst := base+vmm.Addr(pairs[2*i]*int64(c.block)), base+vmm.Addr(pairs[2*i+1]*int64(c.block))
				if err := ctx.MemcpyDtoDAsync(cuda.DevicePtr(dst), cuda.DevicePtr(src), uint64(c.block), 0); err != nil {
					return nil, err
				}
			}
			if err := ctx.StreamSynchronize(0); err != nil {
				return nil, err
			}
			best = min(best, time.Since(t0))
		}
		perS = best.Seconds()
		bytes := 2 * float64(n) * float64(c.block)
		kbw, pbw, sbw := bytes/kernS/1e9, bytes/perS/1e9, bytes/sameS/1e9
		t.Rows = append(t.Rows, []string{fmt.Sprintf("%d KiB", c.block>>10), fmt.Sprint(n), fmt.Sprintf("%.0f", kbw),
			fmt.Sprintf("%.0f%%", 100*kbw/memcpyBW), fmt.Sprintf("%.0f", sbw), fmt.Sprintf("%.0f%%", 100*kbw/sbw),
			fmt.Sprintf("%.1f", pbw), fmt.Sprintf("%.0fx", kbw/pbw)})
	}
	return []Table{load, t}, nil
}

func init() {
	// The PTX load must be cold: no driver JIT cache. Set before the driver initialises.
	if os.Getenv("CUDA_CACHE_DISABLE") == "" {
		os.Setenv("CUDA_CACHE_DISABLE", "1")
	}
}
