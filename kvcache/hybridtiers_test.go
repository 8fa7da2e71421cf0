package kvcache_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/tier/disk"
	"github.com/pagedkv/pagedkv/vmm"
)

// groupStores hands each group of a Hybrid a memStore of its own, shared by every Hybrid that
// asks for the same group: replicas sharing one cluster tier.
type groupStores struct {
	stores map[int]*memStore
	asked  map[int]int // blockBytes each group was asked for
}

func newGroupStores() *groupStores {
	return &groupStores{stores: map[int]*memStore{}, asked: map[int]int{}}
}

func (g *groupStores) tiers(i int, _ kvcache.LayerGroup, fp tier.Fingerprint, blockBytes int) ([]kvcache.Tier, error) {
	if g.stores[i] == nil {
		g.stores[i] = newMemStore(fp)
	}
	g.asked[i] = blockBytes
	return []kvcache.Tier{{Store: g.stores[i], Medium: "CLUSTER"}}, nil
}

func tieredHybrid(t *testing.T, dev vmm.Device, name string, tiers func(int, kvcache.LayerGroup, tier.Fingerprint, int) ([]kvcache.Tier, error)) *kvcache.Hybrid {
	h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: smallHybrid(false), Name: name, Limit: 256 << 20, Capacity: 64 << 20,
		NoBackground: true, HostCacheTokens: 4096, Tiers: tiers, TierTimeout: time.Minute})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, h.Close()) })
	return h
}

// storedOnce runs a first replica on dev that writes a prompt of n tokens through every group
// into stores of their own, and returns the stores and the prompt.
func storedOnce(t *testing.T, dev vmm.Device, n int) (*groupStores, []kvcache.TokenID) {
	stores := newGroupStores()
	h := tieredHybrid(t, dev, "one", stores.tiers)
	p := promptOf(n, 5)
	writeFreed(t, dev, h, p)
	require.NoError(t, h.SyncTiers(context.Background()))
	return stores, p
}

// Two Hybrids share every group's tier, as replicas share a cluster store. What the first
// computed reaches the second through the tiers alone (its device and host caches are new):
// the same hit as the first's device caches served, each group's data read back through its
// own table as the first wrote it, and each group asked its tier only for what the hit reads
// (the window its sink block and the blocks in reach, not all 18).
func TestHybridTiersShareBlocks(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device) {
		stores := newGroupStores()
		h1 := tieredHybrid(t, dev, "one", stores.tiers)
		sub, err := h1.Subscribe(1 << 12)
		require.NoError(t, err)
		p := promptOf(300, 4)
		d1 := writeFreed(t, dev, h1, p)
		require.NoError(t, h1.SyncTiers(context.Background()))
		inTier := make([]uint64, h1.Groups()) // the blocks each group's events say reached its tier
		for _, ev := range sub.Read(nil) {
			if ev.Kind == prefix.BlockStored && ev.Medium == "CLUSTER" {
				inTier[ev.Group] += uint64(len(ev.Keys))
			}
		}
		for g := range h1.Groups() {
			puts := stores.stores[g].Stats().Puts
			require.Positive(t, puts, "group %d wrote behind", g)
			require.Equal(t, puts, inTier[g], "group %d: one event per block written", g)
			require.Equal(t, int(h1.Group(g).Config().BlockStride()), stores.asked[g], "group %d: the block's bytes", g)
		}

		h2 := tieredHybrid(t, dev, "two", stores.tiers)
		hit, err := h2.StartSequence(2, kvcache.Prompt{Tokens: p})
		require.NoError(t, err)
		require.Equal(t, 288, hit, "as the first's device caches served: 18 full blocks")
		d2 := &hybridData{dev: dev, h: h2, val: map[kvcache.SeqID][]uint64{2: d1.val[1][:hit]}}
		d2.check(t, []kvcache.SeqID{2})
		require.NoError(t, h2.Verify())
		// The tokens each group brought from its tier, and the blocks it read there: full
		// attention and MLA the whole hit, the window its sink block and the two its next token
		// reads, the chunk the two of its current chunk.
		for g, want := range []int{288, 48, 32, 288} {
			st := h2.Group(g).Stats().Prefix
			require.Len(t, st.Tiers, 1, "group %d", g)
			require.EqualValues(t, want, st.Tiers[0].HitTokens, "group %d", g)
			require.Zero(t, st.Tiers[0].Failures, "group %d", g)
			require.EqualValues(t, want/h2.Group(g).Config().BlockTokens, stores.stores[g].Stats().Gets, "group %d", g)
			require.EqualValues(t, hit, st.HitTokens, "group %d", g)
		}

		// A start that fails (the sequence exists) asks no tier, not even for blocks nobody holds.
		before := stores.stores[0].Stats()
		_, err = h2.StartSequence(2, kvcache.Prompt{Tokens: promptOf(300, 99)})
		require.ErrorIs(t, err, kvcache.ErrSequenceExists)
		require.Equal(t, before, stores.stores[0].Stats())

		// A third replica without tiers finds nothing: the hit came from the tiers.
		h3 := tieredHybrid(t, dev, "three", nil)
		none, err := h3.StartSequence(3, kvcache.Prompt{Tokens: p})
		require.NoError(t, err)
		require.Zero(t, none)
	})
}

// A Hybrid on disk tiers, one directory per group, finds after a restart (a new Hybrid on a new
// device, the stores opened again on the same directories) the hit it had, with the data
// intact: each group's blocks describe themselves, and the index is rebuilt from the files.
func TestHybridTiersWarmRestart(t *testing.T) {
	dirs := []string{t.TempDir(), t.TempDir(), t.TempDir(), t.TempDir()}
	var open []*disk.Store
	onDisk := func(i int, _ kvcache.LayerGroup, fp tier.Fingerprint, blockBytes int) ([]kvcache.Tier, error) {
		s, err := disk.Open(dirs[i], disk.Options{Fingerprint: fp, BlockBytes: blockBytes, LimitBytes: 64 << 20})
		if err != nil {
			return nil, err
		}
		open = append(open, s)
		return []kvcache.Tier{{Store: s, Medium: "DISK"}}, nil
	}
	closeAll := func() {
		for _, s := range open {
			require.NoError(t, s.Close())
		}
		open = nil
	}
	p := promptOf(300, 9)

	dev := hostDevice(t, 64<<10)
	h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: smallHybrid(false), Limit: 256 << 20, Capacity: 64 << 20,
		NoBackground: true, HostCacheTokens: 4096, Tiers: onDisk, TierTimeout: time.Minute})
	require.NoError(t, err)
	d := writeFreed(t, dev, h, p)
	require.NoError(t, h.SyncTiers(context.Background()))
	require.NoError(t, h.Close())
	closeAll()

	dev2 := hostDevice(t, 64<<10)
	h2, err := kvcache.NewHybrid(dev2, kvcache.HybridConfig{Geometry: smallHybrid(false), Limit: 256 << 20, Capacity: 64 << 20,
		NoBackground: true, HostCacheTokens: 4096, Tiers: onDisk, TierTimeout: time.Minute})
	require.NoError(t, err)
	defer closeAll()
	defer func() { require.NoError(t, h2.Close()) }()
	for g := range h2.Groups() {
		require.Positive(t, h2.Group(g).Stats().Prefix.Tiers[0].Store.Restored, "group %d found its blocks on disk", g)
	}
	hit, err := h2.StartSequence(2, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	require.Equal(t, 288, hit)
	d2 := &hybridData{dev: dev2, h: h2, val: map[kvcache.SeqID][]uint64{2: d.val[1][:hit]}}
	d2.check(t, []kvcache.SeqID{2})
	require.NoError(t, h2.Verify())
}

// Tiers that cannot serve cost the hit, never a start: a tier that is down counts its failure,
// and corrupt blocks are dropped and counted by the store, never served; the hit is then what
// the device and host caches hold (nothing, for a new replica).
func TestHybridTiersFaultsAreMisses(t *testing.T) {
	for _, fault := range []string{"down", "corrupt"} {
		t.Run(fault, func(t *testing.T) {
			dev := hostDevice(t, 64<<10)
			stores, p := storedOnce(t, dev, 300)
			for _, s := range stores.stores {
				if fault == "down" {
					s.setDown(true)
				} else {
					s.corruptAll()
				}
			}
			h2 := tieredHybrid(t, dev, "two", stores.tiers)
			hit, err := h2.StartSequence(2, kvcache.Prompt{Tokens: p})
			require.NoError(t, err)
			require.Zero(t, hit)
			require.NoError(t, h2.Verify())
			st := h2.Group(0).Stats().Prefix.Tiers[0]
			if fault == "down" {
				require.EqualValues(t, 1, st.Failures, "the full group's one fetch failed")
			} else {
				require.Zero(t, st.Failures)
				require.Positive(t, st.Store.Corrupt)
			}
			require.Zero(t, st.HitTokens)
		})
	}
}

// Tiers a Hybrid cannot use are refused at NewHybrid, naming the field or the group: without a
// host prefix cache, a group's tiers failing to open (the callback's error, wrapped), a nil
// store, and a Hybrid over several devices.
func TestHybridTiersRefused(t *testing.T) {
	dev := hostDevice(t, 64<<10)
	base := kvcache.HybridConfig{Geometry: smallHybrid(false), Limit: 256 << 20, Capacity: 64 << 20, NoBackground: true, HostCacheTokens: 4096}
	stores := newGroupStores()

	cfg := base
	cfg.HostCacheTokens, cfg.Tiers = 0, stores.tiers
	_, err := kvcache.NewHybrid(dev, cfg)
	var ce *kvcache.ConfigError
	require.ErrorAs(t, err, &ce)
	require.Equal(t, "Tiers", ce.Field)
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument)

	boom := errors.New("disk full")
	cfg = base
	cfg.Tiers = func(i int, g kvcache.LayerGroup, fp tier.Fingerprint, n int) ([]kvcache.Tier, error) {
		if i == 2 {
			return nil, boom
		}
		return stores.tiers(i, g, fp, n)
	}
	_, err = kvcache.NewHybrid(dev, cfg)
	var ge *kvcache.GroupOpError
	require.ErrorAs(t, err, &ge)
	require.Equal(t, 2, ge.Group)
	require.Equal(t, "chunk", ge.Name)
	require.ErrorIs(t, err, boom)

	cfg.Tiers = func(int, kvcache.LayerGroup, tier.Fingerprint, int) ([]kvcache.Tier, error) {
		return []kvcache.Tier{{Medium: "DISK"}}, nil
	}
	_, err = kvcache.NewHybrid(dev, cfg)
	require.ErrorAs(t, err, &ge)
	require.Equal(t, 0, ge.Group)
	require.ErrorAs(t, err, &ce)
	require.Equal(t, "Tiers", ce.Field)

	cfg.Tiers = stores.tiers
	_, err = kvcache.NewHybridMulti(hostDevices(t, 2), cfg, kvcache.Split{TensorParallel: 2})
	require.ErrorAs(t, err, &ce)
	require.Equal(t, "Tiers", ce.Field)

}

// Groups of one shape (gpt-oss's full and window layers) are given different fingerprints, so
// that stores sharing a server keep their blocks apart (tier/redis puts the fingerprint in
// every key, and tier.Check refuses another's).
func TestHybridTiersGroupsOfOneShapeApart(t *testing.T) {
	g := kvcache.Geometry{Model: "alternating", Layers: 4, Groups: []kvcache.LayerGroup{
		{Name: "full", Layers: []int{0, 2}, KVHeads: 2, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
		{Name: "window", Layers: []int{1, 3}, Kind: kvcache.SlidingWindow, Window: 32, KVHeads: 2, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
	}}
	var fps []tier.Fingerprint
	tiers := func(_ int, _ kvcache.LayerGroup, fp tier.Fingerprint, _ int) ([]kvcache.Tier, error) {
		fps = append(fps, fp)
		return []kvcache.Tier{{Store: newMemStore(fp), Medium: "CLUSTER"}}, nil
	}
	h, err := kvcache.NewHybrid(hostDevice(t, 64<<10), kvcache.HybridConfig{Geometry: g, Limit: 256 << 20, Capacity: 64 << 20,
		NoBackground: true, HostCacheTokens: 4096, Tiers: tiers, TierTimeout: time.Minute})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, h.Close()) })
	require.Equal(t, h.Group(0).Config().Fingerprint(), h.Group(1).Config().Fingerprint(), "one layout")
	require.Len(t, fps, 2)
	require.NotEqual(t, fps[0], fps[1], "but not one group's blocks")
}

// A group's tier hits are the blocks the start's hit reads, not all it fetched: a full group
// that fetches 17 blocks of a 280-token prompt, whose hit the MLA group's 32-token blocks cut
// to 256 tokens, counts 256; a store that is down in one group leaves a hit of 0 and no tier
// hit anywhere.
func TestHybridTiersCountWhatTheHitReads(t *testing.T) {
	for _, down := range []bool{false, true} {
		dev := hostDevice(t, 64<<10)
		stores, p := storedOnce(t, dev, 280)
		stores.stores[1].setDown(down) // the window's
		h2 := tieredHybrid(t, dev, "two", stores.tiers)
		hit, err := h2.StartSequence(2, kvcache.Prompt{Tokens: p})
		require.NoError(t, err)
		// The window its sink block and blocks 14-15; the chunk none: its next token starts the
		// chunk [256, 320).
		want := []int{256, 48, 0, 256}
		if down {
			require.Zero(t, hit)
			want = []int{0, 0, 0, 0}
		} else {
			require.Equal(t, 256, hit)
		}
		for g, w := range want {
			require.EqualValues(t, w, h2.Group(g).Stats().Prefix.Tiers[0].HitTokens, "group %d, window store down %v", g, down)
		}
	}
}

// A recurrent group's checkpoints stay on the device, so a new replica can hit nothing: its
// start asks no tier for anything.
func TestHybridTiersRecurrentBoundsTheFetch(t *testing.T) {
	g := smallHybrid(true)
	g.Groups[len(g.Groups)-1].Checkpoints = 32
	dev := hostDevice(t, 64<<10)
	stores := newGroupStores()
	cfg := kvcache.HybridConfig{Geometry: g, Limit: 256 << 20, Capacity: 64 << 20, NoBackground: true, HostCacheTokens: 4096, Tiers: stores.tiers}
	h1, err := kvcache.NewHybrid(dev, cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, h1.Close()) })
	p := promptOf(300, 7)
	writeFreed(t, dev, h1, p)
	require.NoError(t, h1.SyncTiers(context.Background()))
	require.Len(t, stores.stores, 4, "the attention groups have tiers, the recurrent one none")
	for _, s := range stores.stores {
		require.Positive(t, s.Stats().Puts)
	}

	cfg.Name = "two"
	h2, err := kvcache.NewHybrid(dev, cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, h2.Close()) })
	hit, err := h2.StartSequence(2, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	require.Zero(t, hit)
	for i, s := range stores.stores {
		st := s.Stats()
		require.Zero(t, st.Gets+st.Misses+st.Failures, "group %d's tier was not asked", i)
	}
}

// Starts on one Hybrid from several goroutines at once, each fetching from the tiers what its
// device and host do not hold while others free and write behind, stay consistent (run with
// -race): every start gets the whole hit (from the tiers, the host or the device, whichever
// holds it then), and Verify holds after.
func TestHybridTiersConcurrentStarts(t *testing.T) {
	dev := hostDevice(t, 64<<10)
	stores, p := storedOnce(t, dev, 300)
	h := tieredHybrid(t, dev, "two", stores.tiers)
	const workers, rounds = 4, 8
	errs := make(chan error, workers)
	for w := range workers {
		go func() {
			for r := range rounds {
				seq := kvcache.SeqID(100 + w*rounds + r)
				hit, err := h.StartSequence(seq, kvcache.Prompt{Tokens: p})
				if err == nil && hit != 288 {
					err = fmt.Errorf("sequence %d: a hit of %d tokens, want 288", seq, hit)
				}
				if err == nil {
					err = h.FreeSequence(seq)
				}
				if err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range workers {
		require.NoError(t, <-errs)
	}
	require.NoError(t, h.SyncTiers(context.Background()))
	require.NoError(t, h.Verify())
	hit, err := h.StartSequence(1, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	require.Equal(t, 288, hit)
}

// capStore serves at most max blocks of a Get: a store that lost the tail of a run.
type capStore struct {
	*memStore
	max int
}

func (s *capStore) Get(ctx context.Context, ns prefix.Namespace, keys []prefix.Key, dst [][]byte) (int, error) {
	return s.memStore.Get(ctx, ns, keys[:min(len(keys), s.max)], dst)
}

// One group's shorter run moves the hit every group can end at, and the window then fetches
// for that length: with the MLA group (32-token blocks) first and the full group's tier
// holding 17 of the prompt's 18 blocks, the hit is 256 tokens (every group's whole blocks),
// with the data read back, where fetching the window's reach for 272 left a hit of 0.
func TestHybridTiersShortRunBoundsTheHit(t *testing.T) {
	small := smallHybrid(false)
	g := kvcache.Geometry{Model: "mla-first", Layers: 7, Groups: []kvcache.LayerGroup{small.Groups[3], small.Groups[0], small.Groups[1], small.Groups[2]}}
	for held, want := range map[int]int{1000: 288, 17: 256, 16: 256, 15: 224} {
		dev := hostDevice(t, 64<<10)
		stores := newGroupStores()
		tiers := func(i int, lg kvcache.LayerGroup, fp tier.Fingerprint, n int) ([]kvcache.Tier, error) {
			ts, err := stores.tiers(i, lg, fp, n)
			if i == 1 { // the full group's
				ts[0].Store = &capStore{stores.stores[1], held}
			}
			return ts, err
		}
		cfg := kvcache.HybridConfig{Geometry: g, Limit: 256 << 20, Capacity: 64 << 20, NoBackground: true, HostCacheTokens: 4096, Tiers: tiers}
		h1, err := kvcache.NewHybrid(dev, cfg)
		require.NoError(t, err)
		p := promptOf(300, 3)
		d1 := writeFreed(t, dev, h1, p)
		require.NoError(t, h1.SyncTiers(context.Background()))
		require.NoError(t, h1.Close())

		cfg.Name = "two"
		h2, err := kvcache.NewHybrid(dev, cfg)
		require.NoError(t, err)
		hit, err := h2.StartSequence(2, kvcache.Prompt{Tokens: p})
		require.NoError(t, err)
		require.Equal(t, want, hit, "the full group's tier holds %d blocks", held)
		d2 := &hybridData{dev: dev, h: h2, val: map[kvcache.SeqID][]uint64{2: d1.val[1][:hit]}}
		d2.check(t, []kvcache.SeqID{2})
		require.NoError(t, h2.Verify())
		require.NoError(t, h2.Close())
	}
}

// gateStore stops the first Get after arming inside the store until released.
type gateStore struct {
	*memStore
	entered, release chan struct{}
	armed            bool
}

func (s *gateStore) Get(ctx context.Context, ns prefix.Namespace, keys []prefix.Key, dst [][]byte) (int, error) {
	if s.armed {
		s.armed = false
		close(s.entered)
		<-s.release
	}
	return s.memStore.Get(ctx, ns, keys, dst)
}

// Overlapping starts count every block a tier gave once, whichever start's hit reads it: start
// A fetches the full, window and MLA groups' blocks into the hosts and stops inside the chunk
// group's Get; start B (a 257-token prompt, whose chunk group needs nothing) brings 16 of them
// to the devices; then A completes. Each group's tier hits are then exactly the blocks its
// store served.
func TestHybridTiersOverlappingStartsCountOnce(t *testing.T) {
	dev := hostDevice(t, 64<<10)
	stores, p := storedOnce(t, dev, 300)
	gate := &gateStore{entered: make(chan struct{}), release: make(chan struct{})}
	h := tieredHybrid(t, dev, "two", func(i int, lg kvcache.LayerGroup, fp tier.Fingerprint, n int) ([]kvcache.Tier, error) {
		ts, err := stores.tiers(i, lg, fp, n)
		if i == 2 {
			gate.memStore = stores.stores[2]
			ts[0].Store = gate
		}
		return ts, err
	})
	gate.armed = true
	done := make(chan error, 1)
	go func() {
		hit, err := h.StartSequence(10, kvcache.Prompt{Tokens: p})
		if err == nil && hit != 288 {
			err = fmt.Errorf("start A: hit %d, want 288", hit)
		}
		done <- err
	}()
	<-gate.entered
	hitB, err := h.StartSequence(11, kvcache.Prompt{Tokens: p[:257]})
	require.NoError(t, err)
	require.Equal(t, 256, hitB)
	close(gate.release)
	require.NoError(t, <-done)
	for g := range h.Groups() {
		bt := h.Group(g).Config().BlockTokens
		got := h.Group(g).Stats().Prefix.Tiers[0].HitTokens
		require.Positive(t, got, "group %d", g)
		require.EqualValues(t, stores.stores[g].Stats().Gets*uint64(bt), got, "group %d: each block the tier gave, once", g)
	}
	require.NoError(t, h.Verify())
}

// A group's fingerprint tells apart what its element encoding would otherwise blur: bf16 from
// f16, e4m3 from e5m2, and fp8 groups whose scales differ.
func TestHybridTiersFingerprintEncoding(t *testing.T) {
	fpOf := func(dt kvcache.DType, scale float32) tier.Fingerprint {
		grp := kvcache.LayerGroup{Name: "full", Layers: []int{0, 1}, KVHeads: 2, KHeadDim: 64, VHeadDim: 64, DType: dt, BlockTokens: 16}
		if dt.Size() == 1 {
			grp.KScales, grp.VScales = []float32{scale, scale}, []float32{scale, scale}
		}
		var fp tier.Fingerprint
		h, err := kvcache.NewHybrid(hostDevice(t, 64<<10), kvcache.HybridConfig{Geometry: kvcache.Geometry{Model: "m", Layers: 2, Groups: []kvcache.LayerGroup{grp}},
			Limit: 64 << 20, Capacity: 16 << 20, NoBackground: true, HostCacheTokens: 256,
			Tiers: func(_ int, _ kvcache.LayerGroup, f tier.Fingerprint, _ int) ([]kvcache.Tier, error) {
				fp = f
				return nil, nil
			}})
		require.NoError(t, err)
		require.NoError(t, h.Close())
		return fp
	}
	require.NotEqual(t, fpOf(kvcache.BF16, 0), fpOf(kvcache.F16, 0))
	require.NotEqual(t, fpOf(kvcache.FP8E4M3, 1), fpOf(kvcache.FP8E5M2, 1))
	require.NotEqual(t, fpOf(kvcache.FP8E4M3, 1), fpOf(kvcache.FP8E4M3, 0.5))
	require.Equal(t, fpOf(kvcache.FP8E4M3, 0.5), fpOf(kvcache.FP8E4M3, 0.5), "the same settings, the same fingerprint")
}

// smallHostReplica returns a second replica, with host caches of 256 tokens a group, of the
// Hybrid storedOnce ran with a 300-token prompt, and the prompt.
func smallHostReplica(t *testing.T) (*kvcache.Hybrid, []kvcache.TokenID) {
	dev := hostDevice(t, 64<<10)
	stores, p := storedOnce(t, dev, 300)
	h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: smallHybrid(false), Name: "two", Limit: 256 << 20, Capacity: 64 << 20,
		NoBackground: true, HostCacheTokens: 256, Tiers: stores.tiers})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, h.Close()) })
	return h, p
}

// A Hybrid's fetch keeps each group's host blocks that the hit reads from the host, and only
// those. A replica (host caches of 256 tokens a group) whose start of the first 161 tokens
// fetched them from the tiers, then freed them, starts the 300-token prompt:
//   - its device caches emptied (a sleep), the hosts hold those 160 tokens: 256 tokens (16 full
//     blocks, the hosts' room), not fewer than the hosts alone served;
//   - its devices still caching them: 288, the whole hit, the host copies of the device's
//     blocks being room for the fetch.
func TestHybridTiersFetchKeepsWhatTheHostServes(t *testing.T) {
	for _, tc := range []struct {
		name  string
		sleep bool
		want  int
	}{{"device caches emptied", true, 256}, {"device caches kept", false, 288}} {
		h, p := smallHostReplica(t)
		hit, err := h.StartSequence(2, kvcache.Prompt{Tokens: p[:161]})
		require.NoError(t, err)
		require.Equal(t, 160, hit)
		require.NoError(t, h.FreeSequence(2))
		require.NoError(t, h.SyncTiers(context.Background()))
		if tc.sleep {
			_, err = h.Sleep()
			require.NoError(t, err)
			require.NoError(t, h.Wake())
		}
		hit, err = h.StartSequence(3, kvcache.Prompt{Tokens: p})
		require.NoError(t, err)
		require.Equal(t, tc.want, hit, tc.name)
		require.NoError(t, h.Verify())
	}
}

// A model whose attention groups are all windows or chunks (no full-attention group to bound
// the hit by its leading run) finds in its tiers the prefix that another replica computed of a
// longer prompt: each group's run in its tiers, found without reading a block, bounds the hit,
// and each group fetches only what its next token reads there (the window its sink block and
// the blocks in reach). A repeated prompt still hits at its full length.
func TestHybridTiersWindowsOnlyFindAPrefix(t *testing.T) {
	small := smallHybrid(false)
	win, chunk := small.Groups[1], small.Groups[2]
	win.Layers, chunk.Layers = []int{0}, []int{1}
	g := kvcache.Geometry{Model: "windows", Layers: 2, Groups: []kvcache.LayerGroup{win, chunk}}
	dev := hostDevice(t, 64<<10)
	stores := newGroupStores()
	cfg := kvcache.HybridConfig{Geometry: g, Limit: 256 << 20, Capacity: 64 << 20, NoBackground: true, HostCacheTokens: 4096,
		Tiers: stores.tiers}
	h1, err := kvcache.NewHybrid(dev, cfg)
	require.NoError(t, err)
	a := promptOf(300, 3)
	d1 := writeFreed(t, dev, h1, a)
	require.NoError(t, h1.SyncTiers(context.Background()))
	require.NoError(t, h1.Close())

	for _, tc := range []struct {
		name   string
		prompt []kvcache.TokenID
		want   int
		reads  [2]uint64 // blocks each group's tier serves
	}{
		// 200 tokens shared: 12 whole blocks. At 192 the window (32 tokens, 2 sinks) reads
		// block 0 and blocks 10 and 11; a chunk (64) starts there and reads nothing before.
		{"longer prompt", append(append([]kvcache.TokenID(nil), a[:200]...), promptOf(100, 8)...), 192, [2]uint64{3, 0}},
		// The last whole block before the 300th token ends at 288: blocks 0, 16, 17; the chunk
		// at 256 reads blocks 16 and 17.
		{"repeated prompt", a, 288, [2]uint64{3, 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := [2]uint64{stores.stores[0].Stats().Gets, stores.stores[1].Stats().Gets}
			cfg.Name = tc.name
			h2, err := kvcache.NewHybrid(dev, cfg)
			require.NoError(t, err)
			defer func() { require.NoError(t, h2.Close()) }()
			hit, err := h2.StartSequence(2, kvcache.Prompt{Tokens: tc.prompt})
			require.NoError(t, err)
			require.Equal(t, tc.want, hit)
			d2 := &hybridData{dev: dev, h: h2, val: map[kvcache.SeqID][]uint64{2: d1.val[1][:hit]}}
			d2.check(t, []kvcache.SeqID{2})
			require.NoError(t, h2.Verify())
			for i := range 2 {
				require.Equal(t, tc.reads[i], stores.stores[i].Stats().Gets-before[i], "blocks group %d's tier served", i)
			}
		})
	}
}

// A negative TierTimeout (-1 or MinInt64) is a *ConfigError naming the field, found before any
// group's tiers are asked for.
func TestHybridTierTimeoutRefused(t *testing.T) {
	dev := hostDevice(t, 64<<10)
	asked := 0
	tiers := func(int, kvcache.LayerGroup, tier.Fingerprint, int) ([]kvcache.Tier, error) { asked++; return nil, nil }
	for _, d := range []time.Duration{-1, math.MinInt64} {
		_, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: smallHybrid(false), Limit: 256 << 20,
			Capacity: 64 << 20, NoBackground: true, HostCacheTokens: 4096, Tiers: tiers, TierTimeout: d})
		var ce *kvcache.ConfigError
		require.ErrorAs(t, err, &ce, "%v", d)
		require.Equal(t, "TierTimeout", ce.Field)
		require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
	}
	require.Zero(t, asked)
}
