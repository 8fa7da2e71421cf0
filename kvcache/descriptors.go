package kvcache

import (
	"github.com/pagedkv/pagedkv/vmm"

	"github.com/pagedkv/pagedkv/internal/arena"
)

// Layout says where block b of layer l lives inside the regions a manager lists, for transfer
// engines that move blocks by address (NIXL, RDMA).
type Layout struct {
	Base        vmm.Addr // arena base: block 0, layer 0, K
	BlockStride uint64   // distance between consecutive block ids
	BlockBytes  uint64   // one layer's K (or V) of one block
	TokenBytes  uint64   // one token's K (or V) in one layer
	Layers      int
	BlockTokens int
	// Blocks is the arena's size in blocks: every block id of the manager is below it. Pass it
	// as kernels.KVWrite.Blocks and kernels.Attention.Blocks, so that a bad slot or table entry
	// never reaches memory outside the arena.
	Blocks int
}

// Addr returns the address of layer l's K (kv=0) or V (kv=1) of block b. Its arithmetic is
// unchecked, like unsafe.Add (see Config.LayerOffset).
func (l Layout) Addr(layer, kv int, block int32) vmm.Addr {
	return l.Base + vmm.Addr(uint64(block)*l.BlockStride+uint64(2*layer+kv)*l.BlockBytes)
}

// Layout returns the manager's block layout (the zero Layout for a nil manager; on several
// devices the first device's: Shards gives each device's).
func (m *Manager) Layout() Layout {
	if !m.made() {
		return Layout{}
	}
	g := m.geom
	return Layout{
		Base: m.base, BlockStride: g.BlockStride(), BlockBytes: g.BlockBytes(),
		TokenBytes: g.TokenBytes(), Layers: g.Layers, BlockTokens: g.BlockTokens,
		Blocks: m.arena.Pages() * m.bpp,
	}
}

// Regions appends to dst the memory the manager's blocks live in, as registrable regions: each
// maximal run of mapped pages for an elastic manager (which changes as pages are mapped and
// unmapped: compare MapGeneration to know when to register again), the external memory for a
// static one.
func (m *Manager) Regions(dst []vmm.Region) []vmm.Region {
	if !m.made() {
		return dst
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.static {
		return m.back.regions(dst, 0, arena.Page(m.arena.Pages()))
	}
	start := arena.Page(-1)
	flush := func(end arena.Page) {
		if start >= 0 {
			dst = m.back.regions(dst, start, end-start)
			start = -1
		}
	}
	for p := range arena.Page(m.arena.Pages()) {
		mapped := m.arena.State(p) >= arena.Free
		if mapped && start < 0 {
			start = p
		} else if !mapped {
			flush(p)
		}
	}
	flush(arena.Page(m.arena.Pages()))
	return dst
}

// MapGeneration counts the pages mapped and unmapped so far: when it changes, the regions have.
func (m *Manager) MapGeneration() uint64 {
	if !m.made() {
		return 0
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.arena.Gen()
}
