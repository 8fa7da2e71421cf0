package disk_test

import (
	"context"
	"os"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/tier/disk"
)

// large is a batch of blocks whose records fill more than a Get reads with one call and more
// than a ring of them: a Put encodes it while it writes it, a Get reads it in many chunks.
const large = 300

// largeOpts holds 2*large blocks in segments of large/2 records.
func largeOpts() disk.Options {
	o := opts(2 * large)
	o.SegmentBytes = large / 2 * record
	return o
}

// A batch that a Put writes in several writes and a Get reads in several chunks comes back
// whole, in the order asked, in both modes, whether its records lie one after the other or
// not, and again after a restart.
func TestLargeBatchesRoundTrip(t *testing.T) {
	for _, m := range []disk.Mode{disk.ModeAuto, disk.ModeBuffered} {
		t.Run(m.String(), func(t *testing.T) {
			ctx := context.Background()
			dir := t.TempDir()
			o := largeOpts()
			o.Mode = m
			s := open(t, dir, o)
			ns := prefix.Namespace{Salt: "large"}
			bs := chain(ns, large, 40)
			require.NoError(t, s.Put(ctx, bs))
			assertServes(t, s, ns, bs)
			reversed := slices.Clone(bs)
			slices.Reverse(reversed)
			assertServes(t, s, ns, reversed) // no two records one after the other
			mixed := append(slices.Clone(bs[200:]), bs[:200]...)
			assertServes(t, s, ns, mixed) // a jump inside a chunk's reach
			require.NoError(t, s.Close())

			s = open(t, dir, o)
			defer s.Close()
			assert.Equal(t, uint64(large), s.Stats().Restored)
			assertServes(t, s, ns, bs)
		})
	}
}

// assertServes gets bs's keys with one Get and requires every block back, intact.
func assertServes(t *testing.T, s *disk.Store, ns prefix.Namespace, bs []tier.Block) {
	t.Helper()
	dst := dsts(len(bs))
	n, err := s.Get(context.Background(), ns, keysOf(bs), dst)
	require.NoError(t, err)
	require.Equal(t, len(bs), n)
	for i := range bs {
		require.Equal(t, bs[i].Data, dst[i], "block %d", i)
	}
}

// A flipped bit in the middle of a chunk ends the run there: the blocks before it are served
// intact, it is dropped and counted, and the blocks after it stay.
func TestLargeGetStopsAtACorruptBlock(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := open(t, dir, largeOpts())
	defer s.Close()
	ns := prefix.Namespace{}
	bs := chain(ns, 100, 41)
	require.NoError(t, s.Put(ctx, bs))
	files, _ := segFiles(t, dir)
	require.Len(t, files, 1)
	raw, err := os.ReadFile(files[0])
	require.NoError(t, err)
	const bad = 60
	raw[bad*record+tier.HeaderSize(ns)+100] ^= 0x10
	require.NoError(t, os.WriteFile(files[0], raw, 0o644))

	dst := dsts(len(bs))
	n, err := s.Get(ctx, ns, keysOf(bs), dst)
	require.NoError(t, err)
	require.Equal(t, bad, n)
	for i := range bad {
		require.Equal(t, bs[i].Data, dst[i], "block %d", i)
	}
	assert.Equal(t, make([]byte, blockBytes), dst[bad], "a corrupt block is not copied")
	assert.Equal(t, uint64(1), s.Stats().Corrupt)
	assert.False(t, has(t, s, ns, bs[bad].Key))
	assertServes(t, s, ns, bs[bad+1:])
}

// A read that fails partway through a large Get ends the run before the blocks it held; the
// blocks served are intact, and the next Get serves them all.
func TestLargeGetReadFault(t *testing.T) {
	ctx := context.Background()
	s, fault, err := disk.OpenFaulty(t.TempDir(), largeOpts())
	require.NoError(t, err)
	defer s.Close()
	ns := prefix.Namespace{}
	bs := chain(ns, 100, 42)
	require.NoError(t, s.Put(ctx, bs))
	fault.Arm("read", 3, ".seg")
	dst := dsts(len(bs))
	n, err := s.Get(ctx, ns, keysOf(bs), dst)
	require.ErrorIs(t, err, disk.ErrFault)
	require.ErrorIs(t, err, tier.ErrUnavailable)
	require.Positive(t, n)
	require.Less(t, n, len(bs))
	for i := range n {
		require.Equal(t, bs[i].Data, dst[i], "block %d", i)
	}
	st := s.Stats()
	assert.Equal(t, uint64(1), st.Failures)
	assert.Equal(t, uint64(len(bs)), st.Blocks)
	assertServes(t, s, ns, bs)
}

// A large Put whose second write fails leaves the index and the directory as before, and the
// same Put succeeds once the fault is gone.
func TestLargePutFailureLeavesStateAsBefore(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, fault, err := disk.OpenFaulty(dir, largeOpts())
	require.NoError(t, err)
	defer s.Close()
	ns := prefix.Namespace{}
	old := chain(ns, 10, 43)
	require.NoError(t, s.Put(ctx, old))
	before, dsBefore, filesBefore := s.Stats(), s.DiskStats(), sizes(t, dir)

	bs := chain(ns, 100, 44)
	fault.Arm("write", 2, "")
	require.ErrorIs(t, s.Put(ctx, bs), disk.ErrFault)
	after := s.Stats()
	assert.Equal(t, before.Failures+1, after.Failures)
	after.Failures = before.Failures
	assert.Equal(t, before, after)
	assert.Equal(t, dsBefore, s.DiskStats())
	assert.Equal(t, filesBefore, sizes(t, dir))
	n, err := s.Has(ctx, ns, keysOf(bs))
	require.NoError(t, err)
	assert.Zero(t, n)

	require.NoError(t, s.Put(ctx, bs))
	assertServes(t, s, ns, append(old, bs...))
}
