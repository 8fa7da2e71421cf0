package kvcache

import (
	"errors"
	"fmt"

	"github.com/pagedkv/pagedkv/sequence"
)

// Verify checks every invariant of the manager and returns what is broken (nil when all hold):
// each sequence holds exactly the blocks its tokens need; every block's reference count equals
// the number of sequences holding it; a block is free exactly when nobody holds it; every page's
// free count, bitmap and index membership agree with its blocks; the free, partial and unmapped
// indexes hold exactly the pages in those states; and the pages the arena counts as mapped are
// exactly the pages the pool has mapped. It waits for the reserve goroutine to finish a cycle.
// Tests call it after every step; it costs O(blocks + pages).
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
	refs := make(map[int32]int32)
	m.seqs.All(func(s *sequence.Sequence) bool {
		if want := sequence.BlocksFor(s.Tokens, m.cfg.BlockTokens); len(s.Blocks) != want {
			bad("sequence %d: %d tokens in %d blocks, want %d", s.ID, s.Tokens, len(s.Blocks), want)
		}
		seen := make(map[int32]bool, len(s.Blocks))
		for _, b := range s.Blocks {
			if seen[b] {
				bad("sequence %d holds block %d twice", s.ID, b)
			}
			seen[b] = true
			refs[b]++
		}
		return true
	})
	live, mapped, shared := 0, 0, 0
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
		if !m.static && isMapped != m.pool.IsMapped(uint64(p)*m.cfg.PageSize, m.cfg.PageSize) {
			bad("page %d: arena says mapped=%v, the pool disagrees", p, isMapped)
		}
		if !isMapped {
			for i := range m.bpp {
				if r := refs[p*int32(m.bpp)+int32(i)]; r != 0 {
					bad("block %d on unmapped page %d is held %d times", p*int32(m.bpp)+int32(i), p, r)
				}
			}
			continue
		}
		mapped++
		free := 0
		for i := range m.bpp {
			b := p*int32(m.bpp) + int32(i)
			isFree := pg.bits[i/64]&(1<<(i%64)) != 0
			if pg.refs[i] != refs[b] {
				bad("block %d: reference count %d, held by %d sequences", b, pg.refs[i], refs[b])
			}
			if isFree != (refs[b] == 0) {
				bad("block %d: free bit %v with %d holders", b, isFree, refs[b])
			}
			if isFree {
				free++
			} else {
				live++
			}
			if refs[b] > 1 {
				shared++
			}
		}
		if free != pg.free {
			bad("page %d: free count %d, %d free bits", p, pg.free, free)
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
	}
	if shared != a.shared {
		bad("arena counts %d shared blocks, pages hold %d", a.shared, shared)
	}
	if live != a.live {
		bad("arena counts %d live blocks, pages hold %d", a.live, live)
	}
	poolPages := a.mapped
	if !m.static {
		poolPages = m.pool.Stats().MappedPages
	}
	if mapped != a.mapped || mapped != poolPages {
		bad("mapped pages: arena counts %d, pages say %d, pool has %d", a.mapped, mapped, poolPages)
	}
	if m.static && mapped != len(a.pages) {
		bad("static memory: %d of %d pages mapped", mapped, len(a.pages))
	}
	if m.member != nil && m.member.Used() != uint64(mapped+m.inflight)*m.cfg.PageSize {
		bad("budget: member holds %d bytes for %d mapped pages", m.member.Used(), mapped)
	}
	if m.inflight != 0 {
		bad("%d pages in flight while the reserve goroutine is idle", m.inflight)
	}
	return errors.Join(errs...)
}
