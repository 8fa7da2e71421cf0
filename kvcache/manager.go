package kvcache

import (
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pagedkv/pagedkv/blocktable"
	"github.com/pagedkv/pagedkv/internal/arena"
	"github.com/pagedkv/pagedkv/internal/checked"
	"github.com/pagedkv/pagedkv/internal/keyindex"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/sequence"
	"github.com/pagedkv/pagedkv/vmm"
)

// SeqID names a sequence; the runtime chooses it.
type SeqID = sequence.ID

// Manager maps sequences' tokens to KV blocks in an elastic arena. It is a thin coordinator:
// the block bookkeeping (the arena of pages and blocks, the sequences, the prefix cache) knows
// nothing of devices, and the memory behind the arena is its backing (backing.go: one elastic
// device, static runtime-owned memory, or several devices in lockstep). It owns the arena, the
// sequences and the backing's resources; it borrows the Devices, which must outlive it.
//
// Safe for concurrent use: every method takes one lock, which the hot path (an AppendTokens that
// stays inside mapped pages) holds for tens of nanoseconds and allocates nothing under. Driver
// calls of the background reserve goroutine happen outside that lock.
//
// Device work the manager does itself (copying a shared tail block on the first append after a
// Fork) is synchronous on the device's default stream.
type Manager struct {
	mu     *sync.Mutex // its own, or the one of its Hybrid's groups
	cfg    Config
	back   backing
	static bool       // the backing never maps or unmaps (runtime-owned memory)
	dev    vmm.Device // the first shard's device, base and geometry (the only ones, on one device)
	base   vmm.Addr
	geom   Config
	bpp    int
	arena  *arena.Arena
	seqs   *sequence.Registry
	closed bool

	// scratch for AppendTokens' rollback, reused so the hot path does not allocate
	newBlocks []sequence.Block
	drops     []droppedBlock // what the append under way dropped before taking (appendTx.dropEarly)
	admitAt   []int          // Hybrid.Admit's scratch: the blocks a start would fetch from the host
	newPages  []arena.Page
	swap      swapScratch

	growMu    sync.Mutex   // held by a whole reserve/trim cycle, and by Verify
	reserving []arena.Page // guarded by growMu: the pages a reserve round has in flight
	inflight  int          // pages being mapped or unmapped outside mu
	wake      chan struct{}
	stop      chan struct{}
	done      chan struct{}
	growErr   error // last error of the reserve goroutine

	// mu guards the hold (reserve.go): a Hybrid's groups keep spare pages beyond HighWatermark
	// mapped until a whole period of holdFor found them unused.
	holdFor   time.Duration // 0: spare pages beyond HighWatermark go back at once
	holdEnd   time.Time     // the end of the running period (zero: none runs)
	holdLow   int           // the fewest spare pages of the running period
	toReturn  int           // pages the last period found spare throughout, not yet unmapped
	holdTimer *time.Timer   // kicks the reserve goroutine when a period ends

	name     string // in a SharedPool
	shared   bool   // a SharedPool's member: its budget may reclaim from other models
	asleep   bool
	backOpen bool // closed, but the backing failed to return everything: Close tries again

	maxBlocks int // blocks the arena can ever hold: its pages, or fewer under MemoryLimit
	idleCap   int // idle cached blocks the bound keeps: Config.PrefixCacheBytes in blocks

	// prefix cache (the key index is the arena's; see prefixcache.go)
	feed      *prefix.Feed // its own, or its Hybrid's, which every group publishes to
	group     eventGroup   // what its events say of its layer group (a Hybrid's)
	keyer     *prefix.Keyer
	pending   prefix.Journal                     // events held back for the subscribers (the sealed ones), then those of the operation under way
	holding   atomic.Bool                        // committed events are held back for the subscribers' next Read
	pullArmed atomic.Bool                        // pullTimer is set to retry a pull that found the lock taken
	pullTimer *time.Timer                        // runs retryPull
	pubMu     sync.Mutex                         // orders publishing: taken after mu, held while events go to the feed; guards pulled
	pulled    prefix.Journal                     // the journal detachEvents last published, emptied, for pending to reuse
	evicted   []keyindex.Removed[sequence.Block] // evictions of the append under way, restored if it fails
	probe     sequence.Sequence                  // scratch of Admit
	root0     prefix.Key                         // root of the zero namespace
	rootSet   bool

	host  *hostTier  // the host tier's blocks (nil without one)
	tiers *tierState // the stores below the host tier (nil without)

	counters struct {
		syncMaps, bgMaps, unmaps, cows, compactions, moved uint64
		queryTokens, hitTokens, stored, evictions          uint64
		unheldHitTokens                                    uint64 // PrefixStats.UnheldHitTokens
		swapOuts, swapIns                                  uint64
		hostHitTokens, hostStored, hostEvictions           uint64
		hostFailures                                       uint64
		checkpoints, checkpointsSkipped, resumed           uint64 // PrefixStats.Checkpoints
		implicit, unkeyed, repeated                        uint64 // Stats.Warnings
	}
	lastCopy  *Swap        // the newest copy between the tiers on stream 0 (hostcache.go)
	openSwaps atomic.Int64 // Swaps returned and not closed (Stats.Warnings.OpenSwaps)
}

// New binds cfg to dev: it validates the geometry, fills the defaults, reserves the arena's
// virtual range (no physical memory yet) and starts the reserve goroutine unless
// cfg.NoBackground. A nil device is ErrInvalidArgument; a Config that cannot be used is a
// *ConfigError.
func New(dev vmm.Device, cfg Config) (*Manager, error) {
	return newManager(dev, cfg, nil)
}

// newManager binds cfg to dev; join, if set, attaches the manager's backing to a shared budget
// before the reserve goroutine starts.
func newManager(dev vmm.Device, cfg Config, join func(*Manager, *elastic) error) (*Manager, error) {
	if dev == nil {
		return nil, fmt.Errorf("kvcache: new: %w: nil device", ErrInvalidArgument)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	info := dev.Info()
	cfg, err := cfg.withDefaults(info.Granularity, info.TotalMemory)
	if err != nil {
		return nil, err
	}
	e, err := newElastic(dev, cfg)
	if err != nil {
		return nil, err
	}
	m := newManagerOn(dev, cfg, e, int(cfg.Capacity/cfg.PageSize))
	if join != nil {
		if err := join(m, e); err != nil {
			e.close()
			return nil, err
		}
	}
	if cfg.NoBackground {
		close(m.done)
	} else {
		go m.reserveLoop()
		m.kick()
	}
	m.startTiers()
	return m, nil
}

// newManagerOn returns a manager over an arena of npages pages behind b, with nothing mapped.
func newManagerOn(dev vmm.Device, cfg Config, b backing, npages int) *Manager {
	bpp := cfg.BlocksPerPage()
	maxPages := npages
	if cfg.MemoryLimit > 0 {
		maxPages = min(npages, int(min(cfg.MemoryLimit/cfg.PageSize, MaxPages)))
	}
	var host *hostTier
	if cfg.HostBlocks > 0 {
		host = newHostTier(int32(npages*bpp), cfg.HostBlocks, cfg.HostSwapBlocks)
	}
	m := &Manager{
		mu:        new(sync.Mutex),
		keyer:     prefix.NewKeyer(cfg.KeyScheme),
		feed:      new(prefix.Feed),
		host:      host,
		cfg:       cfg,
		back:      b,
		static:    !b.returnsMemory(),
		dev:       dev,
		base:      b.shards()[0].Base,
		geom:      b.shards()[0].Config,
		bpp:       bpp,
		arena:     arena.New(npages, bpp),
		seqs:      sequence.NewRegistry(),
		wake:      make(chan struct{}, 1),
		stop:      make(chan struct{}),
		done:      make(chan struct{}),
		maxBlocks: maxPages * bpp,
		idleCap:   int(min(cfg.PrefixCacheBytes/cfg.BlockStride(), MaxBlocks)),
	}
	m.tiers = newTierState(m)
	m.pullTimer = time.AfterFunc(time.Hour, m.retryPull)
	m.pullTimer.Stop()
	m.holdTimer = time.AfterFunc(time.Hour, m.kick)
	m.holdTimer.Stop()
	m.feed.SetPull(m.pullEvents)
	return m
}

// closedNow reports whether m is closed, under its lock.
func (m *Manager) closedNow() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.closed
}

// made reports whether m is a manager made by New, NewStatic or SharedPool.Register. Every
// method checks it first, so a nil or zero Manager gets an error (or a zero result), never a
// panic.
func (m *Manager) made() bool { return m != nil && m.arena != nil }

// errNotMade is the cause of every call on a nil or zero Manager.
var errNotMade = fmt.Errorf("%w: nil manager, or one not made by New", ErrInvalidArgument)

// notMade is the error of a sequence call on a nil or zero Manager.
func notMade(op string, seq SeqID) error { return &SequenceError{Op: op, Seq: seq, Err: errNotMade} }

// errGroupOfHybrid is the cause of a call that would change sequences of a Hybrid's layer
// group through the group's Manager (Hybrid.Group): the Hybrid keeps one record of each sequence
// across all its groups, so sequences change through it.
var errGroupOfHybrid = fmt.Errorf("%w: a layer group of a Hybrid: change its sequences through the Hybrid", ErrInvalidArgument)

// ofHybrid reports whether m is a layer group of a Hybrid.
func (m *Manager) ofHybrid() bool { return m.group.set }

// notMadeCall is the error of a whole-manager call on a nil or zero Manager.
func notMadeCall(op string) error { return fmt.Errorf("kvcache: %s: %w", op, errNotMade) }

// Config returns the configuration with its defaults filled in (the zero Config for a nil
// manager).
func (m *Manager) Config() Config {
	if !m.made() {
		return Config{}
	}
	return m.cfg
}

// Device returns the device the manager borrows.
func (m *Manager) Device() vmm.Device {
	if !m.made() {
		return nil
	}
	return m.dev
}

// Shards describes each device's share of the cache, in device order: one shard holding every
// layer and head on a single device. The slice is the caller's.
func (m *Manager) Shards() []Shard {
	if !m.made() {
		return nil
	}
	return m.back.shards()
}

// Base returns the arena's base address. It never changes, so kernels and CUDA graphs may keep
// it (and LayerBase) for the manager's life.
func (m *Manager) Base() vmm.Addr {
	if !m.made() {
		return 0
	}
	return m.base
}

// LayerBase returns the base of layer l's K (kv=0) or V (kv=1) view; block b of that view is at
// LayerBase(l, kv) + b*Config().BlockStride(). Its arithmetic is unchecked, like unsafe.Add
// (see Config.LayerOffset): arguments outside the geometry give an address outside the arena.
// On several devices it is the first device's (layers and heads of its share, its stride):
// use Shards for each device's.
func (m *Manager) LayerBase(layer, kv int) vmm.Addr {
	if !m.made() {
		return 0
	}
	return m.base + vmm.Addr(m.geom.LayerOffset(layer, kv))
}

// BlockAddr returns the address of layer l's K or V of block b (the first device's, on
// several). Its arithmetic is unchecked, like unsafe.Add (see Config.LayerOffset).
func (m *Manager) BlockAddr(layer, kv int, block int32) vmm.Addr {
	if !m.made() {
		return 0
	}
	return m.base + vmm.Addr(m.geom.Offset(layer, kv, block))
}

// lookup returns the sequence, or the *SequenceError naming op that an unknown one gets.
func (m *Manager) lookup(op string, seq SeqID) (*sequence.Sequence, error) {
	s, ok := m.seqs.Get(seq)
	if !ok {
		return nil, &SequenceError{Op: op, Seq: seq, Err: ErrUnknownSequence}
	}
	return s, nil
}

func (m *Manager) usable(op string, seq SeqID) error {
	if m.closed {
		return &SequenceError{Op: op, Seq: seq, Err: ErrClosed}
	}
	return nil
}

// AddSequence creates an empty sequence. AppendTokens also creates a sequence on first use,
// unless Config.Strict is set.
func (m *Manager) AddSequence(seq SeqID) error {
	if !m.made() {
		return notMade("add", seq)
	}
	if m.ofHybrid() {
		return &SequenceError{Op: "add", Seq: seq, Err: errGroupOfHybrid}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable("add", seq); err != nil {
		return err
	}
	if _, ok := m.seqs.Get(seq); ok {
		return &SequenceError{Op: "add", Seq: seq, Err: ErrSequenceExists}
	}
	if _, err := m.seqs.Add(seq); err != nil {
		return &SequenceError{Op: "add", Seq: seq, Err: err}
	}
	return nil
}

// AppendTokens adds n tokens to the sequence (creating it if it does not exist, unless
// Config.Strict is set: then that is ErrUnknownSequence) and appends the
// slot of each new token (block*BlockTokens + offset, vLLM's slot_mapping) to dst, which it
// returns. Blocks come from the page of the sequence's last block while it has room, then from
// the lowest page with room; a page is mapped only when no mapped page has a free block.
//
// If the sequence's last block is shared with a fork and has room, the first append copies it
// to a block of its own (copy on write). On any error the manager is exactly as before (a
// sequence created by this call is removed again, pages mapped by it are unmapped) and dst is
// returned unchanged. A negative n is a *CountError; an append that can never fit (more blocks
// than the arena holds, a sequence longer than MaxSequenceTokens, or more than
// blocktable.MaxSlots tokens in one call) is a *BlocksError matching ErrTooLarge; one that does
// not fit now a *BlocksError wrapping ErrOutOfMemory.
func (m *Manager) AppendTokens(seq SeqID, n int, dst []int64) ([]int64, error) {
	if !m.made() {
		return dst, notMade("append", seq)
	}
	if m.ofHybrid() {
		return dst, &SequenceError{Op: "append", Seq: seq, Err: errGroupOfHybrid}
	}
	m.mu.Lock()
	s, ok := m.seqs.Get(seq)
	// The common decode step: an existing sequence whose last block is its own and has room
	// needs no block work at all (n <= FastRoom < BlockTokens, so no count can overflow here).
	if ok && !s.Keyed && m.fastAppend(s, n) {
		if m.reachMoved(s) { // see fastSlots
			m.dropOutOfReach(s)
		}
		dst = m.fastSlots(s, n, dst)
		m.mu.Unlock()
		return dst, nil
	}
	defer m.mu.Unlock()
	if err := m.checkCounts(s, seq, n); err != nil {
		return dst, err
	}
	out, err := m.appendSlow(s, seq, n, dst)
	if err == nil {
		m.afterCounts(s, n)
	}
	m.publish()
	return out, err
}

// fastAppend reports whether n more tokens of s need no new block: they fit its last block,
// which is its own to write (s.FastRoom, which the last append's commit set and every other
// change of s's blocks zeroed). The test reads s and the manager's flags, nothing of other
// sequences or of the arena. No count can overflow then (0 < n <= FastRoom < BlockTokens). An
// append of no tokens takes the path that checks the sequence (swapped, say).
func (m *Manager) fastAppend(s *sequence.Sequence, n int) bool {
	return n > 0 && n <= s.FastRoom && !m.closed && !m.asleep
}

// fastSlots is appendSlots on the fast path: the n tokens use up that much of s.FastRoom, and
// all go into the last block, s.Tail, so their slots follow from its id and the tokens before
// it with no division (a decode step is one token, and a division a good part of its cost),
// and from s's first cache line alone (in a Hybrid, one line a group instead of two).
//
// Its caller first drops, in a window or chunk group, what the first appended token no longer
// reads, as commit does, once the length has reached s.NextDrop:
//
//	if m.reachMoved(s) {
//		m.dropOutOfReach(s)
//	}
//
// The freeing is part of the step and never sends it down the slow path. The test is written at
// each caller, not here, so that fastSlots stays small enough to inline.
func (m *Manager) fastSlots(s *sequence.Sequence, n int, dst []int64) []int64 {
	s.FastRoom -= n
	last := len(s.Blocks) - 1
	bt := int64(m.cfg.BlockTokens)
	slot := int64(s.Tail)*bt + int64(s.Tokens) - int64(last)*bt
	if n == 1 { // a decode step: no loop
		dst = append(dst, slot)
	} else {
		for i := range int64(n) {
			dst = append(dst, slot+i)
		}
	}
	s.Tokens += n
	return dst
}

// setFast sets s.FastRoom after an append committed, to how many tokens s may take on the fast
// path: the room in its last block, if s alone holds that block and it is not cached, and
// s.Tail to that block. With fresh the last block is one the append took, which is so without
// a look at the arena. (A swapped sequence never appends; the tail block is never out of reach
// of the token appended into it.)
func (m *Manager) setFast(s *sequence.Sequence, fresh bool) {
	s.FastRoom = 0
	room := s.TailRoom(m.cfg.BlockTokens)
	if room == 0 || s.Swapped {
		return
	}
	tail := s.Blocks[len(s.Blocks)-1]
	if !fresh && (tail == NullBlock || m.arena.Refs(tail) != 1 || m.arena.Entry(tail) != nil) {
		return
	}
	s.FastRoom, s.Tail = room, tail
}

// checkCounts refuses, under Strict, tokens without ids for keyed sequence s (nil: none).
func (m *Manager) checkCounts(s *sequence.Sequence, seq SeqID, n int) error {
	if s != nil && s.Keyed && n > 0 && m.cfg.Strict && !m.closed {
		return &SequenceError{Op: "append", Seq: seq, Err: ErrNeedsTokenIDs}
	}
	return nil
}

// afterCounts ends the caching of keyed sequence s (nil: one the append created) that took n > 0
// tokens without ids: its later blocks cannot be keyed.
func (m *Manager) afterCounts(s *sequence.Sequence, n int) {
	if s != nil && s.Keyed && n > 0 {
		root, adapter, salt := s.Root, s.Adapter, s.Salt
		s.ResetPrefix()
		// The namespace stays: cut back to empty, s is keyed again in it (afterIDs), never in
		// another, whose prompts would hit K/V computed for this one's adapter.
		s.Root, s.Adapter, s.Salt = root, adapter, salt
		m.counters.unkeyed++
	}
}

// appendSlots records n more tokens of s, whose blocks are in place, and appends their slots:
// the first goes into block last (the last before the append) while it had room left, else
// into the next. The slots run block by block, with no division.
func (m *Manager) appendSlots(s *sequence.Sequence, last, room, n int, dst []int64) []int64 {
	bt := m.cfg.BlockTokens
	i, off := last, bt-room // no room: off is bt, and the first slot is in block last+1
	for range n {
		if off == bt {
			i, off = i+1, 0
		}
		dst = append(dst, int64(s.Blocks[i])*int64(bt)+int64(off))
		off++
	}
	s.Tokens += n
	return dst
}

// appendSlow is AppendTokens when blocks must be found (or the request is bad). s is nil when
// the sequence does not exist yet.
func (m *Manager) appendSlow(s *sequence.Sequence, seq SeqID, n int, dst []int64) ([]int64, error) {
	var tx appendTx
	if err := m.prepareAppend(&tx, s, seq, n); err != nil {
		return dst, err
	}
	return tx.commit(dst), nil
}

// blocksNeeded returns the blocks n more tokens of s (nil: a new sequence) need beyond those it
// holds, counting a private copy of a shared tail (cow). Nothing overflows, whatever n.
func (m *Manager) blocksNeeded(s *sequence.Sequence, n int) (need int, cow bool) {
	if s == nil {
		return sequence.BlocksFor(n, m.cfg.BlockTokens), false
	}
	bt := m.cfg.BlockTokens
	need = sequence.BlocksFor(n-s.TailRoom(bt), bt) // exact for any n: TailRoom is in [0, bt)
	if n > 0 && s.TailRoom(bt) > 0 && m.arena.Refs(s.Blocks[len(s.Blocks)-1]) > 1 {
		need, cow = need+1, true
	}
	return need, cow
}

// checkFits returns a *BlocksError (ErrTooLarge) when n more tokens of s (nil: a new sequence),
// which need blocks more blocks, can never fit: the sequence would pass MaxSequenceTokens, the
// call would append more than blocktable.MaxSlots, or the arena has fewer blocks.
func (m *Manager) checkFits(s *sequence.Sequence, n, need int) error {
	tokens := 0
	if s != nil {
		tokens = s.Tokens
	}
	if n > MaxSequenceTokens-tokens || need > m.maxBlocks || n > blocktable.MaxSlots {
		bytes, ok := checked.Mul(uint64(need), m.cfg.BlockStride())
		if !ok {
			bytes = math.MaxUint64
		}
		return &BlocksError{Tokens: n, SeqTokens: tokens, Blocks: need, Bytes: bytes, Max: m.maxBlocks, Bound: m.bound()}
	}
	return nil
}

// bound names the setting that bounds the blocks the arena can ever hold (maxBlocks).
func (m *Manager) bound() string {
	if m.cfg.MemoryLimit > 0 && m.cfg.MemoryLimit < m.cfg.Capacity {
		return fmt.Sprintf("MemoryLimit %d bytes", m.cfg.MemoryLimit)
	}
	return fmt.Sprintf("Capacity %d bytes", m.cfg.Capacity)
}

// freeBlocks returns the blocks the manager could hand out now without other models' memory,
// as Available counts them: free and idle blocks of mapped pages, and those of the pages its
// arena, MemoryLimit and a shared budget's headroom still let it map.
func (m *Manager) freeBlocks() int { return m.availableLocked().Blocks }

// takeBlocks takes need device blocks into m.newBlocks, each held once, near page hint (-1:
// none): free blocks first, then cache beyond the bound, then mapped pages (growPage). On an
// error it has rolled back; otherwise the caller commits (and recycles m.evicted) or calls
// rollback.
func (m *Manager) takeBlocks(need int, hint arena.Page) error {
	m.newBlocks, m.newPages, m.evicted = m.newBlocks[:0], m.newPages[:0], m.evicted[:0]
	for len(m.newBlocks) < need {
		p, ok := m.arena.Pick(hint, need-len(m.newBlocks))
		if !ok && m.evictExcess() { // cache beyond the bound goes before a page is mapped
			p, ok = m.arena.Pick(hint, need-len(m.newBlocks))
		}
		if !ok {
			var err error
			if p, err = m.growPage(); err != nil {
				m.rollback()
				return err
			}
		}
		hint = p
		if need-len(m.newBlocks) >= m.bpp && m.arena.FreeIn(p) == m.bpp {
			m.newBlocks = m.arena.AllocAll(p, m.newBlocks) // what bpp allocs would take, at once
			continue
		}
		m.newBlocks = append(m.newBlocks, m.arena.Alloc(p))
	}
	return nil
}

// commitEvictions lets the key index reuse what the operation evicted: it stands.
func (m *Manager) commitEvictions() {
	for _, r := range m.evicted {
		m.arena.Index().Recycle(r)
	}
	m.evicted = m.evicted[:0]
}

// rollback frees the blocks, restores the cached blocks evicted and unmaps the pages that a
// failed grow took, and forgets the operation's events.
func (m *Manager) rollback() {
	for _, b := range m.newBlocks {
		m.arena.Unref(b)
	}
	for i := len(m.evicted) - 1; i >= 0; i-- {
		m.arena.Restore(m.evicted[i])
		m.counters.evictions--
	}
	m.evicted = m.evicted[:0]
	m.pending.DropUnsealed() // the committed events held for the subscribers stay
	for _, p := range m.newPages {
		if err := m.unmapPage(p); err != nil {
			// The page stays mapped and free: still consistent, and reused before any new map.
			continue
		}
		m.counters.unmaps++
		m.arena.SetState(p, arena.Unmapped)
	}
	m.newBlocks, m.newPages = m.newBlocks[:0], m.newPages[:0]
}

// rollbackAfterCopy is rollback once a copy has written (or may have written part of) the taken
// blocks in dsts: an eviction that freed one of them cannot be undone, its content being gone.
// Such a block is evicted again after the rollback puts it back, its BlockRemoved published:
// the only difference from before the operation is one idle cached block fewer.
func (m *Manager) rollbackAfterCopy(dsts ...sequence.Block) {
	m.rollback()
	m.dropCopied(dsts...)
}

// dropCopied is rollbackAfterCopy's second half, for a caller that must put other things back
// in the LRU order first (an entry it held, whose neighbour may be among dsts).
func (m *Manager) dropCopied(dsts ...sequence.Block) {
	evicted := false
	for _, b := range dsts {
		if m.arena.Entry(b) != nil { // restored: the copy overwrote the block it names
			m.evictBlock(b, false)
			evicted = true
		}
	}
	if evicted {
		m.publish()
	}
}

// growPage finds a page with room for an append when no mapped page has any: it maps one
// within the manager's limits and the shared budget's headroom; when memory is short it evicts
// the manager's own cached blocks (the whole protected cache included) before a shared budget
// reclaims from other models, and only then fails. It returns a page with a free block.
func (m *Manager) growPage() (arena.Page, error) {
	p, err := m.mapPageLocked(false)
	if err == nil {
		m.counters.syncMaps++
		m.newPages = append(m.newPages, p)
		return p, nil
	}
	if !errors.Is(err, ErrOutOfMemory) {
		return 0, err
	}
	if m.evictForAlloc() {
		if p, ok := m.arena.Pick(-1, 1); ok {
			return p, nil
		}
	}
	if !m.shared {
		return 0, err
	}
	if p, err = m.mapPageLocked(true); err != nil {
		return 0, err
	}
	m.counters.syncMaps++
	m.newPages = append(m.newPages, p)
	return p, nil
}

// mapPageLocked maps the lowest unmapped page while holding mu (the slow path: the reserve ran
// dry, or a compaction tops the reserve up); with reclaim, a shared budget may take memory back
// from other models. It returns the page, mapped and entirely free.
func (m *Manager) mapPageLocked(reclaim bool) (arena.Page, error) {
	if err := m.checkLimit(); err != nil {
		return 0, err
	}
	p, ok := m.arena.TakeUnmapped()
	if !ok {
		return 0, &vmm.CapacityError{Need: m.cfg.PageSize, Free: 0}
	}
	if err := m.mapPage(p, reclaim); err != nil {
		m.arena.SetState(p, arena.Unmapped)
		return 0, err
	}
	m.arena.MarkMapped(p)
	return p, nil
}

// mapPage backs page p with memory on every device: from the shared budget, if any (with
// reclaim, taking memory back from other models), then mapped.
func (m *Manager) mapPage(p arena.Page, reclaim bool) error { return m.back.mapPage(p, reclaim) }

// unmapPage returns page p's memory to the devices and the budget.
func (m *Manager) unmapPage(p arena.Page) error { return m.back.unmapPage(p) }

// checkLimit reports whether one more page fits under MemoryLimit.
func (m *Manager) checkLimit() error {
	if m.cfg.MemoryLimit == 0 {
		return nil
	}
	used := uint64(m.arena.Mapped()+m.inflight) * m.cfg.PageSize
	if used+m.cfg.PageSize > m.cfg.MemoryLimit {
		free := uint64(0)
		if m.cfg.MemoryLimit > used {
			free = m.cfg.MemoryLimit - used
		}
		return &vmm.CapacityError{Need: m.cfg.PageSize, Free: free}
	}
	return nil
}

// FreeSequence drops the sequence and releases its blocks (a block shared with a fork lives on
// in the fork). Entirely free pages stay mapped up to the high watermark; the reserve goroutine
// unmaps the rest from the top of the arena.
func (m *Manager) FreeSequence(seq SeqID) error {
	if !m.made() {
		return notMade("free", seq)
	}
	if m.ofHybrid() {
		return &SequenceError{Op: "free", Seq: seq, Err: errGroupOfHybrid}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable("free", seq); err != nil {
		return err
	}
	s, err := m.lookup("free", seq)
	if err != nil {
		return err
	}
	m.free(s)
	return nil
}

// free drops sequence s and releases its blocks; the lock is held.
func (m *Manager) free(s *sequence.Sequence) {
	// Last block first: cached blocks go idle tail first, so the tail is evicted before the
	// prefix other prompts share (as vLLM frees).
	for i := len(s.Blocks) - 1; i >= 0; i-- {
		if b := s.Blocks[i]; b != NullBlock {
			m.arena.Unref(b)
		} else if s.Swapped && s.Host[i] != sequence.NoHost {
			m.host.unref(s.Host[i])
		}
	}
	m.writeBack(s)
	m.publish()
	m.seqs.Remove(s)
	if m.spare() > m.cfg.HighWatermark {
		m.kick()
	}
}

// Fork creates dst as a copy of src that shares src's blocks by reference count. Full blocks
// stay shared for the life of both; a shared partial tail block is copied by whichever sequence
// appends to it first.
func (m *Manager) Fork(src, dst SeqID) error {
	if !m.made() {
		return notMade("fork", src)
	}
	if m.ofHybrid() {
		return &SequenceError{Op: "fork", Seq: dst, Err: errGroupOfHybrid}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	s, err := m.checkFork(src, dst)
	if err != nil {
		return err
	}
	return m.fork(s, dst)
}

// checkFork returns src, or the error of forking it to dst; the lock is held.
func (m *Manager) checkFork(src, dst SeqID) (*sequence.Sequence, error) {
	if err := m.usable("fork", src); err != nil {
		return nil, err
	}
	s, err := m.lookup("fork", src)
	if err != nil {
		return nil, err
	}
	if s.Swapped {
		return nil, &SequenceError{Op: "fork", Seq: src, Err: ErrSwapped}
	}
	if _, ok := m.seqs.Get(dst); ok {
		return nil, &SequenceError{Op: "fork", Seq: dst, Err: ErrSequenceExists}
	}
	return s, nil
}

// fork makes dst a copy of s sharing its blocks; the lock is held and checkFork passed. Only
// the registry can refuse it (a nil one).
func (m *Manager) fork(s *sequence.Sequence, dst SeqID) error {
	d, err := m.seqs.Add(dst)
	if err != nil {
		return &SequenceError{Op: "fork", Seq: dst, Err: err}
	}
	s.FastRoom = 0 // its tail is shared now: whichever appends first copies it
	d.Tokens, d.Written, d.Dropped = s.Tokens, s.Written, s.Dropped
	d.Blocks = append(d.Blocks, s.Blocks...)
	d.Root, d.Adapter, d.Salt = s.Root, s.Adapter, s.Salt // kept unkeyed too: see afterCounts
	if s.Keyed {
		d.Keyed = true
		d.IDs = append(d.IDs, s.IDs...)
		d.Keys = append(d.Keys, s.Keys...)
	}
	for _, b := range d.Blocks {
		if b != NullBlock {
			m.arena.Ref(b)
		}
	}
	return nil
}

// Truncate drops the last n tokens of the sequence (rolling back rejected speculative tokens,
// say) and releases the blocks that no longer hold any of its tokens.
func (m *Manager) Truncate(seq SeqID, n int) error {
	if !m.made() {
		return notMade("truncate", seq)
	}
	if m.ofHybrid() {
		return &SequenceError{Op: "truncate", Seq: seq, Err: errGroupOfHybrid}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	s, err := m.checkTruncate(seq, n)
	if err != nil {
		return err
	}
	m.truncate(s, n)
	return nil
}

// checkTruncate returns the sequence, or the error of truncating n tokens; the lock is held.
func (m *Manager) checkTruncate(seq SeqID, n int) (*sequence.Sequence, error) {
	if err := m.usable("truncate", seq); err != nil {
		return nil, err
	}
	s, err := m.lookup("truncate", seq)
	if err != nil {
		return nil, err
	}
	if s.Swapped {
		return nil, &SequenceError{Op: "truncate", Seq: seq, Err: ErrSwapped}
	}
	keep := m.minLength(s)
	if n < 0 || n > s.Tokens && keep == 0 {
		return nil, &SequenceError{Op: "truncate", Seq: seq, Err: &CountError{What: "tokens", N: n, Max: s.Tokens}}
	}
	if s.Tokens-n < keep { // n > s.Tokens too: Max is the most that may go, not s.Tokens
		return nil, &SequenceError{Op: "truncate", Seq: seq, Err: &CountError{
			What: fmt.Sprintf("tokens (the blocks before token %d are freed: out of reach)", s.Dropped*m.cfg.BlockTokens), N: n, Max: s.Tokens - keep}}
	}
	return s, nil
}

// truncate drops the last n tokens of s; the lock is held and checkTruncate passed.
func (m *Manager) truncate(s *sequence.Sequence, n int) {
	s.Tokens -= n
	s.Written, s.Hit, s.FastRoom = min(s.Written, s.Tokens), 0, 0
	bt := m.cfg.BlockTokens
	keep := sequence.BlocksFor(s.Tokens, bt)
	for i := len(s.Blocks) - 1; i >= keep; i-- {
		m.arena.Unref(s.Blocks[i])
	}
	s.Blocks = s.Blocks[:keep]
	if s.Keyed {
		s.IDs = s.IDs[:s.Tokens]
		s.Keys = s.Keys[:min(len(s.Keys), m.keyable(s))]
	}
	if m.spare() > m.cfg.HighWatermark {
		m.kick()
	}
}

// Len returns the sequence's token count.
func (m *Manager) Len(seq SeqID) (int, error) {
	if !m.made() {
		return 0, notMade("len", seq)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable("len", seq); err != nil {
		return 0, err
	}
	s, err := m.lookup("len", seq)
	if err != nil {
		return 0, err
	}
	return s.Tokens, nil
}

// Blocks appends the sequence's block ids, in token order, to dst. A swapped-out sequence's are
// its host slots, numbered past the arena's blocks as the copy kernels number them, and the
// ids of the device blocks it kept (see SwapOut).
func (m *Manager) Blocks(seq SeqID, dst []int32) ([]int32, error) {
	if !m.made() {
		return dst, notMade("blocks", seq)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable("blocks", seq); err != nil {
		return dst, err
	}
	s, err := m.lookup("blocks", seq)
	if err != nil {
		return dst, err
	}
	if !s.Swapped {
		return append(dst, sequence.Int32s(s.Blocks)...), nil
	}
	for i, b := range s.Blocks {
		id := int32(b)
		if h := s.Host[i]; h != sequence.NoHost {
			id = int32(h)
		}
		dst = append(dst, id)
	}
	return dst, nil
}

// Slots appends the slots of tokens [from, to) of the sequence to dst. A range outside
// [0, Len) is a *CountError, and dst comes back unchanged.
func (m *Manager) Slots(seq SeqID, from, to int, dst []int64) ([]int64, error) {
	if !m.made() {
		return dst, notMade("slots", seq)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable("slots", seq); err != nil {
		return dst, err
	}
	s, err := m.lookup("slots", seq)
	if err != nil {
		return dst, err
	}
	if s.Swapped {
		return dst, &SequenceError{Op: "slots", Seq: seq, Err: ErrSwapped}
	}
	if from < 0 || from > to {
		return dst, &SequenceError{Op: "slots", Seq: seq, Err: &CountError{What: "first token", N: from, Max: to}}
	}
	if to > s.Tokens {
		return dst, &SequenceError{Op: "slots", Seq: seq, Err: &CountError{What: "end token", N: to, Max: s.Tokens}}
	}
	if i := firstDropped(s, from, to, m.cfg.BlockTokens); i >= 0 {
		return dst, &SequenceError{Op: "slots", Seq: seq, Err: fmt.Errorf("%w: token %d is in block %d, freed (out of reach)", ErrInvalidArgument, i, i/m.cfg.BlockTokens)}
	}
	out, err := blocktable.AppendSlots(dst, sequence.Int32s(s.Blocks), m.cfg.BlockTokens, from, to)
	if err != nil {
		return dst, &SequenceError{Op: "slots", Seq: seq, Err: err}
	}
	return out, nil
}

// Close stops the reserve goroutine, drops every sequence and returns all memory to the device.
// The manager is closed even when a driver call fails: the error names it, the memory not
// returned stays counted (in a shared budget too), and the next Close tries it again. Once all
// is returned, a second Close returns ErrClosed. Swaps the runtime never closed make it return ErrNotClosed,
// with their count, after it has closed all the same.
func (m *Manager) Close() error {
	if !m.made() {
		return notMadeCall("close")
	}
	m.mu.Lock()
	if m.closed {
		retry := m.backOpen
		m.mu.Unlock()
		if retry {
			return m.closeBacking()
		}
		return fmt.Errorf("kvcache: close: %w", ErrClosed)
	}
	m.closed = true
	m.mu.Unlock()
	m.stopTiers()
	if !m.cfg.NoBackground {
		close(m.stop)
	}
	<-m.done
	m.growMu.Lock()
	defer m.growMu.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	m.flushEvents()
	m.pullTimer.Stop()
	m.holdTimer.Stop()
	m.feed.Close()
	m.settleCopies()
	if err := m.back.close(); err != nil {
		m.backOpen = true
		return fmt.Errorf("kvcache: close: %w", err)
	}
	if n := m.openSwaps.Load(); n > 0 {
		return fmt.Errorf("kvcache: close: %d swaps were never closed (their events stay allocated): %w", n, ErrNotClosed)
	}
	return nil
}

// closeBacking is a later Close of a manager whose backing failed to return everything: it
// tries again.
func (m *Manager) closeBacking() error {
	m.growMu.Lock()
	defer m.growMu.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.backOpen {
		return fmt.Errorf("kvcache: close: %w", ErrClosed)
	}
	if err := m.back.close(); err != nil {
		return fmt.Errorf("kvcache: close: %w", err)
	}
	m.backOpen = false
	return nil
}
