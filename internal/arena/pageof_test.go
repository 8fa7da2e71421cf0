package arena_test

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/arena"
)

// checkPageOf asserts that PageOf(b) is b's page by division, and for a block id (b >= 0) that
// b lies in it: First(p) <= b < First(p)+bpp, its index in the page the remainder.
func checkPageOf(t *testing.T, a *arena.Arena, bpp int, b int32) {
	t.Helper()
	p := a.PageOf(arena.Block(b))
	require.Equal(t, arena.Page(b/int32(bpp)), p, "block %d, %d blocks a page", b, bpp)
	if b >= 0 {
		first := int64(a.First(p))
		require.True(t, first <= int64(b) && int64(b) < first+int64(bpp), "block %d outside page %d of %d blocks", b, p, bpp)
	}
}

// TestPageOfRandomPageSizes checks PageOf against the division for page sizes drawn from the
// whole range a configuration allows ([1, MaxInt32] blocks a page), at the ids where a
// reciprocal is most likely off: the last ids below 2^31 on either side of a page boundary,
// the boundaries of the first pages, NullBlock and random ids.
func TestPageOfRandomPageSizes(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for range 2000 {
		var bpp int
		switch r.IntN(3) {
		case 0: // small pages, as the configurations have
			bpp = 1 + r.IntN(4096)
		case 1: // a power of two, or one off one
			bpp = max(1, min(math.MaxInt32, 1<<r.IntN(32)+r.IntN(3)-1))
		default:
			bpp = 1 + r.IntN(math.MaxInt32)
		}
		a := arena.New(1, bpp)
		last := int64(math.MaxInt32) / int64(bpp) * int64(bpp) // the last page's first block
		ids := []int64{-1, 0, 1, int64(bpp) - 1, int64(bpp), int64(bpp) + 1, 2*int64(bpp) - 1, last - 1, last, math.MaxInt32 - 1, math.MaxInt32}
		for range 200 {
			ids = append(ids, r.Int64N(math.MaxInt32+1))
		}
		for _, b := range ids {
			if b >= -1 && b <= math.MaxInt32 {
				checkPageOf(t, a, bpp, int32(b))
			}
		}
	}
}

// FuzzPageOf checks PageOf against the division for any page size a configuration allows and
// any int32 id, negative ones (NullBlock) included.
func FuzzPageOf(f *testing.F) {
	f.Add(uint32(1), int32(math.MaxInt32))
	f.Add(uint32(3), int32(math.MaxInt32))
	f.Add(uint32(7), int32(-1))
	f.Add(uint32(641), int32(2147483006))
	f.Add(uint32(math.MaxInt32), int32(math.MaxInt32-1))
	f.Add(uint32(1<<30+1), int32(1<<31-2))
	f.Fuzz(func(t *testing.T, n uint32, b int32) {
		bpp := 1 + int(n%math.MaxInt32)
		checkPageOf(t, arena.New(1, bpp), bpp, b)
	})
}
