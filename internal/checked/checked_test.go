package checked

import (
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestChecked(t *testing.T) {
	p, ok := Mul(1<<32, 1<<31)
	assert.True(t, ok)
	assert.EqualValues(t, uint64(1)<<63, p)
	_, ok = Mul(1<<32, 1<<32)
	assert.False(t, ok)
	_, ok = Add(math.MaxUint64, 1)
	assert.False(t, ok)
	s, ok := Add(math.MaxUint64-1, 1)
	assert.True(t, ok)
	assert.EqualValues(t, uint64(math.MaxUint64), s)

	p, ok = MulN(math.MaxUint64, 2, 3, 7)
	assert.True(t, ok)
	assert.EqualValues(t, 42, p)
	_, ok = MulN(41, 2, 3, 7)
	assert.False(t, ok, "over max")
	_, ok = MulN(math.MaxUint64, 2, -3)
	assert.False(t, ok, "negative factor")
	_, ok = MulN(math.MaxUint64, 1<<30, 1<<30, 1<<30)
	assert.False(t, ok, "2^90 overflows")

	n, ok := Int(1<<31, 1<<31)
	assert.True(t, ok)
	assert.Equal(t, 1<<62, n)
	_, ok = Int(math.MaxInt, 2)
	assert.False(t, ok)
	_, ok = Int(-1, 2)
	assert.False(t, ok)

	r, ok := RoundUp(5, 4)
	assert.True(t, ok)
	assert.EqualValues(t, 8, r)
	_, ok = RoundUp(math.MaxUint64, 4)
	assert.False(t, ok)
	_, ok = RoundUp(5, 0)
	assert.False(t, ok)
}

func TestOver(t *testing.T) {
	for _, c := range []struct{ used, n, limit, want uint64 }{
		{0, 0, 0, 0}, {0, 5, 10, 0}, {5, 5, 10, 0}, {5, 6, 10, 1}, {10, 1, 10, 1}, {12, 3, 10, 5},
		{0, math.MaxUint64, 10, math.MaxUint64 - 10}, {math.MaxUint64, 1, 0, math.MaxUint64}, {math.MaxUint64, math.MaxUint64, 5, math.MaxUint64},
	} {
		if got := Over(c.used, c.n, c.limit); got != c.want {
			t.Errorf("Over(%d, %d, %d) = %d, want %d", c.used, c.n, c.limit, got, c.want)
		}
	}
}
