package kvcache

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"time"

	"github.com/pagedkv/pagedkv/internal/keyindex"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/sequence"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/vmm"
)

// Tier is a store below the host tier as a manager uses it (Config.Tiers): a local disk
// (package tier/disk) or a store shared by replicas (package tier/redis).
type Tier struct {
	Store  tier.Store
	Medium string // the KV events' medium of blocks written to it: "DISK", "CLUSTER"
}

// TierStats is one tier's traffic, as the manager counts it, beside the store's own counters.
type TierStats struct {
	Medium    string
	HitTokens uint64 // prompt tokens StartSequence found here (brought back through the host tier)
	Stored    uint64 // blocks written to it
	Failures  uint64 // calls that failed or passed TierTimeout: counted as misses, never as errors
	// Evicted counts the blocks the store reported removing on its own (tier.EvictionReporter):
	// each went out as a BlockRemoved event with the tier's medium. EvictionsLost counts those
	// its queue could not name: each time some are lost, an AllBlocksCleared event went out.
	Evicted, EvictionsLost uint64
	Store                  tier.Stats
}

// The stores below the host tier (Config.Tiers) see every block the host prefix cache stores:
//
//   - Write-behind: writeBack hands each block it copies to the host to the tier goroutine,
//     holding its host entry so that nothing reuses the host block meanwhile. The goroutine
//     waits for the copy, reads the host block, lets the entry go and puts the block in every
//     tier, outside the manager's lock: the append path never waits for a tier.
//   - Fetch on a miss: StartSequence, before it takes the lock for the lookup, asks the tiers in
//     order for the prompt's blocks that neither the device nor the host holds, each call
//     bounded by TierTimeout, and writes what they return into host blocks of the host prefix
//     cache. The lookup then brings them to the device as a host hit (fetchHost).
//   - Evictions: a store that names the blocks it removes on its own (tier.EvictionReporter)
//     is drained by the tier goroutine alone, after it has queued the BlockStored events of its
//     Puts and whenever a fetch has read from the tiers (a read may move blocks, and evict).
//     Each block goes out as BlockRemoved with the tier's medium, so that a router stops
//     counting on it. Where the tier goroutine is the store's only writer (tier/disk, which
//     leaves out blocks it holds again), a block's removal never goes out after it was stored
//     again. A store shared by replicas (tier/redis with Options.Evictions) reports what it
//     hears, blocks other replicas stored included, at the tier goroutine's next wake (a
//     write-back or a fetch). Evictions a store could not name go out as AllBlocksCleared:
//     the router forgets what it knew of the replica and relearns it, rather than route on
//     blocks that are gone. Give each manager Store values of its own: each eviction is
//     reported once.
//
// A tier that is down, slow or full costs a miss, counted in TierStats.Failures, never an
// error of the manager's call.
//
// The blocks waiting for the tier goroutine hold host blocks: the host tier is the staging
// buffer. When the tiers fall behind, the host blocks they hold are not available to later
// write-backs (which copy fewer blocks) nor to swaps: back-pressure, never a block dropped.
// Swaps still find the swap slots (Config.HostSwapBlocks) free: the cache never holds them.
// tierState is what a manager keeps for its tiers (nil without).
type tierState struct {
	tiers     []Tier
	reporters []tier.EvictionReporter // tiers[i].Store where it reports evictions, else nil
	bytes     int                     // one block's data: every shard's BlockStride, in shard order

	// guarded by the manager's mu
	queue    []demotion
	held     int // host entries held for the tier goroutine: queued, or in its batch
	counters []TierStats
	queued   uint64        // blocks ever queued
	settled  uint64        // of those, written or given up
	progress chan struct{} // closed, and replaced, each time settled grows

	wake chan struct{}
	stop chan struct{}
	done chan struct{}

	// the tier goroutine's own
	batch   []demotion
	bufs    [][]byte
	out     []tier.Block
	evicted []tier.Eviction

	// fromTier marks the host cache's blocks a Hybrid's start brought from a tier, by key, until
	// a start's hit brings them to the device (a tier hit then) or the host drops them. Guarded
	// by the manager's mu; nil until such a fetch.
	fromTier map[prefix.Key]int

	// fetchMu serialises StartSequence's fetches, which share these
	fetchMu   chan struct{}
	keyer     *prefix.Keyer
	keys      []prefix.Key
	fetchBufs [][]byte
	runs      []fetchRun
}

// demotion is a block written back to the host, on its way to the tiers: its host entry is
// held until the tier goroutine has read the block.
type demotion struct {
	e      *keyindex.Entry[hostSlot]
	block  hostSlot
	key    prefix.Key
	parent prefix.Key
	first  bool // the sequence's first block: its parent is the namespace's root
	ns     prefix.Namespace
}

// fetchRun is a run of a prompt's blocks one tier returned: keys[from:to] from tiers[tier].
type fetchRun struct{ tier, from, to int }

// newTierState returns m's tier state for cfg.Tiers, or nil without tiers.
func newTierState(m *Manager) *tierState {
	if len(m.cfg.Tiers) == 0 {
		return nil
	}
	t := &tierState{tiers: m.cfg.Tiers, counters: make([]TierStats, len(m.cfg.Tiers)),
		wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{}), fetchMu: make(chan struct{}, 1),
		progress: make(chan struct{}),
		keyer:    prefix.NewKeyer(m.cfg.KeyScheme)}
	for _, sh := range m.back.shards() {
		t.bytes += int(sh.Config.BlockStride())
	}
	t.reporters = make([]tier.EvictionReporter, len(t.tiers))
	for i, tr := range t.tiers {
		t.counters[i].Medium = tr.Medium
		if r, ok := tr.Store.(tier.EvictionReporter); ok {
			t.reporters[i] = r
			t.evicted = make([]tier.Eviction, evictionBatch)
		}
	}
	return t
}

// Fingerprint identifies the layout of this geometry's blocks as the tiers store them: open a
// store (tier/disk, tier/redis) with it, so that a store shared by replicas of another model,
// another geometry or another key scheme never serves their blocks as this one's K/V. It is
// the same on every machine for the same settings.
func (c Config) Fingerprint() tier.Fingerprint {
	h := sha256.New()
	var b [8]byte
	put := func(v uint64) {
		binary.LittleEndian.PutUint64(b[:], v)
		h.Write(b[:])
	}
	h.Write([]byte("pagedkv blocks v1\x00"))
	for _, v := range []int{c.Layers, c.KVHeads, c.HeadDim, c.vHeadDim(), c.ElemSize, c.BlockTokens, b2i(c.KOnly), b2i(c.KeyScheme.VLLM)} {
		put(uint64(v))
	}
	put(c.StateBytes)
	put(c.BlockPadding)
	h.Write([]byte(c.KeyScheme.Seed))
	var fp tier.Fingerprint
	h.Sum(fp[:0])
	return fp
}

func b2i(v bool) int {
	if v {
		return 1
	}
	return 0
}

// startTiers starts the tier goroutine.
func (m *Manager) startTiers() {
	if m.tiers != nil {
		go m.tierLoop()
	}
}

// stopTiers stops the tier goroutine and lets go of the host entries it still held; the lock
// is not held.
func (m *Manager) stopTiers() {
	t := m.tiers
	if t == nil {
		return
	}
	close(t.stop)
	<-t.done
	m.mu.Lock()
	for _, d := range t.queue {
		m.host.cache.Release(d.e)
	}
	t.held -= len(t.queue)
	t.settled += uint64(len(t.queue))
	t.queue = t.queue[:0]
	close(t.progress)
	t.progress = make(chan struct{})
	m.mu.Unlock()
}

// demote queues a block writeBack just copied to host block e.Block for the tiers, holding e.
// The lock is held.
func (m *Manager) demote(s *sequence.Sequence, i int, e *keyindex.Entry[hostSlot]) {
	t := m.tiers
	parent := s.Root
	if i > 0 {
		parent = s.Keys[i-1]
	}
	t.held++
	t.queued++
	t.queue = append(t.queue, demotion{e: e, block: e.Block, key: e.Key, parent: parent, first: i == 0,
		ns: prefix.Namespace{Adapter: s.Adapter, Salt: s.Salt}})
	select {
	case t.wake <- struct{}{}:
	default:
	}
}

// tierLoop writes the queued blocks to the tiers until stopped.
func (m *Manager) tierLoop() {
	t := m.tiers
	defer close(t.done)
	m.drainEvictions() // the stores start reporting
	for {
		select {
		case <-t.stop:
			return
		case <-t.wake:
		}
		m.mu.Lock()
		m.settleCopies()                        // the write-backs' copies are done: the host blocks hold their content
		t.batch, t.queue = t.queue, t.batch[:0] // the queue's storage goes to the batch, and back
		m.mu.Unlock()
		if len(t.batch) == 0 { // woken by a fetch, or by demotions an earlier wake took
			m.drainEvictions()
			continue
		}
		m.writeTiers(t.batch)
		m.drainEvictions()
		m.mu.Lock()
		t.settled += uint64(len(t.batch))
		close(t.progress)
		t.progress = make(chan struct{})
		m.mu.Unlock()
	}
}

// SyncTiers waits until every block queued for the tiers (Config.Tiers) before the call has
// been written to them or given up on, or until ctx is done (its error). A runtime calls it
// before a planned exit, so that a restart finds what this process computed; without tiers it
// returns at once.
func (m *Manager) SyncTiers(ctx context.Context) error {
	if !m.made() {
		return notMadeCall("sync tiers")
	}
	if ctx == nil {
		return fmt.Errorf("kvcache: sync tiers: %w: nil context", ErrInvalidArgument)
	}
	m.mu.Lock()
	t := m.tiers
	if t == nil {
		m.mu.Unlock()
		return nil
	}
	target := t.queued
	for t.settled < target {
		if m.closed {
			m.mu.Unlock()
			return fmt.Errorf("kvcache: sync tiers: %w", ErrClosed)
		}
		ch := t.progress
		m.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("kvcache: sync tiers: %w", ctx.Err())
		}
		m.mu.Lock()
	}
	m.mu.Unlock()
	return nil
}

// writeTiers reads the held host blocks of batch, lets their entries go and puts them in
// every tier. The lock is not held.
func (m *Manager) writeTiers(batch []demotion) {
	t := m.tiers
	for len(t.bufs) < len(batch) {
		t.bufs = append(t.bufs, make([]byte, t.bytes))
	}
	t.out = t.out[:0]
	var readErr error
	for i, d := range batch {
		if err := m.readBlock(d.block, t.bufs[i]); err != nil {
			readErr = err
			break
		}
		t.out = append(t.out, tier.Block{NS: d.ns, Key: d.key, Parent: d.parent, Data: t.bufs[i]})
	}
	m.mu.Lock()
	for _, d := range batch {
		m.host.cache.Release(d.e)
	}
	t.held -= len(batch)
	if readErr != nil {
		m.counters.hostFailures++
	}
	m.mu.Unlock()
	if len(t.out) == 0 {
		return
	}
	for i, tr := range t.tiers {
		for from := 0; from < len(t.out); from += tierPut {
			to := min(from+tierPut, len(t.out))
			err := m.tierCall(func(ctx context.Context) error { return tr.Store.Put(ctx, t.out[from:to]) })
			m.mu.Lock()
			if err != nil {
				t.counters[i].Failures++
			} else {
				t.counters[i].Stored += uint64(to - from)
				for j := from; j < to; j++ {
					m.emitTierStored(batch[j], tr.Medium)
				}
				m.publish()
			}
			m.mu.Unlock()
		}
	}
}

// tierPut is how many blocks one Put carries: each call has TierTimeout to finish.
const tierPut = 16

// evictionBatch is how many evictions the tier goroutine takes from a store at once.
const evictionBatch = 256

// drainEvictions takes the blocks each reporting tier removed on its own and queues their
// BlockRemoved events. Only the tier goroutine calls it, after the BlockStored events of its
// Puts. The lock is not held.
func (m *Manager) drainEvictions() {
	t := m.tiers
	for i, r := range t.reporters {
		for r != nil {
			n, lost := r.TakeEvictions(t.evicted)
			if n == 0 && lost == 0 {
				break
			}
			m.mu.Lock()
			m.emitTierRemoved(i, t.evicted[:n], lost)
			m.publish()
			m.mu.Unlock()
			clear(t.evicted[:n])
			if n < len(t.evicted) {
				break
			}
		}
	}
}

// emitTierRemoved counts the evictions tier i reported and queues a BlockRemoved event with
// the tier's medium for them, then AllBlocksCleared if lost ones could not be named. The lock
// is held.
func (m *Manager) emitTierRemoved(i int, evicted []tier.Eviction, lost uint64) {
	t := m.tiers
	c := &t.counters[i]
	c.Evicted += uint64(len(evicted))
	c.EvictionsLost += lost
	for _, e := range evicted {
		m.emitRemovedOn(e.Key, t.tiers[i].Medium)
	}
	if lost > 0 && m.feed.Active() {
		m.emitCleared(t.tiers[i].Medium)
	}
}

// emitTierStored queues a BlockStored event for block d written to a tier. The event has no
// token ids: the tier goroutine no longer has them (routers key by block hash).
func (m *Manager) emitTierStored(d demotion, medium string) {
	if !m.feed.Active() {
		return
	}
	keys := [1]prefix.Key{d.key}
	ev := prefix.Event{Kind: prefix.BlockStored, Keys: keys[:], Parent: d.parent,
		ParentIsRoot: d.first, BlockSize: m.cfg.BlockTokens, Adapter: d.ns.Adapter, Medium: medium}
	m.group.stored(&ev)
	m.pending.Append(&ev)
}

// tierCall runs fn with a context bounded by TierTimeout.
func (m *Manager) tierCall(fn func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), m.tierTimeout())
	defer cancel()
	return fn(ctx)
}

func (m *Manager) tierTimeout() time.Duration {
	if m.cfg.TierTimeout > 0 {
		return m.cfg.TierTimeout
	}
	return DefaultTierTimeout
}

// DefaultTierTimeout bounds each call to a tier when Config.TierTimeout is 0.
const DefaultTierTimeout = 50 * time.Millisecond

// readBlock copies host block b's bytes (every shard's, in shard order) into dst.
func (m *Manager) readBlock(b hostSlot, dst []byte) error {
	off := 0
	for _, sh := range m.back.shards() {
		n := int(sh.Config.BlockStride())
		if err := sh.Device.CopyOut(dst[off:off+n], sh.Base+vmm.Addr(uint64(b)*uint64(n))); err != nil {
			return fmt.Errorf("read block %d: %w", b, err)
		}
		off += n
	}
	return nil
}

// writeBlock copies src (every shard's bytes, in shard order) into host block b.
func (m *Manager) writeBlock(b hostSlot, src []byte) error {
	off := 0
	for _, sh := range m.back.shards() {
		n := int(sh.Config.BlockStride())
		if err := sh.Device.CopyIn(sh.Base+vmm.Addr(uint64(b)*uint64(n)), src[off:off+n]); err != nil {
			return fmt.Errorf("write block %d: %w", b, err)
		}
		off += n
	}
	return nil
}

// fetchTiers brings the blocks of prompt p (at most maxBlocks, root: its namespace's) that
// neither the device nor the host holds, and that the tiers do, into the host prefix cache, so
// that the lookup that follows finds them as host hits. One fetch runs at a time; the lock is
// not held, and is taken twice: to find where the cached run ends, and to store what came
// back. Failures are counted and cost only the blocks not found.
func (m *Manager) fetchTiers(p Prompt, root prefix.Key, maxBlocks int) {
	t := m.tiers
	if t == nil || maxBlocks == 0 {
		return
	}
	t.fetchMu <- struct{}{}
	defer func() { <-t.fetchMu }()
	bt := m.cfg.BlockTokens
	t.keys = t.keys[:0]
	parent := root
	for i := range maxBlocks {
		var key prefix.Key
		if i < len(p.Keys) {
			key = p.Keys[i]
		} else {
			key = t.keyer.Next(p.Namespace, i, parent, p.Tokens[i*bt:(i+1)*bt])
		}
		t.keys = append(t.keys, key)
		parent = key
	}
	m.fetchRun(p.Namespace, t.keys, true, t.keys)
}

// fetchRun brings into the host prefix cache the blocks of keys (a chain in namespace ns) from
// the first that neither the device nor the host holds, as many as the tiers hold in a run and
// the host has room for without evicting the host's blocks of keep (the rest of what the start
// reads: the fetch must not shorten the hit it lengthens). They count as tier hits now, or,
// with mark, when a start's hit first brings them to the device (fromTier: a start may still
// fail, or, a Hybrid's, read fewer). The caller holds t.fetchMu and not the lock.
func (m *Manager) fetchRun(ns prefix.Namespace, keys []prefix.Key, mark bool, keep ...[]prefix.Key) {
	t := m.tiers
	from, room := m.cachedAnywhere(keys, keep...)
	if from == len(keys) || room == 0 {
		return
	}
	end := min(len(keys), from+room)
	for len(t.fetchBufs) < end-from {
		t.fetchBufs = append(t.fetchBufs, make([]byte, t.bytes))
	}
	t.runs = t.runs[:0]
	at := from
	for i, tr := range t.tiers {
		if at == end {
			break
		}
		var n int
		err := m.tierCall(func(ctx context.Context) error {
			var err error
			n, err = tr.Store.Get(ctx, ns, keys[at:end], t.fetchBufs[at-from:end-from])
			return err
		})
		if err != nil {
			m.mu.Lock()
			t.counters[i].Failures++
			m.mu.Unlock()
		}
		n = min(n, end-at) // a store's count is not trusted past the keys asked
		if n > 0 {
			t.runs = append(t.runs, fetchRun{tier: i, from: at, to: at + n})
			at += n
		}
		if t.reporters[i] != nil {
			// A read may evict (tier/disk moves a block it serves): the tier goroutine reports it.
			select {
			case t.wake <- struct{}{}:
			default:
			}
		}
	}
	if at > from {
		m.storeFetched(keys, from, at, mark, keep...)
	}
}

// cachedAnywhere returns where the run of keys that the device or the host holds ends, and how
// many host blocks a fetch could take now without evicting the host's blocks of keep
// (fetchRoom).
func (m *Manager) cachedAnywhere(keys []prefix.Key, keep ...[]prefix.Key) (end, room int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return len(keys), 0
	}
	for end < len(keys) && (m.arena.Index().Get(keys[end]) != nil || m.host.cache.Get(keys[end]) != nil) {
		end++
	}
	if end == len(keys) {
		return end, 0 // nothing to fetch: leave the host's order alone
	}
	return end, m.fetchRoom(keep...)
}

// fetchRoom returns how many host blocks a fetch may take without evicting the host cache's
// idle blocks of keep that the start will read from the host (those the device does not hold),
// and makes those the most recently used (the first key the most), so that what the fetch
// evicts is older. The lock is held.
func (m *Manager) fetchRoom(keep ...[]prefix.Key) int {
	kept := 0
	for i := len(keep) - 1; i >= 0; i-- {
		for j := len(keep[i]) - 1; j >= 0; j-- {
			k := keep[i][j]
			if m.arena.Index().Get(k) != nil {
				continue // the start reads the device's copy
			}
			if e := m.host.cache.Get(k); e != nil && e.Idle() {
				m.host.touch(e)
				kept++
			}
		}
	}
	return max(0, m.host.cacheRoom()-kept)
}

// storeFetched writes the fetched blocks [from, to) of keys into host blocks and caches them
// there, the prefix the most recently used, and counts them as fetchRun says (mark, keep).
// Blocks the host or the device came to hold meanwhile are skipped; what does not fit now is
// left.
func (m *Manager) storeFetched(keys []prefix.Key, from, to int, mark bool, keep ...[]prefix.Key) {
	t := m.tiers
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return
	}
	n := min(to-from, m.fetchRoom(keep...))
	if n == 0 {
		return
	}
	m.host.reserveCache(n)
	for j := range n {
		if err := m.writeBlock(m.host.taken[j], t.fetchBufs[j]); err != nil {
			m.host.abortWritten(m.emitHostRemoved) // the blocks written held cached content
			m.publish()
			m.counters.hostFailures++
			return
		}
	}
	m.host.commit(m.emitHostRemoved)
	if mark && t.fromTier == nil {
		t.fromTier = map[prefix.Key]int{}
	}
	for j := n - 1; j >= 0; j-- {
		k := keys[from+j]
		if m.host.cache.Get(k) != nil {
			m.host.free = append(m.host.free, m.host.taken[j]) // another fetch or a write-back got there first
			continue
		}
		m.host.store(k, m.host.taken[j])
		tr := t.runOf(from + j)
		if mark {
			t.fromTier[k] = tr
		} else {
			t.counters[tr].HitTokens += uint64(m.cfg.BlockTokens)
		}
	}
	m.publish()
}

// runOf returns the tier that gave the fetch's block at position pos.
func (t *tierState) runOf(pos int) int {
	for _, r := range t.runs {
		if pos >= r.from && pos < r.to {
			return r.tier
		}
	}
	return 0 // not reached: storeFetched stores only what the runs brought
}

// tierHits counts as tier hits the blocks of keys at positions at (a start's host fetch,
// ascending) within its hit of hit blocks that a Hybrid's start brought from a tier
// (fromTier), and forgets them: from now on they are host blocks. The lock is held.
func (m *Manager) tierHits(keys []prefix.Key, at []int32, hit int) {
	t := m.tiers
	if t == nil || len(t.fromTier) == 0 {
		return
	}
	for _, pos := range at {
		if int(pos) >= hit {
			break
		}
		m.tierHit(keys[pos])
	}
}

// tierHit counts the host block of key k as a tier hit if a start's fetch brought it from a
// tier (fromTier), and forgets that: a start took it to the device. The lock is held.
func (m *Manager) tierHit(k prefix.Key) {
	t := m.tiers
	if t == nil || len(t.fromTier) == 0 {
		return
	}
	if tr, ok := t.fromTier[k]; ok {
		t.counters[tr].HitTokens += uint64(m.cfg.BlockTokens)
		delete(t.fromTier, k)
	}
}

// forgetFromTier forgets that the host's block of key k came from a tier: the host dropped it,
// or took it again from the device. The lock is held.
func (m *Manager) forgetFromTier(k prefix.Key) {
	if t := m.tiers; t != nil && t.fromTier != nil {
		delete(t.fromTier, k)
	}
}

// tierStats returns a copy of the tiers' counters, each with its store's; the lock is held.
// The stores' Stats take only their own locks.
func (m *Manager) tierStats() []TierStats {
	t := m.tiers
	if t == nil {
		return nil
	}
	out := append([]TierStats(nil), t.counters...)
	for i := range out {
		out[i].Store = t.tiers[i].Store.Stats()
	}
	return out
}
