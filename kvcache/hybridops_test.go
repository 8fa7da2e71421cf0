package kvcache_test

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/apitest"
	"github.com/pagedkv/pagedkv/internal/testutil/proctest"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/ledger"
	"github.com/pagedkv/pagedkv/prefix"
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

// A mark on a sleeping Hybrid records the mark but makes no checkpoint: the recurrent group,
// its one page full of live states, maps no page for one, and counts it skipped. After Wake the
// same mark makes it.
func TestHybridMarkAsleepMakesNoCheckpoint(t *testing.T) {
	g := smallHybrid(true)
	g.Groups[4].Checkpoints = 32
	h, err := kvcache.NewHybrid(hostDevice(t, 64<<10), kvcache.HybridConfig{Geometry: g, Limit: 64 << 20, Capacity: 16 << 20,
		NoBackground: true, PrefixCacheBytes: 8 << 20})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, h.Close()) })
	p := promptOf(64, 1)
	_, err = h.StartSequence(1, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	_, err = h.AppendTokenIDs(1, p, make([][]int64, h.Groups()))
	require.NoError(t, err)
	for seq := kvcache.SeqID(10); seq < 25; seq++ { // 16 live states: the recurrent group's page is full
		_, err = h.AppendTokens(seq, 1, make([][]int64, h.Groups()))
		require.NoError(t, err)
	}
	res, err := h.Sleep()
	require.NoError(t, err)

	require.NoError(t, h.MarkWritten(1, 32))
	st := h.Stats()
	require.Equal(t, res.MappedBytes, st.MappedBytes, "a sleeping Hybrid maps nothing")
	require.Equal(t, kvcache.CheckpointStats{Skipped: 1}, st.Groups[4].Prefix.Checkpoints)
	require.Zero(t, st.Groups[4].Prefix.CachedBlocks)
	require.NoError(t, h.Verify())

	require.NoError(t, h.Wake())
	require.NoError(t, h.MarkWritten(1, 32))
	require.EqualValues(t, 1, h.Stats().Groups[4].Prefix.Checkpoints.Made)
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

// swapHybrid is a Hybrid of every kind of group on dev with a host tier of hostTokens tokens
// a group (and hostSeqs states) under a limit of limit bytes.
func swapHybrid(t *testing.T, dev vmm.Device, limit uint64, hostTokens, hostSeqs int) *kvcache.Hybrid {
	t.Helper()
	h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: smallHybrid(true), Limit: limit, Capacity: 64 << 20,
		NoBackground: true, HostTokens: hostTokens, HostSequences: hostSeqs})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, h.Close()) })
	return h
}

// hybridModel is what a Hybrid's sequences hold: the K data of every attention group
// (hybridData) and each sequence's recurrent state, and which sequences are swapped out.
type hybridModel struct {
	*hybridData
	t       *testing.T
	state   map[kvcache.SeqID][]byte
	swapped map[kvcache.SeqID]bool
	tag     uint64
}

func newHybridModel(t *testing.T, dev vmm.Device, h *kvcache.Hybrid) *hybridModel {
	return &hybridModel{hybridData: &hybridData{dev: dev, h: h, val: map[kvcache.SeqID][]uint64{}}, t: t,
		state: map[kvcache.SeqID][]byte{}, swapped: map[kvcache.SeqID]bool{}}
}

// stateGroup is smallHybrid(true)'s recurrent group.
const stateGroup = 4

// append appends n tokens to seq (keyed ids when ids is set), writes their data and a new state,
// and returns the error of a refused append (nothing written then).
func (x *hybridModel) append(seq kvcache.SeqID, n int, ids []kvcache.TokenID) error {
	from, _ := x.h.Len(seq)
	var dst [][]int64
	var err error
	if ids != nil {
		dst, err = x.h.AppendTokenIDs(seq, ids, make([][]int64, x.h.Groups()))
	} else {
		dst, err = x.h.AppendTokens(seq, n, make([][]int64, x.h.Groups()))
	}
	if err != nil {
		return err
	}
	x.val[seq] = x.val[seq][:from]
	x.write(x.t, seq, from, dst)
	x.tag++
	x.state[seq] = writeState(x.t, x.dev, x.h, stateGroup, seq, x.tag)
	return nil
}

func (x *hybridModel) fork(src, dst kvcache.SeqID) {
	require.NoError(x.t, x.h.Fork(src, dst))
	x.val[dst] = append([]uint64(nil), x.val[src]...)
	x.state[dst] = x.state[src]
}

func (x *hybridModel) free(seq kvcache.SeqID) {
	require.NoError(x.t, x.h.FreeSequence(seq))
	delete(x.val, seq)
	delete(x.state, seq)
	delete(x.swapped, seq)
}

// swap swaps seqs out (or in), waits for the copies and closes the swap.
func (x *hybridModel) swap(out bool, seqs ...kvcache.SeqID) (*kvcache.HybridSwap, error) {
	var sw *kvcache.HybridSwap
	var err error
	if out {
		sw, err = x.h.SwapOut(seqs, 0)
	} else {
		sw, err = x.h.SwapIn(seqs, 0)
	}
	if err != nil {
		return nil, err
	}
	require.Len(x.t, sw.Groups, x.h.Groups())
	require.NoError(x.t, sw.Wait())
	done, err := sw.Done()
	require.NoError(x.t, err)
	require.True(x.t, done)
	require.NoError(x.t, sw.Close())
	for _, s := range seqs {
		x.swapped[s] = out
		got, err := x.h.Swapped(s)
		require.NoError(x.t, err)
		require.Equal(x.t, out, got)
	}
	return sw, nil
}

// check reads back every sequence on the device, in every group, and verifies the Hybrid.
func (x *hybridModel) check() {
	x.t.Helper()
	var seqs []kvcache.SeqID
	for s := range x.val {
		if !x.swapped[s] {
			seqs = append(seqs, s)
		}
	}
	slices.Sort(seqs)
	x.hybridData.check(x.t, seqs)
	for _, s := range seqs {
		if x.state[s] != nil {
			require.Equal(x.t, x.state[s], stateOfSeq(x.t, x.dev, x.h, stateGroup, s), "state of sequence %d", s)
		}
	}
	require.NoError(x.t, x.h.Verify())
}

// hybridSnapshot is what a refused call must leave alone in every group: its statistics, the
// blocks of each of seqs and the keys it caches (sorted).
func hybridSnapshot(t *testing.T, h *kvcache.Hybrid, seqs []kvcache.SeqID) []any {
	var out []any
	for g := range h.Groups() {
		m := h.Group(g)
		blocks := map[kvcache.SeqID][]int32{}
		for _, s := range seqs {
			b, err := m.Blocks(s, nil)
			require.NoError(t, err)
			blocks[s] = b
		}
		keys := m.CachedKeys(nil)
		slices.SortFunc(keys, func(a, b prefix.Key) int { return bytes.Compare(a[:], b[:]) })
		out = append(out, shape(m.Stats()), blocks, keys)
	}
	return out
}

// distinctHeld counts, in group g, the distinct blocks (dropped ones aside) that seqs hold.
func distinctHeld(t *testing.T, h *kvcache.Hybrid, g int, seqs ...kvcache.SeqID) int {
	seen := map[int32]bool{}
	for _, s := range seqs {
		b, err := h.Group(g).Blocks(s, nil)
		require.NoError(t, err)
		for _, x := range b {
			if x != kvcache.NullBlock {
				seen[x] = true
			}
		}
	}
	return len(seen)
}

// Sequences swapped out of a Hybrid leave every group's device (a window's only the blocks it
// still holds, a recurrent group each state, blocks shared with a sequence that stays are
// kept); others overwrite what they freed; swapped back in, every group's data and every state
// read back through the tables, and the sequences take appends again.
func TestHybridSwapRoundTrip(t *testing.T) {
	dev := hostDevice(t, 64<<10)
	h := swapHybrid(t, dev, 256<<20, 2048, 8)
	x := newHybridModel(t, dev, h)
	for s := kvcache.SeqID(1); s <= 4; s++ {
		p := promptOf(150+10*int(s), uint32(s))
		_, err := h.StartSequence(s, kvcache.Prompt{Tokens: p})
		require.NoError(t, err)
		require.NoError(t, x.append(s, 0, p))
		require.NoError(t, x.append(s, 0, []kvcache.TokenID{7})) // the window drops what it no longer reads
	}
	x.fork(1, 5)
	require.NoError(t, x.append(5, 10, nil)) // its own tail and state
	x.check()

	var held []int
	for g := range h.Groups() {
		held = append(held, distinctHeld(t, h, g, 1, 2))
	}
	sw, err := x.swap(true, 1, 2)
	require.NoError(t, err)
	for g, st := range h.Stats().Groups {
		require.Equal(t, held[g], sw.Groups[g].Blocks+sw.Groups[g].Kept, "group %d: every block held, once", g)
		require.Equal(t, sw.Groups[g].Blocks, st.HostSwappedBlocks, "group %d", g)
		require.Equal(t, 2, st.SwappedSequences, "group %d", g)
	}
	require.Positive(t, sw.Groups[0].Kept, "the blocks 1 shares with its fork stay on the device")
	require.Equal(t, 2, sw.Groups[stateGroup].Blocks, "each state moved")
	nulls := 0
	for _, b := range func() []int32 { b, _ := h.Group(1).Blocks(2, nil); return b }() {
		if b == kvcache.NullBlock {
			nulls++
		}
	}
	require.Positive(t, nulls, "the window group's dropped blocks stay dropped")
	x.check()

	shape := hybridShape(t, h)
	_, err = h.AppendTokens(1, 1, make([][]int64, h.Groups()))
	require.ErrorIs(t, err, kvcache.ErrSwapped)
	require.ErrorIs(t, h.Fork(2, 7), kvcache.ErrSwapped)
	require.ErrorIs(t, h.Truncate(2, 1), kvcache.ErrSwapped)
	require.ErrorIs(t, h.MarkWritten(2, 1), kvcache.ErrSwapped)
	require.Equal(t, shape, hybridShape(t, h))

	for s := kvcache.SeqID(3); s <= 6; s++ { // take (and overwrite) what 1 and 2 freed
		require.NoError(t, x.append(s, 120, nil))
	}
	x.check()
	_, err = x.swap(false, 2, 1)
	require.NoError(t, err)
	for g, st := range h.Stats().Groups {
		require.Zero(t, st.HostSwappedBlocks, "group %d: every host block free again", g)
		require.Equal(t, st.HostFreeBlocks, h.Group(g).Config().HostBlocks)
	}
	x.check()
	for _, s := range []kvcache.SeqID{1, 2} {
		require.NoError(t, x.append(s, 30, nil))
	}
	x.check()
}

// A random trace of appends (keyed and not), forks, swaps out and in, frees and compactions
// under a tight limit and a small host tier keeps every group consistent and every token and
// state readable.
func TestHybridSwapRandomTrace(t *testing.T) {
	for _, seed := range []uint64{1, 2, 3} {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			dev := hostDevice(t, 64<<10)
			h := swapHybrid(t, dev, 3<<20, 1024, 6)
			x := newHybridModel(t, dev, h)
			r := rand.New(rand.NewPCG(seed, 7))
			ids := kvcache.SeqID(0)
			var outs, ins, ooms int
			refused := map[bool]int{}
			pick := func(swapped bool) []kvcache.SeqID {
				var out []kvcache.SeqID
				for s := range x.val {
					if x.swapped[s] == swapped {
						out = append(out, s)
					}
				}
				slices.Sort(out)
				r.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
				return out[:min(len(out), 1+r.IntN(3))]
			}
			any := func() (kvcache.SeqID, bool) { // a live sequence, drawn from the seed
				seqs := slices.Sorted(maps.Keys(x.val))
				if len(seqs) == 0 {
					return 0, false
				}
				return seqs[r.IntN(len(seqs))], true
			}
			for step := range 300 {
				switch op := r.IntN(10); {
				case op <= 1 || len(x.val) == 0: // a new sequence, keyed or not
					ids++
					p := promptOf(1+r.IntN(200), uint32(ids))
					var err error
					if r.IntN(2) == 0 {
						if _, err = h.StartSequence(ids, kvcache.Prompt{Tokens: p}); err == nil {
							if err = x.append(ids, 0, p); err != nil {
								require.NoError(t, h.FreeSequence(ids))
							}
						}
					} else {
						err = x.append(ids, len(p), nil)
					}
					if err != nil {
						require.ErrorIs(t, err, kvcache.ErrOutOfMemory, "step %d", step)
						ooms++
					}
				case op <= 3: // an append
					s, _ := any()
					if err := x.append(s, 1+r.IntN(40), nil); err != nil {
						require.True(t, errors.Is(err, kvcache.ErrOutOfMemory) || errors.Is(err, kvcache.ErrSwapped), "step %d: %v", step, err)
					}
				case op == 4: // a fork
					if s, _ := any(); !x.swapped[s] {
						ids++
						x.fork(s, ids)
					}
				case op == 5 || op == 6: // swaps
					out := op == 5
					seqs := pick(!out)
					if len(seqs) == 0 {
						continue
					}
					before := hybridSnapshot(t, h, slices.Collect(maps.Keys(x.val)))
					if _, err := x.swap(out, seqs...); err != nil {
						var se *kvcache.SwapError
						require.ErrorAs(t, err, &se, "step %d", step)
						require.ErrorIs(t, err, kvcache.ErrOutOfMemory)
						require.Equal(t, before, hybridSnapshot(t, h, slices.Collect(maps.Keys(x.val))), "step %d: a refused swap changed something", step)
						refused[out]++
					} else if out {
						outs++
					} else {
						ins++
					}
				case op == 7:
					s, _ := any()
					x.free(s)
				case op == 8:
					_, err := h.Compact(kvcache.CompactOptions{})
					require.NoError(t, err)
				}
				require.NoError(t, h.Verify(), "step %d", step)
				if step%25 == 0 {
					x.check()
				}
			}
			x.check()
			t.Logf("seed %d: %d swaps out, %d in; refused for room: %d out, %d in; %d appends out of memory",
				seed, outs, ins, refused[true], refused[false], ooms)
			require.Positive(t, outs)
			require.Positive(t, ins)
			require.Positive(t, refused[true], "the host tier runs short at times")
			require.Positive(t, refused[false], "the device runs short at times")
		})
	}
}

// A group that cannot take its part of a swap leaves every group exactly as it was: a host tier
// too small in a group in the middle (the MLA group's 32-token blocks fill its tier first), a
// device too full, and a copy launch failing in each group in turn, both ways. A later swap
// then succeeds and every group reads back right.
func TestHybridSwapFailures(t *testing.T) {
	fd := vmm.InjectFaults(hostDevice(t, 64<<10))
	h := swapHybrid(t, fd, 4<<20, 64, 8) // 4 host blocks of 16 tokens a group, 2 of MLA's 32
	x := newHybridModel(t, fd, h)
	for s := kvcache.SeqID(1); s <= 3; s++ {
		require.NoError(t, x.append(s, 1, nil))
	}
	seqs := []kvcache.SeqID{1, 2, 3}
	before := hybridShape(t, h)
	_, err := h.SwapOut(seqs, 0)
	var se *kvcache.SwapError
	require.ErrorAs(t, err, &se)
	require.ErrorIs(t, err, kvcache.ErrOutOfMemory)
	var ge *kvcache.GroupOpError
	require.ErrorAs(t, err, &ge)
	require.Equal(t, 3, ge.Group, "the MLA group")
	require.Equal(t, 3, se.Blocks)
	require.Equal(t, 2, se.Max)
	require.Equal(t, before, hybridShape(t, h), "every group as it was")
	x.check()

	// A launch failing in each group in turn, while 2 and 3 swap out.
	failed := map[int]bool{}
	swapFaults := func(out bool) {
		for call := 1; ; call++ {
			before := hybridShape(t, h)
			require.NoError(t, fd.FailNth(vmm.OpCopy, call, nil))
			_, err := x.swap(out, 2, 3)
			fd.Clear()
			if err == nil {
				break
			}
			require.ErrorIs(t, err, vmm.ErrInjected, "call %d", call)
			require.ErrorAs(t, err, &ge)
			failed[ge.Group] = true
			require.Equal(t, before, hybridShape(t, h), "a failed copy in group %d (call %d)", ge.Group, call)
			x.check()
		}
	}
	swapFaults(true)
	require.Len(t, failed, h.Groups(), "out: a failure in every group: %v", failed)
	x.check()
	require.NoError(t, x.append(1, 300, nil)) // 2 and 3's device blocks overwritten
	clear(failed)
	swapFaults(false)
	require.Len(t, failed, h.Groups(), "in: a failure in every group: %v", failed)
	x.check()

	// A device too full: 2 and 3 out, the others take the device, 2 and 3 do not fit back.
	_, err = x.swap(true, 2, 3)
	require.NoError(t, err)
	for s := kvcache.SeqID(4); ; s++ {
		if err := x.append(s, 1, nil); err != nil {
			require.ErrorIs(t, err, kvcache.ErrOutOfMemory)
			break
		}
		if s > 10000 {
			t.Fatal("the device never fills")
		}
	}
	before = hybridShape(t, h)
	_, err = h.SwapIn(seqs[1:], 0)
	require.ErrorIs(t, err, kvcache.ErrOutOfMemory)
	require.ErrorAs(t, err, &se)
	require.Equal(t, before, hybridShape(t, h))
	x.check()
	x.free(4)
	x.free(5)
	_, err = x.swap(false, 2, 3)
	require.NoError(t, err)
	x.check()
}

// Bad input to SwapOut and SwapIn: typed errors, nothing changed.
func TestHybridSwapBadInput(t *testing.T) {
	dev := hostDevice(t, 64<<10)
	h := swapHybrid(t, dev, 256<<20, 256, 4)
	x := newHybridModel(t, dev, h)
	require.NoError(t, x.append(1, 20, nil))
	require.NoError(t, x.append(2, 20, nil))
	_, err := x.swap(true, 2)
	require.NoError(t, err)
	before := hybridShape(t, h)
	for name, c := range map[string]struct {
		out  bool
		seqs []kvcache.SeqID
		want error
	}{
		"nil":                {true, nil, kvcache.ErrInvalidArgument},
		"empty":              {false, []kvcache.SeqID{}, kvcache.ErrInvalidArgument},
		"unknown":            {true, []kvcache.SeqID{1, 9}, kvcache.ErrUnknownSequence},
		"twice":              {true, []kvcache.SeqID{1, 1}, kvcache.ErrInvalidArgument},
		"swapped out again":  {true, []kvcache.SeqID{1, 2}, kvcache.ErrSwapped},
		"in, not out":        {false, []kvcache.SeqID{2, 1}, kvcache.ErrInvalidArgument},
		"in, unknown":        {false, []kvcache.SeqID{9}, kvcache.ErrUnknownSequence},
		"in, listed twice":   {false, []kvcache.SeqID{2, 2}, kvcache.ErrInvalidArgument},
		"out of a huge list": {true, []kvcache.SeqID{1, math.MaxUint64}, kvcache.ErrUnknownSequence},
	} {
		var err error
		if c.out {
			_, err = h.SwapOut(c.seqs, 0)
		} else {
			_, err = h.SwapIn(c.seqs, 0)
		}
		require.ErrorIs(t, err, c.want, name)
		require.Equal(t, before, hybridShape(t, h), name)
		require.NoError(t, apitest.Text(err), name)
	}
	x.check()

	none := newHybrid(t, dev, smallHybrid(true)) // no host tier
	_, err = none.AppendTokens(1, 1, make([][]int64, none.Groups()))
	require.NoError(t, err)
	_, err = none.SwapOut([]kvcache.SeqID{1}, 0)
	require.ErrorIs(t, err, kvcache.ErrNotSupported)
	var zero kvcache.Hybrid
	_, err = zero.SwapOut([]kvcache.SeqID{1}, 0)
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
	_, err = zero.Swapped(1)
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
	var nilSwap *kvcache.HybridSwap
	require.NoError(t, nilSwap.Wait())
	require.NoError(t, nilSwap.Close())

	for name, cfg := range map[string]kvcache.HybridConfig{
		"negative tokens":           {HostTokens: -1},
		"sequences without tokens":  {HostSequences: 2},
		"no states for a recurrent": {HostTokens: 64},
		"negative sequences":        {HostTokens: 64, HostSequences: -1},
	} {
		cfg.Geometry, cfg.Limit, cfg.NoBackground = smallHybrid(true), 64<<20, true
		_, err := kvcache.NewHybrid(dev, cfg)
		var ce *kvcache.ConfigError
		require.ErrorAs(t, err, &ce, name)
	}

	closed, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: smallHybrid(true), Limit: 64 << 20, NoBackground: true, HostTokens: 64, HostSequences: 1})
	require.NoError(t, err)
	require.NoError(t, closed.Close())
	_, err = closed.SwapIn([]kvcache.SeqID{1}, 0)
	require.ErrorIs(t, err, kvcache.ErrClosed)
}

// A recurrent group with checkpoints swaps the live state, not a checkpoint: the swapped-out
// sequence's checkpoints stay cached on the device (a new start resumes from one), and the
// state that comes back in is the sequence's own, later one.
func TestHybridSwapKeepsCheckpoints(t *testing.T) {
	dev := hostDevice(t, 64<<10)
	h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: ckptGeometry(4096), Limit: 64 << 20, Capacity: 8 << 20,
		NoBackground: true, HostTokens: 1024, HostSequences: 2})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, h.Close()) })
	p := promptOf(100, 3)
	_, err = h.StartSequence(1, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	states := prefill(t, dev, h, 1, p, 32, 64, 90)
	require.EqualValues(t, 2, h.Group(1).Stats().Prefix.Checkpoints.Made)
	sw, err := h.SwapOut([]kvcache.SeqID{1}, 0)
	require.NoError(t, err)
	require.NoError(t, sw.Wait())
	require.NoError(t, sw.Close())
	require.Equal(t, 1, sw.Groups[1].Blocks, "the live state moved")

	hit, err := h.StartSequence(2, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	require.Equal(t, 64, hit, "the checkpoints stayed cached")
	require.Equal(t, states[64], stateOfSeq(t, dev, h, 1, 2))
	require.NoError(t, h.FreeSequence(2))

	sw, err = h.SwapIn([]kvcache.SeqID{1}, 0)
	require.NoError(t, err)
	require.NoError(t, sw.Wait())
	require.NoError(t, sw.Close())
	require.Zero(t, sw.Groups[1].Kept, "a state is never found in the cache")
	require.Equal(t, states[90], stateOfSeq(t, dev, h, 1, 1), "its own state, after 90 tokens")
	require.NoError(t, h.Verify())
}

// A swap-in whose copy is queued in one group while a later group's launch fails cannot unwrite
// that copy: the cached block the first group evicted to make room, and overwrote, stays
// evicted, so that no prefix hit serves what the copy wrote. Everything else is as before.
func TestHybridSwapInFailureDropsOverwrittenCache(t *testing.T) {
	fd := vmm.InjectFaults(hostDevice(t, 64<<10))
	g := kvcache.Geometry{Model: "two", Layers: 2, Groups: []kvcache.LayerGroup{ // 8 blocks of 16 tokens each, one page
		{Name: "a", Layers: []int{0}, KVHeads: 2, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
		{Name: "b", Layers: []int{1}, KVHeads: 2, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
	}}
	h, err := kvcache.NewHybrid(fd, kvcache.HybridConfig{Geometry: g, Limit: 1 << 20, Capacity: 64 << 10, NoBackground: true, HostTokens: 256})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, h.Close()) })
	require.Equal(t, 8, h.Group(0).Stats().BlocksPerPage)
	d := &hybridData{dev: fd, h: h, val: map[kvcache.SeqID][]uint64{}}
	appendTo := func(seq kvcache.SeqID, ids []kvcache.TokenID, n int) {
		var dst [][]int64
		var err error
		if ids != nil {
			dst, err = h.AppendTokenIDs(seq, ids, make([][]int64, 2))
		} else {
			dst, err = h.AppendTokens(seq, n, make([][]int64, 2))
		}
		require.NoError(t, err)
		d.write(t, seq, 0, dst)
	}
	appendTo(3, nil, 16)
	appendTo(1, nil, 16)
	sw, err := h.SwapOut([]kvcache.SeqID{1}, 0)
	require.NoError(t, err)
	require.NoError(t, sw.Close())
	p := promptOf(97, 5) // 6 full blocks, cached, and a tail of one token
	_, err = h.StartSequence(2, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	appendTo(2, p, 0)
	require.NoError(t, h.FreeSequence(2)) // its 6 full blocks idle, the last the oldest
	appendTo(4, nil, 16)                  // the free tail: no free block left
	for i := range 2 {
		st := h.Group(i).Stats()
		require.Equal(t, 6, st.Prefix.IdleBlocks)
		require.Equal(t, 8, st.LiveBlocks+st.Prefix.IdleBlocks, "group %d: every block held or cached", i)
	}

	require.NoError(t, fd.FailNth(vmm.OpCopy, 2, nil)) // group a's copy runs into an evicted block, group b's fails
	_, err = h.SwapIn([]kvcache.SeqID{1}, 0)
	fd.Clear()
	require.ErrorIs(t, err, vmm.ErrInjected)
	var ge *kvcache.GroupOpError
	require.ErrorAs(t, err, &ge)
	require.Equal(t, 1, ge.Group)
	require.NoError(t, h.Verify())
	for i := range 2 {
		st := h.Group(i).Stats()
		require.Equal(t, 5, st.Prefix.IdleBlocks, "group %d: the block the copy overwrote is no longer cached", i)
		require.Equal(t, 2, st.LiveBlocks)
		ok, err := h.Group(i).Swapped(1)
		require.NoError(t, err)
		require.True(t, ok)
	}
	d.check(t, []kvcache.SeqID{3, 4})

	hit, err := h.StartSequence(5, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	require.Equal(t, 5*16, hit, "the five blocks still cached, not the overwritten sixth")
	d.val[5] = append([]uint64(nil), d.val[2][:hit]...)
	d.check(t, []kvcache.SeqID{5})
	require.NoError(t, h.FreeSequence(5))
	sw, err = h.SwapIn([]kvcache.SeqID{1}, 0)
	require.NoError(t, err)
	require.NoError(t, sw.Close())
	d.check(t, []kvcache.SeqID{1, 3, 4})
	require.NoError(t, h.Verify())
}

// TestHybridAppendRefusedAsleepOrClosed: an append that every group could take on its fast path
// (room in each tail) is refused while the Hybrid sleeps and once it is closed, and changes
// nothing; after Wake it goes on where it stopped.
func TestHybridAppendRefusedAsleepOrClosed(t *testing.T) {
	h, err := kvcache.NewHybrid(hostDevice(t, 64<<10), kvcache.HybridConfig{Geometry: smallHybrid(false), Limit: 256 << 20, Capacity: 64 << 20, NoBackground: true})
	require.NoError(t, err) // closed by the test
	dst := make([][]int64, h.Groups())
	_, err = h.AppendTokens(1, 3, dst)
	require.NoError(t, err)
	length := func() int {
		n, err := h.Len(1)
		require.NoError(t, err)
		return n
	}
	_, err = h.Sleep()
	require.NoError(t, err)
	for g := range dst {
		dst[g] = dst[g][:0]
	}
	out, err := h.AppendTokens(1, 1, dst)
	require.ErrorIs(t, err, kvcache.ErrAsleep)
	for g := range out {
		require.Empty(t, out[g], "group %d got slots while asleep", g)
	}
	require.Equal(t, 3, length())
	require.NoError(t, h.Wake())
	_, err = h.AppendTokens(1, 1, dst)
	require.NoError(t, err)
	require.Equal(t, 4, length())
	require.NoError(t, h.Close())
	_, err = h.AppendTokens(1, 1, make([][]int64, h.Groups()))
	require.ErrorIs(t, err, kvcache.ErrClosed)
}
