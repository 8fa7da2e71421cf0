package kvcache

import (
	"fmt"
	"slices"
	"time"

	"github.com/pagedkv/pagedkv/internal/arena"
	"github.com/pagedkv/pagedkv/internal/keyindex"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/sequence"
)

// TokenID is a token id, as the runtime's tokenizer gives it.
type TokenID = prefix.Token

// Prompt is what StartSequence looks up in the prefix cache.
type Prompt struct {
	// Tokens are the prompt's token ids.
	Tokens []TokenID
	// Namespace separates tenants and adapters: blocks are shared only within one.
	Namespace prefix.Namespace
	// Keys, if set, are the keys of the prompt's leading full blocks as prefix.Keys computes them
	// (a router may have them already), so that the lookup hashes nothing. They must belong to
	// Tokens and Namespace; the manager does not recompute them to check. Blocks beyond len(Keys)
	// are hashed.
	Keys []prefix.Key
}

// PrefixStats are the prefix cache's figures.
type PrefixStats struct {
	QueryTokens uint64  // prompt tokens looked up by StartSequence
	HitTokens   uint64  // of those, tokens found cached
	HitRate     float64 // HitTokens / QueryTokens (0 before any query)
	// UnheldHitTokens are the HitTokens a window or chunk group of a Hybrid served without
	// holding them: before what its next token reads (NullBlock in its table), so that no
	// cache brought them. The rest of HitTokens came from the device, the host or a tier.
	UnheldHitTokens uint64
	Stored          uint64 // blocks that became cached
	Evictions       uint64 // cached blocks evicted (for room, for the bound, by DropCache or Sleep)
	// CachedBlocks are the blocks in the key index, held or idle; IdleBlocks those no sequence
	// holds, kept only for later hits.
	CachedBlocks, IdleBlocks int
	IdleBytes                uint64 // IdleBlocks * BlockStride
	// CacheOnlyPages are mapped pages that hold idle cached blocks and nothing a sequence holds:
	// the memory the cache alone keeps mapped (CacheOnlyBytes).
	CacheOnlyPages int
	CacheOnlyBytes uint64

	// The host prefix cache (Config.HostPrefixCache). HostHitTokens are the HitTokens fetched
	// from it; HostStored the blocks written back to it; HostEvictions the blocks it dropped
	// (for room, a swap, or DropCache); HostCachedBlocks the host blocks it holds now.
	// HostFailures counts write-backs and fetches given up on a failed driver call (the cache
	// stays consistent; the runtime computes what a fetch did not bring).
	HostHitTokens, HostStored, HostEvictions, HostFailures uint64
	HostCachedBlocks                                       int
	// Tiers are the stores below the host tier (Config.Tiers), in order. Their hits reach the
	// device as host hits: HitTokens and HostHitTokens count them too.
	Tiers []TierStats
	// Checkpoints are a recurrent-state arena's checkpoints (Config.CheckpointTokens). They
	// are its cached blocks, so Stored, Evictions, CachedBlocks and IdleBlocks count them too.
	Checkpoints CheckpointStats
}

// StartSequence creates sequence seq for a prompt: it finds the longest prefix of the prompt's
// whole blocks that is cached in the prompt's namespace, shares those blocks with the sequence
// (as Fork does: no copy), and returns how many tokens it found. The sequence then holds
// exactly those tokens; the runtime computes K and V for the rest of the prompt and appends
// them with AppendTokenIDs. The last prompt token is never taken from the cache (as in vLLM), so
// at most len(Tokens)-1 tokens, rounded down to whole blocks, are found.
//
// A recurrent-state arena with checkpoints (Config.CheckpointTokens) finds instead the latest
// checkpoint of the prompt's prefix, and the sequence starts with a copy of it as its state
// (Keys are then for blocks of CheckpointTokens). Without checkpoints it finds nothing.
//
// A sequence started here is keyed: as its blocks fill through AppendTokenIDs they become
// cached. An existing seq is ErrSequenceExists; a prompt over MaxSequenceTokens, or Keys for
// more blocks than Tokens has, a *CountError. It allocates nothing once the sequence's storage
// is warm.
func (m *Manager) StartSequence(seq SeqID, p Prompt) (int, error) {
	if !m.made() {
		return 0, notMade("start", seq)
	}
	if m.ofHybrid() {
		return 0, &SequenceError{Op: "start", Seq: seq, Err: errGroupOfHybrid}
	}
	bt := m.keyTokens()
	if len(p.Tokens) > MaxSequenceTokens {
		return 0, &SequenceError{Op: "start", Seq: seq, Err: &CountError{What: "prompt tokens", N: len(p.Tokens), Max: MaxSequenceTokens}}
	}
	if full := len(p.Tokens) / bt; len(p.Keys) > full {
		return 0, &SequenceError{Op: "start", Seq: seq, Err: &CountError{What: "keys", N: len(p.Keys), Max: full}}
	}
	root := m.keyer.Root(p.Namespace, bt) // outside the lock: it may hash, and changes nothing
	if m.cfg.StateBytes > 0 && m.cfg.CheckpointTokens > 0 {
		return m.startResume(seq, p, root)
	}
	if m.tiers != nil { // a start that would fail asks no tier
		m.mu.Lock()
		err := m.checkStart(seq)
		m.mu.Unlock()
		if err != nil {
			return 0, err
		}
		m.fetchTiers(p, root, maxPromptBlocks(len(p.Tokens), bt))
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.checkStart(seq); err != nil {
		return 0, err
	}
	return m.start(seq, p, root, maxPromptBlocks(len(p.Tokens), bt))
}

// checkStart returns the error of starting seq; the lock is held.
func (m *Manager) checkStart(seq SeqID) error {
	if err := m.usable("start", seq); err != nil {
		return err
	}
	if m.asleep {
		return &SequenceError{Op: "start", Seq: seq, Err: ErrAsleep}
	}
	if _, ok := m.seqs.Get(seq); ok {
		return &SequenceError{Op: "start", Seq: seq, Err: ErrSequenceExists}
	}
	return nil
}

// start creates keyed sequence seq (root: its namespace's) holding the cached blocks of at most
// maxBlocks of p's leading blocks; the lock is held and checkStart passed. Only the registry can
// refuse it (a nil one).
func (m *Manager) start(seq SeqID, p Prompt, root prefix.Key, maxBlocks int) (int, error) {
	bt := m.cfg.BlockTokens
	s, err := m.seqs.Add(seq)
	if err != nil {
		return 0, &SequenceError{Op: "start", Seq: seq, Err: err}
	}
	s.Keyed, s.Root, s.Adapter, s.Salt = true, root, p.Namespace.Adapter, p.Namespace.Salt
	m.lookupPrefix(s, p, maxBlocks)
	m.arena.HoldAll(s.Blocks)
	s.IDs = append(s.IDs, p.Tokens[:len(s.Keys)*bt]...)
	fetched := m.fetchHost(s, p, maxBlocks)
	s.Tokens = len(s.Keys) * bt
	s.Written, s.Hit = s.Tokens, s.Tokens
	m.dropOutOfReach(s) // a window or chunk holds only what its next token reads
	m.counters.queryTokens += uint64(len(p.Tokens))
	m.counters.hitTokens += uint64(s.Tokens)
	m.counters.hostHitTokens += uint64(fetched * bt)
	m.publish()
	return s.Tokens, nil
}

// maxPromptBlocks returns how many whole blocks of a prompt of n tokens a lookup may find: all
// but the last token's.
func maxPromptBlocks(n, bt int) int {
	if n == 0 {
		return 0
	}
	return (n - 1) / bt
}

// promptKey returns the key of p's block i, whose parent key is parent: given in p.Keys, or
// hashed.
func (m *Manager) promptKey(p *Prompt, i int, parent prefix.Key) prefix.Key {
	if i < len(p.Keys) {
		return p.Keys[i]
	}
	bt := m.cfg.BlockTokens
	return m.keyer.Next(p.Namespace, i, parent, p.Tokens[i*bt:(i+1)*bt])
}

// lookupPrefix walks p's whole blocks (at most maxBlocks of them) while they are cached, appending their keys to s.Keys (s.Root is the chain's start) and their blocks to
// s.Blocks. It takes no reference to the blocks.
func (m *Manager) lookupPrefix(s *sequence.Sequence, p Prompt, maxBlocks int) {
	parent := s.Root
	for i := range maxBlocks {
		k := m.promptKey(&p, i, parent)
		e := m.arena.Index().Get(k)
		if e == nil {
			return
		}
		s.Keys = append(s.Keys, k)
		s.Blocks = append(s.Blocks, e.Block)
		parent = k
	}
}

// AppendTokenIDs is AppendTokens for tokens whose ids are known: it appends len(ids) tokens and
// their slots to dst, and as the sequence's blocks fill they become cached under their keys
// (a block whose key is cached already, in another block, stays uncached). A new sequence, or
// an empty one AddSequence made, is keyed in the zero Namespace; use StartSequence for prompts.
// A sequence that holds tokens it took without ids (AppendTokens) is not keyed, and this
// appends like AppendTokens; cut back to empty, it is keyed again in its own namespace.
//
// The decode step (one id, no new block) takes the same fast path as AppendTokens; filling a
// block hashes it (SHA-256 of its ids). Nothing allocates in steady state unless a
// subscriber listens for events. Errors are AppendTokens'.
func (m *Manager) AppendTokenIDs(seq SeqID, ids []TokenID, dst []int64) ([]int64, error) {
	if !m.made() {
		return dst, notMade("append", seq)
	}
	if m.ofHybrid() {
		return dst, &SequenceError{Op: "append", Seq: seq, Err: errGroupOfHybrid}
	}
	n := len(ids)
	m.mu.Lock()
	s, ok := m.seqs.Get(seq)
	if ok && s.Keyed && m.fastAppend(s, n) {
		if m.reachMoved(s) { // see fastSlots
			m.dropOutOfReach(s)
		}
		dst = m.fastSlots(s, n, dst)
		m.fastIDs(s, ids, nil)
		m.mu.Unlock()
		return dst, nil
	}
	defer m.mu.Unlock()
	var tx appendTx
	if err := m.prepareAppend(&tx, s, seq, n); err != nil {
		return dst, err
	}
	out := tx.commit(dst)
	m.afterIDs(&tx, ids, nil)
	m.publish()
	return out, nil
}

// fastIDs records the ids of tokens the fast path appended to keyed s, and caches a block they
// filled: its key taken from chain, when chain has it (see storeBlocksFrom), else hashed.
func (m *Manager) fastIDs(s *sequence.Sequence, ids []TokenID, chain *sequence.Sequence) {
	if len(ids) == 1 { // a decode step: no call to copy one id
		s.IDs = append(s.IDs, ids[0])
	} else {
		s.IDs = append(s.IDs, ids...)
	}
	if s.Tokens >= (len(s.Keys)+1)*m.cfg.BlockTokens && m.keyable(s) > len(s.Keys) { // a block filled (no division per token), and may be cached
		m.storeBlocksFrom(s, chain)
		m.publish()
	}
}

// afterIDs records the ids of a committed append: a sequence that was empty before it (one it
// created, or AddSequence, as Strict asks) is keyed, and a keyed one caches the blocks the ids
// filled. An empty sequence is keyed in the namespace it keeps from before (see afterCounts),
// else in the zero namespace.
func (m *Manager) afterIDs(tx *appendTx, ids []TokenID, chain *sequence.Sequence) {
	s := tx.s
	if !s.Keyed && s.Tokens == len(ids) { // every token's id is known
		s.Keyed = true
		if s.Root == (prefix.Key{}) {
			s.Root = m.rootZero()
		}
	}
	if s.Keyed {
		s.IDs = append(s.IDs, ids...)
		m.checkRepeat(s, len(ids))
		m.storeBlocksFrom(s, chain)
	}
}

// checkRepeat counts, on the first append of n > 0 ids after StartSequence found h tokens, an
// append that starts with those h tokens again: the whole prompt appended instead of the part
// after the hit (Prompt.Tokens[h:]), which doubles the prompt in the cache.
func (m *Manager) checkRepeat(s *sequence.Sequence, n int) {
	h := s.Hit
	if h == 0 || n == 0 {
		return
	}
	s.Hit = 0
	if n >= h && len(s.IDs) >= 2*h && slices.Equal(s.IDs[h:2*h], s.IDs[:h]) {
		m.counters.repeated++
	}
}

// keyable returns how many of s's leading blocks may be keyed and cached: its full blocks, or,
// under WaitForWrites, the full blocks whose K/V the runtime has reported written. In a
// recurrent arena it is how many checkpoint keys s keeps: its written tokens' (checkpoint.go).
func (m *Manager) keyable(s *sequence.Sequence) int {
	if m.cfg.StateBytes > 0 { // a live state is never cached: only checkpoints, up to the mark
		if m.cfg.CheckpointTokens == 0 {
			return 0
		}
		return min(s.Written, s.Tokens) / m.cfg.CheckpointTokens
	}
	n := s.Tokens
	if m.cfg.WaitForWrites {
		n = min(n, s.Written)
	}
	return n / m.cfg.BlockTokens
}

// MarkWritten tells the manager that the K/V of the sequence's first n tokens is written: the
// kernels that write them have completed, or are ordered before every later reader (on one
// stream). Under Config.WaitForWrites the sequence's full blocks become prefix hits for other
// sequences only up to n; without it the call only records n. Reporting fewer tokens than
// before changes nothing (the mark only moves forward until Truncate cuts it).
//
// In a recurrent-state arena with checkpoints (Config.CheckpointTokens) the call also says that
// the sequence's state is the state after exactly n tokens: at a positive multiple of
// CheckpointTokens, a keyed sequence's state is copied into a checkpoint (checkpoint.go) unless
// one with its key is cached. With no memory for it, or while the manager sleeps, the
// checkpoint is skipped and counted (CheckpointStats.Skipped); a driver failure is an error.
//
// An n outside [0, Len] is a *CountError, a swapped sequence ErrSwapped; either leaves
// everything as it was. It allocates nothing unless a subscriber listens for events.
func (m *Manager) MarkWritten(seq SeqID, n int) error {
	if !m.made() {
		return notMade("mark written", seq)
	}
	if m.ofHybrid() {
		return &SequenceError{Op: "mark written", Seq: seq, Err: errGroupOfHybrid}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	s, err := m.checkMark(seq, n)
	if err != nil {
		return err
	}
	tx, err := m.prepareMark(s, n)
	if err != nil {
		return err
	}
	tx.commit()
	return nil
}

// checkMark returns the sequence, or the error of marking n of its tokens written; the lock is
// held.
func (m *Manager) checkMark(seq SeqID, n int) (*sequence.Sequence, error) {
	if err := m.usable("mark written", seq); err != nil {
		return nil, err
	}
	s, err := m.lookup("mark written", seq)
	if err != nil {
		return nil, err
	}
	if s.Swapped {
		return nil, &SequenceError{Op: "mark written", Seq: seq, Err: ErrSwapped}
	}
	if n < 0 || n > s.Tokens {
		return nil, &SequenceError{Op: "mark written", Seq: seq, Err: &CountError{What: "written tokens", N: n, Max: s.Tokens}}
	}
	return s, nil
}

// rootZero returns the root of the zero Namespace, computed once.
func (m *Manager) rootZero() prefix.Key {
	if !m.rootSet {
		m.root0, m.rootSet = m.keyer.Root(prefix.Namespace{}, m.keyTokens()), true
	}
	return m.root0
}

// storeBlocks keys keyed s's blocks that have filled since the last call, and caches each
// under its key unless the key is cached already.
func (m *Manager) storeBlocks(s *sequence.Sequence) { m.storeBlocksFrom(s, nil) }

// storeBlocksFrom is storeBlocks taking the keys chain already has instead of hashing them:
// chain is nil, or the same sequence in another group of a Hybrid with the same block size,
// keyed from the same root, whose blocks were keyed first (one key chain per token sequence:
// the groups of a model hash each block once).
func (m *Manager) storeBlocksFrom(s, chain *sequence.Sequence) {
	bt := m.cfg.BlockTokens
	events := m.feed.Active()
	run := -1 // start of the run of stored keys in s.Keys, for one BlockStored event
	limit := m.keyable(s)
	for len(s.Keys) < limit {
		i := len(s.Keys)
		parent := s.Root
		if i > 0 {
			parent = s.Keys[i-1]
		}
		var k prefix.Key
		if chain != nil && i < len(chain.Keys) {
			k = chain.Keys[i]
		} else {
			k = m.keyer.Next(prefix.Namespace{Adapter: s.Adapter, Salt: s.Salt}, i, parent, s.IDs[i*bt:(i+1)*bt])
		}
		s.Keys = append(s.Keys, k)
		stored := s.Blocks[i] != NullBlock && m.arena.Entry(s.Blocks[i]) == nil && m.arena.Cache(s.Blocks[i], k)
		if stored {
			m.counters.stored++
			if run < 0 {
				run = i
			}
		}
		if events && run >= 0 && (!stored || len(s.Keys) == limit) {
			end := i
			if stored {
				end = i + 1
			}
			m.emitStored(s, run, end)
			run = -1
		}
	}
}

// emitStored queues one BlockStored event for s's blocks [from, to).
func (m *Manager) emitStored(s *sequence.Sequence, from, to int) {
	m.emitStoredOn(s, from, to, prefix.MediumGPU)
}

// emitStoredOn queues a BlockStored event for blocks [from, to) of s, stored on medium.
func (m *Manager) emitStoredOn(s *sequence.Sequence, from, to int, medium string) {
	if !m.publishes() {
		return
	}
	bt := m.cfg.BlockTokens
	parent := s.Root
	if from > 0 {
		parent = s.Keys[from-1]
	}
	// Field by field into ev itself: a composite literal is built in a temporary and copied,
	// and its 16-byte loads of the 8-byte stores just made stalled the append path (pprof).
	var ev prefix.Event
	ev.Kind, ev.Keys, ev.Parent, ev.ParentIsRoot = prefix.BlockStored, s.Keys[from:to], parent, from == 0
	ev.Tokens, ev.BlockSize, ev.Adapter, ev.Medium = s.IDs[from*bt:to*bt], bt, s.Adapter, medium
	m.group.stored(&ev)
	m.pending.Append(&ev) // its keys and ids copied, as bytes
}

// publishes reports whether the manager queues block events now: a subscriber listens, and
// its blocks are K/V. A recurrent arena's cached blocks are checkpoints of states, which no
// router can place as it places K/V blocks (vLLM publishes no mamba blocks for routers either),
// so it publishes none.
func (m *Manager) publishes() bool { return m.feed.Active() && m.cfg.StateBytes == 0 }

// emitRemoved queues a BlockRemoved event for key k, joining it to the previous one when that
// is a BlockRemoved too.
func (m *Manager) emitRemoved(k prefix.Key) { m.emitRemovedOn(k, prefix.MediumGPU) }

// emitRemovedOn queues a BlockRemoved event for key k leaving medium, joining it to the
// previous event when that is a BlockRemoved on the same medium.
func (m *Manager) emitRemovedOn(k prefix.Key, medium string) {
	if !m.publishes() {
		return
	}
	if m.pending.ExtendRemoved(k, medium) {
		return
	}
	keys := [1]prefix.Key{k}
	var ev prefix.Event // field by field, as in emitStoredOn
	ev.Kind, ev.Keys, ev.Medium = prefix.BlockRemoved, keys[:], medium
	m.group.removed(&ev)
	m.pending.Append(&ev)
}

// emitCleared queues an AllBlocksCleared event for medium, with the group: a Hybrid's group
// may drop its cache alone (its DropCache, a ledger's drop request).
func (m *Manager) emitCleared(medium string) {
	var ev prefix.Event
	ev.Kind, ev.Medium = prefix.AllBlocksCleared, medium
	m.group.removed(&ev)
	m.pending.Append(&ev)
}

// publish delivers the events of the operation that just succeeded, in order, under the lock
// (so that events of concurrent operations keep the order of their effects). Up to holdEvents
// stay in m.pending, committed, and the subscribers are signalled (Feed.Hold): a subscriber's
// next Read pulls them (pullEvents), so the append path publishes in batches and hands each
// one over whole. A pull that found the lock taken (pullArmed) is served here instead: the
// operation that held the lock publishes at its end.
func (m *Manager) publish() {
	if m.pending.Len() == 0 {
		return
	}
	if m.pending.Unsealed() == 0 && m.holding.Load() && !m.pullArmed.Load() {
		return // held already, and every subscriber was told then (Feed.Hold)
	}
	if m.pending.Len() < holdEvents && !m.pullArmed.Load() && m.feed.Hold() {
		m.pending.Seal()
		if !m.holding.Load() { // a store is a full barrier on amd64: it waited for the event's writes
			m.holding.Store(true)
		}
		return
	}
	m.flushEvents()
}

// holdEvents bounds the committed events a manager holds back for its subscribers' next Read.
// Past it they go to the queue: the first batch after a Read is handed over whole
// (Feed.HandJournal), later ones copied behind it. 4,096, which would hold a publisher's whole
// 1 ms batch, made a publisher on a busy 2-core machine read a quarter as often (eventbench,
// absent: 15 batches instead of 56 over two cycles), its Ready rarely signalled; 256 keeps the
// batching of before.
const holdEvents = 256

// flushEvents publishes every pending event; the lock is held and no operation is under way.
func (m *Manager) flushEvents() {
	if m.pending.Len() == 0 {
		return
	}
	m.pubMu.Lock()
	m.feed.HandJournal(&m.pending)
	m.pubMu.Unlock()
	if m.holding.Load() {
		m.holding.Store(false)
	}
	if m.pullArmed.Load() { // the pull waiting for a retry is served
		m.pullArmed.Store(false)
	}
}

// pullEvents is the feed's pull: a subscriber's Read takes the events publish held back. It
// never waits for the lock. A reader waiting on it made the appends queued behind it wait too,
// and a decode step with a reading publisher cost 1.2-1.35x one without (eventbench). When an
// operation holds the lock, that operation publishes what is held at its end (publish sees
// pullArmed); if it ended first, a retry pullRetry later (retryPull) publishes them. Either
// way the subscription's Ready fires for the next Read.
func (m *Manager) pullEvents() {
	if !m.mu.TryLock() {
		m.armPull()
		return
	}
	m.detachEvents()
}

// detachEvents publishes the events held back, with the lock held on entry: it takes them (a
// swap of slices), lets the lock go and publishes them, holding pubMu from before it lets go,
// so that a later flush publishes after them. The append path never waits on the copying.
func (m *Manager) detachEvents() {
	if m.pending.Len() == 0 {
		m.mu.Unlock()
		return
	}
	m.pubMu.Lock()
	held := m.pending
	m.pending, m.pulled = m.pulled, prefix.Journal{}
	m.holding.Store(false)
	m.pullArmed.Store(false)
	m.mu.Unlock()
	m.feed.HandJournal(&held)
	m.pulled = held
	m.pubMu.Unlock()
}

// pullRetry is how soon a pull that found the lock taken is tried again.
const pullRetry = 100 * time.Microsecond

// armPull marks a pull as waiting (pullArmed) and starts its retry, unless one waits already.
func (m *Manager) armPull() {
	if m.pullArmed.CompareAndSwap(false, true) {
		m.pullTimer.Reset(pullRetry)
	}
}

// retryPull runs on the retry timer's goroutine: it publishes the events held back, trying
// again later while the lock is taken, until a publish serves the pull. It stops once one has
// (pullArmed unset), not once nothing is held: publish holds nearly always, and the timer
// would try the lock every pullRetry for as long as the appends ran, each try taking the
// lock's cache line from the appending core.
func (m *Manager) retryPull() {
	if !m.pullArmed.Load() {
		return
	}
	if !m.mu.TryLock() {
		m.pullTimer.Reset(pullRetry)
		return
	}
	if m.closed || m.pending.Len() == 0 {
		m.pullArmed.Store(false)
		m.mu.Unlock()
		return
	}
	m.detachEvents()
}

// evictExcess makes room when more idle cached blocks are kept than the bound allows: the
// excess lives in otherwise-free memory and goes before a page is mapped. It reports whether
// it evicted.
func (m *Manager) evictExcess() bool {
	if m.arena.Idle() <= m.idleAllowed() {
		return false
	}
	return m.evictForAlloc()
}

// evictForAlloc makes room for one block: it evicts the arena's victim (arena.Victim: the least
// recently used idle block, or a cache-only page nearly as old, whole, so that the new block
// lands in a page of its own and no page is left holding scattered cache). It records what it
// evicted in m.evicted (so that a failed append restores it) and reports whether it evicted
// anything.
func (m *Manager) evictForAlloc() bool { return m.evictOne(true) }

// evictOne evicts the arena's victim, recording the evictions for undo when undo is set.
func (m *Manager) evictOne(undo bool) bool {
	b, p, ok := m.arena.Victim()
	switch {
	case !ok:
		return false
	case p >= 0:
		m.evictPage(p, undo)
	default:
		m.evictBlock(b, undo)
	}
	return true
}

// evictPage evicts every idle block of page p; with undo, each is recorded in m.evicted.
func (m *Manager) evictPage(p arena.Page, undo bool) {
	for b := m.arena.First(p); b < m.arena.First(p+1); b++ {
		if m.arena.IsIdle(b) {
			m.evictBlock(b, undo)
		}
	}
}

// evictBlock evicts idle block b.
func (m *Manager) evictBlock(b sequence.Block, undo bool) {
	m.settleCopies() // a write-back may still read b
	r := m.arena.Evict(b)
	if undo {
		m.evicted = append(m.evicted, r)
	} else {
		m.arena.Index().Recycle(r)
	}
	m.counters.evictions++
	m.emitRemoved(r.Key)
}

// idleAllowed returns how many idle cached blocks the bound keeps: Config.PrefixCacheBytes in
// blocks.
func (m *Manager) idleAllowed() int { return m.idleCap }

// spare returns the pages' worth of room an append can have without mapping: free pages, and
// the idle blocks beyond the bound, wherever they are (an append evicts those before it maps).
// The watermarks count spare pages: the reserve maps none while the excess can serve, and
// trimming returns the excess that sits on cache-only pages.
func (m *Manager) spare() int {
	free := m.arena.FreePages()
	if excess := m.arena.Idle() - m.idleAllowed(); excess > 0 { // else no division: every commit asks
		free += (excess + m.bpp - 1) / m.bpp
	}
	return free
}

// dropOverBound evicts idle blocks beyond the bound, in evictForAlloc's order (LRU, near-ties
// emptying a whole page), while more than keep spare pages are mapped and no free page is left
// to return first: the cache beyond the bound is spare memory, returned like free pages beyond
// the watermark, and within the watermark kept (an append takes it before mapping). It stops
// once a page is free, for the caller to unmap, and reports whether one is. Static memory is
// never returned, so there the cache is bounded only by need.
func (m *Manager) dropOverBound(keep int) bool {
	for !m.static && m.arena.FreePages() == 0 && m.spare() > keep && m.arena.Idle() > m.idleAllowed() {
		m.evictOne(false)
	}
	return !m.static && m.arena.FreePages() > 0
}

// dropExcess evicts idle blocks beyond the bound, in evictForAlloc's order, until at most keep
// pages' worth of them remain; compaction calls it before packing.
func (m *Manager) dropExcess(keep int) {
	for !m.static && (m.arena.Idle()-m.idleAllowed()+m.bpp-1)/m.bpp > keep {
		m.evictOne(false)
	}
}

// DropCache empties the prefix cache: idle cached blocks are freed and held ones forget their
// keys (their sequences keep them), and the host prefix cache is emptied, but for blocks the
// tiers are still reading. Subscribers get AllBlocksCleared (Medium "GPU", and "CPU" for the
// host cache; a BlockRemoved "CPU" of each dropped key when some stay). It returns the device
// blocks freed. Free pages beyond the watermark then go back as usual (Settle, or the reserve
// goroutine).
func (m *Manager) DropCache() (int, error) {
	if !m.made() {
		return 0, notMadeCall("drop cache")
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return 0, fmt.Errorf("kvcache: drop cache: %w", ErrClosed)
	}
	n := m.dropCacheLocked()
	if m.host != nil {
		m.settleCopies()
		// Blocks the tier goroutine still reads stay cached: then each dropped key is named.
		var removed func(prefix.Key)
		held := m.host.cache.Len() > m.host.cache.IdleLen()
		if held {
			removed = func(k prefix.Key) { m.emitRemovedOn(k, prefix.MediumCPU) }
		}
		if h := m.host.dropCache(removed); h > 0 {
			if m.tiers != nil {
				m.tiers.fromTier = nil
			}
			m.counters.hostEvictions += uint64(h)
			if !held && m.feed.Active() {
				m.emitCleared(prefix.MediumCPU)
			}
			m.publish()
		}
	}
	m.kick()
	return n, nil
}

// dropCacheLocked empties the cache with mu held and returns the idle blocks it freed.
func (m *Manager) dropCacheLocked() int {
	a := m.arena
	var idle, held []sequence.Block
	a.Index().Each(func(e *keyindex.Entry[sequence.Block]) bool {
		if e.Idle() {
			idle = append(idle, e.Block)
		} else {
			held = append(held, e.Block)
		}
		return true
	})
	if len(idle) > 0 {
		m.settleCopies() // a write-back may still read them, and Sleep unmaps their pages next
	}
	for _, b := range idle {
		a.Index().Recycle(a.Evict(b))
		m.counters.evictions++
	}
	for _, b := range held {
		a.Uncache(b)
	}
	if m.publishes() && len(idle)+len(held) > 0 {
		m.emitCleared(prefix.MediumGPU)
	}
	m.publish()
	return len(idle)
}

// Subscribe returns a subscription to the manager's KV events (BlockStored, BlockRemoved,
// AllBlocksCleared), delivered in the order of their effects. Its queue holds up to queue
// events; a subscriber that falls further behind loses the queue and reads an EventsLost
// event, after which it should rebuild its view from CachedKeys. The append path never waits
// for a subscriber. The subscription gets the events of operations after Subscribe. A Hybrid's
// group shares the Hybrid's feed: its subscription is Hybrid.Subscribe's, every group's events.
// Close the subscription when done; closing the manager closes it.
func (m *Manager) Subscribe(queue int) (*prefix.Subscription, error) {
	if !m.made() {
		return nil, notMadeCall("subscribe")
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, fmt.Errorf("kvcache: subscribe: %w", ErrClosed)
	}
	if err := checkQueue(queue); err != nil {
		return nil, fmt.Errorf("kvcache: subscribe: %w", err)
	}
	// Events held back go to the subscribers they were held for (or to none), so that a new
	// one gets those of later operations only, and the next event's publish tells it. A
	// Hybrid's group flushes every group: they share the feed.
	m.flushHeld()
	sub, err := m.feed.Subscribe(queue)
	if err != nil {
		return nil, fmt.Errorf("kvcache: %w", err)
	}
	return sub, nil
}

// checkQueue refuses a subscription queue shorter than one event (prefix.Feed.Subscribe's
// rule), before a Subscribe changes anything.
func checkQueue(queue int) error {
	if queue < 1 || queue > prefix.MaxQueue {
		return &CountError{What: "queue length", N: queue, Min: 1, Max: prefix.MaxQueue}
	}
	return nil
}

// CachedKeys appends the keys of every cached block (held or idle), in no particular order, to
// dst: a router's full view after EventsLost.
func (m *Manager) CachedKeys(dst []prefix.Key) []prefix.Key {
	if !m.made() {
		return dst
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.arena.Index().Each(func(e *keyindex.Entry[sequence.Block]) bool { dst = append(dst, e.Key); return true })
	return dst
}

// Availability says how many blocks an append could get now.
type Availability struct {
	FreeBlocks int // free blocks of mapped pages
	IdleBlocks int // cached blocks no sequence holds, evicted on demand
	// MappableBlocks are the blocks of pages the manager may still map: within its arena and
	// MemoryLimit, and in a shared pool the budget's headroom (what other models hold and could
	// give back is not counted).
	MappableBlocks int
	Blocks         int // the sum
	Tokens         int // Blocks * BlockTokens, for a new sequence
}

// Available says how many blocks (and tokens, for a new sequence) appends could get now
// without failing, as vLLM's scheduler asks before admitting a request.
func (m *Manager) Available() Availability {
	if !m.made() {
		return Availability{}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.availableLocked()
}

func (m *Manager) availableLocked() Availability {
	a := m.arena
	av := Availability{FreeBlocks: a.Mapped()*m.bpp - a.Live() - a.Idle(), IdleBlocks: a.Idle()}
	if pages := m.ownMappable(); pages > 0 {
		if room, ok := m.back.headroom(); ok {
			pages = min(pages, int(min(room/m.cfg.PageSize, MaxPages)))
		}
		av.MappableBlocks = pages * m.bpp
	}
	av.Blocks = av.FreeBlocks + av.IdleBlocks + av.MappableBlocks
	av.Tokens = av.Blocks * m.cfg.BlockTokens
	return av
}

// ownMappable returns the pages the manager may still map by its own bounds, its arena and
// MemoryLimit (none while static, closed or asleep); a budget's headroom may allow fewer.
func (m *Manager) ownMappable() int {
	if m.static || m.closed || m.asleep {
		return 0
	}
	pages := m.arena.UnmappedPages()
	if m.cfg.MemoryLimit > 0 {
		pages = max(0, min(pages, m.maxBlocks/m.bpp-m.arena.Mapped()-m.inflight))
	}
	return pages
}

// Admission says what starting a prompt would take now.
type Admission struct {
	CachedTokens int          // tokens StartSequence would find cached
	NeedBlocks   int          // blocks the rest of the prompt needs
	Available    Availability // what appends could get, less the prompt's own idle cached blocks
	Fits         bool         // NeedBlocks <= Available.Blocks
}

// cachedRun returns how many of p's leading blocks (at most maxBlocks) are cached in a row,
// taking nothing: what start would find. The lock is held.
func (m *Manager) cachedRun(p Prompt, root prefix.Key, maxBlocks int) int {
	probe := &m.probe
	probe.Root, probe.Keys, probe.Blocks = root, probe.Keys[:0], probe.Blocks[:0]
	m.lookupPrefix(probe, p, maxBlocks)
	return len(probe.Keys)
}

// Admit says, changing nothing, how much of prompt p is cached and whether the rest fits now:
// what a scheduler checks before it admits a request. The answer holds until the next call
// that changes the manager. A closed manager errs with ErrClosed, a sleeping one with ErrAsleep
// (a start is refused then, whatever the memory).
func (m *Manager) Admit(p Prompt) (Admission, error) {
	if !m.made() {
		return Admission{}, notMadeCall("admit")
	}
	bt := m.cfg.BlockTokens
	if len(p.Tokens) > MaxSequenceTokens || len(p.Keys) > len(p.Tokens)/bt {
		return Admission{}, fmt.Errorf("kvcache: admit: %w", &CountError{What: "prompt tokens", N: len(p.Tokens), Max: MaxSequenceTokens})
	}
	root := m.keyer.Root(p.Namespace, bt)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return Admission{}, fmt.Errorf("kvcache: admit: %w", ErrClosed)
	}
	if m.asleep { // a start is refused whatever the memory
		return Admission{}, fmt.Errorf("kvcache: admit: %w", ErrAsleep)
	}
	probe := &m.probe // scratch: its Keys and Blocks are reused
	probe.Root, probe.Keys, probe.Blocks = root, probe.Keys[:0], probe.Blocks[:0]
	m.lookupPrefix(probe, p, maxPromptBlocks(len(p.Tokens), bt))
	idleHits := 0
	for _, b := range probe.Blocks {
		if m.arena.Refs(b) == 0 {
			idleHits++
		}
	}
	ad := Admission{CachedTokens: len(probe.Keys) * bt}
	ad.NeedBlocks = sequence.BlocksFor(len(p.Tokens), bt) - len(probe.Keys)
	ad.Available = m.availableLocked()
	ad.Available.IdleBlocks -= idleHits
	ad.Available.Blocks -= idleHits
	ad.Available.Tokens = ad.Available.Blocks * bt
	ad.Fits = ad.NeedBlocks <= ad.Available.Blocks
	return ad, nil
}
