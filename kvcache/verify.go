package kvcache

import (
	"errors"
	"fmt"

	"github.com/pagedkv/pagedkv/internal/keyindex"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/sequence"
)

// Verify checks every invariant of the manager and returns what is broken (nil when all hold):
// each sequence holds exactly the blocks its tokens need; every block's reference count equals
// the number of sequences holding it; a block is free exactly when nobody holds it and it is
// not cached, and idle exactly when nobody holds it and it is; every page's free and idle
// counts, bitmap and index membership agree with its blocks; the free, partial, unmapped and
// cache-only indexes hold exactly the pages in those states; the pages the arena counts as
// mapped are exactly the pages the pool has mapped; the key index and the blocks' entries agree
// both ways; every keyed sequence's ids hash to its keys, with each of its cached blocks
// cached under the key of the content it holds; and a recurrent arena's cached blocks (its
// checkpoints) are held by no sequence. It waits for the reserve goroutine to finish a
// cycle. Tests call it after every step; it costs O(blocks + pages + keyed tokens).
func (m *Manager) Verify() error {
	if !m.made() {
		return notMadeCall("verify")
	}
	m.growMu.Lock()
	defer m.growMu.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return fmt.Errorf("kvcache: verify: %w", ErrClosed)
	}
	var errs []error
	bad := func(format string, args ...any) {
		if len(errs) < 20 {
			errs = append(errs, fmt.Errorf(format, args...))
		}
	}
	a := m.arena
	bt := m.cfg.BlockTokens
	refs := make(map[int32]int32)
	keyer := prefix.NewKeyer(m.cfg.KeyScheme)
	m.seqs.All(func(s *sequence.Sequence) bool {
		if want := sequence.BlocksFor(s.Tokens, bt); len(s.Blocks) != want {
			bad("sequence %d: %d tokens in %d blocks, want %d", s.ID, s.Tokens, len(s.Blocks), want)
		}
		seen := make(map[int32]bool, len(s.Blocks))
		for i, b := range s.Blocks {
			if b == NullBlock {
				if i < m.sinkBlocks() || i >= s.Dropped {
					bad("sequence %d: block %d is dropped outside [%d, %d), its sinks' blocks and the reach", s.ID, i, m.sinkBlocks(), s.Dropped)
				}
				continue
			}
			if i >= m.sinkBlocks() && i < s.Dropped {
				bad("sequence %d: block %d (%d) is held below its dropped mark %d", s.ID, i, b, s.Dropped)
			}
			if seen[b] {
				bad("sequence %d holds block %d twice", s.ID, b)
			}
			seen[b] = true
			refs[b]++
		}
		m.verifyKeys(s, keyer, bad)
		return true
	})
	m.seqs.All(func(s *sequence.Sequence) bool { // with every holder counted
		if s.FastRoom == 0 {
			return true
		}
		tail := s.Blocks[len(s.Blocks)-1]
		if s.FastRoom < 0 || s.FastRoom > s.TailRoom(bt) || s.Swapped || tail == NullBlock || refs[tail] != 1 || a.entry(tail) != nil {
			bad("sequence %d: fast room %d, but its tail block %d has room %d, %d holders, cached %v, swapped %v",
				s.ID, s.FastRoom, tail, s.TailRoom(bt), refs[tail], tail != NullBlock && a.entry(tail) != nil, s.Swapped)
		}
		return true
	})
	live, idle, mapped, entries := 0, 0, 0, 0
	var mappedList []int32
	for p, pg := range a.pages {
		p := int32(p)
		inFree, inPartial, inUnmapped := a.free.Has(p), a.partial.Has(p), a.unmapped.Has(p)
		if (pg == nil) != (p >= a.fresh) {
			bad("page %d: state allocated %v, first page never used %d", p, pg != nil, a.fresh)
		}
		if pg == nil {
			if inUnmapped || inFree || inPartial {
				bad("never-used page %d: in unmapped %v, free %v, partial %v", p, inUnmapped, inFree, inPartial)
			}
			continue
		}
		wantIdx := [3]bool{pg.state == pageFree, pg.state == pagePartial, pg.state == pageUnmapped}
		if gotIdx := [3]bool{inFree, inPartial, inUnmapped}; gotIdx != wantIdx {
			bad("page %d in state %d: index membership free/partial/unmapped %v", p, pg.state, gotIdx)
		}
		if pg.state == pageInFlight {
			bad("page %d in flight while the reserve goroutine is idle", p)
		}
		isMapped := pg.state >= pageFree
		if isMapped {
			mappedList = append(mappedList, p)
		}
		if !isMapped {
			for i := range m.bpp {
				b := p*int32(m.bpp) + int32(i)
				if r := refs[b]; r != 0 {
					bad("block %d on unmapped page %d is held %d times", b, p, r)
				}
				if a.entry(b) != nil {
					bad("block %d on unmapped page %d is cached", b, p)
				}
			}
			if pg.aged {
				bad("unmapped page %d is in the cache-only index", p)
			}
			continue
		}
		mapped++
		free, pidle := 0, 0
		newest := uint64(0)
		for i := range m.bpp {
			b := p*int32(m.bpp) + int32(i)
			isFree := pg.bits[i/64]&(1<<(i%64)) != 0
			e := a.entry(b)
			if pg.refs[i] != refs[b] {
				bad("block %d: reference count %d, held by %d sequences", b, pg.refs[i], refs[b])
			}
			if isFree != (refs[b] == 0 && e == nil) {
				bad("block %d: free bit %v with %d holders, cached %v", b, isFree, refs[b], e != nil)
			}
			if e != nil {
				entries++
				if a.index.Get(e.Key) != e || e.Block != b {
					bad("block %d: its cache entry is not indexed under its key for it", b)
				}
				if e.Idle() != (refs[b] == 0) {
					bad("block %d: entry idle %v with %d holders", b, e.Idle(), refs[b])
				}
				if m.cfg.StateBytes > 0 && refs[b] != 0 {
					bad("block %d: a recurrent arena caches only checkpoints, which no sequence holds, but %d do", b, refs[b])
				}
			}
			switch {
			case isFree:
				free++
			case refs[b] == 0:
				pidle++
				idle++
				newest = max(newest, e.LastUse)
			default:
				live++
			}
		}
		if free != pg.free || pidle != pg.idle {
			bad("page %d: free/idle counts %d/%d, blocks say %d/%d", p, pg.free, pg.idle, free, pidle)
		}
		want := pagePartial
		switch free {
		case m.bpp:
			want = pageFree
		case 0:
			want = pageFull
		}
		if pg.state != want {
			bad("page %d: state %d with %d of %d blocks free", p, pg.state, free, m.bpp)
		}
		cacheOnly := pidle > 0 && free+pidle == m.bpp
		if cacheOnly != (pg.aged && a.cacheOnly.Has(pageAge{pg.agedAt, p})) || cacheOnly && (pg.newest != newest || pg.agedAt != newest) {
			bad("page %d: cache-only %v, indexed %v at %d, newest idle use %d (page says %d)", p, cacheOnly, pg.aged, pg.agedAt, newest, pg.newest)
		}
	}
	if live != a.live || idle != a.idle || idle != a.index.IdleLen() {
		bad("held/idle blocks: arena counts %d/%d, pages hold %d/%d, the index %d idle", a.live, a.idle, live, idle, a.index.IdleLen())
	}
	if entries != a.index.Len() {
		bad("the key index has %d entries, blocks hold %d", a.index.Len(), entries)
	}
	n := 0
	a.cacheOnly.Ascend(func(pageAge) bool { n++; return true })
	if n != a.cacheOnly.Len() {
		bad("cache-only index miscounts")
	}
	if mapped != a.mapped {
		bad("mapped pages: arena counts %d, pages say %d", a.mapped, mapped)
	}
	if h := m.host; h != nil { // the host tier: each block free, held by swapped sequences, or cached
		freeHost := make(map[int32]bool, len(h.free))
		for _, b := range h.free {
			if freeHost[b] || !h.has(b) {
				bad("host block %d listed free twice, or not a host block", b)
			}
			freeHost[b] = true
		}
		cachedHost := make(map[int32]bool, h.cache.Len())
		idle, held := 0, 0
		if m.tiers != nil {
			held = m.tiers.held // entries the tier goroutine reads: held, not in the LRU list
		}
		h.cache.Each(func(e *keyindex.Entry) bool {
			if !h.has(e.Block) || cachedHost[e.Block] || (!e.Idle() && held == 0) || h.cache.Get(e.Key) != e {
				bad("host cache entry for block %d: not a host block, cached twice, held, or not indexed under its key", e.Block)
			}
			cachedHost[e.Block] = true
			return true
		})
		h.cache.AscendIdle(func(*keyindex.Entry) bool { idle++; return true })
		if idle+held != h.cache.Len() || (!m.cfg.HostPrefixCache && idle > 0) {
			bad("host cache: %d entries, %d in its LRU list, %d held for the tiers (on %v)", h.cache.Len(), idle, held, m.cfg.HostPrefixCache)
		}
		if h.cache.Len() > len(h.refs)-h.swapSlots {
			bad("host cache: %d blocks, beyond the %d the %d swap slots leave", h.cache.Len(), len(h.refs)-h.swapSlots, h.swapSlots)
		}
		swapped := 0
		for i, r := range h.refs {
			b := h.first + int32(i)
			if r > 0 {
				swapped++
			}
			states := 0
			for _, in := range []bool{r > 0, freeHost[b], cachedHost[b]} {
				if in {
					states++
				}
			}
			if r != refs[b] || states != 1 {
				bad("host block %d: %d holders counted, %d references, free %v, cached %v", b, r, refs[b], freeHost[b], cachedHost[b])
			}
		}
		if swapped != h.swapped {
			bad("host tier: %d blocks held by swapped sequences, %d counted", swapped, h.swapped)
		}
	}
	m.seqs.All(func(s *sequence.Sequence) bool { // a swapped-out one may keep device blocks too
		for _, b := range s.Blocks {
			if m.host.has(b) && !s.Swapped {
				bad("sequence %d, not swapped out, holds host block %d", s.ID, b)
			}
		}
		return true
	})
	for _, s := range m.back.check(mappedList, m.inflight) {
		bad("%s", s)
	}
	if m.inflight != 0 {
		bad("%d pages in flight while the reserve goroutine is idle", m.inflight)
	}
	return errors.Join(errs...)
}

// verifyKeys checks keyed sequence s: its ids cover its tokens, its keys are the hash chain of
// its full blocks' ids, and each of its full blocks that is cached is cached under its own key.
// (A partial tail may be cached: a truncation cut into it, and it leaves the cache when it is
// written.)
func (m *Manager) verifyKeys(s *sequence.Sequence, keyer *prefix.Keyer, bad func(string, ...any)) {
	bt := m.keyTokens()
	if !s.Keyed {
		return
	}
	if len(s.IDs) != s.Tokens || len(s.Keys) != m.keyable(s) || s.Written > s.Tokens {
		bad("sequence %d: %d tokens with %d ids and %d keys", s.ID, s.Tokens, len(s.IDs), len(s.Keys))
		return
	}
	parent := s.Root
	for i, k := range s.Keys {
		if want := keyer.Next(prefix.Namespace{Adapter: s.Adapter, Salt: s.Salt}, i, parent, s.IDs[i*bt:(i+1)*bt]); k != want {
			bad("sequence %d: key %d is not the hash of its block's ids", s.ID, i)
			return
		}
		if m.cfg.StateBytes > 0 || s.Blocks[i] == NullBlock || m.host.has(s.Blocks[i]) {
			// checkpoint keys, which name no block of s; dropped; or a host block, which is not
			// cached: swapped-out content leaves the cache's reach
		} else if e := m.arena.entry(s.Blocks[i]); e != nil && e.Key != k {
			bad("sequence %d: block %d (%d) is cached under another content's key", s.ID, i, s.Blocks[i])
		}
		parent = k
	}
}
