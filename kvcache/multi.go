package kvcache

import (
	"errors"
	"fmt"

	"github.com/pagedkv/pagedkv/internal/arena"
	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/sequence"
	"github.com/pagedkv/pagedkv/vmm"
)

// Split says how a model's cache is divided across devices, as tensor and pipeline parallelism
// divide the model: each device holds KVHeads/TensorParallel of the KV heads of
// Layers/PipelineParallel of the layers, of every block. Device d is pipeline stage
// d/TensorParallel and tensor rank d%TensorParallel. The layers must divide evenly among the
// stages. The KV heads must divide evenly among the ranks (vLLM requires it), or be fewer and
// divide the ranks: then each rank holds a copy of one head, rank r head
// r*KVHeads/TensorParallel, as vLLM replicates an MLA latent or a few GQA heads. A
// recurrent-state arena divides each layer's state among the ranks: rank r holds bytes
// [r*StateBytes/TensorParallel, (r+1)*StateBytes/TensorParallel) of it, as vLLM divides the
// heads of Gated DeltaNet and Mamba layers. StateBytes must then be a multiple of
// 16*TensorParallel.
type Split struct {
	TensorParallel   int // devices the KV heads are divided among; 0 means 1
	PipelineParallel int // devices the layers are divided among; 0 means 1
}

// devices returns the number of devices the split needs.
func (s Split) devices() int { return max(s.TensorParallel, 1) * max(s.PipelineParallel, 1) }

// NewMulti returns one manager over several devices in lockstep: one block table, one set of
// sequences and one prefix cache, and on each device an arena laid out for its share of every
// block (Split). Growing maps a page index on every device, compaction launches copy_blocks on
// each (all launched before any is waited for), and any failure on one device rolls the others
// back, so the manager is as before. Shards gives
// each device's layer bases and strides for its kernels; the exported tables serve them all.
//
// Config describes the whole model (its Layers and KVHeads); each device's page is chosen as
// on one device, for its share, and every device must hold the same number of blocks per page.
// The manager's Config is every device's share together: PageSize and BlockStride are their
// sums, and KVHeads counts each rank's copy of a head where the heads are fewer than the ranks.
// Capacity and MemoryLimit count all devices together; 0 Capacity means 4x the smallest device's
// memory on each. The devices are borrowed and must be distinct.
func NewMulti(devs []vmm.Device, cfg Config, split Split) (*Manager, error) {
	m, err := newMulti(devs, cfg, split, nil, nil)
	if err != nil {
		return nil, fmt.Errorf("kvcache: %w", err)
	}
	return m, nil
}

// newMulti is NewMulti, its errors not yet prefixed with the package (a SharedPool's register
// names the package itself); join, if set, attaches each device's backing to its shared budget
// before the reserve goroutine starts, and page, if set, chooses each device's PageSize and
// BlockPadding for its share (a Hybrid's group), where NewMulti divides cfg.PageSize.
func newMulti(devs []vmm.Device, cfg Config, split Split, join func(m *Manager, d int, e *elastic) error, page sharePage) (*Manager, error) {
	tp, pp := max(split.TensorParallel, 1), max(split.PipelineParallel, 1)
	if split.TensorParallel < 0 || split.PipelineParallel < 0 || tp > len(devs) || pp > len(devs) || len(devs) != tp*pp {
		return nil, fmt.Errorf("new multi: %w: %d devices for a split of %d x %d", ErrInvalidArgument, len(devs), tp, pp)
	}
	seen := map[vmm.Device]bool{}
	for i, d := range devs {
		if d == nil || seen[d] {
			return nil, fmt.Errorf("new multi: %w: device %d is nil or repeated", ErrInvalidArgument, i)
		}
		seen[d] = true
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if len(cfg.Tiers) > 0 {
		return nil, &ConfigError{Field: "Tiers", Value: len(cfg.Tiers), Reason: "not supported across several devices yet (" + ErrNotSupported.Error() + ")"}
	}
	part, err := shareOf(cfg, split)
	if err != nil {
		return nil, err
	}
	n := len(devs)
	if err := part.Validate(); err != nil {
		return nil, fmt.Errorf("new multi: a device's share: %w", err)
	}
	parts := make([]Config, n)
	pages := 0
	for i, d := range devs {
		info := d.Info()
		c := part
		if page != nil {
			c, err = page(c, info.Granularity)
		}
		if err == nil {
			c, err = c.withDefaults(info.Granularity, info.TotalMemory)
		}
		if err != nil {
			return nil, fmt.Errorf("new multi: device %d: %w", i, err)
		}
		if c.BlocksPerPage() != parts[0].BlocksPerPage() && i > 0 {
			return nil, &ConfigError{Field: "PageSize", Value: c.PageSize,
				Reason: fmt.Sprintf("device %d holds %d blocks per page, device 0 %d: set PageSize", i, c.BlocksPerPage(), parts[0].BlocksPerPage())}
		}
		parts[i] = c
		if np := int(c.Capacity / c.PageSize); i == 0 || np < pages {
			pages = np
		}
	}
	back := &multi{}
	for i, d := range devs {
		c := parts[i]
		c.Capacity = uint64(pages) * c.PageSize
		e, err := newElastic(d, c)
		if err != nil {
			back.close()
			return nil, fmt.Errorf("new multi: device %d: %w", i, err)
		}
		stage, rank := i/tp, i%tp
		e.layers = [2]int{stage * c.Layers, (stage + 1) * c.Layers}
		e.heads = [2]int{0, 0} // a recurrent state has no heads
		if c.StateBytes == 0 {
			first := rank * cfg.KVHeads / tp // rank*KVHeads/tp heads, or the one head it copies
			e.heads = [2]int{first, first + c.KVHeads}
		}
		back.parts = append(back.parts, e)
	}
	m := newManagerOn(devs[0], wholeOf(parts[0], split, pages, cfg.MemoryLimit), back, pages)
	for d, e := range back.parts {
		if join == nil {
			break
		}
		if err := join(m, d, e); err != nil {
			back.close()
			return nil, err
		}
	}
	if m.cfg.NoBackground {
		close(m.done)
	} else {
		go m.reserveLoop()
		m.kick()
	}
	m.startTiers()
	return m, nil
}

// sharePage chooses the PageSize and BlockPadding of a device's share for its granularity.
type sharePage func(part Config, gran uint64) (Config, error)

// shareOf returns what one device holds of cfg divided by split (its page still cfg's divided
// among the devices): Layers/PipelineParallel layers and, by tensor rank, KVHeads/TensorParallel
// heads, one copied head where the heads are fewer than the ranks, or StateBytes/TensorParallel
// of each layer's state. Capacity counts all devices together, so each gets its part of it.
func shareOf(cfg Config, split Split) (Config, error) {
	tp, pp := max(split.TensorParallel, 1), max(split.PipelineParallel, 1)
	copied := cfg.StateBytes == 0 && cfg.KVHeads > 0 && cfg.KVHeads < tp && tp%cfg.KVHeads == 0
	if cfg.Layers%pp != 0 || cfg.StateBytes == 0 && cfg.KVHeads%tp != 0 && !copied {
		return cfg, &ConfigError{Field: "Split", Value: split,
			Reason: fmt.Sprintf("%d layers must divide evenly among %d stages, and %d KV heads among %d ranks (or divide %d)", cfg.Layers, pp, cfg.KVHeads, tp, tp)}
	}
	if cfg.StateBytes%(16*uint64(tp)) != 0 {
		return cfg, &ConfigError{Field: "StateBytes", Value: cfg.StateBytes,
			Reason: fmt.Sprintf("a state divided among %d tensor-parallel ranks must be a multiple of %d bytes", tp, 16*tp)}
	}
	n := uint64(tp * pp)
	part := cfg
	part.Layers, part.KVHeads, part.StateBytes = cfg.Layers/pp, cfg.KVHeads/tp, cfg.StateBytes/uint64(tp)
	if copied {
		part.KVHeads = 1
	}
	part.Capacity, part.MemoryLimit, part.PageSize = cfg.Capacity/n, 0, cfg.PageSize/n
	return part, nil
}

// wholeOf returns the manager's Config over every device's share (part being each one's, with
// defaults): every device's page of one index together, and every device's block, so that
// BlocksPerPage is each device's and BlockStride the bytes one block takes on all devices.
// KVHeads counts each copy of a head a rank holds.
func wholeOf(part Config, split Split, pages int, limit uint64) Config {
	tp, pp := max(split.TensorParallel, 1), max(split.PipelineParallel, 1)
	n := uint64(tp * pp)
	g := part
	g.Layers, g.KVHeads, g.StateBytes = part.Layers*pp, part.KVHeads*tp, part.StateBytes*uint64(tp)
	g.BlockPadding, g.PageSize = part.BlockPadding*n, part.PageSize*n
	g.Capacity, g.MemoryLimit = uint64(pages)*g.PageSize, limit
	return g
}

// multi backs an arena on several devices in lockstep: every page index is mapped on all of
// them or none, every block copied on each. Each device is an elastic backing for its share.
//
// The driver calls of the devices are made one device after the other. Measured on two H200s
// (docs/performance.md), growing both by a 128 MiB page index took 2.2-2.35x one device that
// way, and 2.5-2.9x with a goroutine per device or a worker goroutine locked to an OS thread
// per device: in this process the calls did not overlap, and handing them to other threads
// only added to them. Copies are launched on every device before waiting for any, so kernels do
// run at once.
type multi struct {
	parts []*elastic
}

// each runs fn for every device and returns the errors by device (nil where it succeeded).
func (mb *multi) each(fn func(i int, e *elastic) error) []error {
	errs := make([]error, len(mb.parts))
	for i, e := range mb.parts {
		errs[i] = fn(i, e)
	}
	return errs
}

// undo runs back for every device where errs says the call succeeded, when it failed on any;
// it returns the joined errors, device by device, with those of the undoing.
func (mb *multi) undo(what string, errs []error, back func(e *elastic) error) error {
	failed := false
	for _, err := range errs {
		failed = failed || err != nil
	}
	if !failed {
		return nil
	}
	var all []error
	for i, err := range errs {
		if err != nil {
			all = append(all, mb.onDevice(what, i, err))
		} else if uerr := back(mb.parts[i]); uerr != nil {
			all = append(all, fmt.Errorf("undo %s on device %d: %w", what, i, uerr))
		}
	}
	return errors.Join(all...)
}

// onDevice names device i in its error err of the call what (none where err names it).
func (mb *multi) onDevice(what string, i int, err error) error {
	if what == "" {
		return fmt.Errorf("device %d (%s): %w", i, mb.parts[i].dev.Info().Name, err)
	}
	return fmt.Errorf("%s on device %d (%s): %w", what, i, mb.parts[i].dev.Info().Name, err)
}

// joined returns the errors of the call what, by device, each naming its device (nil when
// every device succeeded).
func (mb *multi) joined(what string, errs []error) error {
	var all []error
	for i, err := range errs {
		if err != nil {
			all = append(all, mb.onDevice(what, i, err))
		}
	}
	return errors.Join(all...)
}

func (mb *multi) mapPage(p arena.Page, reclaim bool) error {
	errs := mb.each(func(_ int, e *elastic) error { return e.mapPage(p, reclaim) })
	return mb.undo("map", errs, func(e *elastic) error { return e.unmapPage(p) })
}

// unmapPage unmaps p on every device before any budget gets its bytes back: undoing a failure
// maps p again on the others, which their budgets would refuse once the bytes were released
// and the limit is below what the models hold (SetLimit).
func (mb *multi) unmapPage(p arena.Page) error {
	errs := mb.each(func(_ int, e *elastic) error { return e.pool.Unmap(uint64(p)*e.cfg.PageSize, e.cfg.PageSize) })
	err := mb.undo("unmap", errs, func(e *elastic) error {
		_, err := e.pool.Map(uint64(p)*e.cfg.PageSize, e.cfg.PageSize)
		return err
	})
	if err != nil {
		return err
	}
	for _, e := range mb.parts {
		e.releasePage()
	}
	return nil
}

func (mb *multi) returnsMemory() bool { return true }

func (mb *multi) copyBlock(dst, src sequence.Block) error {
	return mb.joined("copy", mb.each(func(_ int, e *elastic) error { return e.copyBlock(dst, src) }))
}

// copyBlocks launches on every device, then waits for each, so the copies run at once. If any
// fails, nothing is undone: the copies only wrote blocks that are free until the manager
// commits the moves, which it does not then.
func (mb *multi) copyBlocks(s kernels.Stream, pairs []int64) error {
	errs := mb.each(func(_ int, e *elastic) error { return e.launchCopy(s, pairs) })
	for i, e := range mb.parts {
		if errs[i] == nil {
			errs[i] = e.kern.Synchronize(s)
		}
	}
	return mb.joined("copy", errs)
}

func (mb *multi) copyAsync(s kernels.Stream, pairs []int64) ([]*kernels.Mark, error) {
	var marks []*kernels.Mark
	var errs []error
	for _, e := range mb.parts {
		mk, err := e.copyAsync(s, pairs)
		marks, errs = append(marks, mk...), append(errs, err)
	}
	if err := mb.joined("copy", errs); err != nil {
		for _, mk := range marks { // the caller frees the blocks once the queued copies are done
			_ = mk.Wait()
			mk.Close()
		}
		return nil, err
	}
	return marks, nil
}

func (mb *multi) regions(dst []vmm.Region, first, n arena.Page) []vmm.Region {
	for _, e := range mb.parts {
		dst = e.regions(dst, first, n)
	}
	return dst
}

func (mb *multi) shards() []Shard {
	out := make([]Shard, 0, len(mb.parts))
	for _, e := range mb.parts {
		out = append(out, e.shards()...)
	}
	return out
}

// headroom is that of the device with the least, scaled to a page index across all of them.
func (mb *multi) headroom() (uint64, bool) {
	least, any := uint64(0), false
	for _, e := range mb.parts {
		if h, ok := e.headroom(); ok && (!any || h/e.cfg.PageSize < least) {
			least, any = h/e.cfg.PageSize, true
		}
	}
	return least * mb.parts[0].cfg.PageSize * uint64(len(mb.parts)), any
}

func (mb *multi) scratchBytes() uint64 {
	n := uint64(0)
	for _, e := range mb.parts {
		n += e.scratchBytes()
	}
	return n
}

func (mb *multi) check(mapped []arena.Page, inflight int) []string {
	var bad []string
	for _, e := range mb.parts {
		bad = append(bad, e.check(mapped, inflight)...)
	}
	return bad
}

func (mb *multi) close() error {
	return mb.joined("", mb.each(func(_ int, e *elastic) error { return e.close() }))
}
