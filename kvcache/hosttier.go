package kvcache

// hostTier is the bookkeeping of the host tier's blocks: which are free and how many swapped
// sequences hold each. Its block ids are [first, first+n), past the arena's device blocks, in
// the pages the backing maps with pinned host memory after the arena's. It knows nothing of
// memory. Not safe for concurrent use.
type hostTier struct {
	first int32
	refs  []int32
	free  []int32 // free ids, the highest first, so that the lowest is taken first
}

func newHostTier(first int32, n int) *hostTier {
	h := &hostTier{first: first, refs: make([]int32, n), free: make([]int32, n)}
	for i := range n {
		h.free[i] = first + int32(n-1-i)
	}
	return h
}

// has reports whether b is a host block id.
func (h *hostTier) has(b int32) bool {
	return h != nil && b >= h.first && b < h.first+int32(len(h.refs))
}

// take returns a free host block, held refs times.
func (h *hostTier) take(refs int32) int32 {
	b := h.free[len(h.free)-1]
	h.free = h.free[:len(h.free)-1]
	h.refs[b-h.first] = refs
	return b
}

// unref drops one holder of host block b, freeing it at none.
func (h *hostTier) unref(b int32) {
	if h.refs[b-h.first]--; h.refs[b-h.first] == 0 {
		h.free = append(h.free, b)
	}
}

// refsOf returns how many sequences hold host block b.
func (h *hostTier) refsOf(b int32) int32 { return h.refs[b-h.first] }

// blocks returns the host tier's blocks, and freeBlocks how many are free.
func (h *hostTier) blocks() int {
	if h == nil {
		return 0
	}
	return len(h.refs)
}

func (h *hostTier) freeBlocks() int {
	if h == nil {
		return 0
	}
	return len(h.free)
}
