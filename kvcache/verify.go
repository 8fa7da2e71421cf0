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
	refs := make(map[sequence.Block]int32)
	hostRefs := make(map[hostSlot]int32)
	keyer := prefix.NewKeyer(m.cfg.KeyScheme)
	m.seqs.All(func(s *sequence.Sequence) bool {
		if want := sequence.BlocksFor(s.Tokens, bt); len(s.Blocks) != want {
			bad("sequence %d: %d tokens in %d blocks, want %d", s.ID, s.Tokens, len(s.Blocks), want)
		}
		seen := make(map[sequence.Block]bool, len(s.Blocks))
		seenHost := make(map[hostSlot]bool, len(s.Host))
		for i, b := range s.Blocks {
			if i < len(s.Host) && s.Host[i] != sequence.NoHost { // on the host tier
				h := s.Host[i]
				switch {
				case b != NullBlock:
					bad("sequence %d: block %d is both host slot %d and device block %d", s.ID, i, h, b)
				case i >= m.sinkBlocks() && i < s.Dropped:
					bad("sequence %d: block %d (host slot %d) is held below its dropped mark %d", s.ID, i, h, s.Dropped)
				case !m.host.has(h) || seenHost[h]:
					bad("sequence %d: block %d is host slot %d, not the host tier's, or held twice", s.ID, i, h)
				}
				seenHost[h] = true
				hostRefs[h]++
				continue
			}
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
		if s.FastRoom < 0 || s.FastRoom > s.TailRoom(bt) || s.Swapped || tail == NullBlock || refs[tail] != 1 || a.Entry(tail) != nil {
			bad("sequence %d: fast room %d, but its tail block %d has room %d, %d holders, cached %v, swapped %v",
				s.ID, s.FastRoom, tail, s.TailRoom(bt), refs[tail], tail != NullBlock && a.Entry(tail) != nil, s.Swapped)
		}
		if s.Tail != tail {
			bad("sequence %d: fast room %d, but its tail block is %d, not %d (Tail)", s.ID, s.FastRoom, tail, s.Tail)
		}
		return true
	})
	mappedList := a.Check(refs, bad)
	if m.cfg.StateBytes > 0 { // a recurrent arena caches only checkpoints, which no sequence holds
		a.Index().Each(func(e *keyindex.Entry[sequence.Block]) bool {
			if !e.Idle() {
				bad("block %d: a recurrent arena caches only checkpoints, which no sequence holds, but %d do", e.Block, refs[e.Block])
			}
			return true
		})
	}
	if h := m.host; h != nil { // the host tier: each block free, held by swapped sequences, or cached
		freeHost := make(map[hostSlot]bool, len(h.free))
		for _, b := range h.free {
			if freeHost[b] || !h.has(b) {
				bad("host block %d listed free twice, or not a host block", b)
			}
			freeHost[b] = true
		}
		cachedHost := make(map[hostSlot]bool, h.cache.Len())
		idle, held := 0, 0
		if m.tiers != nil {
			held = m.tiers.held // entries the tier goroutine reads: held, not in the LRU list
		}
		h.cache.Each(func(e *keyindex.Entry[hostSlot]) bool {
			if b := slot(e); !h.has(b) || cachedHost[b] || (!e.Idle() && held == 0) || h.cache.Get(e.Key) != e {
				bad("host cache entry for block %d: not a host block, cached twice, held, or not indexed under its key", e.Block)
			}
			cachedHost[slot(e)] = true
			return true
		})
		h.cache.AscendIdle(func(*keyindex.Entry[hostSlot]) bool { idle++; return true })
		if idle+held != h.cache.Len() || (!m.cfg.HostPrefixCache && idle > 0) {
			bad("host cache: %d entries, %d in its LRU list, %d held for the tiers (on %v)", h.cache.Len(), idle, held, m.cfg.HostPrefixCache)
		}
		if h.cache.Len() > h.n-h.swapSlots {
			bad("host cache: %d blocks, beyond the %d the %d swap slots leave", h.cache.Len(), h.n-h.swapSlots, h.swapSlots)
		}
		for b := range freeHost {
			if int(b-h.first) >= len(h.refs) {
				bad("host block %d listed free, but never taken", b)
			}
		}
		for b := range cachedHost {
			if int(b-h.first) >= len(h.refs) {
				bad("host block %d cached, but never taken", b)
			}
		}
		for b := range hostRefs {
			if int(b-h.first) >= len(h.refs) {
				bad("host block %d held by a swapped sequence, but never taken", b)
			}
		}
		swapped := 0
		for i, r := range h.refs {
			b := h.first + hostSlot(i)
			if r > 0 {
				swapped++
			}
			states := 0
			for _, in := range []bool{r > 0, freeHost[b], cachedHost[b]} {
				if in {
					states++
				}
			}
			if r != hostRefs[b] || states != 1 {
				bad("host block %d: %d holders counted, %d references, free %v, cached %v", b, r, hostRefs[b], freeHost[b], cachedHost[b])
			}
		}
		if swapped != h.swapped {
			bad("host tier: %d blocks held by swapped sequences, %d counted", swapped, h.swapped)
		}
	}
	m.seqs.All(func(s *sequence.Sequence) bool { // a swapped-out one may keep device blocks too
		if s.Swapped != (len(s.Host) > 0) && len(s.Blocks) > 0 || len(s.Host) > 0 && len(s.Host) != len(s.Blocks) {
			bad("sequence %d: swapped %v with %d host slots for %d blocks", s.ID, s.Swapped, len(s.Host), len(s.Blocks))
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
		if m.cfg.StateBytes > 0 || s.Blocks[i] == NullBlock {
			// checkpoint keys, which name no block of s; dropped, or on the host tier, where it is
			// not cached: swapped-out content leaves the cache's reach
		} else if e := m.arena.Entry(s.Blocks[i]); e != nil && e.Key != k {
			bad("sequence %d: block %d (%d) is cached under another content's key", s.ID, i, s.Blocks[i])
		}
		parent = k
	}
}
