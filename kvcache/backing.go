package kvcache

import (
	"github.com/pagedkv/pagedkv/internal/arena"
	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/sequence"
	"github.com/pagedkv/pagedkv/vmm"
)

// backing is the memory behind a manager's arena: what maps and unmaps its page indexes and
// copies its blocks. The manager's bookkeeping (arena, sequences, prefix cache) knows nothing
// of devices and asks its backing; each kind lives in its own file:
//
//   - elastic (elastic.go): one device, pages mapped on demand through a vmm.Pool, optionally
//     drawing on a shared vmm.Budget;
//   - static (static.go): memory the runtime owns, every page usable from the start;
//   - multi (multi.go): several devices in lockstep, each holding its share of every block
//     (heads or layers), every call made on all of them at once, all or nothing.
//
// The manager calls mapPage and unmapPage with its lock held or, from the reserve goroutine,
// with the page marked in flight and the lock released; the other methods with its lock held.
type backing interface {
	// mapPage backs page p with memory on every device, all or nothing. With reclaim, a shared
	// budget may take memory back from other models; without, only its headroom is used. A
	// backing that cannot map (static memory) returns a *vmm.CapacityError.
	mapPage(p arena.Page, reclaim bool) error
	// unmapPage returns page p's memory on every device, all or nothing.
	unmapPage(p arena.Page) error
	// returnsMemory reports whether pages come and go (false for static memory).
	returnsMemory() bool
	// copyBlock copies block src to block dst on every device, synchronously (copy on write).
	copyBlock(dst, src sequence.Block) error
	// copyBlocks copies (src, dst) block pairs with one launch per device on stream s, and waits.
	copyBlocks(s kernels.Stream, pairs []int64) error
	// copyAsync queues the copy of (src, dst) block pairs with one launch per device on stream
	// s, and returns a mark per device to wait on.
	copyAsync(s kernels.Stream, pairs []int64) ([]*kernels.Mark, error)
	// regions appends the memory of pages [first, first+n), all mapped, as registrable regions.
	regions(dst []vmm.Region, first, n arena.Page) []vmm.Region
	// shards describes each device's share, in device order.
	shards() []Shard
	// headroom returns the bytes the shared budget would let it map now without reclaiming,
	// counted for one page index across its devices (ok false when there is no budget).
	headroom() (bytes uint64, ok bool)
	// scratchBytes returns device memory held beside the arena (kernels' staging).
	scratchBytes() uint64
	// check reports every way the backing disagrees with the arena, which has exactly the pages
	// in mapped mapped and inflight pages in flight.
	check(mapped []arena.Page, inflight int) []string
	// close returns every page, and every other resource, to the devices. After it failed it
	// may be called again, and tries what it could not return.
	close() error
}

// Shard is one device's share of the cache: its device, its arena's base, the layers and KV
// heads it holds, and its geometry. Block ids are the same on every shard; a block's K or V of
// layer l is at Base + b*Config.BlockStride() + Config.LayerOffset(l-Layers[0], kv) on the shard
// holding l, for its heads [KVHeads[0], KVHeads[1]). A single-device manager has one shard
// holding everything.
type Shard struct {
	Device vmm.Device
	Base   vmm.Addr
	// Layers is [first, end) of the model's layers; in a Hybrid's group, of the group's own
	// layer list (LayerGroup.Layers), not the model's layer numbers.
	Layers [2]int
	// KVHeads is [first, end) of the model's KV heads. Ranks that hold a copy of one head (fewer
	// heads than ranks) both name it; a recurrent state has none (Split divides its bytes).
	KVHeads [2]int
	// Config is the shard's own geometry: Layers and KVHeads are its counts, PageSize its page
	// (one page index across all shards is PageSize on each), Capacity its reservation.
	Config Config
}

// LayerBase returns the base of model layer l's K (kv=0) or V (kv=1) view on this shard. Like
// Manager.LayerBase it is unchecked arithmetic (see Config.LayerOffset): l must lie in Layers.
func (s Shard) LayerBase(layer, kv int) vmm.Addr {
	return s.Base + vmm.Addr(s.Config.LayerOffset(layer-s.Layers[0], kv))
}

// BlockAddr returns the address of model layer l's K or V of block b on this shard
// (unchecked, like LayerBase).
func (s Shard) BlockAddr(layer, kv int, block int32) vmm.Addr {
	return s.Base + vmm.Addr(s.Config.Offset(layer-s.Layers[0], kv, block))
}
