package kvcache

import (
	"errors"
	"fmt"

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
	Bytes  uint64 // on every device together
	marks  []*kernels.Mark
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

// Close releases the swap's events; it does not wait for the copy.
func (sw *Swap) Close() error {
	if sw == nil {
		return nil
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
	set   []*sequence.Sequence
	seen  map[SeqID]struct{}
	pairs []int64         // (from, to) for each block copied
	refs  []int32         // for each block copied, its references among the sequences
	at    []int32         // for each block reference of the sequences, in order, its pair
	keys  []prefix.Key    // the keys of the blocks a host-cache hit fetches
	first map[int32]int32 // for a block with several holders, its pair
}

// swapSet looks up seqs for a swap into m.swap.set: each must exist, appear once, and be
// swapped out or not as swapped says. It returns a *SequenceError otherwise.
func (m *Manager) swapSet(op string, seqs []SeqID, swapped bool) error {
	if err := m.usable(op, 0); err != nil {
		return err
	}
	if m.host == nil {
		return &SequenceError{Op: op, Err: fmt.Errorf("%w: no host tier (Config.HostBlocks is 0)", ErrNotSupported)}
	}
	sc := &m.swap
	if sc.seen == nil {
		sc.seen, sc.first = map[SeqID]struct{}{}, map[int32]int32{}
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

// plan lists the blocks of m.swap.set to copy, each once, in the order they come: a pair (b, 0)
// for each, its references among the set, and for each reference its pair. holders(b) is b's
// references in all; a block with one is held by its sequence alone, and needs no lookup.
func (m *Manager) plan(holders func(b int32) int32) {
	sc := &m.swap
	sc.pairs, sc.refs, sc.at = sc.pairs[:0], sc.refs[:0], sc.at[:0]
	clear(sc.first)
	for _, q := range sc.set {
		for _, b := range q.Blocks {
			if holders(b) > 1 {
				if k, ok := sc.first[b]; ok {
					sc.refs[k]++
					sc.at = append(sc.at, k)
					continue
				}
				sc.first[b] = int32(len(sc.refs))
			}
			sc.at = append(sc.at, int32(len(sc.refs)))
			sc.pairs = append(sc.pairs, int64(b), 0)
			sc.refs = append(sc.refs, 1)
		}
	}
}

// SwapOut moves the sequences' blocks to the host tier with one copy launch per device on
// stream s, and gives up their device blocks: free again, or still held by the sequences that
// share them, or cached and idle. A block shared by several of the sequences is copied once and
// stays shared; one shared with a sequence that stays is copied, so that a swapped-out sequence
// holds host blocks only. Until SwapIn the sequences take no append, fork, truncation or export
// (ErrSwapped); FreeSequence frees them. All or nothing: an unknown or already swapped sequence,
// a host tier too small (a *BlocksError wrapping ErrOutOfMemory) or a failed launch change
// nothing.
func (m *Manager) SwapOut(seqs []SeqID, s kernels.Stream) (*Swap, error) {
	if !m.made() {
		return nil, notMadeCall("swap out")
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.swapSet("swap out", seqs, false); err != nil {
		return nil, err
	}
	m.plan(m.arena.refs)
	sc := &m.swap
	n := len(sc.refs)
	if n > m.host.available() {
		bytes, free := uint64(n)*m.cfg.BlockStride(), uint64(m.host.available())*m.cfg.BlockStride()
		return nil, &SequenceError{Op: "swap out", Seq: seqs[0], Err: &BlocksError{Blocks: n, Bytes: bytes, Free: m.host.available(),
			Max: m.host.blocks(), Err: &vmm.CapacityError{Need: bytes, Free: free}}}
	}
	m.host.reserve(n) // free host blocks first, then the host cache's least recently used
	for k, h := range m.host.taken {
		sc.pairs[2*k+1] = int64(h)
	}
	marks, err := m.back.copyAsync(s, sc.pairs)
	if err != nil {
		m.host.abort()
		return nil, fmt.Errorf("kvcache: swap out: %w", err)
	}
	m.host.commit(m.emitHostRemoved)
	for k, h := range m.host.taken {
		m.host.hold(h, sc.refs[k])
	}
	j := 0
	for _, q := range sc.set {
		for i, b := range q.Blocks {
			q.Blocks[i] = int32(sc.pairs[2*sc.at[j]+1])
			j++
			m.arena.unref(b)
		}
		q.Swapped = true
	}
	m.counters.swapOuts += uint64(n)
	m.publish()
	if m.spare() > m.cfg.HighWatermark {
		m.kick()
	}
	return &Swap{Blocks: n, Bytes: uint64(n) * m.cfg.BlockStride(), marks: marks}, nil
}

// SwapIn brings the sequences' blocks back from the host tier into fresh device blocks (their
// ids change: export the tables again) with one copy launch per device on stream s, and frees
// the host blocks. A host block shared by several of the sequences is copied once and stays
// shared; one also held by a sequence still out is copied again when that one comes in. Device
// blocks come as for an append: free ones, evicted cache, mapped pages. All or nothing: an
// unknown sequence or one not swapped out, a device too full (a *BlocksError wrapping
// ErrOutOfMemory) or a failed launch change nothing.
func (m *Manager) SwapIn(seqs []SeqID, s kernels.Stream) (*Swap, error) {
	if !m.made() {
		return nil, notMadeCall("swap in")
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.swapSet("swap in", seqs, true); err != nil {
		return nil, err
	}
	m.plan(m.host.refsOf)
	sc := &m.swap
	n := len(sc.refs)
	if err := m.takeBlocks(n, -1); err != nil {
		return nil, fmt.Errorf("kvcache: swap in: %w", &BlocksError{Blocks: n, Bytes: uint64(n) * m.cfg.BlockStride(),
			Free: m.freeBlocks(), Max: m.maxBlocks, Err: err})
	}
	for k := range n {
		sc.pairs[2*k+1] = int64(m.newBlocks[k])
	}
	marks, err := m.back.copyAsync(s, sc.pairs)
	if err != nil {
		m.rollback()
		return nil, fmt.Errorf("kvcache: swap in: %w", err)
	}
	m.commitEvictions()
	for k := range n {
		for range sc.refs[k] - 1 { // takeBlocks gave it one holder
			m.arena.ref(m.newBlocks[k])
		}
	}
	j := 0
	for _, q := range sc.set {
		for i, h := range q.Blocks {
			q.Blocks[i] = m.newBlocks[sc.at[j]]
			j++
			m.host.unref(h)
		}
		q.Swapped = false
	}
	m.counters.swapIns += uint64(n)
	m.publish()
	return &Swap{Blocks: n, Bytes: uint64(n) * m.cfg.BlockStride(), marks: marks}, nil
}

// Swapped reports whether the sequence is swapped out.
func (m *Manager) Swapped(seq SeqID) (bool, error) {
	if !m.made() {
		return false, notMade("swapped", seq)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	s, err := m.lookup("swapped", seq)
	if err != nil {
		return false, err
	}
	return s.Swapped, nil
}
