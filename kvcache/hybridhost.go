package kvcache

import (
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/sequence"
)

// A Hybrid's host prefix cache (HybridConfig.HostCacheTokens): every attention group, windows
// and chunks too, keeps its idle cached blocks in its host tier as well (hostcache.go: written
// back when FreeSequence releases them). A start first finds what the device caches serve
// (agree); when the groups' host caches could make the hit longer, each group brings back the
// blocks the longer hit needs from its host cache (a window only those its next token reads,
// and its sinks') into new device blocks, cached there, and the hit is found again on the
// devices. The fetch is part of the start: the fetched blocks stay held by it until the start
// commits (then they are idle cached blocks, or the new sequence's), and a start that fails
// gives them back as a failed append does. A group that cannot take the device blocks or copy
// them fetches nothing, and the hit is as short as the devices make it, never wrong.

// hostHits lengthens a start's hit, which the finders (without host) found for limit tokens,
// with the blocks the groups' host caches hold. It returns the hit the devices serve afterwards
// and leaves every finder reset to the device caches for keys, as startFound needs them; each
// group's fetch stays open in h.fetched until commitFetches or abortFetches. The lock is held.
func (h *Hybrid) hostHits(keys [][]prefix.Key, limit, hit int) int {
	if hit >= limit || !h.hostCaching() {
		return hit
	}
	if len(h.fetched) < len(h.groups) {
		h.fetched = make([][]int32, len(h.groups))
	}
	for i, m := range h.groups {
		h.finders[i].reset(m, keys[i])
		h.finders[i].host = m.hostCaching()
	}
	if more := h.agree(limit); more > hit {
		for i, m := range h.groups {
			if f := &h.finders[i]; f.host {
				h.fetched[i] = m.fetchHostBlocks(f, more/m.keyTokens(), h.fetched[i])
			}
		}
	}
	for i, m := range h.groups {
		h.finders[i].reset(m, keys[i])
	}
	return h.agree(limit)
}

// commitFetches lets each group's fetch stand, the start having succeeded with hit tokens, and
// counts the fetched blocks of the hit that a start brought from a group's tiers.
func (h *Hybrid) commitFetches(p Prompt, roots []prefix.Key, keys [][]prefix.Key, hit int) {
	for i := range h.fetched {
		if at := h.fetched[i]; len(at) > 0 {
			h.groups[i].tierHits(keys[i], at, hit/h.groups[i].keyTokens())
			h.groups[i].commitFetch(at, keys[i], hit, p, roots[i])
			h.fetched[i] = at[:0]
		}
	}
}

// abortFetches gives back what each group's fetch took: the start failed.
func (h *Hybrid) abortFetches() {
	for i := range h.fetched {
		if at := h.fetched[i]; len(at) > 0 {
			h.groups[i].abortFetch(at)
			h.fetched[i] = at[:0]
		}
	}
}

// hostCaching reports whether any group has a host prefix cache.
func (h *Hybrid) hostCaching() bool {
	for _, m := range h.groups {
		if m.hostCaching() {
			return true
		}
	}
	return false
}

// fetchHostBlocks brings back from the host cache the blocks of f's prompt that a hit of n
// blocks reads and only the host holds (f.found onHost), keeping those of the hit the device
// caches from its evictions: it takes new device blocks, copies the
// host's into them (one launch on stream 0, before the runtime's kernels that read them) and
// caches them there, held by the fetch (m.newBlocks, in order) until commitFetch or
// abortFetch. It appends their positions to dst and returns it. No room on the device, or a
// failed driver call or launch (counted in PrefixStats.HostFailures), fetches none and
// changes nothing. The lock is held, f.serves(n) == n.
func (m *Manager) fetchHostBlocks(f *hitFinder, n int, dst []int32) []int32 {
	first := 0
	if m.bounded() {
		first = m.reachFrom(n*m.cfg.BlockTokens) / m.cfg.BlockTokens
	}
	sc := &m.swap
	sc.pairs, sc.held = sc.pairs[:0], sc.held[:0]
	at := dst[:0]
	for j := range n {
		if j >= m.sinkBlocks() && j < first || !f.has(j) {
			continue // out of the hit's reach, or not asked (serves(n) asked all in reach)
		}
		switch b := f.found[j]; {
		case b == onHost:
			sc.pairs = append(sc.pairs, int64(m.host.cache.Get(f.keys[j]).Block), 0)
			at = append(at, int32(j))
		case b >= 0:
			sc.held = append(sc.held, b)
		}
	}
	if len(at) == 0 {
		return at
	}
	// The blocks the devices serve are the rest of the hit: held while the fetch takes blocks,
	// so that it cannot evict them to make room, then idle again (the most recently used).
	m.arena.HoldAll(sc.held)
	ok := m.copyFromHost(len(at))
	for i := len(sc.held) - 1; i >= 0; i-- {
		m.arena.Unref(sc.held[i])
	}
	if !ok {
		return at[:0]
	}
	for j, pos := range at {
		m.arena.Cache(m.newBlocks[j], f.keys[pos]) // f.found said the device caches none of these keys
	}
	return at
}

// commitFetch lets the fetch of blocks at (positions in keys, the prompt's chain) stand: the
// host's entries become the most recently used, and the fetch's references go, leaving the
// blocks idle unless the new sequence holds them. The fetched blocks within the hit (hit
// tokens) count as host hits, and each run of them is one BlockStored event on the GPU.
func (m *Manager) commitFetch(at []int32, keys []prefix.Key, hit int, p Prompt, root prefix.Key) {
	m.commitEvictions()
	for j := len(at) - 1; j >= 0; j-- {
		m.host.touch(m.host.cache.Get(keys[at[j]]))
	}
	bt := m.cfg.BlockTokens
	for j, pos := range at { // the prompt's order: its last blocks the most recently used
		m.arena.Unref(m.newBlocks[j])
		if int(pos) < hit/bt {
			m.counters.hostHitTokens += uint64(bt)
		}
	}
	m.counters.stored += uint64(len(at))
	ev := sequence.Sequence{Root: root, Keys: keys, IDs: p.Tokens, Adapter: p.Namespace.Adapter}
	m.emitStoredRuns(&ev, at, prefix.MediumGPU)
	m.publish()
}

// abortFetch gives back what the fetch of len(at) blocks took: it waits for its copy, forgets
// the blocks' keys and frees them, restores the cached blocks it evicted but those the copy
// overwrote (evicted for good, and counted), and unmaps the pages it mapped.
func (m *Manager) abortFetch(at []int32) {
	m.settleCopies()
	for j := range at {
		m.arena.Uncache(m.newBlocks[j])
	}
	m.rollbackAfterCopy(m.newBlocks...)
}
