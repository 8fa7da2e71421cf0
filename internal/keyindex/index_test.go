package keyindex

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/prefix"
)

func TestIndex(t *testing.T) {
	x := NewIndex()
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
	var order []int32
	x.AscendIdle(func(e *Entry) bool { order = append(order, e.Block); return true })
	assert.Equal(t, []int32{10, 30}, order)
	n := 0
	x.Each(func(*Entry) bool { n++; return true })
	assert.Equal(t, 3, n)
	assert.Zero(t, testing.AllocsPerRun(100, func() {
		e := x.Add(k(9), 90)
		x.Release(e)
		x.Recycle(x.Remove(e))
	}), "entries are recycled")
}

// Holds undone in reverse order put every entry back at its place in the order, LastUse kept.
func TestUnhold(t *testing.T) {
	x := NewIndex()
	var es []*Entry
	for b := range 4 {
		e := x.Add(prefix.Key{byte(b)}, int32(b))
		x.Release(e)
		es = append(es, e)
	}
	order := func() []int32 {
		var o []int32
		x.AscendIdle(func(e *Entry) bool { o = append(o, e.Block); return true })
		return o
	}
	held := []*Entry{es[1], es[2], es[0]}
	prevs := make([]*Entry, len(held))
	for i, e := range held {
		prevs[i] = e.Prev()
		x.Hold(e)
	}
	require.Equal(t, []int32{3}, order())
	r := x.Remove(es[3]) // an eviction between, undone first
	x.Restore(r)
	for i := len(held) - 1; i >= 0; i-- {
		x.Unhold(held[i], prevs[i])
	}
	assert.Equal(t, []int32{0, 1, 2, 3}, order())
	assert.Equal(t, 4, x.IdleLen())
	for b, e := range es {
		assert.EqualValues(t, b+1, e.LastUse)
		assert.True(t, e.Idle())
	}
	x.Unhold(es[0], nil) // an idle entry: nothing to undo
	assert.Equal(t, []int32{0, 1, 2, 3}, order())
}
