// Package keyindex is the prefix cache's index from block keys to the blocks that hold them,
// with the idle ones (cached, held by no sequence) in a list ordered by last use, so that
// holding, releasing and evicting are O(1) and a failed operation's evictions can be undone
// exactly. It is generic over B, the type of the ids of what holds the blocks: the arena of
// each kvcache group indexes its device blocks (sequence.Block), a host tier its host slots, and
// the types keep the two from mixing. It is not safe for concurrent use.
package keyindex

import "github.com/pagedkv/pagedkv/prefix"

// Entry is one cached block: its key and the block id that holds it. An entry is idle while no
// sequence holds the block; only idle entries can be evicted. The Index owns entries and
// recycles them: a caller keeps an *Entry only while it is indexed.
//
// The fields are laid out in 64 bytes, one cache line: a lookup, a hold and an eviction each
// touch an entry that is rarely in cache (TestEntrySize).
type Entry[B ~int32] struct {
	Key prefix.Key
	// LastUse orders idle entries: the Index's clock when the block was last released.
	LastUse    uint64
	prev, next *Entry[B] // the idle list, oldest first
	Block      B
	idle       bool
}

// Idle reports whether no sequence holds the entry's block.
func (e *Entry[B]) Idle() bool { return e.idle }

// Removed is an entry Remove took out, with what Restore needs to put it back exactly: the
// entry itself (not yet recycled) and its neighbours in the idle order.
type Removed[B ~int32] struct {
	Key        prefix.Key
	Block      B
	LastUse    uint64
	Idle       bool
	e          *Entry[B]
	prev, next *Entry[B]
}

// Index maps keys to the entries of cached blocks, and keeps the idle ones in a list ordered by
// last use (oldest first), so that holding, releasing and evicting are O(1). It allocates
// nothing in steady state: entries are recycled, and the table keeps its storage. The zero
// Index is not usable; call NewIndex. Not safe for concurrent use.
type Index[B ~int32] struct {
	byKey      table[B]
	head, tail *Entry[B] // idle list
	nidle      int
	clock      uint64
	spare      []*Entry[B]
}

// NewIndex returns an empty index.
func NewIndex[B ~int32]() *Index[B] { return &Index[B]{byKey: newTable[B]()} }

// Len returns the number of cached blocks, held or idle.
func (x *Index[B]) Len() int { return x.byKey.n }

// IdleLen returns the number of idle cached blocks.
func (x *Index[B]) IdleLen() int { return x.nidle }

// Get returns the entry of key k, or nil.
func (x *Index[B]) Get(k prefix.Key) *Entry[B] { return x.byKey.get(&k) }

// GetAt is Get for the key *k, which it reads and does not keep: a walk over a prompt's chain
// of keys passes each in place instead of copying its 32 bytes.
func (x *Index[B]) GetAt(k *prefix.Key) *Entry[B] { return x.byKey.get(k) }

// GetRun writes to dst the blocks of the leading keys that are indexed, up to the first that is
// not or len(dst), and returns how many it wrote. It is Get for each in turn, in one loop over
// the table: a prefix hit asks for a few hundred keys in a row.
func (x *Index[B]) GetRun(keys []prefix.Key, dst []B) int {
	return x.byKey.getRun(keys, dst)
}

// Add indexes block under k as held and returns its entry, or returns nil and changes nothing
// when k is indexed already (another block holds the same content).
func (x *Index[B]) Add(k prefix.Key, block B) *Entry[B] {
	i, found := x.byKey.find(&k) // one probe for the check and the insert
	if found {
		return nil
	}
	var e *Entry[B]
	if n := len(x.spare); n > 0 {
		e, x.spare = x.spare[n-1], x.spare[:n-1]
	} else {
		e = new(Entry[B])
	}
	*e = Entry[B]{Key: k, Block: block}
	x.byKey.insertAt(i, e)
	return e
}

// unlink takes idle e out of the idle list.
func (x *Index[B]) unlink(e *Entry[B]) {
	if e.prev != nil {
		e.prev.next = e.next
	} else {
		x.head = e.next
	}
	if e.next != nil {
		e.next.prev = e.prev
	} else {
		x.tail = e.prev
	}
	e.prev, e.next = nil, nil
	x.nidle--
}

// linkAfter puts idle e after p in the idle list (at the head when p is nil).
func (x *Index[B]) linkAfter(e, p *Entry[B]) {
	e.prev = p
	if p == nil {
		e.next, x.head = x.head, e
	} else {
		e.next, p.next = p.next, e
	}
	if e.next != nil {
		e.next.prev = e
	} else {
		x.tail = e
	}
	x.nidle++
}

// Remove takes e out of the index (an eviction, or a block about to be overwritten) and
// returns what Restore needs to undo it. The entry is recycled by Recycle, not before, so that
// a Restore in the reverse order of the Removes puts everything back exactly.
func (x *Index[B]) Remove(e *Entry[B]) Removed[B] {
	r := Removed[B]{Key: e.Key, Block: e.Block, LastUse: e.LastUse, Idle: e.idle, e: e, prev: e.prev, next: e.next}
	if e.idle {
		x.unlink(e)
	}
	x.byKey.remove(e)
	return r
}

// Recycle lets the index reuse a removed entry's storage; r cannot be restored afterwards.
func (x *Index[B]) Recycle(r Removed[B]) {
	*r.e = Entry[B]{}
	x.spare = append(x.spare, r.e)
}

// Restore puts back what Remove took out, at its place in the idle order, and returns the
// entry. Restores must come in the reverse order of the Removes they undo, with nothing else
// changing the index in between.
func (x *Index[B]) Restore(r Removed[B]) *Entry[B] {
	e := r.e
	*e = Entry[B]{Key: r.Key, Block: r.Block, LastUse: r.LastUse}
	x.byKey.insert(e)
	if r.Idle {
		e.idle = true
		x.linkAfter(e, r.prev)
	}
	return e
}

// Release marks e idle, as the most recently used: no sequence holds its block any more.
func (x *Index[B]) Release(e *Entry[B]) {
	if e.idle {
		return
	}
	x.clock++
	e.LastUse = x.clock
	e.idle = true
	x.linkAfter(e, x.tail)
}

// Hold marks idle e held again (a prefix hit).
func (x *Index[B]) Hold(e *Entry[B]) {
	if !e.idle {
		return
	}
	x.unlink(e)
	e.idle = false
}

// Prev returns the idle entry released just before idle e: nil when e is the least recently
// used or held. Taken before a Hold, it is what Unhold needs to undo it.
func (e *Entry[B]) Prev() *Entry[B] { return e.prev }

// Unhold undoes the Hold that made e held, e having been idle after prev (its Prev then): e is
// idle again at its place in the order, with its LastUse. Unholds come in the reverse order of
// the Holds they undo, after every other change to the idle list since has been undone.
func (x *Index[B]) Unhold(e, prev *Entry[B]) {
	if e.idle {
		return
	}
	e.idle = true
	x.linkAfter(e, prev)
}

// Oldest returns the least recently used idle entry, or nil.
func (x *Index[B]) Oldest() *Entry[B] { return x.head }

// AscendIdle calls fn for the idle entries from the least recently used until fn returns false.
// fn must not change the index.
func (x *Index[B]) AscendIdle(fn func(*Entry[B]) bool) {
	for e := x.head; e != nil; e = e.next {
		if !fn(e) {
			return
		}
	}
}

// Each calls fn for every entry, in no particular order, until fn returns false. fn must not
// change the index.
func (x *Index[B]) Each(fn func(*Entry[B]) bool) {
	for _, s := range x.byKey.slots {
		if s.e != nil && !fn(s.e) {
			return
		}
	}
}

// Clock returns the last-use clock: the LastUse the next released entry gets, minus one.
func (x *Index[B]) Clock() uint64 { return x.clock }
