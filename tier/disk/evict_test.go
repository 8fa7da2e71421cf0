package disk_test

import (
	"context"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/tier/disk"
)

// take returns every eviction s reports now, three at a time, and the count it lost.
func take(s *disk.Store) ([]tier.Eviction, uint64) {
	var out []tier.Eviction
	var lost uint64
	dst := make([]tier.Eviction, 3)
	for {
		n, l := s.TakeEvictions(dst)
		out = append(out, dst[:n]...)
		lost += l
		if n < len(dst) {
			return out, lost
		}
	}
}

func evictionsOf(bs ...tier.Block) []tier.Eviction {
	var out []tier.Eviction
	for _, b := range bs {
		out = append(out, tier.Eviction{NS: b.NS, Key: b.Key})
	}
	return out
}

// Every block that segment eviction removes is reported once, with its namespace, oldest
// first; the blocks reported are exactly those the store no longer holds.
func TestEvictionsAreReported(t *testing.T) {
	ctx := context.Background()
	o := opts(6)
	o.SegmentBytes = 2 * record
	s := open(t, t.TempDir(), o)
	defer s.Close()
	n, lost := s.TakeEvictions(nil)
	require.Zero(t, n)
	require.Zero(t, lost)
	a, b := chain(prefix.Namespace{Salt: "a"}, 9, 1), chain(prefix.Namespace{Adapter: 3}, 9, 2)
	var all, reported []tier.Eviction
	for i := 0; i < 9; i += 3 {
		for _, bs := range [][]tier.Block{a[i : i+3], b[i : i+3]} {
			require.NoError(t, s.Put(ctx, bs))
			all = append(all, evictionsOf(bs...)...)
			got, lost := take(s)
			require.Zero(t, lost)
			reported = append(reported, got...)
		}
	}
	var gone []tier.Eviction
	for _, e := range all {
		if !has(t, s, e.NS, e.Key) {
			gone = append(gone, e)
		}
	}
	require.Len(t, gone, 18-int(s.Stats().Blocks))
	require.Greater(t, len(gone), 10, "18 blocks in a store of 6")
	assert.Equal(t, gone, reported, "the blocks no longer held, in the order they were stored")
	assert.Equal(t, uint64(len(gone)), s.Stats().Evictions)
	got, _ := take(s)
	assert.Empty(t, got, "each eviction is reported once")
}

// A block is not reported when the caller removed it (Drop), when it went before the first
// TakeEvictions (Open's eviction included), or when the store holds it again by the time it is
// asked.
func TestEvictionsNotReported(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	o := opts(6)
	o.SegmentBytes = 2 * record
	s := open(t, dir, o)
	ns := prefix.Namespace{Salt: "s"}
	bs := chain(ns, 9, 5)
	require.NoError(t, s.Put(ctx, bs[:5]))
	require.NoError(t, s.Put(ctx, bs[5:7])) // [0 1] [2 3] [4 5] [6]: 7 records > 6 evicts [0 1]
	require.Equal(t, uint64(2), s.Stats().Evictions)
	got, lost := take(s)
	assert.Empty(t, got, "evicted before the first call")
	assert.Zero(t, lost)

	require.NoError(t, s.Drop(ctx, ns, keysOf(bs[2:3])))
	require.NoError(t, s.Put(ctx, bs[7:9])) // [2 3] [4 5] [6 7] [8]: evicts [2 3], where 2 was dropped
	require.False(t, has(t, s, ns, bs[2].Key))
	require.False(t, has(t, s, ns, bs[3].Key))
	got, _ = take(s)
	assert.Equal(t, evictionsOf(bs[3]), got, "the dropped block is the caller's own act")

	// Open's own eviction, under a smaller limit, is not reported: nobody has asked yet.
	require.NoError(t, s.Close())
	o.LimitBytes = 2 * record
	s = open(t, dir, o)
	defer s.Close()
	require.NotZero(t, s.Stats().Evictions)
	got, lost = take(s)
	assert.Empty(t, got)
	assert.Zero(t, lost)
}

// A block evicted and stored again before TakeEvictions is held: it is not reported.
func TestEvictionsSkipBlocksStoredAgain(t *testing.T) {
	ctx := context.Background()
	o := opts(4)
	o.SegmentBytes = record
	s := open(t, t.TempDir(), o)
	defer s.Close()
	ns := prefix.Namespace{}
	bs := chain(ns, 6, 9)
	take(s)
	require.NoError(t, s.Put(ctx, bs[:4]))
	require.NoError(t, s.Put(ctx, bs[4:5])) // evicts 0
	require.NoError(t, s.Put(ctx, bs[:1]))  // 0 again: evicts 1
	require.True(t, has(t, s, ns, bs[0].Key))
	got, _ := take(s)
	assert.Equal(t, evictionsOf(bs[1]), got)
}

// Past its bound the store counts the evictions it cannot queue, and the next call returns
// the count with the blocks it did queue.
func TestEvictionsOverflowIsCounted(t *testing.T) {
	ctx := context.Background()
	o := opts(4)
	o.SegmentBytes = record
	s := open(t, t.TempDir(), o)
	defer s.Close()
	disk.SetEvictionQueue(s, 2)
	bs := chain(prefix.Namespace{}, 9, 3)
	take(s)
	for i := range bs { // 9 in a store of 4: evicts 5
		require.NoError(t, s.Put(ctx, bs[i:i+1]))
	}
	require.Equal(t, uint64(5), s.Stats().Evictions)
	got, lost := take(s)
	assert.Equal(t, evictionsOf(bs[0], bs[1]), got)
	assert.Equal(t, uint64(3), lost)
	got, lost = take(s)
	assert.Empty(t, got)
	assert.Zero(t, lost, "counted once")
}

// A block a Get drops for failing its checks is reported: the store removed it on its own.
func TestCorruptBlockIsReported(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	ns := prefix.Namespace{Salt: "z"}
	bs := chain(ns, 3, 7)
	s := open(t, dir, opts(8))
	defer s.Close()
	take(s)
	require.NoError(t, s.Put(ctx, bs))
	files, _ := segFiles(t, dir)
	require.Len(t, files, 3) // a segment per record
	raw, err := os.ReadFile(files[1])
	require.NoError(t, err)
	raw[tier.HeaderSize(ns)+100] ^= 0x10
	require.NoError(t, os.WriteFile(files[1], raw, 0o644))
	n, err := s.Get(ctx, ns, keysOf(bs), dsts(3))
	require.NoError(t, err)
	require.Equal(t, 1, n)
	got, _ := take(s)
	assert.Equal(t, evictionsOf(bs[1]), got)
}
