package kvcache

import (
	"fmt"
	"math"

	"github.com/pagedkv/pagedkv/internal/arena"
	"github.com/pagedkv/pagedkv/internal/checked"
	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/sequence"
	"github.com/pagedkv/pagedkv/vmm"
)

// TooSmallError reports memory too small for what it must hold; it matches ErrInvalidArgument.
type TooSmallError struct {
	What      string
	Size, Min uint64
}

// Error describes the failure with its numbers.
func (e *TooSmallError) Error() string {
	if e == nil {
		return "<nil>"
	}
	return fmt.Sprintf("invalid argument: %s of %d bytes is smaller than %d", e.What, e.Size, e.Min)
}

// Is reports whether target is ErrInvalidArgument.
func (e *TooSmallError) Is(target error) bool { return e != nil && target == ErrInvalidArgument }

// NewStatic returns a manager over memory it does not own: mem, handed in by the runtime, is
// laid out as whole pages of the arena from mem.Addr (the tail that is no whole page is not
// used). It has the same API as an elastic manager, with no VMM: every page is usable from the
// start, nothing is ever mapped or unmapped (compaction still packs blocks, but returns nothing),
// and Close frees nothing. mem.Addr must be 256-byte aligned, and mem must hold at least one
// page (a *TooSmallError otherwise). PageSize 0 means one block per page, or as many blocks per
// page as keep the arena within MaxPages. It is also the baseline elastic mode is measured
// against.
func NewStatic(dev vmm.Device, cfg Config, mem vmm.External) (*Manager, error) {
	if dev == nil {
		return nil, fmt.Errorf("kvcache: static memory: %w: nil device", ErrInvalidArgument)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.HostBlocks != 0 {
		return nil, &ConfigError{Field: "HostBlocks", Value: cfg.HostBlocks, Reason: "static memory has no host tier"}
	}
	if _, ok := checked.Add(uint64(mem.Addr), mem.Size); !ok {
		return nil, fmt.Errorf("kvcache: static memory: %w", &vmm.RangeError{Offset: uint64(mem.Addr), Size: mem.Size, Limit: math.MaxUint64})
	}
	stride := cfg.BlockStride()
	blocks := mem.Size / stride
	if blocks > MaxBlocks {
		return nil, &ConfigError{Field: "static memory size", Value: mem.Size,
			Reason: fmt.Sprintf("holds %d blocks of %d bytes; an arena holds at most %d", blocks, stride, MaxBlocks)}
	}
	if cfg.PageSize == 0 { // no mapping unit: the finest page that keeps the bookkeeping bounded
		cfg.PageSize = stride * max(1, (blocks+MaxPages-1)/MaxPages)
	}
	if mem.Size < cfg.PageSize {
		return nil, fmt.Errorf("kvcache: static memory: %w", &TooSmallError{What: "static memory", Size: mem.Size, Min: cfg.PageSize})
	}
	if pages := mem.Size / cfg.PageSize; pages > MaxPages {
		return nil, &ConfigError{Field: "PageSize", Value: cfg.PageSize,
			Reason: fmt.Sprintf("static memory of %d bytes makes %d pages, more than %d", mem.Size, pages, MaxPages)}
	}
	cfg.Capacity = mem.Size / cfg.PageSize * cfg.PageSize
	cfg.ReservePages, cfg.HighWatermark, cfg.NoBackground = 0, int(mem.Size/cfg.PageSize), true
	if mem.Addr%256 != 0 {
		return nil, fmt.Errorf("kvcache: static memory at %#x: %w: not 256-byte aligned", uint64(mem.Addr), ErrInvalidArgument)
	}
	m := newManagerOn(dev, cfg, &static{dev: dev, cfg: cfg, mem: mem}, int(mem.Size/cfg.PageSize))
	for p := range m.arena.Pages() {
		m.arena.TakeUnmapped()
		m.arena.MarkMapped(arena.Page(p))
	}
	close(m.done)
	m.startTiers()
	return m, nil
}

// static backs an arena with memory the runtime owns: every page is usable from the start, and
// nothing is mapped, unmapped or freed.
type static struct {
	dev  vmm.Device
	cfg  Config
	mem  vmm.External
	kern *kernels.Kernels
}

func (s *static) mapPage(arena.Page, bool) error {
	return &vmm.CapacityError{Need: s.cfg.PageSize, Free: 0} // every page is mapped already
}

func (s *static) unmapPage(arena.Page) error {
	return fmt.Errorf("kvcache: %w: static memory is never unmapped", ErrInvalidArgument)
}

func (s *static) returnsMemory() bool { return false }

func (s *static) copyBlock(dst, src sequence.Block) error {
	return copyBlock(s.dev, s.mem.Addr, s.cfg.BlockStride(), dst, src)
}

func (s *static) copyBlocks(st kernels.Stream, pairs []int64) error {
	return copyBlocks(&s.kern, s.dev, s.mem.Addr, s.cfg.BlockStride(), st, pairs)
}

func (s *static) copyAsync(st kernels.Stream, pairs []int64) ([]*kernels.Mark, error) {
	if err := launchCopy(&s.kern, s.dev, s.mem.Addr, s.cfg.BlockStride(), st, pairs); err != nil {
		return nil, err
	}
	mk, err := s.kern.Mark(st)
	if err != nil {
		return nil, err
	}
	return []*kernels.Mark{mk}, nil
}

// regions returns the runtime's memory whole, whatever run is asked for.
func (s *static) regions(dst []vmm.Region, _, _ arena.Page) []vmm.Region {
	return append(dst, s.mem.Regions()...)
}

func (s *static) shards() []Shard {
	return []Shard{{Device: s.dev, Base: s.mem.Addr, Layers: [2]int{0, s.cfg.Layers}, KVHeads: [2]int{0, s.cfg.KVHeads}, Config: s.cfg}}
}

func (s *static) headroom() (uint64, bool) { return 0, false }

func (s *static) scratchBytes() uint64 { return s.kern.ScratchBytes() }

func (s *static) check(mapped []arena.Page, _ int) []string {
	if n := int(s.cfg.Capacity / s.cfg.PageSize); len(mapped) != n {
		return []string{fmt.Sprintf("static memory: %d of %d pages mapped", len(mapped), n)}
	}
	return nil
}

func (s *static) close() error {
	if s.kern == nil {
		return nil
	}
	err := s.kern.Close()
	s.kern = nil
	return err
}
