package kvcache_test

import (
	"context"
	"fmt"
	"math"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
)

// stallStore is a memStore whose Put waits until the test lets it go, ignoring its context: a
// tier that has stopped answering, so that the tier goroutine holds the host cache's entries.
type stallStore struct {
	*memStore
	entered chan struct{} // receives once a Put has started
	release chan struct{} // closed to let every Put finish
	once    sync.Once
}

func newStallStore(fp tier.Fingerprint) *stallStore {
	return &stallStore{memStore: newMemStore(fp), entered: make(chan struct{}, 1), release: make(chan struct{})}
}

func (s *stallStore) Put(ctx context.Context, blocks []tier.Block) error {
	select {
	case s.entered <- struct{}{}:
	default:
	}
	<-s.release
	return s.memStore.Put(ctx, blocks)
}

func (s *stallStore) letGo() { s.once.Do(func() { close(s.release) }) }

// keyedSequence starts seq with a prompt of n whole blocks and one token more, of family fam,
// and writes each token's value.
func keyedSequence(t *testing.T, m *kvcache.Manager, seq kvcache.SeqID, fam, n int) []prefix.Token {
	p := longPrompt(fam, n, m.Config().BlockTokens)
	hit, err := m.StartSequence(seq, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	require.Zero(t, hit)
	_, err = m.AppendTokenIDs(seq, p, nil)
	require.NoError(t, err)
	writeTokens(t, m, seq, p)
	return p
}

// requireHostSplit checks the host tier's accounting in m's Stats: swapped, cached and free
// blocks add up to the tier, and the cache stays out of the swap slots.
func requireHostSplit(t *testing.T, m *kvcache.Manager) kvcache.Stats {
	t.Helper()
	st := m.Stats()
	c := m.Config()
	require.Equal(t, c.HostBlocks, st.HostSwappedBlocks+st.Prefix.HostCachedBlocks+st.HostFreeBlocks,
		"swapped %d + cached %d + free %d", st.HostSwappedBlocks, st.Prefix.HostCachedBlocks, st.HostFreeBlocks)
	require.LessOrEqual(t, st.Prefix.HostCachedBlocks, c.HostBlocks-c.HostSwapBlocks, "the cache stays out of the swap slots")
	require.NoError(t, m.Verify())
	return st
}

// With the host cache full of blocks held for a tier that does not answer, a SwapOut of
// HostSwapBlocks blocks still finds them: the cache never took the swap slots. The swapped
// sequence reads back whole, and write-backs meanwhile take nothing the swap holds.
func TestHostSwapBlocksSurviveHeldCache(t *testing.T) {
	cfg := tierConfig(nil)
	store := newStallStore(cfg.Fingerprint())
	cfg.Tiers[0].Store = store
	cfg.HostBlocks, cfg.HostSwapBlocks, cfg.TierTimeout = 16, 8, time.Hour
	m := newManager(t, hostDevice(t, 64<<10), cfg)
	t.Cleanup(store.letGo) // before the manager's Close, which waits for the tier goroutine

	keyedSequence(t, m, 1, 1, 16)
	require.NoError(t, m.FreeSequence(1)) // 8 written back: the cache's share
	<-store.entered                       // the tier goroutine has read them, let them go, and stalls
	st := requireHostSplit(t, m)
	require.Equal(t, 8, st.Prefix.HostCachedBlocks)

	keyedSequence(t, m, 2, 2, 16)
	require.NoError(t, m.FreeSequence(2)) // 8 more: they evict the first 8, and stay held
	st = requireHostSplit(t, m)
	require.Equal(t, 8, st.Prefix.HostCachedBlocks)
	require.Equal(t, 8, st.HostFreeBlocks, "the swap slots are free")
	require.EqualValues(t, 16, st.Prefix.HostStored)

	p := longPrompt(3, 8, cfg.BlockTokens)[:8*cfg.BlockTokens]
	_, err := m.AppendTokens(3, len(p), nil)
	require.NoError(t, err)
	writeTokens(t, m, 3, p)
	evictions := st.Prefix.HostEvictions
	sw, err := m.SwapOut([]kvcache.SeqID{3}, 0)
	require.NoError(t, err, "a swap of HostSwapBlocks blocks, whatever the cache holds")
	require.NoError(t, sw.Wait())
	require.NoError(t, sw.Close())
	st = requireHostSplit(t, m)
	assert.Equal(t, 8, sw.Blocks)
	assert.Equal(t, 8, st.HostSwappedBlocks)
	assert.Equal(t, evictions, st.Prefix.HostEvictions, "the swap took free blocks only")

	keyedSequence(t, m, 4, 4, 4)
	require.NoError(t, m.FreeSequence(4)) // no room: every cached block is held, the rest swapped
	st = requireHostSplit(t, m)
	assert.EqualValues(t, 16, st.Prefix.HostStored, "nothing written back")

	store.letGo()
	require.NoError(t, m.SyncTiers(context.Background()))
	sw, err = m.SwapIn([]kvcache.SeqID{3}, 0)
	require.NoError(t, err)
	require.NoError(t, sw.Wait())
	require.NoError(t, sw.Close())
	assert.Equal(t, p, readTokens(t, m, 3, len(p)), "the swapped sequence's K/V, back")
	st = requireHostSplit(t, m)
	assert.Zero(t, st.HostSwappedBlocks)
	assert.Equal(t, uint64(16), st.Prefix.Tiers[0].Stored, "the tier got every block written back")
}

// A swap takes free blocks first: one within the swap slots evicts nothing from a full cache.
// Beyond them it evicts the cache's least recently used idle blocks, so the cache never keeps
// memory a swap needs.
func TestHostSwapBlocksIdleCache(t *testing.T) {
	cfg := hostCacheConfig()
	cfg.HostBlocks, cfg.HostSwapBlocks = 64, 24
	h := newHarness(t, hostDevice(t, 2<<20), cfg)
	m, bt := h.m, cfg.BlockTokens
	h.start(1, prefix.Namespace{}, longPrompt(5, 50, bt), false)
	h.step(opFree, 1, 0, arg{}) // 50 blocks go idle: the cache takes the 40 it may
	st := requireHostSplit(t, m)
	require.Equal(t, 40, st.Prefix.HostCachedBlocks)
	require.EqualValues(t, 40, st.Prefix.HostStored)

	h.step(opAppend, 2, 0, exactly(24*bt))
	h.swap(true, 2)
	st = requireHostSplit(t, m)
	assert.Equal(t, 24, st.HostSwappedBlocks)
	assert.Equal(t, 40, st.Prefix.HostCachedBlocks, "the swap slots were free")
	assert.Zero(t, st.Prefix.HostEvictions)

	h.step(opAppend, 3, 0, exactly(6*bt))
	h.swap(true, 3)
	st = requireHostSplit(t, m)
	assert.Equal(t, 30, st.HostSwappedBlocks)
	assert.Equal(t, 34, st.Prefix.HostCachedBlocks, "beyond its slots a swap evicts the cache's oldest")
	assert.EqualValues(t, 6, st.Prefix.HostEvictions)

	h.swap(false, 2)
	h.swap(false, 3)
	st = requireHostSplit(t, m)
	assert.Zero(t, st.HostSwappedBlocks)
	assert.Equal(t, 30, st.HostFreeBlocks)
}

// HostSwapBlocks lies in [0, HostBlocks]; anything else is a *ConfigError naming it and the
// numbers, from Validate and from New.
func TestHostSwapBlocksConfig(t *testing.T) {
	for _, c := range []struct {
		host, swap int
		cache      bool
		want       string // "" when valid
	}{
		{8, -1, true, "HostSwapBlocks = -1: must lie in [0, HostBlocks 8]"},
		{8, 9, true, "HostSwapBlocks = 9: must lie in [0, HostBlocks 8]"},
		{0, 1, false, "HostSwapBlocks = 1: must lie in [0, HostBlocks 0]"},
		{8, math.MaxInt, true, fmt.Sprintf("HostSwapBlocks = %d: must lie in [0, HostBlocks 8]", math.MaxInt)},
		{8, 0, true, ""},
		{8, 8, true, ""},
		{8, 4, false, ""}, // every host block serves swaps anyway
	} {
		t.Run(fmt.Sprint(c.host, "/", c.swap, "/", c.cache), func(t *testing.T) {
			cfg := tinyConfig()
			cfg.HostBlocks, cfg.HostSwapBlocks, cfg.HostPrefixCache = c.host, c.swap, c.cache
			if c.want == "" {
				require.NoError(t, cfg.Validate())
				newManager(t, hostDevice(t, 32<<10), cfg)
				return
			}
			for _, err := range []error{cfg.Validate(), func() error { _, err := kvcache.New(hostDevice(t, 32<<10), cfg); return err }()} {
				var ce *kvcache.ConfigError
				require.ErrorAs(t, err, &ce)
				assert.Equal(t, "HostSwapBlocks", ce.Field)
				assert.ErrorIs(t, err, kvcache.ErrInvalidArgument)
				assert.Contains(t, err.Error(), c.want)
			}
		})
	}
}

// Random swap-outs and swap-ins interleaved with prompts started and freed (write-backs and
// host hits) over a small arena and host tier: after every step the host tier's blocks add up,
// the cache stays out of the swap slots, and every sequence on the device reads back its
// values (the harness's check, through the exported table). A swap-out that fits the swap
// slots not in use always succeeds and evicts nothing from the cache.
func TestHostSwapBlocksRandom(t *testing.T) {
	full, within, beyond, hostHits := 0, 0, 0, uint64(0)
	for seed := range 8 {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			cfg := tinyConfig()
			cfg.Capacity = 8 * cfg.PageSize // 32 device blocks: the device cache gives way often
			cfg.HostBlocks, cfg.HostSwapBlocks, cfg.HostPrefixCache = 24, 8, true
			h := newHarness(t, hostDevice(t, 32<<10), cfg)
			x := uint32(seed*2654435761 + 7)
			next := func() byte { x ^= x << 13; x ^= x >> 17; x ^= x << 5; return byte(x) }
			for range 400 {
				a, b, n := next(), next(), next()
				seq, other := kvcache.SeqID(a%8), kvcache.SeqID(b%8)
				before := h.m.Stats()
				switch next() % 6 {
				case 0, 1:
					h.step(opStart, a&^0x40, b, arg{n: n})
				case 2:
					h.step(opFree, a, b, arg{})
				case 3:
					ids := []kvcache.SeqID{seq}
					if other != seq && n%2 == 0 {
						ids = append(ids, other)
					}
					fits := true
					for _, id := range ids {
						s, ok := h.ref.seqs[id]
						fits = fits && ok && !s.swapped
					}
					moving := 0
					if fits {
						moving = h.ref.moving(ids)
					}
					h.step(opSwapOut, a, b, arg{n: n})
					after := h.m.Stats()
					if fits && moving <= cfg.HostSwapBlocks-before.HostSwappedBlocks {
						require.Equal(t, before.SwappedSequences+len(ids), after.SwappedSequences, "a swap within the free slots")
						require.Equal(t, before.Prefix.HostEvictions, after.Prefix.HostEvictions, "took free blocks only")
						within++
					} else if after.SwappedSequences > before.SwappedSequences && after.Prefix.HostEvictions > before.Prefix.HostEvictions {
						beyond++ // beyond the free slots: the cache gave way
					}
				case 4:
					h.step(opSwapIn, a, b, arg{})
				case 5:
					h.step(opAppend, a, b, arg{n: n})
				}
				st := requireHostSplit(t, h.m)
				require.Equal(t, len(h.ref.host), st.HostSwappedBlocks)
				if st.Prefix.HostCachedBlocks == cfg.HostBlocks-cfg.HostSwapBlocks {
					full++
				}
			}
			hostHits += h.m.Stats().Prefix.HostHitTokens
		})
	}
	t.Logf("%d steps with the cache at its bound; swap-outs: %d within the free slots, %d that evicted cached blocks; %d host hit tokens",
		full, within, beyond, hostHits)
	require.Positive(t, full, "the cache must reach its bound")
	require.Positive(t, within, "swaps must fit the free slots")
	require.Positive(t, beyond, "swaps beyond the free slots must evict cached blocks")
	require.Positive(t, hostHits, "prompts must hit the host cache")
}
