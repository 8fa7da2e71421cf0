package kvcache

import (
	"fmt"

	"github.com/pagedkv/pagedkv/vmm"
)

// TooSmallError reports memory too small for what it must hold; it matches ErrInvalidArgument.
type TooSmallError struct {
	What      string
	Size, Min uint64
}

// Error describes the failure with its numbers.
func (e *TooSmallError) Error() string {
	return fmt.Sprintf("pagedkv: invalid argument: %s of %d bytes is smaller than %d", e.What, e.Size, e.Min)
}

// Is reports whether target is ErrInvalidArgument.
func (e *TooSmallError) Is(target error) bool { return target == ErrInvalidArgument }

// NewStatic returns a manager over memory it does not own: mem, handed in by the runtime, is
// laid out as whole pages of the arena from mem.Addr (the tail that is no whole page is not
// used). It has the same API as an elastic manager, with no VMM: every page is usable from the
// start, nothing is ever mapped or unmapped (compaction still packs blocks, but returns nothing),
// and Close frees nothing. mem.Addr must be 256-byte aligned, and mem must hold at least one
// page (a *TooSmallError otherwise). It is also the baseline elastic mode is measured against.
func NewStatic(dev vmm.Device, cfg Config, mem vmm.External) (*Manager, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.PageSize == 0 {
		cfg.PageSize = cfg.BlockStride() // no mapping unit: the finest page there is
	}
	cfg.Capacity = mem.Size / cfg.PageSize * cfg.PageSize
	cfg.ReservePages, cfg.HighWatermark, cfg.NoBackground = 0, int(mem.Size/cfg.PageSize), true
	if mem.Size < cfg.PageSize {
		return nil, fmt.Errorf("kvcache: static memory: %w", &TooSmallError{What: "static memory", Size: mem.Size, Min: cfg.PageSize})
	}
	if mem.Addr%256 != 0 {
		return nil, fmt.Errorf("kvcache: static memory at %#x: %w: not 256-byte aligned", uint64(mem.Addr), ErrInvalidArgument)
	}
	m := newManagerOn(dev, cfg, mem.Addr, int(mem.Size/cfg.PageSize))
	m.static = true
	m.external = mem
	for p := range m.arena.pages {
		m.arena.takeUnmapped()
		m.arena.markMapped(int32(p))
	}
	close(m.done)
	return m, nil
}
