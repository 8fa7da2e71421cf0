package kvcache

import (
	"math/bits"

	"github.com/google/btree"
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
type page struct {
	state pageState
	free  int      // free blocks
	bits  []uint64 // bit i set: block i of the page is free
	refs  []int32  // reference count of each block (sequences holding it)
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
type arena struct {
	bpp      int
	pages    []*page
	fresh    int32 // first page never used
	free     *btree.BTreeG[int32]
	partial  *btree.BTreeG[int32]
	unmapped *btree.BTreeG[int32]
	mapped   int    // pages in state free, partial or full
	live     int    // blocks with refs > 0
	shared   int    // blocks with refs > 1
	gen      uint64 // mapped/unmapped transitions so far
}

func less(a, b int32) bool { return a < b }

func newArena(npages, bpp int) *arena {
	a := &arena{
		bpp:      bpp,
		pages:    make([]*page, npages),
		free:     btree.NewG(32, less),
		partial:  btree.NewG(32, less),
		unmapped: btree.NewG(32, less),
	}
	return a
}

func (a *arena) pageOf(b int32) int32 { return b / int32(a.bpp) }

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

// mapped marks page p (in flight) as mapped and entirely free.
func (a *arena) markMapped(p int32) {
	pg := a.pages[p]
	pg.free = a.bpp
	for i := range pg.bits {
		pg.bits[i] = ^uint64(0)
	}
	if r := a.bpp % 64; r != 0 {
		pg.bits[len(pg.bits)-1] = 1<<r - 1
	}
	a.setState(p, pageFree)
}

// pick returns the page the next block of a sequence goes to: the page of its last block while
// that has room, else the lowest partially free page, else the lowest free page.
func (a *arena) pick(hint int32) (int32, bool) {
	if hint >= 0 {
		if pg := a.pages[hint]; pg.state == pagePartial || pg.state == pageFree {
			return hint, true
		}
	}
	if p, ok := a.partial.Min(); ok {
		return p, true
	}
	return a.free.Min()
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

// take marks free block b as held by refs sequences.
func (a *arena) take(b int32, refs int32) {
	p := a.pageOf(b)
	pg := a.pages[p]
	i := int(b) % a.bpp
	pg.bits[i/64] &^= 1 << (i % 64)
	pg.refs[i] = refs
	pg.free--
	a.live++
	if refs > 1 {
		a.shared++
	}
	switch {
	case pg.free == 0:
		a.setState(p, pageFull)
	case pg.state == pageFree:
		a.setState(p, pagePartial)
	}
}

// drop frees block b whatever its reference count.
func (a *arena) drop(b int32) {
	p := a.pageOf(b)
	pg := a.pages[p]
	i := int(b) % a.bpp
	if pg.refs[i] > 1 {
		a.shared--
	}
	pg.refs[i] = 0
	pg.bits[i/64] |= 1 << (i % 64)
	pg.free++
	a.live--
	switch {
	case pg.free == a.bpp:
		a.setState(p, pageFree)
	case pg.state == pageFull:
		a.setState(p, pagePartial)
	}
}

// move gives free block dst the references of block src and frees src.
func (a *arena) move(src, dst int32) {
	a.take(dst, a.refs(src))
	a.drop(src)
}

// ref adds a reference to block b.
func (a *arena) ref(b int32) {
	r := &a.pages[a.pageOf(b)].refs[int(b)%a.bpp]
	*r++
	if *r == 2 {
		a.shared++
	}
}

// refs returns block b's reference count.
func (a *arena) refs(b int32) int32 { return a.pages[a.pageOf(b)].refs[int(b)%a.bpp] }

// unref drops a reference to block b and frees it at zero.
func (a *arena) unref(b int32) {
	r := &a.pages[a.pageOf(b)].refs[int(b)%a.bpp]
	if *r > 1 {
		*r--
		if *r == 1 {
			a.shared--
		}
		return
	}
	a.drop(b)
}

// liveIn returns the blocks in use on mapped page p.
func (a *arena) liveIn(p int32) int { return a.bpp - a.pages[p].free }
