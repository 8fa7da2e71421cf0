package kvcache

import (
	"github.com/pagedkv/pagedkv/internal/keyindex"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/sequence"
)

// hostTier is the bookkeeping of the host tier's blocks. Its block ids are [first, first+n),
// past the arena's device blocks, in the pages the backing maps with pinned host memory after
// the arena's. A host block is free, held by swapped-out sequences (refs counts them), or holds
// a cached block's content (an entry in cache, by last use). It knows nothing of memory. Not
// safe for concurrent use.
//
// The swap slots (Config.HostSwapBlocks) keep the cache from the blocks swaps need. The swap
// slots not in use are swapSlots - swapped, at least 0. The cache takes a free block only while
// more blocks are free than that, and otherwise evicts its own least recently used. So the
// cache holds at most n - swapSlots blocks, and a swap of up to swapSlots - swapped blocks
// always finds them free. A swap takes free blocks first, then the cache's least recently used
// idle ones: the cache never keeps a block a swap needs. Two counters keep this O(1) per block.
// hostSlot is a block of the host tier (sequence.HostSlot): numbered after the arena's blocks,
// as the copy kernels address both, but never taken for a device block id. The host cache's
// keyindex is typed by it, so its entries hold host slots, never device blocks.
type hostSlot = sequence.HostSlot

// slot returns the host slot a host cache entry names.
func slot(e *keyindex.Entry[hostSlot]) hostSlot { return e.Block }

type hostTier struct {
	first     hostSlot                  // the first slot: slots are numbered after the arena's blocks
	n         int                       // the tier's slots: [first, first+n)
	refs      []int32                   // by slot - first, for the slots below first+len(refs), the ones ever taken
	free      []hostSlot                // the free slots ever taken; those from first+len(refs) on are free too, and taken after these
	cache     *keyindex.Index[hostSlot] // host blocks holding cached content, least recently used first: idle, or held while the tiers read them
	swapSlots int                       // host blocks the cache never takes (Config.HostSwapBlocks)
	swapped   int                       // host blocks held by swapped-out sequences (refs > 0)

	// what reserve took, until commit or abort
	taken   []hostSlot
	evicted []keyindex.Removed[hostSlot]
	nfree   int // of taken, the first nfree came from the free list
}

// newHostTier returns a tier of n slots from first. Its memory grows with the slots taken,
// not with n: a tier sized for the host's whole memory costs nothing until it is used.
func newHostTier(first int32, n, swapSlots int) *hostTier {
	return &hostTier{first: hostSlot(first), n: n, cache: keyindex.NewIndex[hostSlot](), swapSlots: swapSlots}
}

// freeLen returns how many slots are free: those freed, and those never taken.
func (h *hostTier) freeLen() int { return len(h.free) + h.n - len(h.refs) }

// takeFree takes a free slot (freeLen() > 0): a freed one first, the lowest never taken else.
func (h *hostTier) takeFree() hostSlot {
	if n := len(h.free); n > 0 {
		b := h.free[n-1]
		h.free = h.free[:n-1]
		return b
	}
	h.refs = append(h.refs, 0)
	return h.first + hostSlot(len(h.refs)-1)
}

// has reports whether b is one of the tier's slots.
func (h *hostTier) has(b hostSlot) bool {
	return h != nil && b >= h.first && int64(b) < int64(h.first)+int64(h.n)
}

// unref drops one holder of host block b, freeing it at none.
func (h *hostTier) unref(b hostSlot) {
	if h.refs[b-h.first]--; h.refs[b-h.first] == 0 {
		h.free = append(h.free, b)
		h.swapped--
	}
}

// refsOf returns how many sequences hold host block b.
func (h *hostTier) refsOf(b hostSlot) int32 {
	if int(b-h.first) >= len(h.refs) {
		return 0 // never taken
	}
	return h.refs[b-h.first]
}

// blocks returns the host tier's blocks; freeBlocks how many are free; swappedBlocks how many
// swapped-out sequences hold.
func (h *hostTier) blocks() int {
	if h == nil {
		return 0
	}
	return h.n
}

func (h *hostTier) freeBlocks() int {
	if h == nil {
		return 0
	}
	return h.freeLen()
}

func (h *hostTier) swappedBlocks() int {
	if h == nil {
		return 0
	}
	return h.swapped
}

// swapRoom returns how many blocks reserveSwap can take: the free ones and the cache's idle
// ones.
func (h *hostTier) swapRoom() int {
	if h == nil {
		return 0
	}
	return h.freeLen() + h.cache.IdleLen()
}

// cacheRoom returns how many blocks reserveCache can take: the free ones beyond the swap slots
// not in use, and the cache's idle ones.
func (h *hostTier) cacheRoom() int { return h.cacheFree() + h.cache.IdleLen() }

// cacheFree returns how many free blocks the cache may take.
func (h *hostTier) cacheFree() int {
	return max(0, h.freeLen()-max(0, h.swapSlots-h.swapped))
}

// reserveSwap takes n host blocks (n <= swapRoom()) for a swap into h.taken: free ones first,
// then the cache's least recently used. reserveCache takes n (n <= cacheRoom()) for the cache:
// free ones beyond the swap slots not in use first, then the cache's least recently used.
// Commit or abort either before the next.
func (h *hostTier) reserveSwap(n int)  { h.reserve(n, h.freeLen()) }
func (h *hostTier) reserveCache(n int) { h.reserve(n, h.cacheFree()) }

// reserve takes n host blocks into h.taken: at most maxFree free ones, then the cache's least
// recently used.
func (h *hostTier) reserve(n, maxFree int) {
	h.taken, h.evicted = h.taken[:0], h.evicted[:0]
	h.nfree = min(n, maxFree)
	for range h.nfree {
		h.taken = append(h.taken, h.takeFree())
	}
	for len(h.taken) < n {
		r := h.cache.Remove(h.cache.Oldest())
		h.evicted = append(h.evicted, r)
		h.taken = append(h.taken, hostSlot(r.Block))
	}
}

// abort puts back what reserve took, exactly.
func (h *hostTier) abort() {
	for i := len(h.evicted) - 1; i >= 0; i-- {
		h.cache.Restore(h.evicted[i])
	}
	for i := h.nfree - 1; i >= 0; i-- {
		h.free = append(h.free, h.taken[i])
	}
	h.taken, h.evicted, h.nfree = h.taken[:0], h.evicted[:0], 0
}

// abortWritten undoes reserve after a copy into the taken blocks was queued, or failed midway:
// every taken block is free again, the free ones at their place, and the cache's evictions
// stand, since the copy may have overwritten their content (removed is called with each key
// the cache lost). Without evictions it puts back exactly what reserve took.
func (h *hostTier) abortWritten(removed func(prefix.Key)) {
	for _, b := range h.taken[h.nfree:] {
		h.free = append(h.free, b)
	}
	h.commit(removed)
	for i := h.nfree - 1; i >= 0; i-- {
		h.free = append(h.free, h.taken[i])
	}
	h.taken, h.nfree = h.taken[:0], 0
}

// commit lets reserve's evictions stand, calling removed with each key the cache lost.
func (h *hostTier) commit(removed func(prefix.Key)) {
	for _, r := range h.evicted {
		removed(r.Key)
		h.cache.Recycle(r)
	}
	h.evicted = h.evicted[:0]
}

// hold makes taken host block b held by refs swapped-out references.
func (h *hostTier) hold(b hostSlot, refs int32) {
	h.refs[b-h.first] = refs
	h.swapped++
}

// store makes taken host block b hold the content of key k, as the most recently used.
func (h *hostTier) store(k prefix.Key, b hostSlot) {
	h.cache.Release(h.cache.Add(k, b))
}

// touch makes cached entry e the most recently used; an entry held for the tiers stays held
// (it becomes the most recently used when they let it go).
func (h *hostTier) touch(e *keyindex.Entry[hostSlot]) {
	if !e.Idle() {
		return
	}
	h.cache.Hold(e)
	h.cache.Release(e)
}

// dropCache frees every idle host block the cache holds, calling removed (when not nil) with
// each key, and returns their count. Entries held for the tiers' writes stay.
func (h *hostTier) dropCache(removed func(prefix.Key)) int {
	n := 0
	for e := h.cache.Oldest(); e != nil; e = h.cache.Oldest() {
		r := h.cache.Remove(e)
		if removed != nil {
			removed(r.Key)
		}
		h.free = append(h.free, hostSlot(r.Block))
		h.cache.Recycle(r)
		n++
	}
	return n
}
