package kvcache_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/tier/disk"
	"github.com/pagedkv/pagedkv/vmm"
)

// A block the disk tier evicts goes out as BlockRemoved with the tier's medium, after the
// BlockStored that announced it; no block the disk still holds does.
func TestTierEvictionsAreRemovedEvents(t *testing.T) {
	ctx := context.Background()
	cfg := tierConfig(nil)
	ns := prefix.Namespace{Adapter: 4, Salt: "t"}
	record := (tier.HeaderSize(ns) + int(cfg.BlockStride()) + 4095) &^ 4095
	store, err := disk.Open(t.TempDir(), disk.Options{Fingerprint: cfg.Fingerprint(), BlockBytes: int(cfg.BlockStride()),
		LimitBytes: uint64(4 * record), SegmentBytes: uint64(record)}) // four blocks, a segment each
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, store.Close()) })
	cfg.Tiers, cfg.TierTimeout = []kvcache.Tier{{Store: store, Medium: "DISK"}}, time.Minute
	m := newManager(t, hostDevice(t, 64<<10), cfg)
	events, err := m.Subscribe(1 << 10)
	require.NoError(t, err)

	var stored []prefix.Key
	for seq := range 5 { // two whole blocks each: ten blocks for a disk of four
		prompt := make([]prefix.Token, 9)
		for i := range prompt {
			prompt[i] = prefix.Token(100*seq + i)
		}
		id := kvcache.SeqID(seq + 1)
		_, err := m.StartSequence(id, kvcache.Prompt{Tokens: prompt, Namespace: ns})
		require.NoError(t, err)
		_, err = m.AppendTokenIDs(id, prompt, nil)
		require.NoError(t, err)
		require.NoError(t, m.FreeSequence(id))
		require.NoError(t, m.SyncTiers(ctx)) // one Put of two blocks at a time: each fits
	}
	removed := map[prefix.Key]int{}
	announced := map[prefix.Key]bool{}
	for _, ev := range events.Read(nil) {
		require.NotEqual(t, prefix.EventsLost, ev.Kind)
		if ev.Medium != "DISK" {
			continue
		}
		switch ev.Kind {
		case prefix.BlockStored:
			for _, k := range ev.Keys {
				announced[k] = true
				stored = append(stored, k)
			}
		case prefix.BlockRemoved:
			for _, k := range ev.Keys {
				assert.True(t, announced[k], "removed after it was stored")
				removed[k]++
			}
		default:
			t.Fatalf("unexpected %v on DISK", ev.Kind)
		}
	}
	require.Len(t, stored, 10)
	var gone int
	for _, k := range stored {
		n, err := store.Has(ctx, ns, []prefix.Key{k})
		require.NoError(t, err)
		if n == 1 {
			assert.Zero(t, removed[k], "a block the disk holds is never removed")
		} else {
			gone++
			assert.Equal(t, 1, removed[k], "a block the disk evicted is removed once")
		}
	}
	assert.Equal(t, 6, gone)
	assert.Len(t, removed, gone)
	st := m.Stats().Prefix.Tiers[0]
	assert.Equal(t, uint64(gone), st.Evicted)
	assert.Equal(t, uint64(gone), st.Store.Evictions)
	assert.Zero(t, st.EvictionsLost)
	require.NoError(t, m.Verify())
}

// lossyStore is a memStore that reports, once, evictions it could not name.
type lossyStore struct {
	*memStore
	lost uint64
}

func (s *lossyStore) TakeEvictions(dst []tier.Eviction) (int, uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	lost := s.lost
	s.lost = 0
	return 0, lost
}

// Evictions a tier could not name go out as AllBlocksCleared with its medium: the router
// forgets what it knew of the replica instead of routing on blocks that may be gone.
func TestTierEvictionsLostClearAll(t *testing.T) {
	store := &lossyStore{memStore: newMemStore(tierConfig(nil).Fingerprint())}
	m := newManager(t, hostDevice(t, 64<<10), tierConfig(store))
	events, err := m.Subscribe(1 << 10)
	require.NoError(t, err)
	store.mu.Lock()
	store.lost = 3 // reported at the latest after the write-back below
	store.mu.Unlock()
	_, err = m.AppendTokenIDs(1, make([]prefix.Token, 9), nil)
	require.NoError(t, err)
	require.NoError(t, m.FreeSequence(1))
	require.NoError(t, m.SyncTiers(context.Background()))
	var cleared int
	for _, ev := range events.Read(nil) {
		if ev.Kind == prefix.AllBlocksCleared {
			assert.Equal(t, "DISK", ev.Medium)
			cleared++
		}
	}
	assert.Equal(t, 1, cleared)
	assert.Equal(t, uint64(3), m.Stats().Prefix.Tiers[0].EvictionsLost)
}

// namingStore is a memStore that reports, once, the evictions it is given.
type namingStore struct {
	*memStore
	evicted []tier.Eviction
}

func (s *namingStore) TakeEvictions(dst []tier.Eviction) (int, uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := copy(dst, s.evicted)
	s.evicted = s.evicted[n:]
	return n, 0
}

// A run of evictions a tier reports goes out as one BlockRemoved whatever the tier's medium is
// called: a medium pagedkv has no code for (here "NVME") joins its run as "DISK" does, so a
// subscriber with a small queue loses nothing.
func TestTierEvictionRunIsOneEvent(t *testing.T) {
	for _, medium := range []string{"DISK", "NVME"} {
		t.Run(medium, func(t *testing.T) {
			store := &namingStore{memStore: newMemStore(tierConfig(nil).Fingerprint())}
			cfg := tierConfig(store)
			cfg.Tiers[0].Medium = medium
			m := newManager(t, hostDevice(t, 64<<10), cfg)
			events, err := m.Subscribe(8)
			require.NoError(t, err)
			var want []prefix.Key
			store.mu.Lock()
			for i := range 20 {
				k := prefix.Key{byte(i), 1}
				store.evicted = append(store.evicted, tier.Eviction{Key: k})
				want = append(want, k)
			}
			store.mu.Unlock()
			_, err = m.AppendTokenIDs(1, make([]prefix.Token, 9), nil)
			require.NoError(t, err)
			require.NoError(t, m.FreeSequence(1))
			require.NoError(t, m.SyncTiers(context.Background()))
			var removed [][]prefix.Key
			for _, ev := range events.Read(nil) {
				require.NotEqual(t, prefix.EventsLost, ev.Kind)
				if ev.Kind == prefix.BlockRemoved && ev.Medium == medium {
					removed = append(removed, ev.Keys)
				}
			}
			assert.Equal(t, [][]prefix.Key{want}, removed)
		})
	}
}

// gatedDevice holds the first CopyOut after arm until release: a tier goroutine reading a
// host block for its write then waits, its host cache entries held.
type gatedDevice struct {
	vmm.Device
	armed            atomic.Bool
	entered, release chan struct{}
}

func (d *gatedDevice) CopyOut(dst []byte, src vmm.Addr) error {
	if d.armed.CompareAndSwap(true, false) {
		close(d.entered)
		<-d.release
	}
	return d.Device.CopyOut(dst, src)
}

func (d *gatedDevice) CreateHost(size uint64) (vmm.Handle, error) {
	return d.Device.(vmm.HostAllocator).CreateHost(size)
}

// DropCache while the tier goroutine still reads written-back blocks: the host cache keeps
// those it cannot free yet, and the events say so, so that a subscriber's view of the host
// cache is what it holds.
func TestDropCacheDuringTierWrite(t *testing.T) {
	dev := &gatedDevice{Device: hostDevice(t, 64<<10), entered: make(chan struct{}), release: make(chan struct{})}
	m := newManager(t, dev, tierConfig(nil))
	sub, err := m.Subscribe(1 << 10)
	require.NoError(t, err)
	_, err = m.AppendTokenIDs(1, []prefix.Token{1, 2, 3, 4, 5, 6, 7, 8}, nil)
	require.NoError(t, err)
	require.NoError(t, m.FreeSequence(1)) // two blocks written back and written to the tier
	require.NoError(t, m.SyncTiers(context.Background()))
	_, err = m.AppendTokenIDs(2, []prefix.Token{9, 10, 11, 12, 13, 14, 15, 16}, nil)
	require.NoError(t, err)
	release := sync.OnceFunc(func() { close(dev.release) })
	t.Cleanup(release) // before the manager's Close, which waits for the tier goroutine
	dev.armed.Store(true)
	require.NoError(t, m.FreeSequence(2)) // two more written back, held until the tier reads them
	<-dev.entered                         // the tier goroutine reads the first of them
	_, err = m.DropCache()
	require.NoError(t, err)
	release()
	require.NoError(t, m.SyncTiers(context.Background()))

	host := map[prefix.Key]bool{}
	for _, ev := range sub.Read(nil) {
		if ev.Medium != prefix.MediumCPU {
			continue
		}
		switch ev.Kind {
		case prefix.BlockStored:
			for _, k := range ev.Keys {
				host[k] = true
			}
		case prefix.BlockRemoved:
			for _, k := range ev.Keys {
				require.True(t, host[k], "removed but not held")
				delete(host, k)
			}
		case prefix.AllBlocksCleared:
			clear(host)
		}
	}
	assert.Len(t, host, m.Stats().Prefix.HostCachedBlocks, "the view holds what the host cache holds")
}
