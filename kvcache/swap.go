package kvcache

import (
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/pagedkv/pagedkv/internal/keyindex"
	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/sequence"
	"github.com/pagedkv/pagedkv/vmm"
)

// Swap is a SwapOut or SwapIn under way: its copy was queued on the caller's stream. The
// bookkeeping is done when the call returns: blocks the swap freed may be handed to the next
// append at once, so the runtime's kernels writing them must run on the same stream after the
// swap (or after Wait). Close it when done.
type Swap struct {
	Blocks int    // blocks copied (a block shared by several of the sequences, once)
	Kept   int    // blocks not copied: kept on the device (SwapOut), or found in its prefix cache (SwapIn)
	Bytes  uint64 // copied, on every device together
	marks  []*kernels.Mark
	open   *atomic.Int64 // the manager's count of swaps not closed
	closed atomic.Bool
}

// newSwap returns the Swap of a copy of n blocks (kept: not copied), counted open until Close.
func (m *Manager) newSwap(n, kept int, marks []*kernels.Mark) *Swap {
	m.openSwaps.Add(1)
	return &Swap{Blocks: n, Kept: kept, Bytes: uint64(n) * m.cfg.BlockStride(), marks: marks, open: &m.openSwaps}
}

// Wait blocks until the copy is done.
func (sw *Swap) Wait() error {
	if sw == nil {
		return nil
	}
	var errs []error
	for _, mk := range sw.marks {
		errs = append(errs, mk.Wait())
	}
	return errors.Join(errs...)
}

// Done reports, without blocking, whether the copy is done.
func (sw *Swap) Done() (bool, error) {
	if sw == nil {
		return true, nil
	}
	for _, mk := range sw.marks {
		if done, err := mk.Done(); !done || err != nil {
			return false, err
		}
	}
	return true, nil
}

// Close releases the swap's events; it does not wait for the copy (Wait first to know it is
// done). A second Close does nothing. Every Swap must be closed: the manager counts those that
// are not (Stats.Warnings.OpenSwaps), and its Close reports them.
func (sw *Swap) Close() error {
	if sw == nil || sw.closed.Swap(true) {
		return nil
	}
	if sw.open != nil {
		sw.open.Add(-1)
	}
	var errs []error
	for _, mk := range sw.marks {
		errs = append(errs, mk.Close())
	}
	sw.marks = nil
	return errors.Join(errs...)
}

// swapScratch is what a swap plans with, kept by the manager so that a swap allocates little.
type swapScratch struct {
	set  []*sequence.Sequence
	seen map[SeqID]struct{}
	// The plan: the distinct blocks of the set that a swap moves or finds, in the order they
	// come: device blocks a swap-out moves (out) or host slots a swap-in brings back (in). The
	// k-th has refs[k] references among the set, and goes to outDst[k] (NoHost: it stays on the
	// device) or inDst[k] (a device block; -1 until one is taken). at[j] is, for each block
	// position of the set in order, its k (-1: none).
	out    []sequence.Block
	outDst []hostSlot
	in     []hostSlot
	inDst  []sequence.Block
	refs   []int32
	at     []int32
	found  []foundBlock             // the cached device blocks a SwapIn holds, for its undo
	pairs  []int64                  // (from, to) for each block copied, in the copy kernels' numbering
	keys   []prefix.Key             // the keys of the blocks a host-cache hit fetches
	held   []sequence.Block         // the cached device blocks a Hybrid's host fetch keeps from its own evictions
	first  map[sequence.Block]int32 // for a device block with several holders, its k
	firstH map[hostSlot]int32       // for a host slot with several holders, its k
}

// foundBlock is a cached device block that SwapIn took a reference to, and how to undo it:
// an idle block goes back after prev in the LRU order, a held one loses the reference.
type foundBlock struct {
	b    sequence.Block
	idle bool
	prev *keyindex.Entry[sequence.Block]
}

// swapSet looks up seqs for a swap into m.swap.set: each must exist, appear once, and be
// swapped out or not as swapped says, and a swap-in needs a manager awake. It returns a
// *SequenceError otherwise.
func (m *Manager) swapSet(op string, seqs []SeqID, swapped bool) error {
	if err := m.usable(op, 0); err != nil {
		return err
	}
	if m.host == nil {
		return &SequenceError{Op: op, Err: fmt.Errorf("%w: no host tier (Config.HostBlocks is 0)", ErrNotSupported)}
	}
	if swapped && m.asleep { // a swap-in takes device blocks, as an append does
		return &SequenceError{Op: op, Err: ErrAsleep}
	}
	sc := &m.swap
	if sc.seen == nil {
		sc.seen, sc.first, sc.firstH = map[SeqID]struct{}{}, map[sequence.Block]int32{}, map[hostSlot]int32{}
	}
	clear(sc.seen)
	sc.set = sc.set[:0]
	for _, id := range seqs {
		s, err := m.lookup(op, id)
		if err != nil {
			return err
		}
		if _, ok := sc.seen[id]; ok {
			return &SequenceError{Op: op, Seq: id, Err: fmt.Errorf("%w: listed twice", ErrInvalidArgument)}
		}
		sc.seen[id] = struct{}{}
		if s.Swapped != swapped {
			err := error(ErrSwapped)
			if swapped {
				err = fmt.Errorf("%w: not swapped out", ErrInvalidArgument)
			}
			return &SequenceError{Op: op, Seq: id, Err: err}
		}
		sc.set = append(sc.set, s)
	}
	return nil
}

// planOut lists in m.swap.out the device blocks of m.swap.set (sequences on the device), each
// once, in the order they come, with its references among the set.
func (m *Manager) planOut() {
	sc := &m.swap
	sc.out = planBlocks(sc, sc.out[:0], sc.first, m.arena.Refs, func(q *sequence.Sequence, i int) (sequence.Block, bool) {
		return q.Blocks[i], q.Blocks[i] != NullBlock // dropped blocks stay dropped
	})
}

// planIn lists in m.swap.in the host slots of m.swap.set (swapped-out sequences), each once, in
// the order they come, with its references among the set; device blocks they kept stay.
func (m *Manager) planIn() {
	sc := &m.swap
	sc.in = planBlocks(sc, sc.in[:0], sc.firstH, m.host.refsOf, func(q *sequence.Sequence, i int) (hostSlot, bool) {
		return q.Host[i], q.Host[i] != sequence.NoHost
	})
}

// planBlocks appends to blocks the blocks of sc.set that at names (per sequence and position),
// each once, setting sc.refs and sc.at. holders(b) is b's references in all; a block with one
// is held by its sequence alone and needs no lookup in first, which maps the others to their k.
func planBlocks[B comparable](sc *swapScratch, blocks []B, first map[B]int32, holders func(B) int32,
	at func(q *sequence.Sequence, i int) (B, bool)) []B {
	sc.refs, sc.at = sc.refs[:0], sc.at[:0]
	clear(first)
	for _, q := range sc.set {
		for i := range q.Blocks {
			b, ok := at(q, i)
			if !ok {
				sc.at = append(sc.at, -1)
				continue
			}
			if holders(b) > 1 {
				if k, ok := first[b]; ok {
					sc.refs[k]++
					sc.at = append(sc.at, k)
					continue
				}
				first[b] = int32(len(sc.refs))
			}
			sc.at = append(sc.at, int32(len(sc.refs)))
			blocks = append(blocks, b)
			sc.refs = append(sc.refs, 1)
		}
	}
	return blocks
}

// copyPlanned queues the copy of m.swap.pairs on stream s; with none, it launches nothing.
func (m *Manager) copyPlanned(s kernels.Stream) ([]*kernels.Mark, error) {
	if len(m.swap.pairs) == 0 {
		return nil, nil
	}
	return m.back.copyAsync(s, m.swap.pairs)
}

// SwapOut moves the sequences to the host tier, copying with one launch per device on stream s
// only the blocks that leave the device: those no sequence on the device holds. A block that a
// sequence staying on the device also holds is not copied: the swapped-out sequences keep their
// references to it (it stays held, and shared, so nobody writes it in place), for as long as
// they are out. Every other block is copied, a block shared among the sequences once, and
// their device references are dropped: it goes free, or stays cached and idle for prefix hits
// (and for SwapIn, which finds it by its key). A sequence already swapped out that kept a
// reference to a block leaving now moves to the host copy too. A window's or chunk's dropped
// blocks (NullBlock) stay dropped, and a recurrent arena's state moves like any block.
//
// Until SwapIn the sequences take no append, fork, truncation or export (ErrSwapped);
// FreeSequence frees them. Blocks then lists the host slots and the device blocks kept. All or
// nothing: an unknown or already swapped sequence, a host tier too small (a *SwapError
// wrapping ErrOutOfMemory) or a failed launch change nothing, except that a failed copy may
// have overwritten host blocks the host prefix cache held, which stay evicted.
func (m *Manager) SwapOut(seqs []SeqID, s kernels.Stream) (*Swap, error) {
	if !m.made() {
		return nil, notMadeCall("swap out")
	}
	if m.ofHybrid() {
		return nil, fmt.Errorf("kvcache: swap out: %w", errGroupOfHybrid)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.swapOne(true, seqs, s)
}

// swapOne is a Manager's SwapOut (out) or SwapIn: prepare, launch, commit.
func (m *Manager) swapOne(out bool, seqs []SeqID, s kernels.Stream) (*Swap, error) {
	prepare, op := m.prepareSwapIn, "swap in"
	if out {
		prepare, op = m.prepareSwapOut, "swap out"
	}
	tx, err := prepare(seqs)
	if err != nil {
		return nil, err
	}
	if err := tx.launch(s); err != nil {
		tx.abort()
		return nil, fmt.Errorf("kvcache: %s: %w", op, err)
	}
	return tx.commit(), nil
}

// swapTx is a SwapOut or SwapIn under way in one manager. prepare checks it and reserves its
// blocks (host blocks for a swap-out; device blocks, and the cached ones it finds, for a
// swap-in); launch queues its copy on the caller's stream; commit makes the swap happen and
// returns its Swap; abort puts everything back, once a launched copy is done, so that no later
// operation reuses a block the copy still writes. Until commit nothing a caller sees has
// changed. The lock is held from prepare to commit or abort, and the manager's swap scratch is
// the transaction's state: a manager has at most one in flight. A Hybrid prepares one in every
// group, then launches every copy, then commits them all, or aborts them all: a group short of
// room fails before any copy runs.
type swapTx struct {
	m        *Manager
	out      bool
	launched bool // the copy was queued, or its launch failed midway: it may have written
	n        int  // blocks copied
	away     bool // a swap-out moves references of sequences out before (countSwappedHolders)
	marks    []*kernels.Mark
}

// prepareSwapOut checks a SwapOut of seqs and reserves the host blocks its copy needs. An error
// (a *SequenceError, a *SwapError) leaves everything as it was.
func (m *Manager) prepareSwapOut(seqs []SeqID) (swapTx, error) {
	if err := m.swapSet("swap out", seqs, false); err != nil {
		return swapTx{}, err
	}
	m.planOut()
	sc := &m.swap
	tx := swapTx{m: m, out: true, away: m.countSwappedHolders()}
	for k, b := range sc.out {
		if m.arena.Refs(b) == sc.refs[k] { // every holder is out: it leaves the device
			tx.n++
		}
	}
	if room := m.host.swapRoom(); tx.n > room {
		bytes, free := uint64(tx.n)*m.cfg.BlockStride(), uint64(room)*m.cfg.BlockStride()
		return swapTx{}, &SwapError{Op: "swap out", Seqs: len(seqs), Blocks: tx.n, Bytes: bytes, Free: room,
			Max: m.host.blocks(), Where: "the host tier", Err: &vmm.CapacityError{Need: bytes, Free: free}}
	}
	m.host.reserveSwap(tx.n) // free host blocks first, then the host cache's least recently used
	sc.outDst, sc.pairs = sc.outDst[:0], sc.pairs[:0]
	for k, b := range sc.out {
		h := sequence.NoHost
		if m.arena.Refs(b) == sc.refs[k] {
			h = m.host.taken[len(sc.pairs)/2]
			sc.pairs = append(sc.pairs, int64(b), int64(h))
		}
		sc.outDst = append(sc.outDst, h)
	}
	return tx, nil
}

// launch queues the prepared copy on stream s (nothing to copy: no launch). On an error the
// caller aborts the transaction.
func (tx *swapTx) launch(s kernels.Stream) error {
	tx.launched = true
	marks, err := tx.m.copyPlanned(s)
	tx.marks = marks
	return err
}

// commit makes the prepared swap happen and returns its Swap.
func (tx *swapTx) commit() *Swap {
	if tx.out {
		return tx.commitOut()
	}
	return tx.commitIn()
}

// commitOut gives the host blocks their holders and moves the sequences' references to them.
func (tx *swapTx) commitOut() *Swap {
	m, sc := tx.m, &tx.m.swap
	m.host.commit(m.emitHostRemoved)
	for k, h := range sc.outDst {
		if h != sequence.NoHost {
			m.host.hold(h, sc.refs[k])
		}
	}
	j := 0
	for _, q := range sc.set {
		at := sc.at[j : j+len(q.Blocks)]
		j += len(q.Blocks)
		q.Host = q.Host[:0]
		for range q.Blocks {
			q.Host = append(q.Host, sequence.NoHost)
		}
		for i := len(q.Blocks) - 1; i >= 0; i-- { // the tail first, as FreeSequence releases
			if k := at[i]; k >= 0 && sc.outDst[k] != sequence.NoHost {
				m.arena.Unref(q.Blocks[i])
				q.Blocks[i], q.Host[i] = NullBlock, sc.outDst[k]
			}
		}
		q.Swapped, q.FastRoom = true, 0
	}
	if tx.away {
		m.moveSwappedHolders()
	}
	m.counters.swapOuts += uint64(tx.n)
	m.publish()
	if m.spare() > m.cfg.HighWatermark {
		m.kick()
	}
	return m.newSwap(tx.n, len(sc.out)-tx.n, tx.marks)
}

// abort undoes the prepared swap, once a launched copy is done: a swap-out's host blocks go
// back, a swap-in's device blocks, pages, evictions and found blocks. Before any launch it puts
// everything back exactly; after one, blocks the copy may have overwritten that held cached
// content stay evicted (hostTier.abortWritten, dropOverwritten), and their removal is published.
func (tx *swapTx) abort() {
	m := tx.m
	for _, mk := range tx.marks {
		_ = mk.Wait() // its error changes nothing: the blocks go back either way
		_ = mk.Close()
	}
	tx.marks = nil
	switch {
	case tx.out && tx.launched:
		m.host.abortWritten(m.emitHostRemoved)
	case tx.out:
		m.host.abort()
	default:
		m.rollback()
		m.unholdFound()
		if tx.launched {
			m.dropOverwritten()
		}
	}
	if tx.launched {
		m.publish()
	}
}

// dropOverwritten evicts, for good, each block a swap-in's copy wrote whose cached content the
// rollback restored: the copy overwrote it. The lock is held and m.swap.pairs are the copy's.
func (m *Manager) dropOverwritten() {
	for i := 1; i < len(m.swap.pairs); i += 2 {
		if b := sequence.Block(m.swap.pairs[i]); m.arena.Entry(b) != nil {
			m.evictBlock(b, false)
		}
	}
}

// countSwappedHolders adds to each planned block's references those of sequences swapped out
// before, outside the set, that kept it on the device. It reports whether there were any. Only
// a block some sequence outside the set holds can have them, so with none it looks no further.
func (m *Manager) countSwappedHolders() bool {
	sc := &m.swap
	outside := false
	for k, b := range sc.out {
		outside = outside || m.arena.Refs(b) > sc.refs[k]
	}
	if !outside {
		return false
	}
	away := false
	m.seqs.All(func(q *sequence.Sequence) bool {
		if _, in := sc.seen[q.ID]; in || !q.Swapped {
			return true
		}
		for _, b := range q.Blocks { // the device blocks it kept (NullBlock is never in first)
			if k, ok := sc.first[b]; ok {
				sc.refs[k]++
				away = true
			}
		}
		return true
	})
	return away
}

// moveSwappedHolders points the references countSwappedHolders counted at the host copies of
// the blocks that left the device, and drops their device references.
func (m *Manager) moveSwappedHolders() {
	sc := &m.swap
	m.seqs.All(func(q *sequence.Sequence) bool {
		if _, in := sc.seen[q.ID]; in || !q.Swapped {
			return true
		}
		for i, b := range q.Blocks {
			if k, ok := sc.first[b]; ok && sc.outDst[k] != sequence.NoHost {
				m.arena.Unref(b)
				q.Blocks[i], q.Host[i] = NullBlock, sc.outDst[k]
			}
		}
		return true
	})
}

// SwapIn brings the sequences back from the host tier and frees their host blocks. A host
// block whose content the device's prefix cache still holds (a keyed sequence's full block,
// whose key is cached) is not copied: the sequence takes a reference to the cached block, as
// StartSequence does on a hit. The others are copied into fresh device blocks with one launch
// per device on stream s. Block ids change: export the tables again. A host block shared by
// several of the sequences is brought in once and stays shared; one also held by a sequence
// still out is brought in again when that one comes in. Device blocks come as for an append:
// free ones, evicted cache, mapped pages. All or nothing: an unknown sequence or one not
// swapped out, a sleeping manager (ErrAsleep), a device too full (a *SwapError wrapping
// ErrOutOfMemory) or a failed launch change nothing, except that cached blocks a failed copy
// may have overwritten stay evicted.
func (m *Manager) SwapIn(seqs []SeqID, s kernels.Stream) (*Swap, error) {
	if !m.made() {
		return nil, notMadeCall("swap in")
	}
	if m.ofHybrid() {
		return nil, fmt.Errorf("kvcache: swap in: %w", errGroupOfHybrid)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.swapOne(false, seqs, s)
}

// prepareSwapIn checks a SwapIn of seqs, holds the cached blocks it finds and takes device
// blocks for the rest. An error (a *SequenceError, a *SwapError) leaves everything as it was.
func (m *Manager) prepareSwapIn(seqs []SeqID) (swapTx, error) {
	if err := m.swapSet("swap in", seqs, true); err != nil {
		return swapTx{}, err
	}
	m.planIn()
	sc := &m.swap
	m.findCached() // held before the blocks are taken, so that no eviction takes them
	n := len(sc.in) - len(sc.found)
	if err := m.takeBlocks(n, -1); err != nil {
		m.unholdFound()
		return swapTx{}, &SwapError{Op: "swap in", Seqs: len(seqs), Blocks: n, Bytes: uint64(n) * m.cfg.BlockStride(),
			Free: m.freeBlocks(), Max: m.maxBlocks, Where: "the arena (" + m.bound() + ")", Err: err}
	}
	sc.pairs = sc.pairs[:0]
	for k, d := range sc.inDst {
		if d < 0 {
			sc.pairs = append(sc.pairs, int64(sc.in[k]), int64(m.newBlocks[len(sc.pairs)/2]))
		}
	}
	return swapTx{m: m, n: n}, nil
}

// commitIn gives the sequences their device blocks and frees the host blocks.
func (tx *swapTx) commitIn() *Swap {
	m, sc := tx.m, &tx.m.swap
	m.commitEvictions()
	for k, c := 0, 0; k < len(sc.inDst); k++ {
		if sc.inDst[k] < 0 {
			sc.inDst[k] = m.newBlocks[c]
			c++
		}
		for range sc.refs[k] - 1 { // one reference is taken already
			m.arena.Ref(sc.inDst[k])
		}
	}
	j := 0
	for _, q := range sc.set {
		for i, h := range q.Host {
			if k := sc.at[j]; k >= 0 {
				q.Blocks[i] = sc.inDst[k]
				m.host.unref(h)
			}
			j++
		}
		q.Host = q.Host[:0]
		q.Swapped, q.FastRoom = false, 0
	}
	m.counters.swapIns += uint64(tx.n)
	m.publish()
	return m.newSwap(tx.n, len(sc.found), tx.marks)
}

// findCached sets m.swap.inDst: for each planned host block that a keyed sequence of the set
// holds as a full block whose key the device's prefix cache holds, the cached block, with one
// reference taken (recorded in m.swap.found for unholdFound); -1 for the others. The key is
// that of the block's first holder in the set.
func (m *Manager) findCached() {
	sc := &m.swap
	sc.inDst, sc.found = sc.inDst[:0], sc.found[:0]
	j := 0
	for _, q := range sc.set {
		for i := range q.Blocks {
			k := sc.at[j]
			j++
			if k < 0 || int(k) < len(sc.inDst) { // on the device, or planned at an earlier holder
				continue
			}
			d := sequence.NullBlock
			if i < len(q.Keys) && m.cfg.StateBytes == 0 { // keyed, block i full; a state is never cached
				if e := m.arena.Index().Get(q.Keys[i]); e != nil {
					d = e.Block
					sc.found = append(sc.found, foundBlock{b: d, idle: e.Idle(), prev: e.Prev()})
					m.arena.Hold(d)
				}
			}
			sc.inDst = append(sc.inDst, d)
		}
	}
}

// unholdFound undoes findCached's references, the last first: the blocks are exactly as they
// were, idle ones at their place in the LRU order.
func (m *Manager) unholdFound() {
	sc := &m.swap
	for i := len(sc.found) - 1; i >= 0; i-- {
		if f := sc.found[i]; f.idle {
			m.arena.Unhold(f.b, f.prev)
		} else {
			m.arena.Unref(f.b)
		}
	}
	sc.found = sc.found[:0]
}

// Swapped reports whether the sequence is swapped out.
func (m *Manager) Swapped(seq SeqID) (bool, error) {
	if !m.made() {
		return false, notMade("swapped", seq)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.usable("swapped", seq); err != nil { // as Len: a closed manager holds no sequence
		return false, err
	}
	s, err := m.lookup("swapped", seq)
	if err != nil {
		return false, err
	}
	return s.Swapped, nil
}
