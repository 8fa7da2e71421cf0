package keyindex

import (
	"encoding/binary"
	"math/bits"
	"math/rand/v2"

	"github.com/pagedkv/pagedkv/prefix"
)

// table is a hash table of entries by key: open addressing with linear probing, at most half
// full, with backward-shift deletion so that it needs no tombstones.
//
// Why not a Go map: a prefix lookup is one probe per block, and a map keyed by 32-byte arrays
// hashes all 32 bytes and compares them through a call (about 30 ns a hit in StartSequence's
// profile). Keys are SHA-256 outputs, already uniform, so the slot comes from their first 8
// bytes mixed with a per-table random seed (the seed keeps tenants who choose token ids from
// piling chosen keys into one probe run). A slot keeps those 8 bytes beside the entry, so that
// a probe past other keys, a miss and a deletion's shift read only the slots, not the entries
// (BenchmarkGet, BenchmarkAddRemove).
type table[B ~int32] struct {
	slots []slot[B] // a power of two of them
	seed  uint64
	n     int // entries
}

// slot is one place of the table: empty when e is nil.
type slot[B ~int32] struct {
	short uint64 // the first 8 bytes of e's key
	e     *Entry[B]
}

const minSlots = 64

func newTable[B ~int32]() table[B] {
	return table[B]{slots: make([]slot[B], minSlots), seed: rand.Uint64()}
}

// shortKey returns the first 8 bytes of k.
func shortKey(k *prefix.Key) uint64 { return binary.LittleEndian.Uint64(k[:8]) }

// home returns the slot where the probe run of a key whose first 8 bytes are short starts.
func (t *table[B]) home(short uint64) int {
	hi, lo := bits.Mul64(short^t.seed, 0x9e3779b97f4a7c15)
	return int((hi ^ lo) & uint64(len(t.slots)-1))
}

// get returns the entry of key k, or nil.
func (t *table[B]) get(k *prefix.Key) *Entry[B] {
	short, mask := shortKey(k), len(t.slots)-1
	for i := t.home(short); ; i = (i + 1) & mask {
		s := &t.slots[i]
		if s.e == nil || s.short == short && equal(&s.e.Key, k) {
			return s.e
		}
	}
}

// getRun writes to dst the blocks of keys' leading run of keys in the table, at most len(dst),
// and returns its length.
func (t *table[B]) getRun(keys []prefix.Key, dst []B) int {
	n := min(len(keys), len(dst))
	for j := range n {
		e := t.get(&keys[j])
		if e == nil {
			return j
		}
		dst[j] = e.Block
	}
	return n
}

// find returns where key k is in the table (found) or, when it is not, the empty slot that
// ends its probe run, where it would go.
func (t *table[B]) find(k *prefix.Key) (i int, found bool) {
	short, mask := shortKey(k), len(t.slots)-1
	for i = t.home(short); ; i = (i + 1) & mask {
		s := &t.slots[i]
		if s.e == nil {
			return i, false
		}
		if s.short == short && equal(&s.e.Key, k) {
			return i, true
		}
	}
}

// insertAt adds e at slot i, which find returned for e's key as empty, unless the table must
// grow first (then e goes where its probe run ends in the new slots).
func (t *table[B]) insertAt(i int, e *Entry[B]) {
	if 2*(t.n+1) > len(t.slots) {
		t.insert(e)
		return
	}
	t.slots[i] = slot[B]{shortKey(&e.Key), e}
	t.n++
}

// equal reports whether a and b are the same key, in four 8-byte compares (== on arrays of this
// size calls memequal).
func equal(a, b *prefix.Key) bool {
	le := binary.LittleEndian
	return le.Uint64(a[:8]) == le.Uint64(b[:8]) && le.Uint64(a[8:16]) == le.Uint64(b[8:16]) &&
		le.Uint64(a[16:24]) == le.Uint64(b[16:24]) && le.Uint64(a[24:]) == le.Uint64(b[24:])
}

// insert adds e, whose key the table does not hold, doubling the slots when it would be more
// than half full.
func (t *table[B]) insert(e *Entry[B]) {
	if 2*(t.n+1) > len(t.slots) {
		old := t.slots
		t.slots = make([]slot[B], 2*len(old))
		for _, s := range old {
			if s.e != nil {
				t.place(s)
			}
		}
	}
	t.place(slot[B]{shortKey(&e.Key), e})
	t.n++
}

// place puts s in the first empty slot of its probe run.
func (t *table[B]) place(s slot[B]) {
	mask := len(t.slots) - 1
	i := t.home(s.short)
	for t.slots[i].e != nil {
		i = (i + 1) & mask
	}
	t.slots[i] = s
}

// remove takes out e, which the table holds. The entries after it in the probe run move back
// into the hole whenever their home allows, so that every entry stays reachable from its home
// without gaps.
func (t *table[B]) remove(e *Entry[B]) {
	mask := len(t.slots) - 1
	i := t.home(shortKey(&e.Key))
	for t.slots[i].e != e {
		i = (i + 1) & mask
	}
	for j := (i + 1) & mask; t.slots[j].e != nil; j = (j + 1) & mask {
		// The entry at j may fill the hole at i when i lies on its way from its home to j.
		if h := t.home(t.slots[j].short); (j-h)&mask >= (j-i)&mask {
			t.slots[i] = t.slots[j]
			i = j
		}
	}
	t.slots[i] = slot[B]{}
	t.n--
}
