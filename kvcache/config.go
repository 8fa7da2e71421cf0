package kvcache

import (
	"fmt"

	"github.com/pagedkv/pagedkv/vmm"
)

// Config is a manager's model geometry and arena settings. It is pure data: Validate checks it
// and the Block*/Page*/Addr methods derive the layout; binding to a device happens in New.
//
// # Arena layout
//
// Block b holds, for every layer l and for K (kv=0) and V (kv=1), BlockTokens tokens of
// KVHeads*HeadDim elements in NHD order ([block_size, num_kv_heads, head_dim]). All of a
// block's data is contiguous, layers and K|V interleaved:
//
//	Addr(l, kv, b) = base + b*BlockStride() + (2*l + kv)*BlockBytes()
//	BlockStride()  = 2 * Layers * BlockBytes()
//
// So each layer sees the usual per-layer [num_blocks, block_size, num_kv_heads, head_dim] view,
// with a per-layer base LayerBase(l, kv) = base + (2l+kv)*BlockBytes() and a block stride of
// BlockStride() common to every layer; block ids are the same for every layer. A page of
// PageSize bytes holds BlocksPerPage() whole blocks of every layer, so ONE driver mapping grows
// every layer's K and V by one page index (see ../shared/FACTS.md: 31x cheaper than mapping 64
// per-layer granules for a 32-layer model). Copying a block between ids is one contiguous copy
// of BlockStride() bytes.
type Config struct {
	Layers      int // transformer layers
	KVHeads     int // key/value heads per layer
	HeadDim     int // elements per head
	ElemSize    int // bytes per element (2 for fp16/bf16)
	BlockTokens int // tokens per block (vLLM's block_size)

	// Capacity is the virtual size of the arena in bytes; 0 means 4x the device's memory. It
	// costs no physical memory.
	Capacity uint64
	// PageSize is the mapping unit in bytes; 0 means 2*Layers*granularity (one granule per layer
	// and K|V, as a per-layer allocator would map). It must be a multiple of the device
	// granularity and of BlockStride().
	PageSize uint64
	// ReservePages is how many mapped, entirely free pages a background goroutine keeps ready, so
	// that an AppendTokens crossing into a new page finds one without waiting for the driver.
	// 0 means 1; negative means none.
	ReservePages int
	// HighWatermark is how many entirely free pages stay mapped (reused with no driver call);
	// beyond it free pages are unmapped from the top of the arena. 0 means 2*ReservePages+2.
	HighWatermark int
	// MemoryLimit bounds the bytes of mapped pages; 0 means no bound but the device's memory.
	MemoryLimit uint64
	// NoBackground turns the reserve goroutine off: pages are mapped when an append needs one and
	// the watermarks are applied by Settle. For deterministic tests and single-threaded use.
	NoBackground bool
}

// Validate checks the geometry; the error matches vmm.ErrInvalidArgument.
func (c Config) Validate() error {
	for _, f := range []struct {
		name string
		v    int
	}{{"Layers", c.Layers}, {"KVHeads", c.KVHeads}, {"HeadDim", c.HeadDim}, {"ElemSize", c.ElemSize}, {"BlockTokens", c.BlockTokens}} {
		if f.v <= 0 {
			return fmt.Errorf("kvcache config: %w: %s = %d must be positive", ErrInvalidArgument, f.name, f.v)
		}
	}
	if c.PageSize != 0 && c.PageSize%c.BlockStride() != 0 {
		return fmt.Errorf("kvcache config: %w", &vmm.AlignmentError{What: "page size", Value: c.PageSize, Align: c.BlockStride()})
	}
	if c.HighWatermark < 0 {
		return fmt.Errorf("kvcache config: %w: HighWatermark = %d", ErrInvalidArgument, c.HighWatermark)
	}
	return nil
}

// withDefaults fills the zero settings for a device of the given granularity and memory.
func (c Config) withDefaults(gran, devMem uint64) (Config, error) {
	if c.PageSize == 0 {
		c.PageSize = 2 * uint64(c.Layers) * gran
		if c.PageSize%c.BlockStride() != 0 {
			return c, fmt.Errorf("kvcache config: %w: the default page size %d holds no whole number of %d-byte blocks; set PageSize",
				ErrInvalidArgument, c.PageSize, c.BlockStride())
		}
	}
	if c.PageSize%gran != 0 {
		return c, fmt.Errorf("kvcache config: %w", &vmm.AlignmentError{What: "page size", Value: c.PageSize, Align: gran})
	}
	if c.Capacity == 0 {
		c.Capacity = 4 * devMem
	}
	c.Capacity = (c.Capacity + c.PageSize - 1) / c.PageSize * c.PageSize
	switch {
	case c.ReservePages == 0:
		c.ReservePages = 1
	case c.ReservePages < 0:
		c.ReservePages = 0
	}
	if c.HighWatermark == 0 {
		c.HighWatermark = 2*c.ReservePages + 2
	}
	if c.HighWatermark < c.ReservePages {
		c.HighWatermark = c.ReservePages
	}
	return c, nil
}

// TokenBytes returns the bytes of one token's K (or V) in one layer.
func (c Config) TokenBytes() uint64 { return uint64(c.KVHeads * c.HeadDim * c.ElemSize) }

// BlockBytes returns the bytes of one block's K (or V) in one layer.
func (c Config) BlockBytes() uint64 { return uint64(c.BlockTokens) * c.TokenBytes() }

// BlockStride returns the distance between consecutive blocks: all layers' K and V of one block.
func (c Config) BlockStride() uint64 { return 2 * uint64(c.Layers) * c.BlockBytes() }

// BlocksPerPage returns how many blocks one page holds (PageSize must be set).
func (c Config) BlocksPerPage() int { return int(c.PageSize / c.BlockStride()) }

// LayerOffset returns the offset of layer l's K (kv=0) or V (kv=1) within every block.
func (c Config) LayerOffset(layer, kv int) uint64 { return uint64(2*layer+kv) * c.BlockBytes() }

// Offset returns the arena offset of layer l's K or V of block b.
func (c Config) Offset(layer, kv int, block int32) uint64 {
	return uint64(block)*c.BlockStride() + c.LayerOffset(layer, kv)
}
