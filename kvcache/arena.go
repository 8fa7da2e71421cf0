package kvcache

import (
	"math/bits"

	"github.com/google/btree"

	"github.com/pagedkv/pagedkv/internal/keyindex"
	"github.com/pagedkv/pagedkv/prefix"
)

// pageState is where a page is in its life.
type pageState uint8

const (
	pageUnmapped pageState = iota // no physical memory; in arena.unmapped, or never used (nil)
	pageInFlight                  // being mapped or unmapped by the reserve goroutine; in no index
	pageFree                      // mapped, every block free; in arena.free
	pagePartial                   // mapped, some blocks free; in arena.partial
	pageFull                      // mapped, no block free; in no index
)

// page is the block state of one page index. It is kept after an unmap and reused.
//
// A block is in one of three states: free (its bit set: no holder, no cached data), held
// (refs > 0, cached or not) or idle (refs == 0 with a cache entry: its data is kept for prefix
// hits and can be evicted).
type page struct {
	state   pageState
	free    int               // free blocks
	idle    int               // idle cached blocks
	bits    []uint64          // bit i set: block i of the page is free
	refs    []int32           // reference count of each block (sequences holding it)
	entries []*keyindex.Entry // cache entry of each block; nil until the page caches one
	newest  uint64            // the newest LastUse of its idle blocks (the page's age), unless stale
	stale   bool              // newest must be recomputed before the page is indexed by age
	aged    bool              // in the cache-only index, at agedAt
	agedAt  uint64
}

// live returns the blocks of the page that sequences hold.
func (pg *page) live(bpp int) int { return bpp - pg.free - pg.idle }

// pageAge orders cache-only pages: the least recently used first.
type pageAge struct {
	newest uint64
	page   int32
}

func olderPage(a, b pageAge) bool {
	if a.newest != b.newest {
		return a.newest < b.newest
	}
	return a.page < b.page
}

// arena tracks which blocks of which pages are in use, with the free and partially free pages
// indexed by B-trees ordered by page index: allocation takes the lowest page with room, so live
// data drifts to the bottom of the arena and whole pages at the top come free to be returned.
// It knows nothing of devices; the Manager maps and unmaps the pages it names. Not safe for
// concurrent use.
//
// Pages are used lowest first, so the pages never used yet are exactly [fresh, len(pages)):
// they have no state (nil) and are in no index, and the unmapped index holds only pages used
// before and unmapped since. So the arena's memory and set-up time follow the pages in use,
// not the size of the reservation.
//
// Cached blocks: the arena keeps each cached block's keyindex.Entry and tells the Index when a
// block goes idle or is held again. Pages that sequences do not use but that hold idle cached
// blocks are "cache-only"; they are indexed by age (the newest last use of their idle blocks),
// because memory goes back by the page: evicting a cache-only page whole returns a page, while
// evicting scattered blocks returns nothing.
type arena struct {
	bpp       int
	pages     []*page
	fresh     int32 // first page never used
	free      *btree.BTreeG[int32]
	partial   *btree.BTreeG[int32]
	unmapped  *btree.BTreeG[int32]
	cacheOnly *btree.BTreeG[pageAge] // mapped pages with idle blocks and no held ones
	index     *keyindex.Index
	mapped    int    // pages in state free, partial or full
	live      int    // blocks with refs > 0
	idle      int    // idle cached blocks
	gen       uint64 // mapped/unmapped transitions so far
}

func less(a, b int32) bool { return a < b }

func newArena(npages, bpp int) *arena {
	return &arena{
		bpp:       bpp,
		pages:     make([]*page, npages),
		free:      btree.NewG(32, less),
		partial:   btree.NewG(32, less),
		unmapped:  btree.NewG(32, less),
		cacheOnly: btree.NewG(32, olderPage),
		index:     keyindex.NewIndex(),
	}
}

func (a *arena) pageOf(b int32) int32 { return b / int32(a.bpp) }

// slot returns block b's page and its index in the page.
func (a *arena) slot(b int32) (*page, int) { return a.pages[a.pageOf(b)], int(b) % a.bpp }

// setState moves page p between indexes.
func (a *arena) setState(p int32, s pageState) {
	pg := a.pages[p]
	switch pg.state {
	case pageUnmapped:
		a.unmapped.Delete(p)
	case pageFree:
		a.free.Delete(p)
	case pagePartial:
		a.partial.Delete(p)
	}
	wasMapped := pg.state >= pageFree
	pg.state = s
	switch s {
	case pageUnmapped:
		a.unmapped.ReplaceOrInsert(p)
	case pageFree:
		a.free.ReplaceOrInsert(p)
	case pagePartial:
		a.partial.ReplaceOrInsert(p)
	}
	if isMapped := s >= pageFree; isMapped != wasMapped {
		a.gen++
		if isMapped {
			a.mapped++
		} else {
			a.mapped--
		}
	}
}

// takeUnmapped claims the lowest unmapped page for mapping (state in flight).
func (a *arena) takeUnmapped() (int32, bool) {
	p, ok := a.unmapped.Min() // always below fresh
	if !ok {
		if int(a.fresh) == len(a.pages) {
			return 0, false
		}
		p = a.fresh
		a.fresh++
		a.pages[p] = &page{bits: make([]uint64, (a.bpp+63)/64), refs: make([]int32, a.bpp)}
	}
	a.setState(p, pageInFlight)
	return p, true
}

// unmappedPages returns how many pages have no memory (used before, or never).
func (a *arena) unmappedPages() int { return a.unmapped.Len() + len(a.pages) - int(a.fresh) }

// markMapped marks page p (in flight) as mapped and entirely free.
func (a *arena) markMapped(p int32) {
	pg := a.pages[p]
	pg.free, pg.idle, pg.newest, pg.stale = a.bpp, 0, 0, false
	for i := range pg.bits {
		pg.bits[i] = ^uint64(0)
	}
	if r := a.bpp % 64; r != 0 {
		pg.bits[len(pg.bits)-1] = 1<<r - 1
	}
	a.setState(p, pageFree)
}

// pick returns the page the next of need blocks of a sequence goes to: the page of its last
// block (hint, -1 for none) while that has room, else the lowest partially free page with room
// for all need, else the lowest partially free page, else the lowest free page.
//
// Taking the lowest page with room for the whole run keeps a prompt in one page instead of
// spreading it over the holes of several. Its blocks are freed together, so pages empty as
// sequences end: on the churn trace the page overhead's peak at 128 running falls from 1.34 to
// 1.23 and the means fall too (docs/performance.md). The search reads the partial pages too
// full for need, lowest first. For one block there are none; a page or more fits no partial
// page, so then the search is skipped.
func (a *arena) pick(hint int32, need int) (int32, bool) {
	if hint >= 0 {
		if pg := a.pages[hint]; pg.state == pagePartial || pg.state == pageFree {
			return hint, true
		}
	}
	lowest, ok := a.partial.Min()
	if !ok {
		return a.free.Min()
	}
	if need > 1 && need < a.bpp && a.pages[lowest].free < need {
		a.partial.Ascend(func(p int32) bool {
			if a.pages[p].free >= need {
				lowest = p
				return false
			}
			return true
		})
	}
	return lowest, true
}

// alloc takes the lowest free block of page p, which has room, with one reference.
func (a *arena) alloc(p int32) int32 {
	pg := a.pages[p]
	for w, word := range pg.bits {
		if word != 0 {
			b := p*int32(a.bpp) + int32(w*64+bits.TrailingZeros64(word))
			a.take(b, 1)
			return b
		}
	}
	panic("kvcache: alloc from a page with no free block")
}

// allocAll takes every block of free page p, in order, each with one reference, and appends
// them to dst: what BlocksPerPage calls of alloc would do.
func (a *arena) allocAll(p int32, dst []int32) []int32 {
	pg := a.pages[p]
	for i := range a.bpp {
		pg.refs[i] = 1
		dst = append(dst, p*int32(a.bpp)+int32(i))
	}
	clear(pg.bits)
	pg.free = 0
	a.live += a.bpp
	a.restate(p)
	return dst
}

// occupy clears free block b's bit; the caller accounts for what it now holds.
func (a *arena) occupy(b int32) {
	p := a.pageOf(b)
	pg, i := a.slot(b)
	pg.bits[i/64] &^= 1 << (i % 64)
	pg.free--
	a.restate(p)
}

// vacate sets block b's bit: it holds nothing any more.
func (a *arena) vacate(b int32) {
	p := a.pageOf(b)
	pg, i := a.slot(b)
	pg.bits[i/64] |= 1 << (i % 64)
	pg.free++
	a.restate(p)
}

// restate puts mapped page p in the index its free count calls for, and in or out of the
// cache-only index.
func (a *arena) restate(p int32) {
	pg := a.pages[p]
	want := pagePartial
	switch pg.free {
	case a.bpp:
		want = pageFree
	case 0:
		want = pageFull
	}
	if pg.state != want {
		a.setState(p, want)
	}
	a.reage(p)
}

// take marks free block b as held by refs sequences.
func (a *arena) take(b int32, refs int32) {
	pg, i := a.slot(b)
	pg.refs[i] = refs
	a.live++
	a.occupy(b)
}

// drop frees held block b whatever its reference count; it must have no cache entry.
func (a *arena) drop(b int32) {
	pg, i := a.slot(b)
	pg.refs[i] = 0
	a.live--
	a.vacate(b)
}

// entry returns block b's cache entry, or nil.
func (a *arena) entry(b int32) *keyindex.Entry {
	pg, i := a.slot(b)
	if pg.entries == nil {
		return nil
	}
	return pg.entries[i]
}

// setEntry records block b's cache entry (nil: uncached).
func (a *arena) setEntry(b int32, e *keyindex.Entry) {
	pg, i := a.slot(b)
	if pg.entries == nil {
		if e == nil {
			return
		}
		pg.entries = make([]*keyindex.Entry, a.bpp)
	}
	pg.entries[i] = e
}

// cache indexes held block b under key k; it returns false (and changes nothing) when k is
// cached already, in another block.
func (a *arena) cache(b int32, k prefix.Key) bool {
	e := a.index.Add(k, b)
	if e == nil {
		return false
	}
	a.setEntry(b, e)
	return true
}

// uncache forgets held block b's cache entry, if it has one, and returns the key it had.
func (a *arena) uncache(b int32) (prefix.Key, bool) {
	e := a.entry(b)
	if e == nil {
		return prefix.Key{}, false
	}
	k := e.Key
	a.index.Recycle(a.index.Remove(e))
	a.setEntry(b, nil)
	return k, true
}

// ref adds a reference to held block b.
func (a *arena) ref(b int32) {
	pg, i := a.slot(b)
	pg.refs[i]++
}

// refs returns block b's reference count.
func (a *arena) refs(b int32) int32 {
	pg, i := a.slot(b)
	return pg.refs[i]
}

// unref drops a reference to block b; at zero a cached block goes idle and any other is freed.
func (a *arena) unref(b int32) {
	pg, i := a.slot(b)
	if pg.refs[i] > 1 {
		pg.refs[i]--
		return
	}
	e := a.entry(b)
	if e == nil {
		a.drop(b)
		return
	}
	pg.refs[i] = 0
	pg.idle++
	a.live--
	a.idle++
	a.index.Release(e)
	pg.newest, pg.stale = e.LastUse, false // the newest use of all, so the page's age exactly
	a.reage(a.pageOf(b))
}

// holdAll takes a reference to each of blocks, the cached blocks of a prefix hit: an idle block
// is held again. A page is re-indexed once per run of its blocks, not once per block: reage reads
// only its own page, and nothing reads the cache-only index in between.
func (a *arena) holdAll(blocks []int32) {
	bpp, last, first := int32(a.bpp), int32(-1), int32(0) // first: page last's first block
	var pg *page
	for _, b := range blocks {
		i := b - first
		if last < 0 || i < 0 || i >= bpp { // another page: divide only then
			if last >= 0 {
				a.reage(last)
			}
			last = b / bpp
			pg, first = a.pages[last], last*bpp
			i = b - first
		}
		switch pg.refs[i] {
		case 0:
			pg.refs[i] = 1
			pg.idle--
			a.live++
			a.idle--
			a.index.Hold(pg.entries[i])
			pg.stale = true
		default:
			pg.refs[i]++
		}
	}
	if last >= 0 {
		a.reage(last)
	}
}

// hold takes a reference to block b, as holdAll does for a run.
func (a *arena) hold(b int32) {
	one := [1]int32{b}
	a.holdAll(one[:])
}

// unhold undoes hold of block b, which was idle after prev in the LRU order (its entry's Prev
// then): b is idle again, at its place. Undo holds in reverse order, after the evictions since.
func (a *arena) unhold(b int32, prev *keyindex.Entry) {
	pg, i := a.slot(b)
	pg.refs[i] = 0
	pg.idle++
	a.live--
	a.idle++
	a.index.Unhold(a.entry(b), prev)
	pg.stale = true
	a.reage(a.pageOf(b))
}

// evict forgets idle block b's entry and frees it; it returns what the index took out, so that
// restore can undo it (until the caller recycles it).
func (a *arena) evict(b int32) keyindex.Removed {
	pg, _ := a.slot(b)
	r := a.index.Remove(a.entry(b))
	a.setEntry(b, nil)
	pg.idle--
	a.idle--
	// The page's age is the newest use of its idle blocks. Evicting an older one leaves it as it
	// was, which spares reage a scan of the page for every block evicted in LRU order.
	pg.stale = pg.stale || r.LastUse >= pg.newest
	a.vacate(b)
	return r
}

// restore undoes evict: free block r.Block is idle and cached again, at its place in the order.
func (a *arena) restore(r keyindex.Removed) {
	b := r.Block
	pg, _ := a.slot(b)
	e := a.index.Restore(r)
	a.setEntry(b, e)
	pg.idle++
	a.idle++
	pg.stale = true
	a.occupy(b)
}

// move gives free block dst the state of block src (held with its references, or idle) and
// its cache entry, and frees src.
func (a *arena) move(src, dst int32) {
	e := a.entry(src)
	a.setEntry(src, nil)
	if e != nil { // before the pages are re-indexed, which reads the entries
		e.Block = dst
		a.setEntry(dst, e)
	}
	if refs := a.refs(src); refs > 0 {
		a.take(dst, refs)
		a.drop(src)
		return
	}
	// idle: the entry and its place in the order move with the data
	spg, _ := a.slot(src)
	dpg, _ := a.slot(dst)
	spg.idle--
	dpg.idle++
	spg.stale, dpg.stale = true, true
	a.vacate(src)
	a.occupy(dst)
}

// reage puts page p in the cache-only index, at its age, exactly when it is mapped, holds idle
// blocks and no held ones. The age is recomputed from the page's idle blocks only here, when
// it is stale and the page is cache-only: a page sequences use has no age that matters, so
// holding or evicting blocks there costs nothing per block.
func (a *arena) reage(p int32) {
	pg := a.pages[p]
	want := pg.state >= pageFree && pg.idle > 0 && pg.live(a.bpp) == 0
	if want && pg.stale {
		pg.newest, pg.stale = 0, false
		for _, e := range pg.entries {
			if e != nil && e.Idle() {
				pg.newest = max(pg.newest, e.LastUse)
			}
		}
	}
	if pg.aged && (!want || pg.agedAt != pg.newest) {
		a.cacheOnly.Delete(pageAge{pg.agedAt, p})
		pg.aged = false
	}
	if want && !pg.aged {
		a.cacheOnly.ReplaceOrInsert(pageAge{pg.newest, p})
		pg.aged, pg.agedAt = true, pg.newest
	}
}

// liveIn returns the blocks in use (held or idle) on mapped page p.
func (a *arena) liveIn(p int32) int { return a.bpp - a.pages[p].free }
