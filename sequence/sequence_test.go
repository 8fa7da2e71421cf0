package sequence

import (
	"math"

	"github.com/pagedkv/pagedkv/internal/errdefs"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestSequenceGeometry(t *testing.T) {
	assert.Equal(t, 0, BlocksFor(0, 16))
	assert.Equal(t, 1, BlocksFor(1, 16))
	assert.Equal(t, 1, BlocksFor(16, 16))
	assert.Equal(t, 2, BlocksFor(17, 16))
	s := &Sequence{Tokens: 20, Blocks: []Block{7, 3}}
	assert.Equal(t, 12, s.TailRoom(16))
}

func TestRegistryRecyclesWithoutAllocating(t *testing.T) {
	r := NewRegistry()
	s, err := r.Add(1)
	require.NoError(t, err)
	s.Blocks = append(s.Blocks, 1, 2, 3)
	s.Tokens = 40
	got, ok := r.Get(1)
	require.True(t, ok)
	assert.Same(t, s, got)
	r.Remove(s)
	_, ok = r.Get(1)
	assert.False(t, ok)
	allocs := testing.AllocsPerRun(100, func() {
		s, _ := r.Add(2)
		s.Blocks = append(s.Blocks, 9, 9, 9)
		r.Remove(s)
	})
	assert.Zero(t, allocs)
	s2, err := r.Add(3)
	require.NoError(t, err)
	assert.Zero(t, s2.Tokens)
	assert.Empty(t, s2.Blocks)
	assert.Equal(t, 1, r.Len())
}

// The lookup cache never answers with a removed or recycled sequence, whatever the ids collide on.
func TestRegistryCacheStaysTrue(t *testing.T) {
	r := NewRegistry()
	live := map[ID]*Sequence{}
	x := uint64(1)
	for i := range 20000 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		id := ID(x % 3000) // many collisions in a 4096-slot cache and in ids
		if s, ok := live[id]; ok && i%3 != 0 {
			got, ok := r.Get(id)
			require.True(t, ok)
			require.Same(t, s, got)
			if i%2 == 0 {
				r.Remove(s)
				delete(live, id)
				_, ok := r.Get(id)
				require.False(t, ok)
			}
			continue
		}
		if _, ok := live[id]; !ok {
			_, found := r.Get(id)
			require.False(t, found, "id %d is not live", id)
			s, err := r.Add(id)
			require.NoError(t, err)
			live[id] = s
		}
	}
	require.Equal(t, len(live), r.Len())
	for id, s := range live {
		got, ok := r.Get(id)
		require.True(t, ok)
		require.Same(t, s, got)
	}
}

// Counts never wrap, and a registry refuses what would corrupt it, changing nothing.
func TestNoInputBreaksIt(t *testing.T) {
	assert.Equal(t, 0, BlocksFor(-1, 16))
	assert.Equal(t, 0, BlocksFor(5, 0))
	assert.Equal(t, 0, BlocksFor(5, -16))
	assert.Equal(t, math.MaxInt/16+1, BlocksFor(math.MaxInt, 16), "no overflow at the top of the range")
	assert.Equal(t, 1, BlocksFor(math.MaxInt, math.MaxInt))
	var nilSeq *Sequence
	assert.Zero(t, nilSeq.TailRoom(16))
	two := &Sequence{Tokens: 5, Blocks: make([]Block, 2)}
	assert.Equal(t, math.MaxInt, two.TailRoom(math.MaxInt), "room past MaxInt saturates, never wraps")
	assert.Equal(t, math.MaxInt-5, (&Sequence{Tokens: 5, Blocks: make([]Block, 1)}).TailRoom(math.MaxInt))
	assert.Zero(t, two.TailRoom(-16), "blocks of no tokens hold no room")
	assert.Zero(t, two.TailRoom(2), "blocks holding fewer than Tokens leave no room")
	assert.Equal(t, 11, two.TailRoom(8))

	r := NewRegistry()
	s, err := r.Add(5)
	require.NoError(t, err)
	s.Tokens, s.Blocks = 3, append(s.Blocks, 4)
	_, err = r.Add(5)
	require.ErrorIs(t, err, errdefs.ErrSequenceExists)
	got, _ := r.Get(5)
	assert.Same(t, s, got)
	assert.Equal(t, 3, got.Tokens, "a refused Add leaves the live sequence alone")
	assert.False(t, r.Remove(&Sequence{ID: 5}), "a sequence of another registry is not removed")
	assert.False(t, r.Remove(nil))
	assert.Equal(t, 1, r.Len())
	r.All(nil)

	var nr *Registry
	_, ok := nr.Get(1)
	assert.False(t, ok)
	_, err = nr.Add(1)
	require.ErrorIs(t, err, errdefs.ErrInvalidArgument)
	_, err = (&Registry{}).Add(1)
	require.ErrorIs(t, err, errdefs.ErrInvalidArgument)
	assert.False(t, nr.Remove(s))
	assert.Zero(t, nr.Len())
	nr.All(func(*Sequence) bool { t.Fatal("nil registry has no sequences"); return false })
}

// TestInt32s: a row of Blocks is handed to the tables as the same memory, ids and NullBlock
// unchanged, so what a kernel reads is what the sequence holds.
func TestInt32s(t *testing.T) {
	blocks := []Block{7, NullBlock, 3, math.MaxInt32}
	ids := Int32s(blocks)
	require.Equal(t, []int32{7, -1, 3, math.MaxInt32}, ids)
	blocks[2] = 11
	assert.Equal(t, int32(11), ids[2], "the same memory, not a copy")
	assert.Empty(t, Int32s(nil))
	assert.Empty(t, Int32s(blocks[:0]))
}
