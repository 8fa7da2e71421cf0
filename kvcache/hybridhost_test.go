package kvcache_test

import (
	"math"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/vmm"
)

// hostCacheRun writes a 300-token prompt through every group of the small hybrid geometry
// (full, window, chunk, MLA), frees it, and starts it again after the device caches were
// emptied (evict: a Sleep, which keeps the host tier) or not. It returns the second start's
// hit, with the data of every group read back through its table against the first writer's.
func hostCacheRun(t *testing.T, hostCacheTokens int, evict bool) (int, *kvcache.Hybrid) {
	dev := hostDevice(t, 64<<10)
	h, d, p := hostCacheSetup(t, dev, hostCacheTokens, evict)
	return hostCacheStart(t, h, d, p, 2), h
}

// hostCacheSetup makes the Hybrid of hostCacheRun on dev and runs it up to the second start:
// sequence 1 written, freed, and the device caches emptied when evict.
func hostCacheSetup(t *testing.T, dev vmm.Device, hostCacheTokens int, evict bool) (*kvcache.Hybrid, *hybridData, []kvcache.TokenID) {
	h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: smallHybrid(false), Limit: 256 << 20, Capacity: 64 << 20,
		NoBackground: true, HostCacheTokens: hostCacheTokens})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, h.Close()) })
	p := promptOf(300, 4)
	d := writeFreed(t, dev, h, p)
	if evict {
		_, err = h.Sleep()
		require.NoError(t, err)
		require.NoError(t, h.Wake())
		for g := range h.Groups() {
			require.Zero(t, h.Group(g).Stats().Prefix.CachedBlocks, "group %d: the device cache is empty", g)
		}
	}
	return h, d, p
}

// writeFreed starts p as sequence 1 of h, appends it, writes its data through every group
// and frees it, leaving its blocks cached; it returns what it wrote.
func writeFreed(t *testing.T, dev vmm.Device, h *kvcache.Hybrid, p []kvcache.TokenID) *hybridData {
	d := &hybridData{dev: dev, h: h, val: map[kvcache.SeqID][]uint64{}}
	_, err := h.StartSequence(1, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	slots, err := h.AppendTokenIDs(1, p, make([][]int64, h.Groups()))
	require.NoError(t, err)
	d.write(t, 1, 0, slots)
	require.NoError(t, h.FreeSequence(1))
	return d
}

// hostCacheStart starts seq on p and reads what the hit holds back through every group's table
// against what sequence 1 wrote.
func hostCacheStart(t *testing.T, h *kvcache.Hybrid, d *hybridData, p []kvcache.TokenID, seq kvcache.SeqID) int {
	hit, err := h.StartSequence(seq, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	d.val[seq] = d.val[1][:hit]
	d.check(t, []kvcache.SeqID{seq})
	require.NoError(t, h.Verify())
	return hit
}

// A Hybrid with a host prefix cache serves, after its device caches were emptied, the hit the
// device caches served before, from every group's host cache: full attention and MLA all their
// blocks, the window its sink block and the blocks its next token reads, the chunk its current
// chunk. The data reads back through every group's table as the first sequence wrote it, and
// the host hits are counted, on the host backend and the GPU. Without the host cache the same
// start finds nothing.
func TestHybridHostCache(t *testing.T) {
	onDevice, _ := hostCacheRun(t, 0, false)
	require.Equal(t, 288, onDevice, "the device caches: 18 full blocks, 9 MLA blocks, window and chunk blocks 16-17")

	none, _ := hostCacheRun(t, 0, true)
	require.Zero(t, none, "no host cache: nothing left to serve")

	backends(t, func(t *testing.T, dev vmm.Device) {
		h, d, p := hostCacheSetup(t, dev, 4096, true)
		sub, err := h.Subscribe(1 << 12)
		require.NoError(t, err)
		hit := hostCacheStart(t, h, d, p, 2)
		require.Equal(t, onDevice, hit, "the host caches serve what the device caches did")
		stored := make([]int, h.Groups()) // the blocks brought back to each device, as the KV events say
		for _, ev := range sub.Read(nil) {
			require.Equal(t, prefix.BlockStored, ev.Kind)
			require.Equal(t, prefix.MediumGPU, ev.Medium)
			stored[ev.Group] += len(ev.Keys)
		}
		require.Equal(t, []int{18, 3, 2, 9}, stored)
		// The tokens each group fetched: full attention and MLA the whole hit, the window its sink
		// block and the two its next token reads, the chunk the two of its current chunk.
		for g, fetched := range []int{288, 48, 32, 288} {
			st := h.Group(g).Stats().Prefix
			require.EqualValues(t, fetched, st.HostHitTokens, "group %d", g)
			require.EqualValues(t, hit, st.HitTokens, "group %d", g)
			// The rest of a window's or a chunk's hit it does not hold: out of its next token's reach.
			require.EqualValues(t, hit, st.HostHitTokens+st.UnheldHitTokens, "group %d", g)
			require.Zero(t, st.HostFailures, "group %d", g)
		}
		// What the window and chunk groups fetched: only the blocks a hit of 288 tokens reads.
		w := h.Group(1).Stats().Prefix
		require.Equal(t, 3, w.CachedBlocks, "window: the sink block 0 and blocks 16-17")
		c := h.Group(2).Stats().Prefix
		require.Equal(t, 2, c.CachedBlocks, "chunk: blocks 16-17 of the chunk [256, 320)")
	})
}

// A group whose fetch cannot copy (the driver failing) fetches nothing: the hit is what every
// group can still serve (here nothing, as full attention lost its blocks), the failure is
// counted, no block or page leaks, and the next start, on a working device, gets the whole hit
// with the data intact.
func TestHybridHostCacheFaults(t *testing.T) {
	fd := vmm.InjectFaults(hostDevice(t, 64<<10))
	h, d, p := hostCacheSetup(t, fd, 4096, true)
	require.NoError(t, fd.FailNth(vmm.OpCopy, 1, nil)) // group 0's fetch, the first copy
	hit := hostCacheStart(t, h, d, p, 2)
	fd.Clear()
	require.Zero(t, hit)
	st := h.Group(0).Stats()
	require.EqualValues(t, 1, st.Prefix.HostFailures)
	require.Zero(t, st.LiveBlocks, "the blocks the failed fetch took went back")
	require.Zero(t, st.Prefix.CachedBlocks)
	for g := 1; g < h.Groups(); g++ {
		require.Zero(t, h.Group(g).Stats().Prefix.HostHitTokens, "group %d: a fetch beyond the hit serves no token", g)
	}
	require.NoError(t, h.FreeSequence(2))
	require.Equal(t, 288, hostCacheStart(t, h, d, p, 3))
}

// A negative host cache size is a *ConfigError naming the field.
func TestHybridHostCacheRefused(t *testing.T) {
	_, err := kvcache.NewHybrid(hostDevice(t, 64<<10), kvcache.HybridConfig{Geometry: smallHybrid(false), Limit: 256 << 20,
		Capacity: 64 << 20, NoBackground: true, HostCacheTokens: -1})
	var ce *kvcache.ConfigError
	require.ErrorAs(t, err, &ce)
	require.Equal(t, "HostCacheTokens", ce.Field)
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument)

	// A count no host can hold: the blocks it asks for overflow no sum, and the error names the
	// numbers.
	for _, tokens := range []int{math.MaxInt, 1 << 40} {
		_, err = kvcache.NewHybrid(hostDevice(t, 64<<10), kvcache.HybridConfig{Geometry: smallHybrid(false), Limit: 256 << 20,
			Capacity: 64 << 20, NoBackground: true, HostCacheTokens: tokens})
		require.ErrorIs(t, err, kvcache.ErrInvalidArgument, "HostCacheTokens %d", tokens)
		t.Logf("HostCacheTokens %d: %v", tokens, err)
	}
}

// A host fetch never evicts the device-cached blocks of the hit it lengthens: with a prompt's
// first eight blocks idle on the device, filling its only page, its last eight only in the host
// cache, and the device cache over its bound, the start serves all sixteen blocks, where
// evicting the device's eight to make room for the host's would have left a hit of none. The
// data reads back through the table.
func TestHybridHostFetchKeepsDeviceHit(t *testing.T) {
	dev := hostDevice(t, 64<<10)
	g := kvcache.Geometry{Model: "one", Layers: 2, Groups: []kvcache.LayerGroup{
		{Name: "full", Layers: []int{0, 1}, KVHeads: 2, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16}}}
	const blockBytes = 2 * 2 * 2 * 64 * 2 * 16 // layers x (K, V) x heads x dim x bf16 x tokens: 8 blocks a page
	h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: g, Limit: 256 << 20, Capacity: 64 << 20,
		NoBackground: true, HostCacheTokens: 1024, PrefixCacheBytes: 2 * blockBytes})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, h.Close()) })
	d := &hybridData{dev: dev, h: h, val: map[kvcache.SeqID][]uint64{}}
	p := promptOf(16*16+1, 5)
	_, err = h.StartSequence(1, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	slots, err := h.AppendTokenIDs(1, p, make([][]int64, h.Groups()))
	require.NoError(t, err)
	d.write(t, 1, 0, slots)
	require.NoError(t, h.FreeSequence(1)) // all sixteen written back to the host cache
	_, err = h.Sleep()
	require.NoError(t, err)
	require.NoError(t, h.Wake())
	require.Equal(t, 8*16, hostCacheStart(t, h, d, p[:8*16+1], 3), "the first eight, fetched into one page")
	require.NoError(t, h.FreeSequence(3))
	st := h.Group(0).Stats()
	require.Equal(t, 8, st.Prefix.CachedBlocks, "the first eight idle on the device")
	require.Equal(t, st.MappedPages, st.FullPages, "no free block on the device")

	require.Equal(t, 16*16, hostCacheStart(t, h, d, p, 2), "eight from the device, eight fetched from the host")
}
