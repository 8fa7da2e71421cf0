// Package arena is the block bookkeeping of one elastic KV arena: which blocks of which pages
// are free, held by sequences (with reference counts) or idle and cached, which pages are
// mapped, and the policy that says which idle cached block goes first. It knows nothing of
// devices: its owner (kvcache's Manager) maps and unmaps the pages it names and copies the
// blocks a compaction plan moves. Block ids are page*BlocksPerPage + slot.
//
// The eviction vocabulary, named once here:
//   - free: a block that holds nothing (no holder, no cached data);
//   - held: a block one or more sequences reference (Refs > 0), cached or not;
//   - idle: a cached block no sequence holds; its data is kept for prefix hits and may be
//     evicted;
//   - cache-only page: a mapped page with idle blocks and no held ones: evicting it whole
//     returns a page, evicting scattered blocks returns nothing;
//   - victim: what eviction takes next (Victim): the least recently used idle block, or a
//     cache-only page nearly as old as it (within 1/NearTie of the idle blocks' age span).
//
// Not safe for concurrent use: the owner guards an Arena with its lock.
package arena

import (
	"math"
	"math/bits"
	"slices"

	"github.com/google/btree"

	"github.com/pagedkv/pagedkv/internal/keyindex"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/sequence"
)

// Block is a block id of the arena: page*BlocksPerPage + slot (sequence.Block, the type every
// sequence's Blocks hold). Page is a page index. They are distinct types so that a page cannot
// be passed where a block goes, nor the other way round.
type Block = sequence.Block

// Page is the index of a page of the arena, in [0, Pages()).
type Page int32

// State is where a page is in its life.
type State uint8

const (
	Unmapped State = iota // no physical memory (used before, or never)
	InFlight              // being mapped or unmapped by the owner; in no index
	Free                  // mapped, every block free
	Partial               // mapped, some blocks free
	Full                  // mapped, no block free
)

// page is the block state of one page index. It is kept after an unmap and reused.
//
// A block is in one of three states: free (its bit set: no holder, no cached data), held
// (refs > 0, cached or not) or idle (refs == 0 with a cache entry: its data is kept for prefix
// hits and can be evicted).
type page struct {
	state   State
	free    int                      // free blocks
	idle    int                      // idle cached blocks
	bits    []uint64                 // bit i set: block i of the page is free
	refs    []int32                  // reference count of each block (sequences holding it)
	entries []*keyindex.Entry[Block] // cache entry of each block; nil until the page caches one
	newest  uint64                   // the newest LastUse of its idle blocks (the page's age), unless stale
	stale   bool                     // newest must be recomputed before the page is indexed by age
	aged    bool                     // in the cache-only index, at agedAt
	agedAt  uint64
}

// live returns the blocks of the page that sequences hold.
func (pg *page) live(bpp int) int { return bpp - pg.free - pg.idle }

// pageAge orders cache-only pages: the least recently used first.
type pageAge struct {
	newest uint64
	page   Page
}

func olderPage(a, b pageAge) bool {
	if a.newest != b.newest {
		return a.newest < b.newest
	}
	return a.page < b.page
}

// Arena tracks which blocks of which pages are in use, with the free and partially free pages
// indexed by B-trees ordered by page index: allocation takes the lowest page with room, so live
// data drifts to the bottom of the arena and whole pages at the top come free to be returned.
// It knows nothing of devices; its owner maps and unmaps the pages it names. Not safe for
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
type Arena struct {
	bpp       int
	recip     uint64 // 2^64/bpp rounded up (0 when bpp is 1): see PageOf
	pages     []*page
	fresh     Page // first page never used
	free      *btree.BTreeG[Page]
	partial   *btree.BTreeG[Page]
	unmapped  *btree.BTreeG[Page]
	cacheOnly *btree.BTreeG[pageAge] // mapped pages with idle blocks and no held ones
	index     *keyindex.Index[Block]
	mapped    int    // pages in state free, partial or full
	live      int    // blocks with refs > 0
	idle      int    // idle cached blocks
	gen       uint64 // mapped/unmapped transitions so far
}

func less(a, b Page) bool { return a < b }

// New returns an arena of npages pages (all unmapped) of bpp blocks each.
func New(npages, bpp int) *Arena {
	return &Arena{
		bpp:       bpp,
		recip:     math.MaxUint64/uint64(max(bpp, 1)) + 1,
		pages:     make([]*page, npages),
		free:      btree.NewG(32, less),
		partial:   btree.NewG(32, less),
		unmapped:  btree.NewG(32, less),
		cacheOnly: btree.NewG(32, olderPage),
		index:     keyindex.NewIndex[Block](),
	}
}

// PageOf returns the page of block b.
//
// It multiplies instead of dividing: for every b in [0, 2^32), b/bpp is the high word of the
// 128-bit product recip*b (Lemire, Kaser and Kurz, "Faster remainder by direct computation",
// 2019). A decode step that takes a block looks a block's page up several times in every
// group, and a division was 20-40 cycles of each. A negative b (no block id is) and one-block
// pages (recip 0: 2^64 does not fit) divide.
func (a *Arena) PageOf(b Block) Page {
	if b < 0 || a.recip == 0 {
		return Page(b / Block(a.bpp))
	}
	q, _ := bits.Mul64(a.recip, uint64(b))
	return Page(q)
}

// First returns the first block of page p (its blocks are First(p) to First(p+1)-1).
func (a *Arena) First(p Page) Block { return Block(p) * Block(a.bpp) }

// slot returns block b's page and its index in the page.
func (a *Arena) slot(b Block) (*page, int) {
	_, pg, i := a.at(b)
	return pg, i
}

// at returns block b's page, that page's state and b's index in it (the remainder, with no
// second division). The paths of a decode step locate a block once and pass the three on.
func (a *Arena) at(b Block) (Page, *page, int) {
	p := a.PageOf(b)
	return p, a.pages[p], int(b - a.First(p))
}

// SetState moves page p to state s (the owner mapped, unmapped or claimed it).
func (a *Arena) SetState(p Page, s State) {
	pg := a.pages[p]
	switch pg.state {
	case Unmapped:
		a.unmapped.Delete(p)
	case Free:
		a.free.Delete(p)
	case Partial:
		a.partial.Delete(p)
	}
	wasMapped := pg.state >= Free
	pg.state = s
	switch s {
	case Unmapped:
		a.unmapped.ReplaceOrInsert(p)
	case Free:
		a.free.ReplaceOrInsert(p)
	case Partial:
		a.partial.ReplaceOrInsert(p)
	}
	if isMapped := s >= Free; isMapped != wasMapped {
		a.gen++
		if isMapped {
			a.mapped++
		} else {
			a.mapped--
		}
	}
}

// TakeUnmapped claims the lowest unmapped page for mapping (state in flight).
func (a *Arena) TakeUnmapped() (Page, bool) {
	p, ok := a.unmapped.Min() // always below fresh
	if !ok {
		if int(a.fresh) == len(a.pages) {
			return 0, false
		}
		p = a.fresh
		a.fresh++
		a.pages[p] = &page{bits: make([]uint64, (a.bpp+63)/64), refs: make([]int32, a.bpp)}
	}
	a.SetState(p, InFlight)
	return p, true
}

// UnmappedPages returns how many pages have no memory (used before, or never).
func (a *Arena) UnmappedPages() int { return a.unmapped.Len() + len(a.pages) - int(a.fresh) }

// MarkMapped marks page p (in flight) as mapped and entirely free.
func (a *Arena) MarkMapped(p Page) {
	pg := a.pages[p]
	pg.free, pg.idle, pg.newest, pg.stale = a.bpp, 0, 0, false
	for i := range pg.bits {
		pg.bits[i] = ^uint64(0)
	}
	if r := a.bpp % 64; r != 0 {
		pg.bits[len(pg.bits)-1] = 1<<r - 1
	}
	a.SetState(p, Free)
}

// Pick returns the page the next of need blocks of a sequence goes to: the page of its last
// block (hint, -1 for none) while that has room, else the lowest partially free page with room
// for all need, else the lowest partially free page, else the lowest free page.
//
// Taking the lowest page with room for the whole run keeps a prompt in one page instead of
// spreading it over the holes of several. Its blocks are freed together, so pages empty as
// sequences end: on the churn trace the page overhead's peak at 128 running falls from 1.34 to
// 1.23 and the means fall too (docs/performance.md). The search reads the partial pages too
// full for need, lowest first. For one block there are none; a page or more fits no partial
// page, so then the search is skipped.
func (a *Arena) Pick(hint Page, need int) (Page, bool) {
	if hint >= 0 {
		if pg := a.pages[hint]; pg.state == Partial || pg.state == Free {
			return hint, true
		}
	}
	lowest, ok := a.partial.Min()
	if !ok {
		return a.free.Min()
	}
	if need > 1 && need < a.bpp && a.pages[lowest].free < need {
		a.partial.Ascend(func(p Page) bool {
			if a.pages[p].free >= need {
				lowest = p
				return false
			}
			return true
		})
	}
	return lowest, true
}

// Alloc takes the lowest free block of page p, which has room, with one reference.
func (a *Arena) Alloc(p Page) Block {
	pg := a.pages[p]
	for w, word := range pg.bits {
		if word != 0 {
			i := w*64 + bits.TrailingZeros64(word)
			pg.refs[i] = 1
			a.live++
			a.occupyAt(p, pg, i)
			return a.First(p) + Block(i)
		}
	}
	panic("arena: alloc from a page with no free block")
}

// AllocAll takes every block of free page p, in order, each with one reference, and appends
// them to dst: what BlocksPerPage calls of alloc would do.
func (a *Arena) AllocAll(p Page, dst []Block) []Block {
	pg := a.pages[p]
	for i := range a.bpp {
		pg.refs[i] = 1
		dst = append(dst, a.First(p)+Block(i))
	}
	clear(pg.bits)
	pg.free = 0
	a.live += a.bpp
	a.restate(p, pg)
	return dst
}

// occupy clears free block b's bit; the caller accounts for what it now holds.
func (a *Arena) occupy(b Block) { a.occupyAt(a.at(b)) }

// occupyAt is occupy of block i of page p, whose state is pg.
func (a *Arena) occupyAt(p Page, pg *page, i int) {
	pg.bits[i/64] &^= 1 << (i % 64)
	pg.free--
	a.restate(p, pg)
}

// vacate sets block b's bit: it holds nothing any more.
func (a *Arena) vacate(b Block) { a.vacateAt(a.at(b)) }

// vacateAt is vacate of block i of page p, whose state is pg.
func (a *Arena) vacateAt(p Page, pg *page, i int) {
	pg.bits[i/64] |= 1 << (i % 64)
	pg.free++
	a.restate(p, pg)
}

// restate puts mapped page p, whose state is pg, in the index its free count calls for, and in
// or out of the cache-only index.
func (a *Arena) restate(p Page, pg *page) {
	want := Partial
	switch pg.free {
	case a.bpp:
		want = Free
	case 0:
		want = Full
	}
	if pg.state != want {
		a.SetState(p, want)
	}
	a.reage(p)
}

// Take marks free block b as held by refs sequences.
func (a *Arena) Take(b Block, refs int32) {
	p, pg, i := a.at(b)
	pg.refs[i] = refs
	a.live++
	a.occupyAt(p, pg, i)
}

// Drop frees held block b whatever its reference count; it must have no cache entry.
func (a *Arena) Drop(b Block) { a.dropAt(a.at(b)) }

// dropAt is Drop of block i of page p, whose state is pg.
func (a *Arena) dropAt(p Page, pg *page, i int) {
	pg.refs[i] = 0
	a.live--
	a.vacateAt(p, pg, i)
}

// Entry returns block b's cache entry, or nil.
func (a *Arena) Entry(b Block) *keyindex.Entry[Block] {
	pg, i := a.slot(b)
	return pg.entry(i)
}

// entry returns the cache entry of block i of the page, or nil.
func (pg *page) entry(i int) *keyindex.Entry[Block] {
	if pg.entries == nil {
		return nil
	}
	return pg.entries[i]
}

// setEntry records block b's cache entry (nil: uncached).
func (a *Arena) setEntry(b Block, e *keyindex.Entry[Block]) {
	pg, i := a.slot(b)
	if pg.entries == nil {
		if e == nil {
			return
		}
		pg.entries = make([]*keyindex.Entry[Block], a.bpp)
	}
	pg.entries[i] = e
}

// Cache indexes held block b under key k; it returns false (and changes nothing) when k is
// cached already, in another block.
func (a *Arena) Cache(b Block, k prefix.Key) bool {
	e := a.index.Add(k, b)
	if e == nil {
		return false
	}
	a.setEntry(b, e)
	return true
}

// Uncache forgets held block b's cache entry, if it has one, and returns the key it had.
func (a *Arena) Uncache(b Block) (prefix.Key, bool) {
	e := a.Entry(b)
	if e == nil {
		return prefix.Key{}, false
	}
	k := e.Key
	a.index.Recycle(a.index.Remove(e))
	a.setEntry(b, nil)
	return k, true
}

// Ref adds a reference to held block b.
func (a *Arena) Ref(b Block) {
	pg, i := a.slot(b)
	pg.refs[i]++
}

// Refs returns block b's reference count.
func (a *Arena) Refs(b Block) int32 {
	pg, i := a.slot(b)
	return pg.refs[i]
}

// Unref drops a reference to block b; at zero a cached block goes idle and any other is freed.
func (a *Arena) Unref(b Block) {
	p, pg, i := a.at(b)
	if pg.refs[i] > 1 {
		pg.refs[i]--
		return
	}
	e := pg.entry(i)
	if e == nil {
		a.dropAt(p, pg, i)
		return
	}
	pg.refs[i] = 0
	pg.idle++
	a.live--
	a.idle++
	a.index.Release(e)
	pg.newest, pg.stale = e.LastUse, false // the newest use of all, so the page's age exactly
	a.reage(p)
}

// HoldAll takes a reference to each of blocks, the cached blocks of a prefix hit: an idle block
// is held again. A page is re-indexed once per run of its blocks, not once per block: reage reads
// only its own page, and nothing reads the cache-only index in between.
func (a *Arena) HoldAll(blocks []Block) {
	bpp, last, first := Block(a.bpp), Page(-1), Block(0) // first: page last's first block
	var pg *page
	for _, b := range blocks {
		i := b - first
		if last < 0 || i < 0 || i >= bpp { // another page: divide only then
			if last >= 0 {
				a.reage(last)
			}
			last = Page(b / bpp)
			pg, first = a.pages[last], a.First(last)
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

// Hold takes a reference to block b, as holdAll does for a run.
func (a *Arena) Hold(b Block) {
	one := [1]Block{b}
	a.HoldAll(one[:])
}

// Unhold undoes hold of block b, which was idle after prev in the LRU order (its entry's Prev
// then): b is idle again, at its place. Undo holds in reverse order, after the evictions since.
func (a *Arena) Unhold(b Block, prev *keyindex.Entry[Block]) {
	pg, i := a.slot(b)
	pg.refs[i] = 0
	pg.idle++
	a.live--
	a.idle++
	a.index.Unhold(a.Entry(b), prev)
	pg.stale = true
	a.reage(a.PageOf(b))
}

// Evict forgets idle block b's entry and frees it; it returns what the index took out, so that
// restore can undo it (until the caller recycles it).
func (a *Arena) Evict(b Block) keyindex.Removed[Block] {
	pg, _ := a.slot(b)
	r := a.index.Remove(a.Entry(b))
	a.setEntry(b, nil)
	pg.idle--
	a.idle--
	// The page's age is the newest use of its idle blocks. Evicting an older one leaves it as it
	// was, which spares reage a scan of the page for every block evicted in LRU order.
	pg.stale = pg.stale || r.LastUse >= pg.newest
	a.vacate(b)
	return r
}

// Restore undoes evict: free block r.Block is idle and cached again, at its place in the order.
func (a *Arena) Restore(r keyindex.Removed[Block]) {
	b := r.Block
	pg, _ := a.slot(b)
	e := a.index.Restore(r)
	a.setEntry(b, e)
	pg.idle++
	a.idle++
	pg.stale = true
	a.occupy(b)
}

// Move gives free block dst the state of block src (held with its references, or idle) and
// its cache entry, and frees src.
func (a *Arena) Move(src, dst Block) {
	e := a.Entry(src)
	a.setEntry(src, nil)
	if e != nil { // before the pages are re-indexed, which reads the entries
		e.Block = dst
		a.setEntry(dst, e)
	}
	if refs := a.Refs(src); refs > 0 {
		a.Take(dst, refs)
		a.Drop(src)
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
func (a *Arena) reage(p Page) {
	pg := a.pages[p]
	want := pg.state >= Free && pg.idle > 0 && pg.live(a.bpp) == 0
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

// LiveIn returns the blocks in use (held or idle) on mapped page p.
func (a *Arena) LiveIn(p Page) int { return a.bpp - a.pages[p].free }

// BlocksPerPage returns the blocks of one page.
func (a *Arena) BlocksPerPage() int { return a.bpp }

// Pages returns the pages of the arena, mapped or not.
func (a *Arena) Pages() int { return len(a.pages) }

// State returns page p's state; a page never used is Unmapped.
func (a *Arena) State(p Page) State {
	if pg := a.pages[p]; pg != nil {
		return pg.state
	}
	return Unmapped
}

// Mapped returns the pages in state Free, Partial or Full.
func (a *Arena) Mapped() int { return a.mapped }

// Live returns the held blocks.
func (a *Arena) Live() int { return a.live }

// Idle returns the idle cached blocks.
func (a *Arena) Idle() int { return a.idle }

// Gen counts the pages' transitions between mapped and not mapped so far.
func (a *Arena) Gen() uint64 { return a.gen }

// Index returns the key index of the arena's cached blocks. The arena tells it when a block is
// cached, held, released and evicted; the owner reads it and recycles what Evict returns.
func (a *Arena) Index() *keyindex.Index[Block] { return a.index }

// FreePages returns the mapped pages whose blocks are all free.
func (a *Arena) FreePages() int { return a.free.Len() }

// PartialPages returns the mapped pages with some blocks free.
func (a *Arena) PartialPages() int { return a.partial.Len() }

// HighestFree returns the highest free page: the one to unmap first.
func (a *Arena) HighestFree() (Page, bool) { return a.free.Max() }

// CacheOnlyPages returns the cache-only pages.
func (a *Arena) CacheOnlyPages() int { return a.cacheOnly.Len() }

// OldestCacheOnly returns the cache-only page whose newest idle block is the least recently
// used: the page to evict first when a page must go back.
func (a *Arena) OldestCacheOnly() (Page, bool) {
	pa, ok := a.cacheOnly.Min()
	return pa.page, ok
}

// FreeIn returns the free blocks of mapped page p.
func (a *Arena) FreeIn(p Page) int { return a.pages[p].free }

// IsFree reports whether block b, on a page used before, holds nothing.
func (a *Arena) IsFree(b Block) bool {
	pg, i := a.slot(b)
	return pg.bits[i/64]&(1<<(i%64)) != 0
}

// IsIdle reports whether block b is cached and held by no sequence.
func (a *Arena) IsIdle(b Block) bool {
	e := a.Entry(b)
	return e != nil && e.Idle()
}

// NearTie is how close, as a fraction of the idle blocks' age span, a cache-only page's newest
// block must be to the least recently used block for Victim to name the whole page instead.
const NearTie = 8 // 1/8

// Victim returns what eviction takes next (ok false when nothing is idle): the least recently
// used idle block (page -1), or, when a cache-only page's newest idle block is nearly as old as
// that block (within 1/NearTie of the idle blocks' age span), that whole page (block -1).
// Memory goes back by the page, so emptying a page that is nearly as old beats freeing one
// block on each of many pages; the newest blocks stay cached.
func (a *Arena) Victim() (block Block, page Page, ok bool) {
	e := a.index.Oldest()
	if e == nil {
		return -1, -1, false
	}
	if pa, ok := a.cacheOnly.Min(); ok && pa.newest-e.LastUse <= (a.index.Clock()-e.LastUse)/NearTie {
		return -1, pa.page, true
	}
	return e.Block, -1, true
}

// PlanCompaction returns, changing nothing, the (src, dst) block pairs that pack the held and
// idle blocks into the fewest pages: the pages with the most blocks in use stay (the lowest
// among equals), the sparsest are emptied first (the highest among equals) into the lowest
// free blocks of the pages that stay, up to maxBlocks moved (negative: no bound) and only whole
// source pages. The owner copies each src to dst and then calls Move for each pair.
func (a *Arena) PlanCompaction(maxBlocks int) []int64 {
	type pageLive struct {
		page Page
		live int
	}
	var used []pageLive
	for p, pg := range a.pages {
		if pg != nil && (pg.state == Partial || pg.state == Full) {
			used = append(used, pageLive{Page(p), a.LiveIn(Page(p))})
		}
	}
	keep := (a.live + a.idle + a.bpp - 1) / a.bpp // cached blocks are data: packed, with their keys
	// Keep the pages with the most live blocks (the lowest among equals).
	slices.SortFunc(used, func(x, y pageLive) int {
		if x.live != y.live {
			return y.live - x.live
		}
		return int(x.page - y.page)
	})
	keepers, sources := used[:keep], used[keep:]
	slices.SortFunc(keepers, func(x, y pageLive) int { return int(x.page - y.page) })
	// Evacuate the sparsest pages first, the highest among equals.
	slices.SortFunc(sources, func(x, y pageLive) int {
		if x.live != y.live {
			return x.live - y.live
		}
		return int(y.page - x.page)
	})
	var pairs []int64
	moved := 0
	ki, slot := 0, 0 // next destination: keepers[ki], block slot >= slot
	nextDst := func() Block {
		for ; ki < len(keepers); ki, slot = ki+1, 0 {
			pg := a.pages[keepers[ki].page]
			for ; slot < a.bpp; slot++ {
				if pg.bits[slot/64]&(1<<(slot%64)) != 0 {
					slot++
					return a.First(keepers[ki].page) + Block(slot-1)
				}
			}
		}
		panic("arena: compaction ran out of destination blocks")
	}
	for _, src := range sources {
		if maxBlocks >= 0 && moved+src.live > maxBlocks {
			break
		}
		moved += src.live
		pg := a.pages[src.page]
		for i := range a.bpp {
			if pg.bits[i/64]&(1<<(i%64)) == 0 { // held or idle cached
				pairs = append(pairs, int64(src.page)*int64(a.bpp)+int64(i), int64(nextDst()))
			}
		}
	}
	return pairs
}

// Check reports, through bad, every way the arena disagrees with itself or with refs (each
// block's holders, as the owner's sequences count them): reference counts, free bits, cache
// entries and their index, page states and the indexes of free, partial, unmapped and
// cache-only pages, the counts of held, idle and mapped blocks. It returns the mapped pages,
// lowest first, and changes nothing. Pages in flight are reported: call it when the owner has
// no mapping under way.
func (a *Arena) Check(refs map[Block]int32, bad func(format string, args ...any)) []Page {
	live, idle, mapped, entries := 0, 0, 0, 0
	var mappedList []Page
	for p, pg := range a.pages {
		p := Page(p)
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
		wantIdx := [3]bool{pg.state == Free, pg.state == Partial, pg.state == Unmapped}
		if gotIdx := [3]bool{inFree, inPartial, inUnmapped}; gotIdx != wantIdx {
			bad("page %d in state %d: index membership free/partial/unmapped %v", p, pg.state, gotIdx)
		}
		if pg.state == InFlight {
			bad("page %d in flight while the reserve goroutine is idle", p)
		}
		isMapped := pg.state >= Free
		if isMapped {
			mappedList = append(mappedList, p)
		}
		if !isMapped {
			for i := range a.bpp {
				b := a.First(p) + Block(i)
				if r := refs[b]; r != 0 {
					bad("block %d on unmapped page %d is held %d times", b, p, r)
				}
				if a.Entry(b) != nil {
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
		for i := range a.bpp {
			b := a.First(p) + Block(i)
			isFree := pg.bits[i/64]&(1<<(i%64)) != 0
			e := a.Entry(b)
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
		want := Partial
		switch free {
		case a.bpp:
			want = Free
		case 0:
			want = Full
		}
		if pg.state != want {
			bad("page %d: state %d with %d of %d blocks free", p, pg.state, free, a.bpp)
		}
		cacheOnly := pidle > 0 && free+pidle == a.bpp
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
	return mappedList
}
