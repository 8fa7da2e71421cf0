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
