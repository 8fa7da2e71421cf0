package kvcache

import (
	"errors"
	"fmt"
	"slices"

	"github.com/pagedkv/pagedkv/kernels"
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

// swapSet looks up seqs for a swap: each must exist, appear once, and be swapped or not as
// want says. It returns the sequences, or a *SequenceError.
func (m *Manager) swapSet(op string, seqs []SeqID, swapped bool) ([]*sequence.Sequence, error) {
	if err := m.usable(op, 0); err != nil {
		return nil, err
	}
	if m.host == nil {
		return nil, &SequenceError{Op: op, Err: fmt.Errorf("%w: no host tier (Config.HostBlocks is 0)", ErrNotSupported)}
	}
	set := make([]*sequence.Sequence, 0, len(seqs))
	for i, id := range seqs {
		s, err := m.lookup(op, id)
		if err != nil {
			return nil, err
		}
		if slices.Contains(seqs[:i], id) {
			return nil, &SequenceError{Op: op, Seq: id, Err: fmt.Errorf("%w: listed twice", ErrInvalidArgument)}
		}
		if s.Swapped != swapped {
			err := error(ErrSwapped)
			if swapped {
				err = fmt.Errorf("%w: not swapped out", ErrInvalidArgument)
			}
			return nil, &SequenceError{Op: op, Seq: id, Err: err}
		}
		set = append(set, s)
	}
	return set, nil
}

// holders counts, for every block the sequences hold, how many of their references it has,
// in the order the blocks come.
func holders(set []*sequence.Sequence) (order []int32, count map[int32]int32) {
	count = map[int32]int32{}
	for _, s := range set {
		for _, b := range s.Blocks {
			if count[b] == 0 {
				order = append(order, b)
			}
			count[b]++
		}
	}
	return order, count
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
	set, err := m.swapSet("swap out", seqs, false)
	if err != nil {
		return nil, err
	}
	order, count := holders(set)
	pairs := make([]int64, 0, 2*len(order)) // (device block, host block)
	for _, b := range order {
		pairs = append(pairs, int64(b), 0)
	}
	n := len(pairs) / 2
	if n > m.host.freeBlocks() {
		bytes, free := uint64(n)*m.cfg.BlockStride(), uint64(m.host.freeBlocks())*m.cfg.BlockStride()
		return nil, &SequenceError{Op: "swap out", Seq: seqs[0], Err: &BlocksError{Blocks: n, Bytes: bytes, Free: m.host.freeBlocks(),
			Max: m.host.blocks(), Err: &vmm.CapacityError{Need: bytes, Free: free}}}
	}
	// The host blocks the copy goes to are the next free ones, taken for real once it is queued.
	free := m.host.free
	for i := 1; i < len(pairs); i += 2 {
		pairs[i] = int64(free[len(free)-1-i/2])
	}
	moves := make(map[int32]int32, n)
	marks, err := m.back.copyAsync(s, pairs)
	if err != nil {
		return nil, fmt.Errorf("kvcache: swap out: %w", err)
	}
	for i := 0; i < len(pairs); i += 2 {
		b := int32(pairs[i])
		moves[b] = m.host.take(count[b])
	}
	for _, q := range set {
		for i, b := range q.Blocks {
			q.Blocks[i] = moves[b]
			m.arena.unref(b)
		}
		q.Swapped = true
	}
	m.counters.swapOuts += uint64(n)
	if m.spare() > m.cfg.HighWatermark {
		m.kick()
	}
	return &Swap{Blocks: n, Bytes: uint64(n) * m.cfg.BlockStride(), marks: marks}, nil
}

// SwapIn brings the sequences' blocks back from the host tier into fresh device blocks (their
// ids change: export the tables again) with one copy launch per device on stream s, and frees
// the host blocks. A host block shared by several of the sequences is copied once and stays
// shared; one also held by a sequence still out is copied again when that one comes in. Device
// blocks come as for an append: free ones, evicted cache, mapped pages. All or nothing: an unknown sequence or one not swapped out, a device too full (a
// *BlocksError wrapping ErrOutOfMemory) or a failed launch change nothing.
func (m *Manager) SwapIn(seqs []SeqID, s kernels.Stream) (*Swap, error) {
	if !m.made() {
		return nil, notMadeCall("swap in")
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	set, err := m.swapSet("swap in", seqs, true)
	if err != nil {
		return nil, err
	}
	hosts, count := holders(set)
	if err := m.takeBlocks(len(hosts), -1); err != nil {
		m.commitEvictions()
		return nil, fmt.Errorf("kvcache: swap in: %w", &BlocksError{Blocks: len(hosts), Bytes: uint64(len(hosts)) * m.cfg.BlockStride(),
			Free: m.freeBlocks(), Max: m.maxBlocks, Err: err})
	}
	pairs := make([]int64, 0, 2*len(hosts))
	for i, h := range hosts {
		pairs = append(pairs, int64(h), int64(m.newBlocks[i]))
	}
	marks, err := m.back.copyAsync(s, pairs)
	if err != nil {
		m.rollback()
		m.commitEvictions()
		return nil, fmt.Errorf("kvcache: swap in: %w", err)
	}
	m.commitEvictions()
	moves := make(map[int32]int32, len(hosts))
	for i, h := range hosts {
		d := m.newBlocks[i]
		moves[h] = d
		for range count[h] - 1 { // takeBlocks gave it one holder
			m.arena.ref(d)
		}
	}
	for _, q := range set {
		for i, b := range q.Blocks {
			q.Blocks[i] = moves[b]
			m.host.unref(b)
		}
		q.Swapped = false
	}
	m.counters.swapIns += uint64(len(hosts))
	m.publish()
	return &Swap{Blocks: len(hosts), Bytes: uint64(len(hosts)) * m.cfg.BlockStride(), marks: marks}, nil
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
