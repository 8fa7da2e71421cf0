package kvcache

import (
	"fmt"
	"github.com/pagedkv/pagedkv/internal/arena"

	"github.com/pagedkv/pagedkv/sequence"
)

// appendTx is an append under way: its blocks are taken (m.newBlocks, pages mapped in
// m.newPages, evictions in m.evicted) and nothing a caller sees has changed yet. commit makes it
// happen; abort puts everything back. The manager's lock is held from prepareAppend to either,
// so a manager has at most one in flight, and its scratch is the transaction's state. A Hybrid
// prepares one in every group and commits them all or aborts them all.
type appendTx struct {
	m       *Manager
	s       *sequence.Sequence
	n, need int
	cow     bool // the first new block is a private copy of the shared tail
	created bool // the sequence was created by this append
	fast    bool // no block work (fastAppend): commit is fastSlots, abort nothing
	// early: the blocks the sequence no longer reads were dropped before the take (dropEarly,
	// in m.drops), and s's Dropped and NextDrop were these before
	early                 bool
	wasDropped, wasNextAt int
}

// droppedBlock is a block an append dropped before taking its own: at index i of the
// sequence's blocks, held by others too (shared) or by the sequence alone.
type droppedBlock struct {
	i      int
	b      sequence.Block
	shared bool
}

// prepareFast makes tx the transaction of an append of n tokens to s that fastAppend allows: it
// takes nothing, and its commit is the fast path's. A Hybrid prepares so the groups that need no
// block work in a step where another group does.
func (m *Manager) prepareFast(tx *appendTx, s *sequence.Sequence, n int) {
	tx.set(m, s, n, 0, false)
	tx.fast = true
}

// prepareAppend checks an append of n tokens to seq (s: nil when it does not exist), takes the
// blocks it needs and makes tx its transaction. An error is a *SequenceError, and nothing has
// changed (tx is then undefined). tx is the caller's, written field by field: a transaction
// returned by value was built in a temporary and copied twice, and the copies' wide loads of
// the narrow stores just made stalled a Hybrid's step that takes blocks (pprof).
func (m *Manager) prepareAppend(tx *appendTx, s *sequence.Sequence, seq SeqID, n int) error {
	if err := m.checkAppend(s, seq, n); err != nil {
		return err
	}
	need, cow := m.blocksNeeded(s, n)
	if err := m.checkFits(s, n, need); err != nil {
		return &SequenceError{Op: "append", Seq: seq, Err: err}
	}
	tx.set(m, s, n, need, cow)
	if s != nil && need > 0 && !cow && m.reachMoved(s) {
		tx.dropEarly()
	}
	if s == nil {
		var err error
		if tx.s, err = m.seqs.Add(seq); err != nil {
			return &SequenceError{Op: "append", Seq: seq, Err: err}
		}
		tx.created = true
	}
	if err := tx.take(); err != nil {
		if tx.created {
			m.seqs.Remove(tx.s)
		}
		tx.undoDrops()
		return &SequenceError{Op: "append", Seq: seq, Err: err}
	}
	return nil
}

// dropEarly drops, before the take, the blocks of s that the append's first token no longer
// reads, as commit would after it (dropOutOfReach with the length before the append): their
// memory is then free or evictable for the append's own blocks, so a chunked prefill of a
// window or chunk group holds one chunk's blocks beside its reach, not two (vLLM frees skipped
// blocks before it allocates, too). What it drops goes into m.drops for abort (undoDrops). Not
// with a copy-on-write tail: a failed copy may have written into a block the take reused.
func (tx *appendTx) dropEarly() {
	m, s := tx.m, tx.s
	tx.early, tx.wasDropped, tx.wasNextAt = true, s.Dropped, s.NextDrop
	m.drops = m.drops[:0]
	end := min(m.outOfReach(s), len(s.Blocks))
	for i := max(s.Dropped, m.sinkBlocks()); i < end; i++ {
		if b := s.Blocks[i]; b != NullBlock {
			m.drops = append(m.drops, droppedBlock{i: i, b: b, shared: m.arena.Refs(b) > 1})
		}
	}
	m.dropOutOfReach(s)
}

// undoDrops puts back what dropEarly dropped, after the take was given back (its evictions
// restored): a shared block gets its reference again, an idle cached one is held again, a freed
// one is taken again (nothing else took it: the lock is held).
func (tx *appendTx) undoDrops() {
	if !tx.early {
		return
	}
	m, s := tx.m, tx.s
	for j := len(m.drops) - 1; j >= 0; j-- {
		d := m.drops[j]
		switch {
		case d.shared:
			m.arena.Ref(d.b)
		case m.arena.Entry(d.b) != nil:
			m.arena.Hold(d.b)
		default:
			m.arena.Take(d.b, 1)
		}
		s.Blocks[d.i] = d.b
	}
	s.Dropped, s.NextDrop = tx.wasDropped, tx.wasNextAt
	tx.early = false
}

// set makes tx a transaction of m that appends n tokens to s with need blocks (cow: the first
// copies the shared tail), neither fast nor creating.
func (tx *appendTx) set(m *Manager, s *sequence.Sequence, n, need int, cow bool) {
	tx.m, tx.s, tx.n, tx.need = m, s, n, need
	tx.cow, tx.created, tx.fast, tx.early = cow, false, false, false
}

// checkAppend returns the *SequenceError of an append that cannot be made whatever the memory:
// a closed or sleeping manager, a negative count, a swapped-out sequence, an unknown one under
// Strict.
func (m *Manager) checkAppend(s *sequence.Sequence, seq SeqID, n int) error {
	if err := m.usable("append", seq); err != nil {
		return err
	}
	switch {
	case m.asleep:
		return &SequenceError{Op: "append", Seq: seq, Err: ErrAsleep}
	case n < 0:
		return &SequenceError{Op: "append", Seq: seq, Err: &CountError{What: "tokens", N: n}}
	case s != nil && s.Swapped:
		return &SequenceError{Op: "append", Seq: seq, Err: ErrSwapped}
	case s == nil && m.cfg.Strict:
		return &SequenceError{Op: "append", Seq: seq, Err: ErrUnknownSequence}
	}
	return nil
}

// take takes the transaction's blocks near the sequence's last one, and with cow copies the
// shared tail into the first. A failure is a *BlocksError with the numbers, wrapping the cause;
// the blocks are given back.
func (tx *appendTx) take() error {
	m, s := tx.m, tx.s
	if tx.need == 0 {
		return nil
	}
	hint := arena.Page(-1)
	if len(s.Blocks) > 0 && s.Blocks[len(s.Blocks)-1] != NullBlock { // dropEarly may have dropped a full tail
		hint = m.arena.PageOf(s.Blocks[len(s.Blocks)-1])
	}
	err := m.takeBlocks(tx.need, hint)
	if err == nil && tx.cow {
		tail, dst := s.Blocks[len(s.Blocks)-1], m.newBlocks[0]
		if err = m.back.copyBlock(dst, tail); err != nil {
			m.rollbackAfterCopy(dst)
			err = fmt.Errorf("copy shared tail block %d: %w", tail, err)
		}
	}
	if err != nil {
		return &BlocksError{Tokens: tx.n, SeqTokens: s.Tokens, Blocks: tx.need, Bytes: uint64(tx.need) * m.cfg.BlockStride(),
			Free: m.freeBlocks(), Max: m.maxBlocks, Bound: m.bound(), Err: err}
	}
	return nil
}

// commit makes the append happen: the sequence gets its new blocks (the private copy of its
// tail first), blocks it can no longer read are dropped (unless prepareAppend dropped them before
// the take: dropEarly), and the slots of the n tokens are
// appended to dst. Where the first token goes follows from the last block and the room in it
// before the append, so that a decode step's new block costs no division (every group of a
// Hybrid takes one at the same step).
func (tx *appendTx) commit(dst []int64) []int64 {
	m, s := tx.m, tx.s
	if tx.fast {
		if m.reachMoved(s) { // see fastSlots
			m.dropOutOfReach(s)
		}
		return m.fastSlots(s, tx.n, dst)
	}
	last, room := len(s.Blocks)-1, s.TailRoom(m.cfg.BlockTokens) // the first token goes into last if room > 0
	if tx.need > 0 {
		m.commitEvictions()
		blocks := m.newBlocks
		if tx.cow {
			m.counters.cows++
			m.arena.Unref(s.Blocks[len(s.Blocks)-1])
			s.Blocks[len(s.Blocks)-1] = blocks[0]
			blocks = blocks[1:]
		}
		s.Blocks = append(s.Blocks, blocks...)
	}
	if m.reachMoved(s) { // as on the fast path: nothing falls out of reach before NextDrop
		m.dropOutOfReach(s)
	}
	// A cached block is immutable: a tail cut into one by Truncate and held by s alone is
	// uncached before it is written (a shared one was copied).
	if tx.n > 0 && room > 0 && m.arena.Entry(s.Blocks[last]) != nil {
		k, _ := m.arena.Uncache(s.Blocks[last])
		m.emitRemoved(k)
	}
	dst = m.appendSlots(s, last, room, tx.n, dst)
	m.setFast(s, tx.need > 0) // the last block is then one take took: held once, uncached
	if tx.created {
		m.counters.implicit++
	}
	spare := m.spare()
	m.holdLow = min(m.holdLow, spare)
	if spare < m.cfg.ReservePages {
		m.kick()
	}
	return dst
}

// abort undoes a prepared append: its blocks, pages and evictions go back, and a sequence it
// created is removed.
func (tx *appendTx) abort() {
	switch {
	case tx.need > 0 && tx.cow: // the tail was copied into the first block: see rollbackAfterCopy
		tx.m.rollbackAfterCopy(tx.m.newBlocks[0])
	case tx.need > 0:
		tx.m.rollback()
	}
	tx.undoDrops()
	if tx.created {
		tx.m.seqs.Remove(tx.s)
	}
}
