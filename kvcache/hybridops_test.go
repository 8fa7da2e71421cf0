package kvcache_test

import (
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/proctest"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/ledger"
	"github.com/pagedkv/pagedkv/vmm"
)

// sleepyHybrid is a Hybrid of every kind of group on dev holding twelve keyed sequences of
// which every other one is freed again (scattered blocks, idle cached ones), and a fork of
// sequence 0 that took a few tokens of its own. It returns the Hybrid, the data written and the
// live sequences.
func sleepyHybrid(t *testing.T, dev vmm.Device) (*kvcache.Hybrid, *hybridData, []kvcache.SeqID) {
	h := newHybrid(t, dev, smallHybrid(true))
	d := &hybridData{dev: dev, h: h, val: map[kvcache.SeqID][]uint64{}}
	var live []kvcache.SeqID
	for s := range kvcache.SeqID(12) {
		p := promptOf(100+7*int(s), uint32(s)+50)
		_, err := h.StartSequence(s, kvcache.Prompt{Tokens: p})
		require.NoError(t, err)
		dst, err := h.AppendTokenIDs(s, p, make([][]int64, h.Groups()))
		require.NoError(t, err)
		d.write(t, s, 0, dst)
	}
	for s := kvcache.SeqID(1); s < 12; s += 2 {
		require.NoError(t, h.FreeSequence(s))
		delete(d.val, s)
	}
	for s := kvcache.SeqID(0); s < 12; s += 2 {
		live = append(live, s)
	}
	require.NoError(t, h.Fork(0, 20))
	d.val[20] = append([]uint64(nil), d.val[0]...)
	dst, err := h.AppendTokens(20, 5, make([][]int64, h.Groups()))
	require.NoError(t, err)
	d.write(t, 20, len(d.val[20]), dst)
	require.NoError(t, h.Verify())
	return h, d, append(live, 20)
}

// pagesFor returns the pages a group's live blocks fill.
func pagesFor(st kvcache.Stats) int { return (st.LiveBlocks + st.BlocksPerPage - 1) / st.BlocksPerPage }

// A sleeping Hybrid keeps in every group only the pages its live blocks fill, and no cache;
// appends and starts fail with ErrAsleep and change nothing, a free still works; after Wake
// every group's data reads back through its table and appends work again.
func TestHybridSleep(t *testing.T) {
	dev := hostDevice(t, 64<<10)
	h, d, live := sleepyHybrid(t, dev)
	before := h.Stats()
	require.Positive(t, before.Groups[0].Prefix.IdleBlocks, "the freed sequences' blocks stay cached")
	sparse := 0
	for _, st := range before.Groups {
		if st.MappedPages > pagesFor(st) {
			sparse++
		}
	}
	require.Positive(t, sparse, "some group maps more pages than its live blocks fill")

	res, err := h.Sleep()
	require.NoError(t, err)
	require.True(t, h.Asleep())
	require.Len(t, res.Groups, h.Groups())
	after := h.Stats()
	require.Equal(t, after.MappedBytes, res.MappedBytes)
	moved := 0
	for g, st := range after.Groups {
		require.Equal(t, before.Groups[g].LiveBlocks, st.LiveBlocks, "group %d: live blocks stay", g)
		require.Equal(t, pagesFor(st), st.MappedPages, "group %d: only the pages its live blocks fill", g)
		require.Equal(t, st.MappedPages, res.Groups[g].PagesMapped, "group %d", g)
		require.Zero(t, st.Prefix.CachedBlocks, "group %d: the cache is dropped", g)
		moved += res.Groups[g].BlocksMoved
	}
	require.Positive(t, moved, "the groups compacted")
	require.NoError(t, h.Verify())

	shape := hybridShape(t, h)
	_, err = h.AppendTokens(0, 1, make([][]int64, h.Groups()))
	require.ErrorIs(t, err, kvcache.ErrAsleep)
	var ge *kvcache.GroupOpError
	require.ErrorAs(t, err, &ge)
	_, err = h.StartSequence(30, kvcache.Prompt{Tokens: promptOf(40, 9)})
	require.ErrorIs(t, err, kvcache.ErrAsleep)
	require.Equal(t, shape, hybridShape(t, h), "a refused append or start changes nothing")
	require.NoError(t, h.FreeSequence(10))
	delete(d.val, 10)
	live = slices.DeleteFunc(live, func(s kvcache.SeqID) bool { return s == 10 })
	require.NoError(t, h.Verify())

	require.NoError(t, h.Wake())
	require.False(t, h.Asleep())
	d.check(t, live)
	for _, s := range live {
		n, err := h.Len(s)
		require.NoError(t, err)
		dst, err := h.AppendTokens(s, 20, make([][]int64, h.Groups()))
		require.NoError(t, err)
		d.write(t, s, n, dst)
	}
	d.check(t, live)
	require.NoError(t, h.Verify())
}

// A group whose compaction fails while the Hybrid goes to sleep sleeps all the same with its
// blocks where they were; the other groups sleep and compact; the error names the group. After
// Wake every group's data reads back.
func TestHybridSleepFault(t *testing.T) {
	// A dry run counts each group's copies while it sleeps, to fail the first copy of a group
	// in the middle.
	dry := vmm.InjectFaults(hostDevice(t, 64<<10))
	h, _, _ := sleepyHybrid(t, dry)
	copies := make([]int, h.Groups())
	for g := range h.Groups() {
		n := dry.Calls(vmm.OpCopy)
		_, err := h.Group(g).Sleep()
		require.NoError(t, err)
		copies[g] = dry.Calls(vmm.OpCopy) - n
	}
	target, skip := -1, 0
	for g := 1; g < len(copies); g++ {
		if copies[g] > 0 {
			target = g
			break
		}
	}
	require.Positive(t, target, "a group after the first compacts: %v", copies)
	for _, n := range copies[:target] {
		skip += n
	}

	fd := vmm.InjectFaults(hostDevice(t, 64<<10))
	h, d, live := sleepyHybrid(t, fd)
	before := h.Stats()
	require.NoError(t, fd.FailNth(vmm.OpCopy, skip+1, nil))
	res, err := h.Sleep()
	fd.Clear()
	require.ErrorIs(t, err, vmm.ErrInjected)
	var ge *kvcache.GroupOpError
	require.ErrorAs(t, err, &ge)
	require.Equal(t, target, ge.Group)
	require.True(t, h.Asleep())
	after := h.Stats()
	for g, st := range after.Groups {
		require.Zero(t, st.Prefix.CachedBlocks, "group %d: the cache is dropped", g)
		if g == target {
			require.Zero(t, res.Groups[g].BlocksMoved)
			require.Greater(t, st.MappedPages, pagesFor(st), "group %d: its blocks stay where they were", g)
			continue
		}
		require.Equal(t, pagesFor(st), st.MappedPages, "group %d sleeps", g)
		require.Equal(t, before.Groups[g].LiveBlocks, st.LiveBlocks)
	}
	require.NoError(t, h.Verify())
	_, err = h.AppendTokens(0, 1, make([][]int64, h.Groups()))
	require.ErrorIs(t, err, kvcache.ErrAsleep)
	require.NoError(t, h.Wake())
	d.check(t, live)
	_, err = h.Compact(kvcache.CompactOptions{})
	require.NoError(t, err)
	d.check(t, live)
	require.NoError(t, h.Verify())
}

// Sleep, Wake and Asleep on a closed or zero Hybrid: typed errors, no panic.
func TestHybridSleepBadInput(t *testing.T) {
	var zero kvcache.Hybrid
	_, err := zero.Sleep()
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
	require.ErrorIs(t, zero.Wake(), kvcache.ErrInvalidArgument)
	require.False(t, zero.Asleep())
	h, err := kvcache.NewHybrid(hostDevice(t, 64<<10), kvcache.HybridConfig{Geometry: smallHybrid(true), Limit: 64 << 20, Capacity: 8 << 20, NoBackground: true})
	require.NoError(t, err)
	require.NoError(t, h.Close())
	_, err = h.Sleep()
	require.ErrorIs(t, err, kvcache.ErrClosed)
	require.ErrorIs(t, h.Wake(), kvcache.ErrClosed)
}

// fillHybrid starts keyed sequences from seq on, of n tokens each, until the memory runs out,
// and returns the first sequence that did not fit (freed again).
func fillHybrid(t *testing.T, h *kvcache.Hybrid, d *hybridData, seq kvcache.SeqID, n int) kvcache.SeqID {
	for ; ; seq++ {
		p := promptOf(n, uint32(seq)+100)
		_, err := h.StartSequence(seq, kvcache.Prompt{Tokens: p})
		require.NoError(t, err)
		dst, err := h.AppendTokenIDs(seq, p, make([][]int64, h.Groups()))
		if err != nil {
			require.ErrorIs(t, err, kvcache.ErrOutOfMemory)
			require.NoError(t, h.FreeSequence(seq))
			return seq
		}
		d.write(t, seq, 0, dst)
	}
}

// A Hybrid shares a ledger with a serving process: the child's appends take back the Hybrid's
// free and cached pages, the limit holds across both processes, the dead child's share comes
// back to the Hybrid, and the ledger's DropCache empties every group's cache.
func TestHybridLedger(t *testing.T) {
	const limit = 16 << 20 // 8 of the child's 2 MiB pages
	path := filepath.Join(t.TempDir(), "ledger")
	l, err := ledger.Open(path, ledger.Options{Limit: limit})
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	dev := hostDevice(t, 64<<10)
	cfg := kvcache.HybridConfig{Geometry: smallHybrid(true), Ledger: l, Capacity: 64 << 20, NoBackground: true, CompactOnPressure: true}
	h, err := kvcache.NewHybrid(dev, cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, h.Close()) })
	_, err = kvcache.NewHybrid(dev, cfg)
	require.ErrorIs(t, err, kvcache.ErrExists, "a second Hybrid under the same names")
	d := &hybridData{dev: dev, h: h, val: map[kvcache.SeqID][]uint64{}}

	end := fillHybrid(t, h, d, fillHybrid(t, h, d, 0, 1000), 16)
	require.LessOrEqual(t, l.Used(), uint64(limit))
	require.Greater(t, l.Used(), uint64(limit-(2<<20)), "the Hybrid alone takes about the whole limit")
	for s := kvcache.SeqID(2); s < end; s++ { // their blocks stay mapped: free, or cached
		require.NoError(t, h.FreeSequence(s))
		delete(d.val, s)
	}
	live := []kvcache.SeqID{0, 1}
	alone := h.Stats().MappedBytes
	require.Greater(t, alone, uint64(limit-(2<<20)))

	child := proctest.Start(t, "grow", "host", path, "child", "5")
	child.Expect("ready", 60*time.Second) // its 5 pages came from the Hybrid's free and cached ones
	require.LessOrEqual(t, h.Stats().MappedBytes, uint64(limit-(10<<20)))
	d.check(t, live)
	end = fillHybrid(t, h, d, end, 100)
	for s := kvcache.SeqID(2); s < end; s++ {
		if _, ok := d.val[s]; ok {
			live = append(live, s)
		}
	}
	beside := h.Stats().MappedBytes
	require.LessOrEqual(t, beside, uint64(limit-(10<<20)), "the child holds 5 pages live")
	s, err := l.Snapshot()
	require.NoError(t, err)
	require.Len(t, s.Members, h.Groups()+1)
	require.LessOrEqual(t, s.Used, uint64(limit))

	child.Kill9()
	end = fillHybrid(t, h, d, end, 16)
	for s := range end {
		if _, ok := d.val[s]; ok && !slices.Contains(live, s) {
			live = append(live, s)
		}
	}
	require.Greater(t, h.Stats().MappedBytes, beside, "the dead child's share came back")
	t.Logf("the Hybrid maps %d KiB alone, %d KiB beside the child, %d KiB after its kill (limit %d KiB)",
		alone>>10, beside>>10, h.Stats().MappedBytes>>10, limit>>10)
	require.Greater(t, h.Stats().MappedBytes, uint64(limit-(2<<20)))
	s, err = l.Snapshot()
	require.NoError(t, err)
	require.Len(t, s.Members, h.Groups())
	require.Equal(t, h.Stats().MappedBytes, s.Used)
	require.NoError(t, l.Check())
	d.check(t, live)
	require.NoError(t, h.Verify())

	for _, seq := range live[len(live)/2:] {
		require.NoError(t, h.FreeSequence(seq))
	}
	require.Positive(t, h.Stats().Groups[0].Prefix.IdleBlocks)
	asked, err := l.DropCache("")
	require.NoError(t, err)
	require.Equal(t, h.Groups(), asked)
	for g, st := range h.Stats().Groups {
		require.Zero(t, st.Prefix.CachedBlocks, "group %d", g)
	}
	require.NoError(t, h.Verify())
}
