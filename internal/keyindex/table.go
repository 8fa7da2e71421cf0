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
// piling chosen keys into one probe run), and a hit costs one slot load and one key compare
// (BenchmarkGet).
type table struct {
	slots []*Entry // a power of two of them; nil is empty
	seed  uint64
	n     int // entries
}

const minSlots = 64

func newTable() table { return table{slots: make([]*Entry, minSlots), seed: rand.Uint64()} }

// home returns the slot where k's probe run starts.
func (t *table) home(k *prefix.Key) int {
	hi, lo := bits.Mul64(binary.LittleEndian.Uint64(k[:8])^t.seed, 0x9e3779b97f4a7c15)
	return int((hi ^ lo) & uint64(len(t.slots)-1))
}

// get returns the entry of key k, or nil.
func (t *table) get(k *prefix.Key) *Entry {
	mask := len(t.slots) - 1
	for i := t.home(k); ; i = (i + 1) & mask {
		if e := t.slots[i]; e == nil || equal(&e.Key, k) {
			return e
		}
	}
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
func (t *table) insert(e *Entry) {
	if 2*(t.n+1) > len(t.slots) {
		old := t.slots
		t.slots = make([]*Entry, 2*len(old))
		for _, f := range old {
			if f != nil {
				t.place(f)
			}
		}
	}
	t.place(e)
	t.n++
}

// place puts e in the first empty slot of its probe run.
func (t *table) place(e *Entry) {
	mask := len(t.slots) - 1
	i := t.home(&e.Key)
	for t.slots[i] != nil {
		i = (i + 1) & mask
	}
	t.slots[i] = e
}

// remove takes out e, which the table holds. The entries after it in the probe run move back
// into the hole whenever their home allows, so that every entry stays reachable from its home
// without gaps.
func (t *table) remove(e *Entry) {
	mask := len(t.slots) - 1
	i := t.home(&e.Key)
	for t.slots[i] != e {
		i = (i + 1) & mask
	}
	for j := (i + 1) & mask; t.slots[j] != nil; j = (j + 1) & mask {
		// The entry at j may fill the hole at i when i lies on its way from its home to j.
		if h := t.home(&t.slots[j].Key); (j-h)&mask >= (j-i)&mask {
			t.slots[i] = t.slots[j]
			i = j
		}
	}
	t.slots[i] = nil
	t.n--
}
