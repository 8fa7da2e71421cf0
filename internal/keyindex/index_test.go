package keyindex

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/sequence"
)

func TestIndex(t *testing.T) {
	x := NewIndex[sequence.Block]()
	k := func(b byte) prefix.Key { return prefix.Key{b} }
	e1 := x.Add(k(1), 10)
	require.NotNil(t, e1)
	assert.Nil(t, x.Add(k(1), 11), "a key already cached is not indexed twice")
	e2, e3 := x.Add(k(2), 20), x.Add(k(3), 30)
	assert.Equal(t, 3, x.Len())
	assert.Zero(t, x.IdleLen())
	x.Release(e2)
	x.Release(e1)
	x.Release(e3)
	assert.Equal(t, 3, x.IdleLen())
	assert.Same(t, e2, x.Oldest(), "released first, evicted first")
	x.Hold(e2)
	assert.Same(t, e1, x.Oldest())
	assert.False(t, e2.Idle())
	r := x.Remove(e1)
	assert.Nil(t, x.Get(k(1)))
	assert.Same(t, e3, x.Oldest())
	back := x.Restore(r)
	require.NotNil(t, back)
	assert.Same(t, back, x.Oldest(), "a restored entry goes back to its place in the order")
	assert.Equal(t, 2, x.IdleLen())
	// Removes undone in reverse order put everything back, neighbours included.
	ra, rb := x.Remove(x.Get(k(1))), x.Remove(x.Get(k(3)))
	assert.Zero(t, x.IdleLen())
	x.Restore(rb)
	x.Restore(ra)
	assert.EqualValues(t, 10, x.Get(k(1)).Block)
	var order []sequence.Block
	x.AscendIdle(func(e *Entry[sequence.Block]) bool { order = append(order, e.Block); return true })
	assert.Equal(t, []sequence.Block{10, 30}, order)
	n := 0
	x.Each(func(*Entry[sequence.Block]) bool { n++; return true })
	assert.Equal(t, 3, n)
	assert.Zero(t, testing.AllocsPerRun(100, func() {
		e := x.Add(k(9), 90)
		x.Release(e)
		x.Recycle(x.Remove(e))
	}), "entries are recycled")
}

// Holds undone in reverse order put every entry back at its place in the order, LastUse kept.
func TestUnhold(t *testing.T) {
	x := NewIndex[sequence.Block]()
	var es []*Entry[sequence.Block]
	for b := range 4 {
		e := x.Add(prefix.Key{byte(b)}, sequence.Block(b))
		x.Release(e)
		es = append(es, e)
	}
	order := func() []sequence.Block {
		var o []sequence.Block
		x.AscendIdle(func(e *Entry[sequence.Block]) bool { o = append(o, e.Block); return true })
		return o
	}
	held := []*Entry[sequence.Block]{es[1], es[2], es[0]}
	prevs := make([]*Entry[sequence.Block], len(held))
	for i, e := range held {
		prevs[i] = e.Prev()
		x.Hold(e)
	}
	require.Equal(t, []sequence.Block{3}, order())
	r := x.Remove(es[3]) // an eviction between, undone first
	x.Restore(r)
	for i := len(held) - 1; i >= 0; i-- {
		x.Unhold(held[i], prevs[i])
	}
	assert.Equal(t, []sequence.Block{0, 1, 2, 3}, order())
	assert.Equal(t, 4, x.IdleLen())
	for b, e := range es {
		assert.EqualValues(t, b+1, e.LastUse)
		assert.True(t, e.Idle())
	}
	x.Unhold(es[0], nil) // an idle entry: nothing to undo
	assert.Equal(t, []sequence.Block{0, 1, 2, 3}, order())
}

// keys returns n keys as prefix.Keys makes them: SHA-256 chained over blocks of 16 tokens.
func keys(n int) []prefix.Key {
	toks := make([]prefix.Token, 16*n)
	for i := range toks {
		toks[i] = prefix.Token(i*7919 + 13)
	}
	return prefix.Keys(nil, prefix.Namespace{}, 16, toks)
}

// BenchmarkGet times a hit in an index of 256 and 65,536 cached blocks: the per-block cost of a
// prefix lookup with the keys given.
func BenchmarkGet(b *testing.B) {
	for _, n := range []int{256, 65536} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			x, ks := NewIndex[sequence.Block](), keys(n)
			for i, k := range ks {
				x.Add(k, sequence.Block(i))
			}
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if x.Get(ks[i]) == nil {
					b.Fatal("miss")
				}
				if i++; i == n {
					i = 0
				}
			}
		})
	}
}

// BenchmarkAddRemove times evicting the least recently used of 65,536 idle cached blocks and
// caching a block again: what a prefix cache at a 0% hit rate does for every block.
func BenchmarkAddRemove(b *testing.B) {
	x := NewIndex[sequence.Block]()
	for i, k := range keys(65536) {
		x.Release(x.Add(k, sequence.Block(i)))
	}
	b.ReportAllocs()
	for b.Loop() {
		r := x.Remove(x.Oldest())
		x.Recycle(r)
		x.Release(x.Add(r.Key, r.Block))
	}
}

// The table against a map, through Add, Remove, Restore and Recycle in random order, with keys
// that share their first 8 bytes (so their probe runs collide whatever the seed) beside
// ordinary ones: every key stays found, removed ones are gone, and Each sees exactly the set.
func TestTableAgainstMap(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	x, want := NewIndex[sequence.Block](), map[prefix.Key]sequence.Block{}
	var undo []Removed[sequence.Block] // removes not yet recycled, restored in reverse order
	key := func() prefix.Key {
		var k prefix.Key
		if rng.IntN(2) == 0 {
			k[0] = byte(rng.IntN(4)) // a few crowded first-8-byte groups
		} else {
			binary.LittleEndian.PutUint64(k[:8], rng.Uint64())
		}
		binary.LittleEndian.PutUint64(k[24:], rng.Uint64())
		return k
	}
	check := func() {
		require.Equal(t, len(want), x.Len())
		for k, b := range want {
			e := x.Get(k)
			require.NotNil(t, e, "key %v lost", k)
			require.Equal(t, b, e.Block)
		}
		seen := 0
		x.Each(func(e *Entry[sequence.Block]) bool { seen++; require.Equal(t, want[e.Key], e.Block); return true })
		require.Equal(t, len(want), seen)
	}
	for step := range 6000 {
		switch op := rng.IntN(10); {
		case op < 5 || len(want) == 0:
			k := key()
			_, had := want[k]
			e := x.Add(k, sequence.Block(step))
			require.Equal(t, had, e == nil)
			if !had {
				want[k] = sequence.Block(step)
			}
		case op < 8:
			for k := range want { // the first in the map's random order
				undo = append(undo, x.Remove(x.Get(k)))
				delete(want, k)
				break
			}
			require.Nil(t, x.Get(undo[len(undo)-1].Key))
		case op < 9 && len(undo) > 0:
			r := undo[len(undo)-1]
			undo = undo[:len(undo)-1]
			x.Restore(r)
			want[r.Key] = r.Block
		default:
			for _, r := range undo {
				x.Recycle(r)
			}
			undo = undo[:0]
		}
		if step%31 == 0 {
			check()
		}
	}
	check()
	assert.Greater(t, len(x.byKey.slots), minSlots, "the table grew")
}

// An entry fills one cache line, so that touching it costs one miss (on 64-bit platforms).
func TestEntrySize(t *testing.T) {
	if unsafe.Sizeof(uintptr(0)) == 8 {
		assert.EqualValues(t, 64, unsafe.Sizeof(Entry[sequence.Block]{}))
	}
}

// GetRun finds what Get finds for each key in turn, and stops at the first key not indexed or
// where dst ends.
func TestGetRun(t *testing.T) {
	x := NewIndex[sequence.Block]()
	k := func(b byte) prefix.Key { return prefix.Key{b, 7} }
	for b := range byte(100) {
		if b != 60 {
			x.Add(k(b), sequence.Block(b)+1000)
		}
	}
	keys := make([]prefix.Key, 100)
	for i := range keys {
		keys[i] = k(byte(i))
	}
	for _, tc := range []struct {
		name      string
		keys, dst int
		want      int
	}{
		{"to the key not indexed", 100, 100, 60},
		{"to the end of dst", 100, 40, 40},
		{"to the end of keys", 30, 100, 30},
		{"none", 0, 100, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := make([]sequence.Block, tc.dst)
			require.Equal(t, tc.want, x.GetRun(keys[:tc.keys], dst))
			for i := range tc.want {
				assert.Equal(t, x.GetAt(&keys[i]).Block, dst[i])
			}
			for _, b := range dst[tc.want:] {
				assert.Zero(t, b, "nothing written past the run")
			}
		})
	}
	assert.Zero(t, x.GetRun(keys[60:], make([]sequence.Block, 10)))
	assert.Nil(t, x.GetAt(&keys[60]))
}
