package kvcache_test

import (
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/vmm"
)

// Admit's answer is what happens: for prompts of random lengths, partly cached, appended in
// chunks of random sizes (each marked written, as a runtime whose recurrent group keeps
// checkpoints does) on a Hybrid of every group kind under a budget that random live sequences
// fill in part, a prompt Admit says fits starts and takes every chunk, and one it says does not
// fit is refused (ErrOutOfMemory) before its last chunk; the hit is StartSequence's. Admit itself
// changes nothing. With a prefix cache bound and a host prefix cache ("cached"), where the
// order of the groups' takes can decide, a prompt Admit says fits still goes in, and the answer
// is exact whenever the groups' pages fit the headroom together.
func TestHybridAdmitIsWhatHappens(t *testing.T) {
	for _, kind := range []string{"attention", "recurrent", "checkpoints", "cached"} {
		t.Run(kind, func(t *testing.T) {
			geom := smallHybrid(kind != "attention")
			if kind == "checkpoints" || kind == "cached" { // every 64 tokens, where the runtime calls MarkWritten
				geom.Groups[4].Checkpoints = 64
			}
			var cacheBytes uint64
			var hostTokens int
			if kind == "cached" {
				cacheBytes, hostTokens = 512<<10, 2048
			}
			var cautious int
			rng := rand.New(rand.NewPCG(7, uint64(len(kind))))
			var fits, refused, hits int
			for round := range 12 {
				dev := hostDevice(t, 64<<10)
				limit := uint64(16+rng.IntN(48)) << 16 // 1 to 4 MiB over the five groups
				h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: geom, Limit: limit,
					Capacity: 16 << 20, PrefixCacheBytes: cacheBytes, HostCacheTokens: hostTokens, NoBackground: true})
				require.NoError(t, err)
				dst := make([][]int64, h.Groups())
				cached := [][]kvcache.TokenID{}
				for s := range 4 { // some prompts cached, some sequences live
					p := promptOf(32+rng.IntN(300), uint32(round*100+s))
					if _, err := h.AppendTokenIDs(kvcache.SeqID(100+s), p, dst); err != nil {
						require.ErrorIs(t, err, kvcache.ErrOutOfMemory)
						continue
					}
					cached = append(cached, p)
					if rng.IntN(2) == 0 {
						require.NoError(t, h.FreeSequence(kvcache.SeqID(100+s)))
					}
				}
				var groups []kvcache.Admission
				for try := range 25 {
					p := promptOf(1+rng.IntN(700), uint32(round*100+50+try))
					if len(cached) > 0 && rng.IntN(2) == 0 { // a cached prompt, extended
						p = append(append([]kvcache.TokenID(nil), cached[rng.IntN(len(cached))]...), p[:rng.IntN(len(p))]...)
					}
					chunk := []int{0, 1, 7, 16, 50, 128, 1000}[rng.IntN(7)]
					before := hybridShape(t, h)
					ad, err := h.Admit(kvcache.Prompt{Tokens: p}, chunk, groups)
					require.NoError(t, err)
					groups = ad.Groups
					require.Len(t, ad.Groups, h.Groups())
					require.Equal(t, before, hybridShape(t, h), "Admit changed something")
					seq := kvcache.SeqID(1000 + round*100 + try)
					hit := ad.CachedTokens
					if !ad.Fits && hostTokens > 0 {
						hit = -1 // a fetch from the host with no room for it fetches nothing: a shorter hit
					}
					ok := tryPrompt(t, h, seq, p, chunk, hit)
					if ad.Fits || ad.NeedBytes <= ad.HeadroomBytes {
						require.Equal(t, ad.Fits, ok, "round %d try %d: %d tokens (%d cached) in chunks of %d: Admit %+v", round, try, len(p), ad.CachedTokens, chunk, ad)
					} else if ok {
						cautious++ // the takes' order let it in
					}
					if ad.Fits {
						fits++
					} else {
						refused++
					}
					if ad.CachedTokens > 0 {
						hits++
					}
					if ok && rng.IntN(3) > 0 {
						require.NoError(t, h.FreeSequence(seq))
					}
					require.NoError(t, h.Verify())
				}
				require.NoError(t, h.Close())
			}
			t.Logf("%d prompts fit, %d did not (%d of which went in all the same), %d with a hit", fits, refused, cautious, hits)
			if kind != "cached" {
				require.Zero(t, cautious, "nothing yields without a cache bound")
			}
			require.Positive(t, fits)
			require.Positive(t, refused)
			if kind != "recurrent" { // a recurrent group without checkpoints serves no hit
				require.Positive(t, hits)
			}
		})
	}
}

// tryPrompt starts seq on p and appends the rest of p in calls of at most chunk tokens (0: one
// call), marking each written; it reports whether all of it went in, and leaves seq freed if
// not. The start must find hit tokens cached (unless hit is -1), and a refusal must be for
// memory.
func tryPrompt(t *testing.T, h *kvcache.Hybrid, seq kvcache.SeqID, p []kvcache.TokenID, chunk, hit int) bool {
	t.Helper()
	got, err := h.StartSequence(seq, kvcache.Prompt{Tokens: p})
	if err != nil {
		require.ErrorIs(t, err, kvcache.ErrOutOfMemory)
		return false
	}
	if hit >= 0 {
		require.Equal(t, hit, got, "the hit Admit saw")
	}
	dst := make([][]int64, h.Groups())
	for t0 := got; t0 < len(p); {
		n := len(p) - t0
		if chunk > 0 {
			n = min(n, chunk)
		}
		_, err := h.AppendTokenIDs(seq, p[t0:t0+n], dst)
		if err == nil {
			err = h.MarkWritten(seq, t0+n)
		}
		if err != nil {
			require.ErrorIs(t, err, kvcache.ErrOutOfMemory)
			require.NoError(t, h.FreeSequence(seq))
			return false
		}
		t0 += n
	}
	return true
}

// Admit refuses what a start would refuse, with the numbers, and changes nothing: a nil Hybrid,
// more keys than the prompt's whole blocks, a negative chunk, a closed Hybrid.
func TestHybridAdmitBadInput(t *testing.T) {
	var nilH *kvcache.Hybrid
	_, err := nilH.Admit(kvcache.Prompt{}, 0, nil)
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
	h, err := kvcache.NewHybrid(hostDevice(t, 64<<10), kvcache.HybridConfig{Geometry: smallHybrid(true), Limit: 256 << 20,
		Capacity: 64 << 20, NoBackground: true})
	require.NoError(t, err)
	before := hybridShape(t, h)
	var ce *kvcache.CountError
	_, err = h.Admit(kvcache.Prompt{Tokens: promptOf(40, 1), Keys: make([]prefix.Key, 3)}, 0, nil)
	require.ErrorAs(t, err, &ce)
	require.Equal(t, kvcache.CountError{What: "keys", N: 3, Max: 2}, *ce)
	_, err = h.Admit(kvcache.Prompt{Tokens: promptOf(40, 1)}, -1, nil)
	require.ErrorAs(t, err, &ce)
	require.Equal(t, -1, ce.N)
	require.Equal(t, before, hybridShape(t, h))
	ad, err := h.Admit(kvcache.Prompt{}, 0, nil)
	require.NoError(t, err)
	require.True(t, ad.Fits, "an empty prompt needs a recurrent state slot, which a fresh Hybrid has room for")
	require.Equal(t, 1, ad.Groups[4].NeedBlocks)
	require.NoError(t, h.Close())
	_, err = h.Admit(kvcache.Prompt{Tokens: promptOf(40, 1)}, 0, nil)
	require.True(t, errors.Is(err, kvcache.ErrClosed), "%v", err)
}

// A recurrent group's checkpoint is made where there is room and skipped where there is none,
// so it is not part of what a prompt cannot do without: with one state slot left and no room to
// map more, a prompt whose prefill ends a call at a multiple of the checkpoints fits, and goes
// in, though Admit counts the checkpoint's page among what the groups would map.
func TestHybridAdmitCheckpointSkipped(t *testing.T) {
	geom := kvcache.Geometry{Model: "ckpt", Layers: 2, Groups: []kvcache.LayerGroup{
		{Name: "full", Layers: []int{0}, KVHeads: 1, KHeadDim: 32, VHeadDim: 32, DType: kvcache.BF16, BlockTokens: 16}, // 32 blocks a page
		{Name: "state", Layers: []int{1}, Kind: kvcache.RecurrentState, StateBytes: 4096, Checkpoints: 64},             // 16 slots a page
	}}
	for _, c := range []struct{ tokens, chunk int }{{64, 0}, {130, 64}} {
		dev := hostDevice(t, 64<<10)
		h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: geom, Limit: 128 << 10, Capacity: 1 << 20, NoBackground: true})
		require.NoError(t, err)
		dst := make([][]int64, h.Groups())
		for s := range 15 { // 15 of the state page's 16 slots, and the budget's two pages, taken
			_, err := h.AppendTokenIDs(kvcache.SeqID(s), promptOf(16, uint32(s)), dst)
			require.NoError(t, err)
		}
		ad, err := h.Admit(kvcache.Prompt{Tokens: promptOf(c.tokens, 99)}, c.chunk, nil)
		require.NoError(t, err)
		require.True(t, ad.Fits, "%d tokens in calls of %d: %+v", c.tokens, c.chunk, ad)
		require.Equal(t, 2, ad.Groups[1].NeedBlocks, "the state, and a checkpoint where there is room")
		require.Equal(t, uint64(64<<10), ad.NeedBytes, "a state page for the checkpoint, if the budget had room")
		require.Zero(t, ad.HeadroomBytes)
		require.True(t, tryPrompt(t, h, 99, promptOf(c.tokens, 99), c.chunk, 0), "%d tokens in calls of %d", c.tokens, c.chunk)
		require.Equal(t, uint64(c.tokens/64), h.Group(1).Stats().Prefix.Checkpoints.Skipped, "a checkpoint at each multiple of 64, skipped")
		_, err = h.AppendTokenIDs(100, promptOf(1, 100), dst)
		require.ErrorIs(t, err, kvcache.ErrOutOfMemory, "the last slot is taken")
		require.NoError(t, h.Close())
	}
}

// Admit allocates nothing once its answer's Groups are passed back, with the keys hashed or
// given.
func TestHybridAdmitAllocs(t *testing.T) {
	h := newHybrid(t, hostDevice(t, 64<<10), smallHybrid(true))
	p := kvcache.Prompt{Tokens: promptOf(3000, 5)}
	ad, err := h.Admit(p, 512, nil)
	require.NoError(t, err)
	require.Zero(t, testing.AllocsPerRun(20, func() {
		ad, err = h.Admit(p, 512, ad.Groups)
	}))
	require.NoError(t, err)
	p.Keys = prefix.Keys(nil, prefix.Namespace{}, 16, p.Tokens)
	require.Zero(t, testing.AllocsPerRun(20, func() {
		ad, err = h.Admit(p, 0, ad.Groups)
	}))
	require.NoError(t, err)
}

// A start that resumes a recurrent group from a checkpoint holds the checkpoint while it takes
// the fresh state it copies it into (prepareResume), so the checkpoint is no room for that
// state: with the state page full of live states and that checkpoint, and no headroom, the
// start is refused, and Admit must say so.
func TestHybridAdmitResumeHoldsItsCheckpoint(t *testing.T) {
	geom := kvcache.Geometry{Model: "ckpt", Layers: 2, Groups: []kvcache.LayerGroup{
		{Name: "full", Layers: []int{0}, KVHeads: 1, KHeadDim: 32, VHeadDim: 32, DType: kvcache.BF16, BlockTokens: 16}, // 32 blocks a page
		{Name: "state", Layers: []int{1}, Kind: kvcache.RecurrentState, StateBytes: 4096, Checkpoints: 64},             // 16 slots a page
	}}
	h, err := kvcache.NewHybrid(hostDevice(t, 64<<10), kvcache.HybridConfig{Geometry: geom, Limit: 128 << 10, Capacity: 1 << 20, NoBackground: true})
	require.NoError(t, err)
	defer func() { require.NoError(t, h.Close()) }()
	dst := make([][]int64, h.Groups())
	_, err = h.AppendTokenIDs(0, promptOf(64, 7), dst)
	require.NoError(t, err)
	require.NoError(t, h.MarkWritten(0, 64)) // the checkpoint after 64 tokens, idle
	require.Equal(t, uint64(1), h.Group(1).Stats().Prefix.Checkpoints.Made)
	for s := 1; s < 15; s++ { // the state page's other 14 slots, live; the budget's two pages taken
		_, err := h.AppendTokenIDs(kvcache.SeqID(s), promptOf(16, uint32(s)), dst)
		require.NoError(t, err)
	}
	p := promptOf(80, 7) // seq 0's 64 tokens, and 16 more
	ad, err := h.Admit(kvcache.Prompt{Tokens: p}, 0, nil)
	require.NoError(t, err)
	require.Equal(t, 64, ad.CachedTokens)
	ok := tryPrompt(t, h, 99, p, 0, ad.CachedTokens)
	require.False(t, ok, "the start has no slot for the resumed state")
	require.Equal(t, ok, ad.Fits, "Admit %+v", ad)
	require.NoError(t, h.Verify())
}

// A checkpoint is skipped only when there is no room for it: where the budget has room, the
// recurrent group maps a page for it, and that page is no longer there for the appends after
// it (the groups share one lock, so one cannot take back another's). Here the prompt's first
// 64 tokens fit the attention group's free blocks, its state takes the state page's last slot,
// the checkpoint at 64 maps the budget's last page, and the next 64 tokens find none: Admit,
// which counts that page for them, says the prompt fits.
func TestHybridAdmitCheckpointTakesTheHeadroom(t *testing.T) {
	geom := kvcache.Geometry{Model: "ckpt", Layers: 2, Groups: []kvcache.LayerGroup{
		{Name: "full", Layers: []int{0}, KVHeads: 1, KHeadDim: 32, VHeadDim: 32, DType: kvcache.BF16, BlockTokens: 16}, // 32 blocks a page
		{Name: "state", Layers: []int{1}, Kind: kvcache.RecurrentState, StateBytes: 4096, Checkpoints: 64},             // 16 slots a page
	}}
	h, err := kvcache.NewHybrid(hostDevice(t, 64<<10), kvcache.HybridConfig{Geometry: geom, Limit: 192 << 10, Capacity: 1 << 20, NoBackground: true})
	require.NoError(t, err)
	defer func() { require.NoError(t, h.Close()) }()
	dst := make([][]int64, h.Groups())
	for s := range 15 { // 28 of the attention page's 32 blocks, 15 of the state page's 16 slots
		n := 32
		if s >= 13 {
			n = 16
		}
		_, err := h.AppendTokenIDs(kvcache.SeqID(s), promptOf(n, uint32(s)), dst)
		require.NoError(t, err)
	}
	p := promptOf(128, 99)
	ad, err := h.Admit(kvcache.Prompt{Tokens: p}, 64, nil)
	require.NoError(t, err)
	ok := tryPrompt(t, h, 99, p, 64, 0)
	require.Equal(t, ok, ad.Fits, "Admit %+v; checkpoints made %d", ad, h.Group(1).Stats().Prefix.Checkpoints.Made)
	require.NoError(t, h.Verify())
}

// Within PrefixCacheBytes a group's take maps a page rather than evict its idle cached blocks,
// and a later group cannot take that page back (the groups share one lock). Here the attention
// group's only room is its protected cache and the state group's is the budget's last page:
// Admit counts the cache for the one and the page for the other and says the prompt fits, but
// the attention group maps the page first and the state group is refused.
func TestHybridAdmitProtectedCacheMapsFirst(t *testing.T) {
	geom := kvcache.Geometry{Model: "cached", Layers: 2, Groups: []kvcache.LayerGroup{
		{Name: "full", Layers: []int{0}, KVHeads: 1, KHeadDim: 32, VHeadDim: 32, DType: kvcache.BF16, BlockTokens: 16}, // 32 blocks a page
		{Name: "state", Layers: []int{1}, Kind: kvcache.RecurrentState, StateBytes: 4096},                              // 16 slots a page
	}}
	h, err := kvcache.NewHybrid(hostDevice(t, 64<<10), kvcache.HybridConfig{Geometry: geom, Limit: 192 << 10, Capacity: 1 << 20,
		PrefixCacheBytes: 1 << 20, NoBackground: true})
	require.NoError(t, err)
	defer func() { require.NoError(t, h.Close()) }()
	dst := make([][]int64, h.Groups())
	_, err = h.AppendTokenIDs(0, promptOf(256, 1000), dst) // 16 blocks, cached
	require.NoError(t, err)
	for s := 1; s < 16; s++ {
		_, err := h.AppendTokenIDs(kvcache.SeqID(s), promptOf(16, uint32(s)), dst)
		require.NoError(t, err)
	}
	require.NoError(t, h.FreeSequence(0)) // its 16 blocks idle, within the bound
	_, err = h.AppendTokenIDs(16, promptOf(16, 16), dst)
	require.NoError(t, err) // both pages full: the attention page of live and idle blocks, the state page of states
	require.Equal(t, 16, h.Group(0).Available().IdleBlocks)
	require.Zero(t, h.Group(0).Available().FreeBlocks)
	require.Zero(t, h.Group(1).Available().FreeBlocks)
	p := promptOf(16, 99)
	ad, err := h.Admit(kvcache.Prompt{Tokens: p}, 0, nil)
	require.NoError(t, err)
	ok := tryPrompt(t, h, 99, p, 0, 0)
	require.Equal(t, ok, ad.Fits, "Admit %+v", ad)
	require.NoError(t, h.Verify())
}

// A sleeping Hybrid refuses a start (ErrAsleep) whatever its memory, so Admit must not say a
// prompt fits: after Sleep the pages of a live sequence keep free blocks a short prompt fits
// in.
func TestHybridAdmitAsleep(t *testing.T) {
	h := newHybrid(t, hostDevice(t, 64<<10), smallHybrid(true))
	dst := make([][]int64, h.Groups())
	_, err := h.AppendTokenIDs(1, promptOf(20, 1), dst)
	require.NoError(t, err)
	_, err = h.Sleep()
	require.NoError(t, err)
	p := promptOf(8, 2)
	ad, err := h.Admit(kvcache.Prompt{Tokens: p}, 0, nil)
	_, startErr := h.StartSequence(2, kvcache.Prompt{Tokens: p})
	require.ErrorIs(t, startErr, kvcache.ErrAsleep)
	if err == nil {
		require.False(t, ad.Fits, "asleep: %+v", ad)
	} else {
		require.ErrorIs(t, err, kvcache.ErrAsleep)
	}
}

// What only the host prefix cache holds, a start brings back, and a window group brings back
// only what its next token reads (hostHits), not the blocks computing it in one call takes: a
// prompt whose first 512 tokens the host holds fits in one call when the window group needs
// two blocks for them, not 32. Admit, which counts them as computed, says it does not fit.
func TestHybridAdmitHostHitWindow(t *testing.T) {
	geom := kvcache.Geometry{Model: "host", Layers: 2, Groups: []kvcache.LayerGroup{
		{Name: "global", Layers: []int{0}, KVHeads: 1, KHeadDim: 32, VHeadDim: 32, DType: kvcache.BF16, BlockTokens: 16}, // 32 blocks a page
		{Name: "local", Layers: []int{1}, Kind: kvcache.SlidingWindow, Window: 32, KVHeads: 1, KHeadDim: 32, VHeadDim: 32,
			DType: kvcache.BF16, BlockTokens: 16},
	}}
	h, err := kvcache.NewHybrid(hostDevice(t, 64<<10), kvcache.HybridConfig{Geometry: geom, Limit: 5 * 64 << 10, Capacity: 1 << 20,
		HostCacheTokens: 4096, NoBackground: true})
	require.NoError(t, err)
	defer func() { require.NoError(t, h.Close()) }()
	dst := make([][]int64, h.Groups())
	_, err = h.AppendTokenIDs(1, promptOf(512, 7), dst) // a page in each group
	require.NoError(t, err)
	require.NoError(t, h.FreeSequence(1)) // written back to the host
	_, err = h.AppendTokens(2, 512, dst)  // evicts them from the devices, and holds both pages
	require.NoError(t, err)
	p := promptOf(528, 7)
	ad, err := h.Admit(kvcache.Prompt{Tokens: p}, 0, nil)
	require.NoError(t, err)
	got, err := h.StartSequence(99, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	require.Equal(t, 512, got, "the host serves the 512")
	require.Equal(t, got, ad.CachedTokens)
	_, err = h.AppendTokenIDs(99, p[got:], dst)
	require.NoError(t, err, "the rest goes in, in one call")
	require.True(t, ad.Fits, "Admit %+v", ad)
	require.NoError(t, h.Verify())
}

// On several devices a group's headroom is whole pages of its own (multi.headroom), so the
// group of the largest page rounds the budget's room down to none while a group of smaller
// pages can still map one: a one-block prompt whose only new page is the small group's goes
// in, and Admit, taking the least of the groups' headrooms, says it does not fit.
func TestHybridAdmitMultiHeadroomRounded(t *testing.T) {
	geom := kvcache.Geometry{Model: "pages", Layers: 5, Groups: []kvcache.LayerGroup{
		{Name: "small", Layers: []int{0}, KVHeads: 2, KHeadDim: 32, VHeadDim: 32, DType: kvcache.BF16, BlockTokens: 16},          // 64 KiB pages a device
		{Name: "large", Layers: []int{1, 2, 3, 4}, KVHeads: 2, KHeadDim: 16, VHeadDim: 16, DType: kvcache.BF16, BlockTokens: 16}, // 256 KiB
	}}
	devs := []vmm.Device{hostDevice(t, 64<<10), hostDevice(t, 64<<10)}
	h, err := kvcache.NewHybridMulti(devs, kvcache.HybridConfig{Geometry: geom, Limit: 384 << 10, Capacity: 4 << 20, NoBackground: true},
		kvcache.Split{TensorParallel: 2})
	require.NoError(t, err)
	defer func() { require.NoError(t, h.Close()) }()
	dst := make([][]int64, h.Groups())
	_, err = h.AppendTokenIDs(1, promptOf(512, 1), dst) // the small group's page full, the large one's half: 64 KiB left a device
	require.NoError(t, err)
	require.Zero(t, h.Group(0).Available().FreeBlocks)
	require.Positive(t, h.Group(0).Available().MappableBlocks)
	p := promptOf(16, 2)
	ad, err := h.Admit(kvcache.Prompt{Tokens: p}, 0, nil)
	require.NoError(t, err)
	require.True(t, tryPrompt(t, h, 2, p, 0, 0), "a small page is mapped on each device")
	require.True(t, ad.Fits, "Admit %+v", ad)
	require.NoError(t, h.Verify())
}
