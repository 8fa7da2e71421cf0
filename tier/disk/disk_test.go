package disk_test

import (
	"context"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/tier/disk"
)

const blockBytes = 8192

// record is the bytes of one block's file in a namespace with a short salt.
const record = 12288

var fp = tier.Fingerprint{0xfe, 1, 2}

func opts(limitBlocks int) disk.Options {
	return disk.Options{Fingerprint: fp, BlockBytes: blockBytes, LimitBytes: uint64(limitBlocks * record)}
}

// chain returns n blocks of namespace ns whose keys chain from the root, each block's data
// derived from its key.
func chain(ns prefix.Namespace, n int, seed int32) []tier.Block {
	var h prefix.Hasher
	parent := prefix.Root(ns, 16)
	out := make([]tier.Block, n)
	for i := range out {
		k := h.Next(parent, []prefix.Token{seed, int32(i)})
		out[i] = tier.Block{NS: ns, Key: k, Parent: parent, Data: dataOf(k)}
		parent = k
	}
	return out
}

func dataOf(k prefix.Key) []byte {
	d := make([]byte, blockBytes)
	for j := range d {
		d[j] = k[j%32] ^ byte(j)
	}
	return d
}

func keysOf(bs []tier.Block) []prefix.Key {
	ks := make([]prefix.Key, len(bs))
	for i, b := range bs {
		ks[i] = b.Key
	}
	return ks
}

func dsts(n int) [][]byte {
	d := make([][]byte, n)
	for i := range d {
		d[i] = make([]byte, blockBytes)
	}
	return d
}

func open(t *testing.T, dir string, o disk.Options) *disk.Store {
	t.Helper()
	s, err := disk.Open(dir, o)
	require.NoError(t, err)
	return s
}

// segFiles returns the paths of the segment files under dir, sorted, and the sum of their
// sizes.
func segFiles(t *testing.T, dir string) ([]string, uint64) {
	t.Helper()
	return files(t, dir, func(p string) bool { return strings.HasSuffix(p, ".seg") })
}

// sizes returns every file under dir but LOCK with its size.
func sizes(t *testing.T, dir string) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	paths, _ := files(t, dir, func(p string) bool { return filepath.Base(p) != "LOCK" })
	for _, p := range paths {
		info, err := os.Stat(p)
		require.NoError(t, err)
		out[p] = info.Size()
	}
	return out
}

func files(t *testing.T, dir string, want func(string) bool) ([]string, uint64) {
	t.Helper()
	var paths []string
	var bytes uint64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !want(p) {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		paths = append(paths, p)
		bytes += uint64(info.Size())
		return nil
	})
	require.NoError(t, err)
	sort.Strings(paths)
	return paths, bytes
}

func has(t *testing.T, s *disk.Store, ns prefix.Namespace, k prefix.Key) bool {
	t.Helper()
	n, err := s.Has(context.Background(), ns, []prefix.Key{k})
	require.NoError(t, err)
	return n == 1
}

func TestRoundTripBothModes(t *testing.T) {
	for _, m := range []disk.Mode{disk.ModeAuto, disk.ModeBuffered} {
		t.Run(m.String(), func(t *testing.T) {
			ctx := context.Background()
			dir := t.TempDir()
			o := opts(16)
			o.Mode = m
			o.SegmentBytes = 16 * record // one segment, the tail: no Get moves a block
			s := open(t, dir, o)
			defer s.Close()
			ns := prefix.Namespace{Adapter: 3, Salt: "tenant"}
			bs := chain(ns, 5, 1)
			require.NoError(t, s.Put(ctx, bs))
			n, err := s.Has(ctx, ns, keysOf(bs))
			require.NoError(t, err)
			require.Equal(t, 5, n)
			dst := dsts(5)
			n, err = s.Get(ctx, ns, keysOf(bs), dst)
			require.NoError(t, err)
			require.Equal(t, 5, n)
			for i := range bs {
				require.Equal(t, bs[i].Data, dst[i], "block %d", i)
			}
			st := s.Stats()
			assert.Equal(t, uint64(5), st.Puts)
			assert.Equal(t, uint64(5*blockBytes), st.PutBytes)
			assert.Equal(t, uint64(5), st.Gets)
			assert.Equal(t, uint64(5), st.Blocks)
			assert.Equal(t, uint64(5*record), st.Bytes)
			_, onDisk := segFiles(t, dir)
			assert.Equal(t, st.Bytes, onDisk)
			if m == disk.ModeBuffered {
				assert.Equal(t, disk.ModeBuffered, s.DiskStats().Mode)
			} else {
				assert.NotEqual(t, disk.ModeAuto, s.DiskStats().Mode)
			}
			// A Put of held blocks stores nothing twice.
			require.NoError(t, s.Put(ctx, bs))
			assert.Equal(t, uint64(5), s.Stats().Puts)

			// A run stops at the first key the store does not hold.
			keys := keysOf(bs)
			keys[2][0] ^= 1
			n, err = s.Get(ctx, ns, keys, dsts(5))
			require.NoError(t, err)
			assert.Equal(t, 2, n)
			n, err = s.Has(ctx, ns, keys)
			require.NoError(t, err)
			assert.Equal(t, 2, n)
			assert.Equal(t, uint64(2), s.Stats().Misses)

			require.NoError(t, s.Drop(ctx, ns, keysOf(bs)[:2]))
			n, err = s.Has(ctx, ns, keysOf(bs)[2:])
			require.NoError(t, err)
			assert.Equal(t, 3, n)
			assert.False(t, has(t, s, ns, bs[0].Key))
			files, onDisk := segFiles(t, dir)
			assert.Len(t, files, 1)
			assert.Equal(t, uint64(5*record), onDisk, "dropped records stay until their segment goes")
			assert.Equal(t, onDisk, s.Stats().Bytes)
			assert.Equal(t, uint64(3*record), s.DiskStats().LiveBytes)
		})
	}
}

// A full store evicts the least recently used blocks: a Get counts as a use. Here every record
// has a segment of its own, so the approximation is exact.
func TestEvictsLeastRecentlyUsed(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir(), opts(3))
	defer s.Close()
	ns := prefix.Namespace{}
	bs := chain(ns, 5, 2)
	for _, b := range bs[:3] {
		require.NoError(t, s.Put(ctx, []tier.Block{b}))
	}
	_, err := s.Get(ctx, ns, keysOf(bs[:1]), dsts(1)) // 0 is now the most recent
	require.NoError(t, err)
	require.NoError(t, s.Put(ctx, bs[3:4])) // evicts 1
	_, err = s.Get(ctx, ns, keysOf(bs[2:3]), dsts(1))
	require.NoError(t, err)                 // 2 is now the most recent
	require.NoError(t, s.Put(ctx, bs[4:5])) // evicts 0
	held := []bool{}
	for _, b := range bs {
		held = append(held, has(t, s, ns, b.Key))
	}
	assert.Equal(t, []bool{false, false, true, true, true}, held)
	st := s.Stats()
	assert.Equal(t, uint64(2), st.Evictions)
	assert.Equal(t, uint64(3), st.Blocks)
	assert.LessOrEqual(t, st.Bytes, st.LimitBytes)
}

func TestNeverFitsIsRefused(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir(), opts(2))
	defer s.Close()
	bs := chain(prefix.Namespace{}, 3, 3)
	require.NoError(t, s.Put(ctx, bs[:2]))
	err := s.Put(ctx, bs)
	var fe *disk.FitError
	require.ErrorAs(t, err, &fe)
	require.ErrorIs(t, err, disk.ErrTooLarge)
	assert.Equal(t, uint64(3*record), fe.Need)
	assert.Equal(t, uint64(2*record), fe.Limit)
	n, err := s.Has(ctx, prefix.Namespace{}, keysOf(bs))
	require.NoError(t, err)
	assert.Equal(t, 2, n, "a refused Put keeps what the store had")

	// Spare files take their share of the limit.
	o := opts(4)
	o.SpareBytes = 2 * record
	s2 := open(t, t.TempDir(), o)
	defer s2.Close()
	require.ErrorAs(t, s2.Put(ctx, bs), &fe)
	assert.Equal(t, uint64(2*record), fe.Limit)
	require.NoError(t, s2.Put(ctx, bs[:2]))
}

func TestWarmRestart(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	ns := prefix.Namespace{Salt: "a"}
	bs := chain(ns, 6, 4)
	s := open(t, dir, opts(8))
	require.NoError(t, s.Put(ctx, bs))
	require.NoError(t, s.Close())

	s = open(t, dir, opts(8))
	defer s.Close()
	st := s.Stats()
	assert.Equal(t, uint64(6), st.Restored)
	assert.Equal(t, uint64(6), st.Blocks)
	assert.Equal(t, uint64(6*record), st.Bytes)
	dst := dsts(6)
	n, err := s.Get(ctx, ns, keysOf(bs), dst)
	require.NoError(t, err)
	require.Equal(t, 6, n)
	for i := range bs {
		require.Equal(t, bs[i].Data, dst[i])
	}
	assert.Zero(t, s.DiskStats().DroppedAtOpen)
}

// A store reopened with a smaller limit evicts down to it at Open.
func TestRestartUnderSmallerLimitEvicts(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	bs := chain(prefix.Namespace{}, 6, 5)
	s := open(t, dir, opts(8))
	require.NoError(t, s.Put(ctx, bs))
	require.NoError(t, s.Close())
	s = open(t, dir, opts(4))
	defer s.Close()
	st := s.Stats()
	assert.Equal(t, uint64(4), st.Blocks)
	assert.Equal(t, uint64(2), st.Evictions)
	_, onDisk := segFiles(t, dir)
	assert.Equal(t, st.Bytes, onDisk)
}

func TestOpenDropsForeignAndTornRecords(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	ns := prefix.Namespace{Adapter: 1}
	bs := chain(ns, 4, 6)
	s := open(t, dir, opts(8)) // a segment per record
	require.NoError(t, s.Put(ctx, bs))
	require.NoError(t, s.Close())
	files, _ := segFiles(t, dir)
	require.Len(t, files, 4)

	require.NoError(t, os.Truncate(files[0], record-1)) // torn
	foreign := filepath.Join(dir, "notes.txt")
	require.NoError(t, os.WriteFile(foreign, []byte("not a block"), 0o644))
	s = open(t, dir, opts(8))
	ds := s.DiskStats()
	assert.Equal(t, uint64(1), ds.DroppedAtOpen)
	assert.Equal(t, uint64(1), ds.TornAtOpen)
	assert.Equal(t, uint64(3), s.Stats().Restored)
	assert.Equal(t, uint64(3), ds.Segments)
	require.NoError(t, s.Close())
	_, err := os.Stat(foreign)
	assert.NoError(t, err, "a file not of the layout is not the store's to delete")
	_, err = os.Stat(files[0])
	assert.ErrorIs(t, err, fs.ErrNotExist, "a segment with no record left is deleted")

	// Another model's store drops every record and deletes the segments.
	o := opts(8)
	o.Fingerprint[0]++
	s = open(t, dir, o)
	defer s.Close()
	assert.Equal(t, uint64(3), s.DiskStats().DroppedAtOpen)
	assert.Zero(t, s.Stats().Restored)
	files, _ = segFiles(t, dir)
	assert.Empty(t, files)
}

// A torn tail (a crash in the middle of an append) is cut away at Open; the records before it
// in the same segment are kept, and the next Put appends where they end.
func TestOpenTruncatesATornTail(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	ns := prefix.Namespace{}
	bs := chain(ns, 3, 40)
	o := opts(8)
	o.SegmentBytes = 4 * record
	s := open(t, dir, o)
	require.NoError(t, s.Put(ctx, bs))
	require.NoError(t, s.Close())
	files, _ := segFiles(t, dir)
	require.Len(t, files, 1)
	require.NoError(t, os.Truncate(files[0], 2*record+4096)) // half the third record
	s = open(t, dir, o)
	defer s.Close()
	assert.Equal(t, uint64(2), s.Stats().Restored)
	assert.Equal(t, uint64(1), s.DiskStats().TornAtOpen)
	info, err := os.Stat(files[0])
	require.NoError(t, err)
	assert.Equal(t, int64(2*record), info.Size())
	require.NoError(t, s.Put(ctx, bs[2:]))
	dst := dsts(3)
	n, err := s.Get(ctx, ns, keysOf(bs), dst)
	require.NoError(t, err)
	require.Equal(t, 3, n)
	assert.Equal(t, bs[2].Data, dst[2])
	info, err = os.Stat(files[0])
	require.NoError(t, err)
	assert.Equal(t, int64(3*record), info.Size(), "appended where the kept records end")
}

// A flipped bit is caught by Get: the block is not served, it is dropped and counted, and the
// run ends before it.
func TestFlippedBitCaughtAtGet(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	ns := prefix.Namespace{Salt: "z"}
	bs := chain(ns, 3, 7)
	s := open(t, dir, opts(8))
	defer s.Close()
	require.NoError(t, s.Put(ctx, bs))
	files, _ := segFiles(t, dir)
	require.Len(t, files, 3) // a segment per record
	path := files[1]
	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	raw[tier.HeaderSize(ns)+100] ^= 0x10
	require.NoError(t, os.WriteFile(path, raw, 0o644))

	dst := dsts(3)
	n, err := s.Get(ctx, ns, keysOf(bs), dst)
	require.NoError(t, err)
	assert.Equal(t, 1, n)
	assert.Equal(t, bs[0].Data, dst[0])
	assert.Equal(t, make([]byte, blockBytes), dst[1], "a corrupt block is not copied")
	st := s.Stats()
	assert.Equal(t, uint64(1), st.Corrupt)
	assert.Equal(t, uint64(2), st.Blocks)
	assert.False(t, has(t, s, ns, bs[1].Key))
	assert.Equal(t, uint64(2*record), s.DiskStats().LiveBytes)
	_, err = os.Stat(path)
	assert.ErrorIs(t, err, fs.ErrNotExist, "its segment, left with no record, is deleted")
}

func TestNamespacesAreIsolated(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir(), opts(8))
	defer s.Close()
	a := prefix.Namespace{Salt: "tenant-a"}
	b := chain(a, 1, 8)[0]
	require.NoError(t, s.Put(ctx, []tier.Block{b}))
	for _, other := range []prefix.Namespace{{Salt: "tenant-b"}, {}, {Adapter: 1, Salt: "tenant-a"}} {
		n, err := s.Get(ctx, other, []prefix.Key{b.Key}, dsts(1))
		require.NoError(t, err)
		assert.Zero(t, n, "%+v", other)
		assert.False(t, has(t, s, other, b.Key))
	}
	// The same key in another namespace is another block.
	b2 := b
	b2.NS = prefix.Namespace{Salt: "tenant-b"}
	b2.Data = make([]byte, blockBytes)
	require.NoError(t, s.Put(ctx, []tier.Block{b2}))
	dst := dsts(1)
	n, err := s.Get(ctx, a, []prefix.Key{b.Key}, dst)
	require.NoError(t, err)
	require.Equal(t, 1, n)
	assert.Equal(t, b.Data, dst[0])
}

func TestOptionsAreChecked(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		name   string
		dir    string
		o      disk.Options
		option string
	}{
		{"empty dir", "", opts(4), "dir"},
		{"zero block", dir, disk.Options{BlockBytes: 0, LimitBytes: 1 << 20}, "BlockBytes"},
		{"negative block", dir, disk.Options{BlockBytes: -1, LimitBytes: 1 << 20}, "BlockBytes"},
		{"huge block", dir, disk.Options{BlockBytes: math.MaxInt, LimitBytes: math.MaxUint64}, "BlockBytes"},
		{"block over max", dir, disk.Options{BlockBytes: disk.MaxBlockBytes + 1, LimitBytes: math.MaxUint64}, "BlockBytes"},
		{"zero limit", dir, disk.Options{BlockBytes: blockBytes}, "LimitBytes"},
		{"limit under one block", dir, disk.Options{BlockBytes: blockBytes, LimitBytes: record - 1}, "LimitBytes"},
		{"negative mode", dir, disk.Options{BlockBytes: blockBytes, LimitBytes: record, Mode: -1}, "Mode"},
		{"spare of the whole limit", dir, disk.Options{BlockBytes: blockBytes, LimitBytes: 2 * record, SpareBytes: record + 1}, "SpareBytes"},
		{"huge spare", dir, disk.Options{BlockBytes: blockBytes, LimitBytes: 2 * record, SpareBytes: math.MaxUint64}, "SpareBytes"},
		{"segment over max", dir, disk.Options{BlockBytes: blockBytes, LimitBytes: 2 * record, SegmentBytes: disk.MaxSegmentBytes + 1}, "SegmentBytes"},
		{"huge segment", dir, disk.Options{BlockBytes: blockBytes, LimitBytes: 2 * record, SegmentBytes: math.MaxUint64}, "SegmentBytes"},
		{"unknown mode", dir, disk.Options{BlockBytes: blockBytes, LimitBytes: record, Mode: 3}, "Mode"},
	} {
		t.Run(c.name, func(t *testing.T) {
			s, err := disk.Open(c.dir, c.o)
			require.Nil(t, s)
			var oe *disk.ArgumentError
			require.ErrorAs(t, err, &oe)
			require.ErrorIs(t, err, tier.ErrInvalidArgument)
			assert.Equal(t, c.option, oe.Name)
		})
	}
	s, err := disk.Open(dir, disk.Options{BlockBytes: blockBytes, LimitBytes: math.MaxUint64})
	require.NoError(t, err, "an unbounded limit is fine")
	require.NoError(t, s.Close())
}

func TestBadCallsChangeNothing(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := open(t, dir, opts(8))
	ns := prefix.Namespace{}
	bs := chain(ns, 2, 9)
	require.NoError(t, s.Put(ctx, bs))
	before := s.Stats()
	keys := keysOf(bs)

	var nilCtx context.Context
	require.ErrorIs(t, s.Put(nilCtx, bs), tier.ErrInvalidArgument)
	_, err := s.Get(nilCtx, ns, keys, dsts(2))
	require.ErrorIs(t, err, tier.ErrInvalidArgument)
	_, err = s.Has(nilCtx, ns, keys)
	require.ErrorIs(t, err, tier.ErrInvalidArgument)
	require.ErrorIs(t, s.Drop(nilCtx, ns, keys), tier.ErrInvalidArgument)

	_, err = s.Get(ctx, ns, keys, nil)
	require.ErrorIs(t, err, tier.ErrInvalidArgument)
	_, err = s.Get(ctx, ns, keys, dsts(1))
	require.ErrorIs(t, err, tier.ErrInvalidArgument)
	short := dsts(2)
	short[1] = short[1][:blockBytes-1]
	_, err = s.Get(ctx, ns, keys, short)
	var se *disk.SizeError
	require.ErrorAs(t, err, &se)
	assert.Equal(t, disk.SizeError{What: "dst", Index: 1, Len: blockBytes - 1, Want: blockBytes}, *se)
	long := dsts(2)
	long[0] = make([]byte, blockBytes+1)
	_, err = s.Get(ctx, ns, keys, long)
	require.ErrorIs(t, err, tier.ErrInvalidArgument)

	bad := chain(ns, 3, 10)
	bad[2].Data = bad[2].Data[:10]
	require.ErrorIs(t, s.Put(ctx, bad), tier.ErrInvalidArgument)
	bad[2].Data = nil
	require.ErrorIs(t, s.Put(ctx, bad), tier.ErrInvalidArgument)
	salty := chain(prefix.Namespace{Salt: strings.Repeat("s", tier.MaxSalt+1)}, 1, 11)
	require.ErrorIs(t, s.Put(ctx, salty), tier.ErrInvalidArgument)
	assert.Equal(t, before, s.Stats())

	// Empty calls are fine.
	n, err := s.Get(ctx, ns, nil, nil)
	require.NoError(t, err)
	assert.Zero(t, n)
	n, err = s.Has(ctx, ns, nil)
	require.NoError(t, err)
	assert.Zero(t, n)
	require.NoError(t, s.Put(ctx, nil))
	require.NoError(t, s.Drop(ctx, ns, nil))
	assert.Equal(t, before, s.Stats())

	// A done context is a failure, stores nothing and serves nothing.
	done, cancel := context.WithCancel(ctx)
	cancel()
	more := chain(ns, 2, 12)
	require.ErrorIs(t, s.Put(done, more), context.Canceled)
	require.ErrorIs(t, s.Put(done, more), tier.ErrUnavailable)
	_, err = s.Get(done, ns, keys, dsts(2))
	require.ErrorIs(t, err, context.Canceled)
	_, err = s.Has(done, ns, keys)
	require.ErrorIs(t, err, tier.ErrUnavailable)
	assert.False(t, has(t, s, ns, more[0].Key))
	files, _ := segFiles(t, dir)
	assert.Len(t, files, 2)

	require.NoError(t, s.Close())
	require.ErrorIs(t, s.Close(), tier.ErrClosed)
	require.ErrorIs(t, s.Put(ctx, bs), tier.ErrClosed)
	_, err = s.Get(ctx, ns, keys, dsts(2))
	require.ErrorIs(t, err, tier.ErrClosed)
	_, err = s.Has(ctx, ns, keys)
	require.ErrorIs(t, err, tier.ErrClosed)
	require.ErrorIs(t, s.Drop(ctx, ns, keys), tier.ErrClosed)
}

func TestNilStoreIsAnError(t *testing.T) {
	ctx := context.Background()
	for _, s := range []*disk.Store{nil, {}} {
		require.ErrorIs(t, s.Put(ctx, chain(prefix.Namespace{}, 1, 20)), tier.ErrInvalidArgument)
		_, err := s.Get(ctx, prefix.Namespace{}, nil, nil)
		require.ErrorIs(t, err, tier.ErrInvalidArgument)
		_, err = s.Has(ctx, prefix.Namespace{}, nil)
		require.ErrorIs(t, err, tier.ErrInvalidArgument)
		require.ErrorIs(t, s.Drop(ctx, prefix.Namespace{}, nil), tier.ErrInvalidArgument)
		require.ErrorIs(t, s.Close(), tier.ErrInvalidArgument)
		assert.Equal(t, tier.Stats{}, s.Stats())
		assert.Equal(t, disk.DiskStats{}, s.DiskStats())
	}
}

func TestOneStorePerDirectory(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, opts(4))
	_, err := disk.Open(dir, opts(4))
	require.ErrorIs(t, err, disk.ErrLocked)
	require.ErrorIs(t, err, tier.ErrUnavailable)
	require.NoError(t, s.Close())
	s = open(t, dir, opts(4))
	require.NoError(t, s.Close())
}

// A Put whose rename or write fails leaves the index and the directory exactly as before: the
// spare file it took is given back under its name and the tail is cut back to its size. A full disk or a read-only
// one is such a failure, with its own sentinel and its errno in the chain.
func TestFailedPutLeavesStateAsBefore(t *testing.T) {
	for _, c := range []struct {
		op    string
		n     int
		errno syscall.Errno // 0: disk.ErrFault
		want  error
	}{
		{"write", 1, 0, disk.ErrFault}, {"write", 2, 0, disk.ErrFault}, {"rename", 1, 0, disk.ErrFault},
		{"write", 1, syscall.ENOSPC, disk.ErrNoSpace}, {"write", 2, syscall.ENOSPC, disk.ErrNoSpace},
		{"write", 2, syscall.EDQUOT, disk.ErrNoSpace},
		{"write", 1, syscall.EROFS, disk.ErrReadOnly}, {"write", 2, syscall.EACCES, disk.ErrReadOnly},
		{"rename", 1, syscall.EROFS, disk.ErrReadOnly},
	} {
		t.Run(fmt.Sprintf("%s-%d-%v", c.op, c.n, c.want), func(t *testing.T) {
			ctx := context.Background()
			dir := t.TempDir()
			o := opts(6)
			o.SegmentBytes = 2 * record
			o.SpareBytes = 2 * record
			s, fault, err := disk.OpenFaulty(dir, o)
			require.NoError(t, err)
			defer s.Close()
			ns := prefix.Namespace{}
			require.NoError(t, s.Put(ctx, chain(ns, 4, 17)))
			old := chain(ns, 3, 13)
			require.NoError(t, s.Put(ctx, old)) // evicts 2 segments, 1 kept spare: the tail holds 1
			before, dsBefore := s.Stats(), s.DiskStats()
			require.Equal(t, uint64(1), dsBefore.SpareFiles)
			filesBefore := sizes(t, dir)

			if c.errno == 0 {
				fault.Arm(c.op, c.n, "")
			} else {
				fault.ArmErrno(c.op, c.n, "", c.errno)
			}
			err = s.Put(ctx, chain(ns, 3, 14)) // 1 at the tail, 2 over the spare file
			require.ErrorIs(t, err, c.want)
			if c.errno != 0 {
				require.ErrorIs(t, err, c.errno)
			}
			require.ErrorIs(t, err, tier.ErrUnavailable)
			assert.Equal(t, dsBefore, s.DiskStats())

			after := s.Stats()
			assert.Equal(t, before.Failures+1, after.Failures)
			after.Failures = before.Failures
			assert.Equal(t, before, after)
			assert.Equal(t, filesBefore, sizes(t, dir))
			n, err := s.Has(ctx, ns, keysOf(old))
			require.NoError(t, err)
			assert.Equal(t, 3, n)
			// The same Put succeeds once the fault is gone.
			require.NoError(t, s.Put(ctx, chain(ns, 3, 14)))
		})
	}
}

// A Put that fails after writing part of its records at a tail made from a spare file leaves
// nothing of them for the next Open: the zero page that ends the tail's records is back at its
// committed size. The spare's older bytes past it stay, for the next Put to overwrite.
func TestFailedPutOverAReusedSpareIsNotRestored(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	o := opts(6)
	o.SegmentBytes = 2 * record
	o.SpareBytes = 2 * record
	s, fault, err := disk.OpenFaulty(dir, o)
	require.NoError(t, err)
	ns := prefix.Namespace{}
	bs := chain(ns, 9, 50)
	require.NoError(t, s.Put(ctx, bs[:4]))  // [0 1] [2 3]
	require.NoError(t, s.Put(ctx, bs[4:5])) // [4]: [0 1] evicted into the pool
	require.NoError(t, s.Put(ctx, bs[5:6])) // [4 5]
	require.NoError(t, s.Put(ctx, bs[6:7])) // [6] over the spare file: 2 records, 1 committed
	before, filesBefore := s.Stats(), sizes(t, dir)
	fault.Arm("write", 2, "") // 7 lands at the tail, 8's segment fails
	require.ErrorIs(t, s.Put(ctx, bs[7:9]), disk.ErrFault)
	after := s.Stats()
	after.Failures = before.Failures
	assert.Equal(t, before, after)
	assert.Equal(t, filesBefore, sizes(t, dir))
	assert.False(t, has(t, s, ns, bs[7].Key))
	require.NoError(t, s.Close())

	s = open(t, dir, o)
	defer s.Close()
	assert.False(t, has(t, s, ns, bs[7].Key), "the failed Put's block came back")
	assert.Equal(t, uint64(3), s.Stats().Restored)
	n, err := s.Get(ctx, ns, keysOf(bs[6:7]), dsts(1))
	require.NoError(t, err)
	assert.Equal(t, 1, n)
}

// A failing read is an error the caller treats as a miss; the block stays.
func TestFailedReadKeepsTheBlock(t *testing.T) {
	ctx := context.Background()
	s, fault, err := disk.OpenFaulty(t.TempDir(), opts(4))
	require.NoError(t, err)
	defer s.Close()
	bs := chain(prefix.Namespace{}, 2, 15)
	require.NoError(t, s.Put(ctx, bs))
	fault.Arm("read", 1, "0000000000000002.seg@0") // a segment per record: bs[1] in the second
	n, err := s.Get(ctx, prefix.Namespace{}, keysOf(bs), dsts(2))
	require.ErrorIs(t, err, tier.ErrUnavailable)
	require.ErrorIs(t, err, disk.ErrFault)
	assert.Equal(t, 1, n)
	assert.Equal(t, uint64(1), s.Stats().Failures)
	n, err = s.Get(ctx, prefix.Namespace{}, keysOf(bs), dsts(2))
	require.NoError(t, err)
	assert.Equal(t, 2, n)
}

// Several goroutines put, get, check and drop overlapping chains; every block served is the
// one stored under its key, and afterwards the counters agree with the files on disk.
func TestConcurrentUse(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	o := opts(10)
	o.SegmentBytes = 2 * record
	s := open(t, dir, o)
	nss := []prefix.Namespace{{}, {Salt: "b"}}
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			ns := nss[g%2]
			for round := range 30 {
				bs := chain(ns, 4, int32(round%5))
				if err := s.Put(ctx, bs); !assert.NoError(t, err) {
					return
				}
				dst := dsts(4)
				n, err := s.Get(ctx, ns, keysOf(bs), dst)
				if !assert.NoError(t, err) {
					return
				}
				for i := range n {
					assert.Equal(t, bs[i].Data, dst[i])
				}
				if _, err := s.Has(ctx, ns, keysOf(bs)); !assert.NoError(t, err) {
					return
				}
				if round%7 == g {
					assert.NoError(t, s.Drop(ctx, ns, keysOf(bs)[1:3]))
				}
			}
		})
	}
	wg.Wait()
	st, ds := s.Stats(), s.DiskStats()
	files, onDisk := segFiles(t, dir)
	assert.Equal(t, onDisk, st.Bytes)
	assert.Equal(t, uint64(len(files)), ds.Segments)
	assert.Equal(t, st.Blocks*record, ds.LiveBytes)
	assert.LessOrEqual(t, ds.LiveBytes, st.Bytes)
	assert.LessOrEqual(t, st.Bytes, st.LimitBytes)
	assert.Positive(t, st.Evictions)
	assert.Zero(t, st.Corrupt)
	assert.Zero(t, st.Failures)
	require.NoError(t, s.Close())
	s = open(t, dir, o)
	defer s.Close()
	assert.Equal(t, st.Blocks, s.Stats().Restored)
	assert.Equal(t, ds.LiveBytes, s.DiskStats().LiveBytes)
	assert.Zero(t, s.DiskStats().DroppedAtOpen)
}

// ModeAuto uses O_DIRECT where the filesystem takes it and falls back to buffered I/O where
// ModeDirect is refused. tmpfs (before Linux 6.6) refuses O_DIRECT.
func TestModeFallsBackWhereDirectIsRefused(t *testing.T) {
	ctx := context.Background()
	for _, root := range []string{"/dev/shm", t.TempDir()} {
		if _, err := os.Stat(root); err != nil {
			continue
		}
		dir, err := os.MkdirTemp(root, "disktier")
		require.NoError(t, err)
		defer os.RemoveAll(dir)
		o := opts(4)
		o.Mode = disk.ModeDirect
		s, err := disk.Open(dir, o)
		want := disk.ModeDirect
		if err != nil {
			require.ErrorIs(t, err, disk.ErrNotSupported)
			want = disk.ModeBuffered
		} else {
			require.NoError(t, s.Close())
		}
		s = open(t, dir, opts(4))
		assert.Equal(t, want, s.DiskStats().Mode, root)
		bs := chain(prefix.Namespace{}, 2, 16)
		require.NoError(t, s.Put(ctx, bs))
		dst := dsts(2)
		n, err := s.Get(ctx, prefix.Namespace{}, keysOf(bs), dst)
		require.NoError(t, err)
		require.Equal(t, 2, n)
		assert.Equal(t, bs[1].Data, dst[1])
		t.Logf("%s: %s", root, want)
		require.NoError(t, s.Close())
	}
}

// Eviction frees whole segments, the oldest first, and forgets every block in them; a segment
// left with no live record by Drop is deleted at once.
func TestSegmentEviction(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	o := opts(6)
	o.SegmentBytes = 2 * record
	s := open(t, dir, o)
	defer s.Close()
	ns := prefix.Namespace{Salt: "s"}
	bs := chain(ns, 9, 18)
	require.NoError(t, s.Put(ctx, bs[:5])) // segments [0 1] [2 3] [4]
	check := func(blocks, segs uint64) {
		t.Helper()
		st, ds := s.Stats(), s.DiskStats()
		assert.Equal(t, blocks, st.Blocks)
		assert.Equal(t, segs, ds.Segments)
		files, onDisk := segFiles(t, dir)
		assert.Len(t, files, int(segs))
		assert.Equal(t, st.Bytes, onDisk)
		assert.LessOrEqual(t, st.Bytes, o.LimitBytes)
	}
	check(5, 3)
	require.NoError(t, s.Put(ctx, bs[5:7])) // [4 5] [6]: 7 records > 6 evicts [0 1]
	check(5, 3)
	assert.Equal(t, uint64(2), s.Stats().Evictions)
	n, err := s.Has(ctx, ns, keysOf(bs))
	require.NoError(t, err)
	assert.Zero(t, n)
	n, err = s.Has(ctx, ns, keysOf(bs[2:7]))
	require.NoError(t, err)
	assert.Equal(t, 5, n)

	require.NoError(t, s.Drop(ctx, ns, keysOf(bs[2:4]))) // empties [2 3]: deleted
	check(3, 2)
	require.NoError(t, s.Put(ctx, bs[7:9])) // [6 7] [8]
	check(5, 3)
	assert.Equal(t, uint64(2), s.Stats().Evictions, "room made by the Drop")
	dst := dsts(5)
	n, err = s.Get(ctx, ns, keysOf(bs[4:9]), dst)
	require.NoError(t, err)
	require.Equal(t, 5, n)
	for i := range dst {
		assert.Equal(t, bs[4+i].Data, dst[i])
	}
}

// A segment grows no larger than the room for segments (LimitBytes less SpareBytes), asked for
// or by default: eviction frees whole segments, and a tail past the room went whole, the block
// just put in it and every other with it.
func TestSegmentsFitTheRoom(t *testing.T) {
	for _, c := range []struct {
		name                string
		limit, spare, segBy uint64
	}{
		{"SegmentBytes over LimitBytes", 4 * record, 0, disk.MaxSegmentBytes},
		{"default over the room left by SpareBytes", 64 * record, 60 * record, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			ctx := context.Background()
			o := opts(1)
			o.LimitBytes, o.SpareBytes, o.SegmentBytes = c.limit, c.spare, c.segBy
			s := open(t, t.TempDir(), o)
			defer s.Close()
			ns := prefix.Namespace{}
			bs := chain(ns, 5, 60)
			require.NoError(t, s.Put(ctx, bs[:4])) // the room, in one segment
			require.NoError(t, s.Put(ctx, bs[4:5]))
			assert.True(t, has(t, s, ns, bs[4].Key), "the block just put is held")
			st := s.Stats()
			assert.Equal(t, uint64(1), st.Blocks)
			assert.Equal(t, uint64(4), st.Evictions)
			assert.Equal(t, uint64(record), st.Bytes)
		})
	}
}

// A Get of a block in a segment that eviction would reach within the next quarter of the limit
// appends it again at the tail, so the eviction of its segment spares it; blocks not read go
// with their segment. A store far from full moves nothing.
func TestSecondChance(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	o := opts(8)
	o.SegmentBytes = 2 * record
	s := open(t, dir, o)
	defer s.Close()
	ns := prefix.Namespace{}
	bs := chain(ns, 10, 41)
	require.NoError(t, s.Put(ctx, bs[:4])) // [0 1] [2 3]: half full
	dst := dsts(1)
	n, err := s.Get(ctx, ns, keysOf(bs[1:2]), dst)
	require.NoError(t, err)
	require.Equal(t, 1, n)
	assert.Equal(t, uint64(4*record), s.Stats().Bytes, "nothing moved")
	require.NoError(t, s.Put(ctx, bs[4:8]))       // [4 5] [6 7]: full
	n, err = s.Get(ctx, ns, keysOf(bs[1:2]), dst) // the next append evicts the first segment
	require.NoError(t, err)
	require.Equal(t, 1, n)
	assert.Equal(t, bs[1].Data, dst[0])
	// 1 was moved to a new tail [1]: 9 records > 8 evicted [0 1], which held only 0 by then.
	st := s.Stats()
	assert.Equal(t, uint64(1), st.Evictions)
	assert.Equal(t, uint64(7), st.Blocks)
	assert.False(t, has(t, s, ns, bs[0].Key))
	assert.True(t, has(t, s, ns, bs[1].Key))
	n, err = s.Get(ctx, ns, keysOf(bs[4:5]), dst) // 3 records from eviction, over 8/4: stays
	require.NoError(t, err)
	require.Equal(t, 1, n)
	require.NoError(t, s.Put(ctx, bs[8:10])) // [1 8] [9]: 9 records > 8 evicts [2 3]
	held := []bool{}
	for _, b := range bs {
		held = append(held, has(t, s, ns, b.Key))
	}
	assert.Equal(t, []bool{false, true, false, false, true, true, true, true, true, true}, held)
	n, err = s.Get(ctx, ns, keysOf(bs[1:2]), dst)
	require.NoError(t, err)
	require.Equal(t, 1, n)
	assert.Equal(t, bs[1].Data, dst[0])
	// The moved block survives a restart in its new place.
	require.NoError(t, s.Close())
	s = open(t, dir, o)
	assert.True(t, has(t, s, ns, bs[1].Key))
	assert.Equal(t, uint64(7), s.Stats().Restored)
}

// A segment emptied while a Get reads it is deleted only after the read; the block dropped
// meanwhile is not served.
func TestSegmentReadNowIsDeletedAfter(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, fault, err := disk.OpenFaulty(dir, opts(6)) // a segment per record
	require.NoError(t, err)
	defer s.Close()
	ns := prefix.Namespace{}
	bs := chain(ns, 2, 19)
	require.NoError(t, s.Put(ctx, bs))
	files, _ := segFiles(t, dir)
	require.Len(t, files, 2)
	fault.OnRead = func(string) {
		fault.OnRead = nil
		assert.NoError(t, s.Drop(ctx, ns, keysOf(bs)))
		_, err := os.Stat(files[0])
		assert.NoError(t, err, "the segment is still read")
	}
	n, err := s.Get(ctx, ns, keysOf(bs[:1]), dsts(1))
	require.NoError(t, err)
	assert.Zero(t, n, "the block was dropped while it was read")
	after, _ := segFiles(t, dir)
	assert.Equal(t, files[1:], after, "the emptied segment is deleted after the read; the tail stays")
	assert.Zero(t, s.Stats().Corrupt)
}

// A dropped block stays dropped across a restart: its record is marked in place.
func TestDropSurvivesRestart(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	o := opts(8)
	o.SegmentBytes = 8 * record
	ns := prefix.Namespace{Salt: "d"}
	bs := chain(ns, 4, 42)
	s := open(t, dir, o)
	require.NoError(t, s.Put(ctx, bs))
	require.NoError(t, s.Drop(ctx, ns, keysOf(bs[1:2])))
	require.NoError(t, s.Close())
	s = open(t, dir, o)
	defer s.Close()
	assert.Equal(t, uint64(3), s.Stats().Restored)
	assert.Zero(t, s.DiskStats().DroppedAtOpen)
	assert.False(t, has(t, s, ns, bs[1].Key))
	dst := dsts(1)
	n, err := s.Get(ctx, ns, keysOf(bs[2:3]), dst)
	require.NoError(t, err)
	require.Equal(t, 1, n, "the records after a dropped one are found")
	assert.Equal(t, bs[2].Data, dst[0])
}

// A dropped block stays dropped across a restart where the store wrote it twice: a Get moved it
// to the tail (its second chance), or one Put held it twice. Drop marks the record the index
// points at; the earlier copy, still intact, must not come back at Open.
func TestDropSurvivesRestartOfACopiedBlock(t *testing.T) {
	ctx := context.Background()
	ns := prefix.Namespace{}
	for _, tc := range []struct {
		name string
		copy func(t *testing.T, s *disk.Store, bs []tier.Block)
	}{
		{"moved", func(t *testing.T, s *disk.Store, bs []tier.Block) {
			require.NoError(t, s.Put(ctx, bs)) // [0 1] [2 3] [4 5] [6]: 7 of 8 records
			n, err := s.Get(ctx, ns, keysOf(bs[1:2]), dsts(1))
			require.NoError(t, err)
			require.Equal(t, 1, n)
			require.Equal(t, uint64(8*record), s.Stats().Bytes, "1 moved to [6 1], [0 1] kept")
		}},
		{"twice in one Put", func(t *testing.T, s *disk.Store, bs []tier.Block) {
			require.NoError(t, s.Put(ctx, append(bs[:7:7], bs[1])))
			require.Equal(t, uint64(8*record), s.Stats().Bytes, "1 written twice")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			o := opts(8)
			o.SegmentBytes = 2 * record
			bs := chain(ns, 7, 44)
			s := open(t, dir, o)
			tc.copy(t, s, bs)
			require.NoError(t, s.Drop(ctx, ns, keysOf(bs[1:2])))
			require.False(t, has(t, s, ns, bs[1].Key))
			require.NoError(t, s.Close())
			s = open(t, dir, o)
			defer s.Close()
			assert.False(t, has(t, s, ns, bs[1].Key), "the dropped block came back")
			assert.Equal(t, uint64(6), s.Stats().Restored)
			n, err := s.Get(ctx, ns, keysOf(bs[:1]), dsts(1))
			require.NoError(t, err)
			assert.Equal(t, 1, n, "the other block of the copy's segment stays")
		})
	}
}

// Evicted segments' files become spares, up to SpareBytes, within LimitBytes with the segments;
// a new segment overwrites one in place, and the older records past its end are not restored.
func TestSpareFilesAreReused(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	o := opts(6)
	o.SegmentBytes = 2 * record
	o.SpareBytes = 2 * record
	s := open(t, dir, o)
	ns := prefix.Namespace{Salt: "s"}
	bs := chain(ns, 8, 43)
	check := func(blocks, spares uint64) {
		t.Helper()
		st, ds := s.Stats(), s.DiskStats()
		assert.Equal(t, blocks, st.Blocks)
		assert.Equal(t, spares, ds.SpareFiles)
		_, onDisk := segFiles(t, dir)
		_, spareBytes := files(t, dir, func(p string) bool { return strings.HasSuffix(p, ".spare") })
		assert.Equal(t, st.Bytes, onDisk)
		assert.Equal(t, ds.SpareBytes, spareBytes)
		assert.LessOrEqual(t, st.Bytes+ds.SpareBytes, o.LimitBytes)
	}
	require.NoError(t, s.Put(ctx, bs[:4])) // [0 1] [2 3]
	check(4, 0)
	require.NoError(t, s.Put(ctx, bs[4:5])) // [4]: 5 records > 6-2 evicts [0 1], a spare now
	check(3, 1)
	require.NoError(t, s.Put(ctx, bs[5:6])) // [4 5]
	check(4, 1)
	require.NoError(t, s.Put(ctx, bs[6:7])) // [6] over the spare, whose record 1 lies past it
	check(3, 1)                             // and [2 3] evicted into the pool
	dst := dsts(1)
	n, err := s.Get(ctx, ns, keysOf(bs[6:7]), dst)
	require.NoError(t, err)
	require.Equal(t, 1, n)
	assert.Equal(t, bs[6].Data, dst[0])
	assert.Equal(t, uint64(4), s.Stats().Evictions)

	require.NoError(t, s.Close())
	s = open(t, dir, o)
	defer s.Close()
	assert.Equal(t, uint64(3), s.Stats().Restored)
	assert.False(t, has(t, s, ns, bs[1].Key), "a spare's older record is not restored")
	assert.Zero(t, s.DiskStats().DroppedAtOpen)
	check(3, 1)
}
