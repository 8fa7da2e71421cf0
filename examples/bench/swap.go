package main

import (
	"fmt"
	"time"

	"github.com/pagedkv/pagedkv/internal/cuda"
	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// swapBlocks is how many blocks one swap moves in the bench: 64 sequences of 64 blocks.
const swapBlocks, swapSeqs = 4096, 64

// benchSwap times SwapOut and SwapIn of 4,096 blocks of 16, 64 and 256 KiB (64 sequences of 64
// blocks, scattered over the arena by a churn before) against, in the same run, one
// cuMemcpyDtoHAsync / HtoDAsync of the same total bytes between the arena and cuMemAllocHost
// memory, and one such memcpy per block (the naive swap). On the host backend the yardsticks are
// one Go copy of the same bytes and one per block.
func benchSwap(dev vmm.Device, scale int) ([]Table, error) {
	n := 7
	if scale == 0 {
		n = 2
	}
	t := Table{
		Title: "Swapping 4,096 blocks to pinned host memory and back",
		Note: fmt.Sprintf("SwapOut / SwapIn of 64 sequences x 64 blocks, wall time from the call to Swap.Wait returning (bookkeeping, "+
			"the pairs' upload and one copy_blocks launch), p50 of %d after a warm-up, as GB/s of block bytes. Yardsticks in the same "+
			"run: one async memcpy of the same total bytes between the arena and page-locked host memory (cuMemAllocHost), and one "+
			"memcpy per block from the blocks' own addresses. 'copy_blocks alone': the same pairs through the kernel without the "+
			"manager (pairs' upload, launch, wait).", n),
		Columns: []string{"block", "direction", "swap GB/s", "copy_blocks alone GB/s", "one memcpy GB/s", "swap / one memcpy", "per-block memcpy GB/s", "swap / per-block"},
	}
	for _, layers := range []int{1, 4, 16} { // 16, 64 and 256 KiB blocks
		rows, err := swapRows(dev, layers, n)
		if err != nil {
			return nil, err
		}
		t.Rows = append(t.Rows, rows...)
	}
	return []Table{t}, nil
}

// mover copies between the arena and a host buffer of the same size: the yardsticks.
type mover interface {
	out(src vmm.Addr, off, n uint64) error // arena address to the buffer at off
	in(dst vmm.Addr, off, n uint64) error  // buffer at off to an arena address
	wait() error
	close() error
}

type cudaMover struct {
	ctx *cuda.Context
	buf cuda.HostPtr
}

func (c cudaMover) out(src vmm.Addr, off, n uint64) error {
	return c.ctx.MemcpyDtoHAsyncPinned(c.buf+cuda.HostPtr(off), cuda.DevicePtr(src), n, 0)
}
func (c cudaMover) in(dst vmm.Addr, off, n uint64) error {
	return c.ctx.MemcpyHtoDAsyncPinned(cuda.DevicePtr(dst), c.buf+cuda.HostPtr(off), n, 0)
}
func (c cudaMover) wait() error  { return c.ctx.StreamSynchronize(0) }
func (c cudaMover) close() error { return c.ctx.MemFreeHost(c.buf) }

type hostMover struct {
	dev vmm.Device
	buf []byte
}

func (h hostMover) out(src vmm.Addr, off, n uint64) error {
	return h.dev.CopyOut(h.buf[off:off+n], src)
}
func (h hostMover) in(dst vmm.Addr, off, n uint64) error { return h.dev.CopyIn(dst, h.buf[off:off+n]) }
func (hostMover) wait() error                            { return nil }
func (hostMover) close() error                           { return nil }

func newMover(dev vmm.Device, size uint64) (mover, error) {
	if cd, ok := dev.(*vmm.CUDADevice); ok {
		buf, err := cd.Context().MemAllocHost(size)
		if err != nil {
			return nil, err
		}
		return cudaMover{ctx: cd.Context(), buf: buf}, nil
	}
	return hostMover{dev: dev, buf: make([]byte, size)}, nil
}

// swapRows measures one block size: a manager with a 4,096-block host tier, its sequences
// interleaved with others that are freed, so the blocks lie scattered as a serving arena's do.
func swapRows(dev vmm.Device, layers, n int) ([][]string, error) {
	cfg := kvcache.Config{Layers: layers, KVHeads: 2, HeadDim: 128, ElemSize: 2, BlockTokens: 16,
		HostBlocks: swapBlocks, NoBackground: true}
	cfg.PageSize = 2 * uint64(layers) * dev.Info().Granularity // the default, set to size the arena
	cfg.Capacity = uint64(2*swapBlocks/cfg.BlocksPerPage()+2) * cfg.PageSize
	m, err := kvcache.New(dev, cfg)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	stride := m.Config().BlockStride()
	perSeq := swapBlocks / swapSeqs * m.Config().BlockTokens
	ids := make([]kvcache.SeqID, swapSeqs)
	for i := range swapSeqs {
		ids[i] = kvcache.SeqID(i)
		for _, s := range []kvcache.SeqID{ids[i], kvcache.SeqID(swapSeqs + i)} { // one kept, one freed
			if _, err := m.AppendTokens(s, perSeq/2, nil); err != nil {
				return nil, err
			}
		}
	}
	for i := range swapSeqs {
		if _, err := m.AppendTokens(ids[i], perSeq-perSeq/2, nil); err != nil {
			return nil, err
		}
		if err := m.FreeSequence(kvcache.SeqID(swapSeqs + i)); err != nil {
			return nil, err
		}
	}
	total := uint64(swapBlocks) * stride
	mv, err := newMover(dev, total)
	if err != nil {
		return nil, err
	}
	defer mv.close()
	base := m.BlockAddr(0, 0, 0)
	timeIt := func(f func() error) (sample, error) {
		var s sample
		for i := range n + 1 {
			t0 := time.Now()
			if err := f(); err != nil {
				return nil, err
			}
			if i > 0 {
				s = append(s, time.Since(t0))
			}
		}
		return s, nil
	}
	var outS, inS sample
	for i := range n + 1 {
		t0 := time.Now()
		sw, err := m.SwapOut(ids, 0)
		if err != nil {
			return nil, err
		}
		if err := sw.Wait(); err != nil {
			return nil, err
		}
		d := time.Since(t0)
		if err := sw.Close(); err != nil {
			return nil, err
		}
		t0 = time.Now()
		if sw, err = m.SwapIn(ids, 0); err != nil {
			return nil, err
		}
		if err := sw.Wait(); err != nil {
			return nil, err
		}
		if i > 0 {
			outS, inS = append(outS, d), append(inS, time.Since(t0))
		}
		if err := sw.Close(); err != nil {
			return nil, err
		}
	}
	var blocks []int32 // where the sequences' blocks are now: the per-block yardstick's addresses
	for _, id := range ids {
		if blocks, err = m.Blocks(id, blocks); err != nil {
			return nil, err
		}
	}
	oneOut, err := timeIt(func() error { return errors2(mv.out(base, 0, total), mv.wait()) })
	if err != nil {
		return nil, err
	}
	oneIn, err := timeIt(func() error { return errors2(mv.in(base, 0, total), mv.wait()) })
	if err != nil {
		return nil, err
	}
	perBlock := func(out bool) func() error {
		return func() error {
			for i, b := range blocks {
				a, off := base+vmm.Addr(uint64(b)*stride), uint64(i)*stride
				var err error
				if out {
					err = mv.out(a, off, stride)
				} else {
					err = mv.in(a, off, stride)
				}
				if err != nil {
					return err
				}
			}
			return mv.wait()
		}
	}
	// The copy alone: the same pairs through a kernels.Kernels of its own (the pairs' upload, one
	// launch, its wait), without the manager's bookkeeping. The host tier's blocks follow the
	// arena's, and are all free now.
	k, err := kernels.For(dev)
	if err != nil {
		return nil, err
	}
	defer k.Close()
	hostFirst := int64(m.Config().Capacity / stride)
	pairs := func(out bool) []int64 {
		p := make([]int64, 0, 2*len(blocks))
		for i, b := range blocks {
			if out {
				p = append(p, int64(b), hostFirst+int64(i))
			} else {
				p = append(p, hostFirst+int64(i), int64(b))
			}
		}
		return p
	}
	copyOnly := func(p []int64) func() error {
		return func() error { return errors2(k.CopyBlocks(0, base, p, stride), k.Synchronize(0)) }
	}
	kernOut, err := timeIt(copyOnly(pairs(true)))
	if err != nil {
		return nil, err
	}
	kernIn, err := timeIt(copyOnly(pairs(false)))
	if err != nil {
		return nil, err
	}
	perOut, err := timeIt(perBlock(true))
	if err != nil {
		return nil, err
	}
	perIn, err := timeIt(perBlock(false))
	if err != nil {
		return nil, err
	}
	gbs := func(d time.Duration) float64 { return float64(total) / d.Seconds() / 1e9 }
	row := func(dir string, swap, kern, one, per sample) []string {
		return []string{fmt.Sprintf("%d KiB", stride>>10), dir, fmt.Sprintf("%.1f", gbs(swap.p50())), fmt.Sprintf("%.1f", gbs(kern.p50())),
			fmt.Sprintf("%.1f", gbs(one.p50())),
			fmt.Sprintf("%.0f%%", 100*float64(one.p50())/float64(swap.p50())), fmt.Sprintf("%.2f", gbs(per.p50())),
			fmt.Sprintf("%.1fx", float64(per.p50())/float64(swap.p50()))}
	}
	return [][]string{row("out (device to host)", outS, kernOut, oneOut, perOut), row("in (host to device)", inS, kernIn, oneIn, perIn)}, nil
}

// errors2 returns the first of two errors.
func errors2(a, b error) error {
	if a != nil {
		return a
	}
	return b
}
