package kvcache_test

import (
	"context"
	"encoding/binary"
	"math"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/vmm"
)

// memStore is a tier.Store in a map: encoded values under namespace and key, checked on every
// read as the real tiers do. down makes every call fail, as a dead server would.
type memStore struct {
	fp   tier.Fingerprint
	size int

	mu     sync.Mutex
	blocks map[string][]byte
	down   bool
	stats  tier.Stats
}

// newMemStore returns a store for blocks of fingerprint fp.
func newMemStore(fp tier.Fingerprint) *memStore {
	return &memStore{fp: fp, blocks: map[string][]byte{}, size: -1}
}

func memKey(ns prefix.Namespace, k prefix.Key) string {
	return string(binary.LittleEndian.AppendUint64(nil, ns.Adapter)) + ns.Salt + "\x00" + string(k[:])
}

func (s *memStore) Put(_ context.Context, blocks []tier.Block) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.down {
		s.stats.Failures++
		return tier.ErrUnavailable
	}
	for _, b := range blocks {
		v, err := tier.Encode(nil, s.fp, b)
		if err != nil {
			return err
		}
		s.size = len(b.Data)
		s.blocks[memKey(b.NS, b.Key)] = v
		s.stats.Puts++
	}
	return nil
}

func (s *memStore) Get(_ context.Context, ns prefix.Namespace, keys []prefix.Key, dst [][]byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.down {
		s.stats.Failures++
		return 0, tier.ErrUnavailable
	}
	for i, k := range keys {
		v, ok := s.blocks[memKey(ns, k)]
		if !ok {
			s.stats.Misses++
			return i, nil
		}
		data, err := tier.Check(v, s.fp, ns, k, len(dst[i]))
		if err != nil {
			s.stats.Corrupt++
			delete(s.blocks, memKey(ns, k))
			return i, nil
		}
		copy(dst[i], data)
		s.stats.Gets++
	}
	return len(keys), nil
}

func (s *memStore) Has(_ context.Context, ns prefix.Namespace, keys []prefix.Key) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, k := range keys {
		if _, ok := s.blocks[memKey(ns, k)]; !ok {
			return i, nil
		}
	}
	return len(keys), nil
}

func (s *memStore) Drop(_ context.Context, ns prefix.Namespace, keys []prefix.Key) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, k := range keys {
		delete(s.blocks, memKey(ns, k))
	}
	return nil
}

func (s *memStore) Stats() tier.Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats
}

func (s *memStore) Close() error { return nil }

func (s *memStore) setDown(v bool) {
	s.mu.Lock()
	s.down = v
	s.mu.Unlock()
}

func (s *memStore) corruptAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, v := range s.blocks {
		v[len(v)-1] ^= 0x40
	}
}

// tierConfig is a small geometry with a host prefix cache of 8 blocks over store (nil: a new
// memStore).
func tierConfig(store tier.Store) kvcache.Config {
	if store == nil {
		store = newMemStore(tierConfig(newMemStore(tier.Fingerprint{})).Fingerprint())
	}
	return kvcache.Config{Layers: 2, KVHeads: 2, HeadDim: 64, ElemSize: 2, BlockTokens: 4,
		PageSize: 64 << 10, Capacity: 16 * (64 << 10), NoBackground: true,
		HostBlocks: 8, HostPrefixCache: true, Tiers: []kvcache.Tier{{Store: store, Medium: "DISK"}},
		TierTimeout: time.Minute} // no call is late however the machine schedules it
}

// writeTokens stores token i's value (its id) at its slot in the first layer's K and the last
// layer's V, as a runtime's write_kv would; readTokens reads them back.
func writeTokens(t *testing.T, m *kvcache.Manager, seq kvcache.SeqID, ids []prefix.Token) {
	slots, err := m.Slots(seq, 0, len(ids), nil)
	require.NoError(t, err)
	forTokenAddrs(m, slots, func(i int, dev vmm.Device, a vmm.Addr) {
		require.NoError(t, dev.CopyIn(a, binary.LittleEndian.AppendUint64(nil, uint64(ids[i])+1)))
	})
}

func readTokens(t *testing.T, m *kvcache.Manager, seq kvcache.SeqID, n int) []prefix.Token {
	slots, err := m.Slots(seq, 0, n, nil)
	require.NoError(t, err)
	out := make([]prefix.Token, n)
	forTokenAddrs(m, slots, func(i int, dev vmm.Device, a vmm.Addr) {
		var b [8]byte
		require.NoError(t, dev.CopyOut(b[:], a))
		out[i] = prefix.Token(binary.LittleEndian.Uint64(b[:]) - 1)
	})
	return out
}

func forTokenAddrs(m *kvcache.Manager, slots []int64, fn func(i int, dev vmm.Device, a vmm.Addr)) {
	bt := int64(m.Config().BlockTokens)
	for i, slot := range slots {
		b, off := int32(slot/bt), uint64(slot%bt)
		for _, s := range m.Shards() {
			at := vmm.Addr(off * s.Config.TokenBytes())
			fn(i, s.Device, s.BlockAddr(s.Layers[0], 0, b)+at)
			fn(i, s.Device, s.BlockAddr(s.Layers[1]-1, 1, b)+at)
		}
	}
}

// A replica's blocks reach a store below its host tier behind the append path, and another
// replica (a second manager on its own device, sharing the store) finds them on a miss: the
// prompt's K/V read back through its slots, counted as the tier's hits, announced in events
// with the tier's medium.
func TestTiersShareBlocksBetweenReplicas(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device) { shareBlocks(t, dev) })
}

func shareBlocks(t *testing.T, dev vmm.Device) {
	cfg := func(store tier.Store) kvcache.Config {
		c := tierConfig(store)
		c.PageSize, c.Capacity = 2<<20, 4*(2<<20)
		return c
	}
	store := newMemStore(cfg(nil).Fingerprint())
	a := newManager(t, dev, cfg(store))
	events, err := a.Subscribe(1 << 10)
	require.NoError(t, err)
	ns := prefix.Namespace{Adapter: 2, Salt: "tenant"}
	prompt := make([]prefix.Token, 30) // 7 whole blocks, the last token's block partial
	for i := range prompt {
		prompt[i] = prefix.Token(100 + i)
	}
	_, err = a.StartSequence(1, kvcache.Prompt{Tokens: prompt, Namespace: ns})
	require.NoError(t, err)
	_, err = a.AppendTokenIDs(1, prompt, nil)
	require.NoError(t, err)
	writeTokens(t, a, 1, prompt)
	require.NoError(t, a.FreeSequence(1)) // written back to the host, then to the store
	require.NoError(t, a.SyncTiers(context.Background()))
	require.Equal(t, uint64(7), a.Stats().Prefix.Tiers[0].Stored)
	require.NoError(t, a.Verify())
	var disk int
	for _, ev := range events.Read(nil) {
		if ev.Kind == prefix.BlockStored && ev.Medium == "DISK" {
			disk += len(ev.Keys)
		}
	}
	assert.Equal(t, 7, disk, "one BlockStored on DISK per block written")

	b := newManager(t, dev, cfg(store))
	hit, err := b.StartSequence(1, kvcache.Prompt{Tokens: prompt, Namespace: ns})
	require.NoError(t, err)
	assert.Equal(t, 28, hit, "every whole block before the last token's")
	assert.Equal(t, prompt[:28], readTokens(t, b, 1, 28), "the K/V written on the other replica")
	st := b.Stats().Prefix
	assert.Equal(t, uint64(28), st.Tiers[0].HitTokens)
	assert.Equal(t, uint64(28), st.HostHitTokens)
	require.NoError(t, b.Verify())

	// A start that fails (the sequence exists) asks the store nothing, not even for blocks
	// nobody holds.
	gets, misses := store.Stats().Gets, store.Stats().Misses
	_, err = b.StartSequence(1, kvcache.Prompt{Tokens: prompt, Namespace: prefix.Namespace{Salt: "nobody's"}})
	require.ErrorIs(t, err, kvcache.ErrSequenceExists)
	require.Equal(t, gets, store.Stats().Gets)
	require.Equal(t, misses, store.Stats().Misses)

	// Another namespace finds nothing: the namespace is part of every stored block.
	hit, err = b.StartSequence(2, kvcache.Prompt{Tokens: prompt, Namespace: prefix.Namespace{Adapter: 2, Salt: "other"}})
	require.NoError(t, err)
	assert.Zero(t, hit)

	// Nor does a model of another geometry reading the same values through a store opened for
	// it: the fingerprint in every stored block differs.
	other := cfg(store)
	other.HeadDim = 32
	require.NotEqual(t, other.Fingerprint(), cfg(nil).Fingerprint())
	view := newMemStore(other.Fingerprint())
	view.blocks = store.blocks
	other.Tiers = []kvcache.Tier{{Store: view, Medium: "DISK"}}
	c := newManager(t, dev, other)
	hit, err = c.StartSequence(1, kvcache.Prompt{Tokens: prompt, Namespace: ns})
	require.NoError(t, err)
	assert.Zero(t, hit)
	assert.Equal(t, uint64(1), view.Stats().Corrupt, "refused at the first block")
}

// A store that is down, or serves corrupt values, costs misses: StartSequence succeeds with
// what the device and host hold, the failures are counted, and the manager stays consistent.
func TestTiersFaultsAreMisses(t *testing.T) {
	store := newMemStore(tierConfig(nil).Fingerprint())
	a := newManager(t, hostDevice(t, 64<<10), tierConfig(store))
	prompt := make([]prefix.Token, 17)
	for i := range prompt {
		prompt[i] = prefix.Token(7 * i)
	}
	_, err := a.AppendTokenIDs(1, prompt, nil)
	require.NoError(t, err)
	require.NoError(t, a.FreeSequence(1))
	require.NoError(t, a.SyncTiers(context.Background()))
	require.Equal(t, uint64(4), a.Stats().Prefix.Tiers[0].Stored)

	store.setDown(true)
	b := newManager(t, hostDevice(t, 64<<10), tierConfig(store))
	hit, err := b.StartSequence(1, kvcache.Prompt{Tokens: prompt})
	require.NoError(t, err)
	assert.Zero(t, hit)
	assert.Equal(t, uint64(1), b.Stats().Prefix.Tiers[0].Failures)
	require.NoError(t, b.FreeSequence(1))

	store.setDown(false)
	store.corruptAll()
	hit, err = b.StartSequence(2, kvcache.Prompt{Tokens: prompt})
	require.NoError(t, err)
	assert.Zero(t, hit, "a corrupt block is never served")
	assert.Equal(t, uint64(1), store.Stats().Corrupt)
	require.NoError(t, b.Verify())

	// A writer whose store is down drops nothing on the floor of the manager: the host cache
	// keeps its blocks and the failure is counted.
	_, err = b.AppendTokenIDs(3, prompt, nil)
	require.NoError(t, err)
	store.setDown(true)
	require.NoError(t, b.FreeSequence(3))
	require.NoError(t, b.SyncTiers(context.Background()))
	require.Equal(t, uint64(2), b.Stats().Prefix.Tiers[0].Failures)
	require.NoError(t, b.Verify())
	hit, err = b.StartSequence(4, kvcache.Prompt{Tokens: prompt})
	require.NoError(t, err)
	assert.Equal(t, 16, hit, "still a hit on the device")
}

// storedPrompt returns a host device and a store that a first manager filled with a
// 49-token prompt's 12 whole blocks, and the prompt.
func storedPrompt(t *testing.T) (vmm.Device, *memStore, []prefix.Token) {
	dev := hostDevice(t, 64<<10)
	store := newMemStore(tierConfig(nil).Fingerprint())
	big := tierConfig(store)
	big.HostBlocks = 32
	a := newManager(t, dev, big)
	prompt := make([]prefix.Token, 49)
	for i := range prompt {
		prompt[i] = prefix.Token(100 + i)
	}
	_, err := a.AppendTokenIDs(1, prompt, nil)
	require.NoError(t, err)
	require.NoError(t, a.FreeSequence(1))
	require.NoError(t, a.SyncTiers(context.Background()))
	require.EqualValues(t, 12, a.Stats().Prefix.Tiers[0].Stored)
	return dev, store, prompt
}

// A fetch never evicts the host's blocks of the prompt it fetches for: with a host cache of 8
// blocks holding the prompt's first 5, a fetch of the rest takes the 3 free blocks only, so the
// hit is 8 blocks (32 tokens), not the 1 left when the fetch evicted the prompt's own oldest
// blocks; the tier hits are the 3 blocks fetched.
func TestTiersFetchKeepsTheHostPrefix(t *testing.T) {
	dev, store, prompt := storedPrompt(t)

	b := newManager(t, dev, tierConfig(store)) // 8 host blocks
	hit, err := b.StartSequence(1, kvcache.Prompt{Tokens: prompt[:21]})
	require.NoError(t, err)
	require.Equal(t, 20, hit)
	require.NoError(t, b.FreeSequence(1))
	_, err = b.Sleep() // the device cache goes; the host keeps blocks 0-4
	require.NoError(t, err)
	require.NoError(t, b.Wake())
	before := b.Stats().Prefix
	require.Equal(t, 5, before.HostCachedBlocks)

	hit, err = b.StartSequence(2, kvcache.Prompt{Tokens: prompt})
	require.NoError(t, err)
	require.Equal(t, 32, hit)
	after := b.Stats().Prefix
	require.EqualValues(t, 12, after.Tiers[0].HitTokens-before.Tiers[0].HitTokens)
	require.EqualValues(t, 32, after.HostHitTokens-before.HostHitTokens)
	require.NoError(t, b.Verify())
}

// The blocks the device holds are read from the device, so a fetch may take their host
// copies' room: a manager that computed a prompt's first 8 blocks (cached on the device, and
// written back to its 8 host blocks) fetches the other 4 from the tier, a hit of 48 tokens.
func TestTiersFetchUsesTheRoomOfDeviceCopies(t *testing.T) {
	dev, store, prompt := storedPrompt(t)

	b := newManager(t, dev, tierConfig(store)) // 8 host blocks
	_, err := b.AppendTokenIDs(1, prompt[:32], nil)
	require.NoError(t, err)
	require.NoError(t, b.FreeSequence(1))
	require.NoError(t, b.SyncTiers(context.Background()))
	before := b.Stats().Prefix
	require.Equal(t, 8, before.HostCachedBlocks)
	require.Equal(t, 8, before.CachedBlocks)
	hit, err := b.StartSequence(2, kvcache.Prompt{Tokens: prompt})
	require.NoError(t, err)
	require.Equal(t, 48, hit)
	require.EqualValues(t, 16, b.Stats().Prefix.Tiers[0].HitTokens-before.Tiers[0].HitTokens)
	require.NoError(t, b.Verify())
}

// A fetch whose write into the host fails midway serves no block under a key whose content it
// overwrote: with the host cache full of a prompt's 8 blocks, a fetch of another prompt evicts
// them to make room, writes one, and fails at the second. The evicted block it overwrote is
// never served as the first prompt's: that prompt's K/V reads back as it was written.
func TestTiersFailedFetchWriteServesNoOverwrittenBlock(t *testing.T) {
	_, store, other := storedPrompt(t)
	fd := vmm.InjectFaults(hostDevice(t, 64<<10))
	b := newManager(t, fd, tierConfig(store)) // 8 host blocks
	prompt := make([]prefix.Token, 33)
	for i := range prompt {
		prompt[i] = prefix.Token(500 + i)
	}
	_, err := b.AppendTokenIDs(1, prompt, nil)
	require.NoError(t, err)
	writeTokens(t, b, 1, prompt)
	require.NoError(t, b.FreeSequence(1)) // its 8 whole blocks written back to the 8 host blocks
	require.NoError(t, b.SyncTiers(context.Background()))
	_, err = b.Sleep() // the device cache goes; the host keeps the 8 blocks
	require.NoError(t, err)
	require.NoError(t, b.Wake())
	require.Equal(t, 8, b.Stats().Prefix.HostCachedBlocks)

	require.NoError(t, fd.FailNth(vmm.OpCopyIn, 2, nil)) // the fetch's second block
	hit, err := b.StartSequence(2, kvcache.Prompt{Tokens: other})
	require.NoError(t, err)
	require.Zero(t, hit)
	require.EqualValues(t, 1, b.Stats().Prefix.HostFailures)
	require.NoError(t, b.FreeSequence(2))
	require.NoError(t, b.Verify())

	hit, err = b.StartSequence(3, kvcache.Prompt{Tokens: prompt})
	require.NoError(t, err)
	require.Equal(t, 32, hit)
	assert.Equal(t, prompt[:32], readTokens(t, b, 3, 32), "the K/V written, never another prompt's")
	require.NoError(t, b.Verify())
}

// overStore reports more blocks than a Get asked for once it served them all: a faulty store.
type overStore struct {
	*memStore
	over int
}

func (s *overStore) Get(ctx context.Context, ns prefix.Namespace, keys []prefix.Key, dst [][]byte) (int, error) {
	n, err := s.memStore.Get(ctx, ns, keys, dst)
	if n == len(keys) {
		n = s.over
	}
	return n, err
}

// A store's count past the keys a Get asked for is not trusted: the start takes the blocks it
// asked for, no more, and neither panics nor reads past its buffers.
func TestTiersGetCountPastTheKeys(t *testing.T) {
	_, store, prompt := storedPrompt(t)
	for _, over := range []int{4, math.MaxInt} {
		b := newManager(t, hostDevice(t, 64<<10), tierConfig(&overStore{store, over}))
		hit, err := b.StartSequence(1, kvcache.Prompt{Tokens: prompt[:13]}) // 3 whole blocks
		require.NoError(t, err, "count %d", over)
		require.Equal(t, 12, hit, "count %d", over)
		require.EqualValues(t, 12, b.Stats().Prefix.Tiers[0].HitTokens)
		require.Equal(t, 3, b.Stats().Prefix.HostCachedBlocks)
		require.NoError(t, b.Verify())
	}
}

// hookStore runs hook before its next Get: something the runtime does while a start's fetch
// reads a tier, outside the manager's lock.
type hookStore struct {
	*memStore
	hook func()
}

func (s *hookStore) Get(ctx context.Context, ns prefix.Namespace, keys []prefix.Key, dst [][]byte) (int, error) {
	if h := s.hook; h != nil {
		s.hook = nil
		h()
	}
	return s.memStore.Get(ctx, ns, keys, dst)
}

// Tier hits count the blocks a start takes, not those a fetch brings: a start refused after its
// fetch (the sequence was added meanwhile) counts no tier hit and no host hit, and the next
// start that uses the fetched blocks counts them once, as tier and host hits both.
func TestTiersHitsCountTheStartThatUsesThem(t *testing.T) {
	_, store, prompt := storedPrompt(t)
	hs := &hookStore{memStore: store}
	b := newManager(t, hostDevice(t, 64<<10), tierConfig(hs))
	hs.hook = func() {
		_, err := b.AppendTokens(1, 1, nil)
		require.NoError(t, err)
	}
	_, err := b.StartSequence(1, kvcache.Prompt{Tokens: prompt[:33]})
	require.ErrorIs(t, err, kvcache.ErrSequenceExists)
	st := b.Stats().Prefix
	require.Zero(t, st.Tiers[0].HitTokens, "nothing was hit")
	require.Zero(t, st.HostHitTokens)
	require.Equal(t, 8, st.HostCachedBlocks, "the fetch brought the blocks to the host")
	hit, err := b.StartSequence(2, kvcache.Prompt{Tokens: prompt[:33]})
	require.NoError(t, err)
	require.Equal(t, 32, hit)
	st = b.Stats().Prefix
	require.EqualValues(t, 32, st.Tiers[0].HitTokens)
	require.EqualValues(t, 32, st.HostHitTokens)
	require.NoError(t, b.Verify())
}
