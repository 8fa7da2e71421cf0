package kvcache

import (
	"errors"
	"fmt"

	"github.com/pagedkv/pagedkv/internal/arena"
	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/sequence"
	"github.com/pagedkv/pagedkv/vmm"
)

// elastic backs an arena on one device with a vmm.Pool: a virtual reservation whose pages are
// mapped on demand, each page index one driver mapping that grows every layer the device
// holds. In a SharedPool each page is first acquired from the budget.
type elastic struct {
	dev           vmm.Device
	cfg           Config // this device's geometry, defaults filled
	pool          *vmm.Pool
	member        account          // set when the manager belongs to a SharedPool
	compactOthers bool             // reclaim by compacting other models when the budget is spent
	kern          *kernels.Kernels // loaded by the first copyBlocks
	layers, heads [2]int
	hostPages     int // pages of pinned host memory after the arena's: the host tier
	closed        bool
}

// newElastic reserves the arena of cfg (defaults filled) on dev, and maps its host tier
// (cfg.HostBlocks, in whole pages) right after the arena's pages as one mapping, so that host
// blocks have block ids past the device's and copy_blocks reaches them with the same base and
// stride.
func newElastic(dev vmm.Device, cfg Config) (*elastic, error) {
	host := hostPagesOf(cfg)
	pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: cfg.Capacity + uint64(host)*cfg.PageSize, PageSize: cfg.PageSize})
	if err != nil {
		return nil, fmt.Errorf("kvcache: %w", err)
	}
	if host > 0 {
		if _, err := pool.MapHost(cfg.Capacity, uint64(host)*cfg.PageSize); err != nil {
			pool.Close()
			return nil, fmt.Errorf("kvcache: host tier of %d blocks: %w", cfg.HostBlocks, err)
		}
	}
	return &elastic{dev: dev, cfg: cfg, pool: pool, layers: [2]int{0, cfg.Layers}, heads: [2]int{0, cfg.KVHeads}, hostPages: host}, nil
}

// hostPagesOf returns the pages the host tier of cfg takes.
func hostPagesOf(cfg Config) int {
	bpp := cfg.BlocksPerPage()
	return (cfg.HostBlocks + bpp - 1) / bpp
}

func (e *elastic) mapPage(p arena.Page, reclaim bool) error {
	page := e.cfg.PageSize
	if e.member != nil {
		var err error
		if reclaim {
			err = e.member.Acquire(page, e.compactOthers)
		} else {
			err = e.member.TryAcquire(page)
		}
		if err != nil {
			return err
		}
	}
	if _, err := e.pool.Map(uint64(p)*page, page); err != nil {
		if e.member != nil {
			e.member.Release(page)
		}
		return err
	}
	return nil
}

func (e *elastic) unmapPage(p arena.Page) error {
	if err := e.pool.Unmap(uint64(p)*e.cfg.PageSize, e.cfg.PageSize); err != nil {
		return err
	}
	e.releasePage()
	return nil
}

// releasePage gives the budget back the bytes of a page just unmapped.
func (e *elastic) releasePage() {
	if e.member != nil {
		e.member.Release(e.cfg.PageSize)
	}
}

func (e *elastic) returnsMemory() bool { return true }

func (e *elastic) copyBlock(dst, src sequence.Block) error {
	return copyBlock(e.dev, e.pool.Base(), e.cfg.BlockStride(), dst, src)
}

// copyBlock copies one block of a device's arena at base, synchronously.
func copyBlock(dev vmm.Device, base vmm.Addr, stride uint64, dst, src sequence.Block) error {
	return dev.Copy(base+vmm.Addr(uint64(dst)*stride), base+vmm.Addr(uint64(src)*stride), stride)
}

func (e *elastic) copyAsync(s kernels.Stream, pairs []int64) ([]*kernels.Mark, error) {
	if err := e.launchCopy(s, pairs); err != nil {
		return nil, err
	}
	mk, err := e.kern.Mark(s)
	if err != nil {
		_ = e.kern.Synchronize(s) // the copy is queued: the caller frees its blocks once it is done
		return nil, err
	}
	return []*kernels.Mark{mk}, nil
}

func (e *elastic) copyBlocks(s kernels.Stream, pairs []int64) error {
	return copyBlocks(&e.kern, e.dev, e.pool.Base(), e.cfg.BlockStride(), s, pairs)
}

// launchCopy queues the copy of the pairs on s without waiting (e.kern is loaded then).
func (e *elastic) launchCopy(s kernels.Stream, pairs []int64) error {
	return launchCopy(&e.kern, e.dev, e.pool.Base(), e.cfg.BlockStride(), s, pairs)
}

// copyBlocks copies the pairs of a device's arena with one launch and waits for it.
func copyBlocks(kern **kernels.Kernels, dev vmm.Device, base vmm.Addr, stride uint64, s kernels.Stream, pairs []int64) error {
	if err := launchCopy(kern, dev, base, stride, s, pairs); err != nil {
		return err
	}
	return (*kern).Synchronize(s)
}

// launchCopy loads *kern on first use and queues the copy of the pairs with one launch.
func launchCopy(kern **kernels.Kernels, dev vmm.Device, base vmm.Addr, stride uint64, s kernels.Stream, pairs []int64) error {
	if *kern == nil {
		k, err := kernels.For(dev)
		if err != nil {
			return err
		}
		*kern = k
	}
	return (*kern).CopyBlocks(s, base, pairs, stride)
}

func (e *elastic) regions(dst []vmm.Region, first, n arena.Page) []vmm.Region {
	info := e.dev.Info()
	return append(dst, vmm.Region{
		Addr: e.pool.Base() + vmm.Addr(uint64(first)*e.cfg.PageSize), Len: uint64(n) * e.cfg.PageSize,
		DeviceID: info.Ordinal, Kind: info.Kind,
	})
}

func (e *elastic) shards() []Shard {
	return []Shard{{Device: e.dev, Base: e.pool.Base(), Layers: e.layers, KVHeads: e.heads, Config: e.cfg}}
}

func (e *elastic) headroom() (uint64, bool) {
	if e.member == nil {
		return 0, false
	}
	return e.member.Headroom(), true
}

func (e *elastic) scratchBytes() uint64 { return e.kern.ScratchBytes() }

func (e *elastic) check(mapped []arena.Page, inflight int) []string {
	var bad []string
	want := make(map[arena.Page]bool, len(mapped))
	for _, p := range mapped {
		want[p] = true
		if !e.pool.IsMapped(uint64(p)*e.cfg.PageSize, e.cfg.PageSize) {
			bad = append(bad, fmt.Sprintf("%s: page %d is mapped in the arena, not in the pool", e.dev.Info().Name, p))
		}
	}
	if n := e.pool.Stats().MappedPages - e.hostPages; n != len(mapped) {
		bad = append(bad, fmt.Sprintf("%s: the pool has %d pages mapped, the arena %d", e.dev.Info().Name, n, len(mapped)))
	}
	if e.hostPages > 0 && !e.pool.IsMapped(e.cfg.Capacity, uint64(e.hostPages)*e.cfg.PageSize) {
		bad = append(bad, fmt.Sprintf("%s: the host tier is not mapped", e.dev.Info().Name))
	}
	if e.member != nil && e.member.Used() != uint64(len(mapped)+inflight)*e.cfg.PageSize {
		bad = append(bad, fmt.Sprintf("%s: budget member holds %d bytes for %d mapped pages", e.dev.Info().Name, e.member.Used(), len(mapped)))
	}
	return bad
}

// close returns everything; it may be called again after it failed. A pool that could not
// unmap every page stays open around them, and the budget keeps counting them: they are still
// mapped, and another model mapping their bytes would pass the limit. The next close tries them
// again, and only a pool closed whole leaves the budget.
func (e *elastic) close() error {
	if e.closed {
		return nil
	}
	var errs []error
	if e.kern != nil {
		errs = append(errs, e.kern.Close())
		e.kern = nil
	}
	if err := e.pool.Close(); err != nil {
		if e.member != nil {
			if held, used := e.mappedBytes(), e.member.Used(); used > held {
				e.member.Release(used - held)
			}
		}
		return errors.Join(append(errs, err)...)
	}
	e.closed = true
	if e.member != nil {
		e.member.Leave()
	}
	return errors.Join(errs...)
}

// mappedBytes returns the bytes of the arena's pages the pool has mapped, the host tier left out.
func (e *elastic) mappedBytes() uint64 {
	pages := e.pool.Stats().MappedPages
	if e.hostPages > 0 && e.pool.IsMapped(e.cfg.Capacity, uint64(e.hostPages)*e.cfg.PageSize) {
		pages -= e.hostPages
	}
	return uint64(pages) * e.cfg.PageSize
}
