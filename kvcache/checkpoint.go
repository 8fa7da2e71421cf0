package kvcache

import (
	"errors"
	"fmt"

	"github.com/pagedkv/pagedkv/internal/keyindex"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/sequence"
)

// Checkpoints of a recurrent-state arena (Config.CheckpointTokens). A recurrent layer keeps no
// K/V, only a state that every token changes, so a prefix hit needs the state as it was after
// the prefix. MarkWritten(seq, n) at a multiple of CheckpointTokens copies the live state into
// a block of the arena's own and caches it under the key of the first n tokens, chained in
// blocks of CheckpointTokens. The block is idle from the start: no sequence holds a
// checkpoint, and it is evicted as any idle cached block is. A start copies the latest
// checkpoint of its prompt into a fresh live state, and the checkpoint stays cached.
//
// A recurrent arena's keyed sequence keeps in Keys the checkpoint keys of its written tokens
// (Written / CheckpointTokens of them); its one block, the live state, is never cached.

// CheckpointStats are a recurrent-state arena's checkpoint figures (Config.CheckpointTokens).
type CheckpointStats struct {
	// Made are the checkpoints MarkWritten copied and cached.
	Made uint64
	// Skipped are the checkpoints MarkWritten did not make for want of memory, or while the
	// manager slept. A mark off a multiple of CheckpointTokens, or one whose key is cached
	// already, is not counted.
	Skipped uint64
	// Resumed are the starts that resumed from a checkpoint (their tokens are in HitTokens).
	Resumed uint64
}

// keyTokens returns the tokens each of the arena's keys covers: a block's, or a recurrent
// arena's checkpoint interval.
func (m *Manager) keyTokens() int {
	if m.cfg.StateBytes > 0 && m.cfg.CheckpointTokens > 0 {
		return m.cfg.CheckpointTokens
	}
	return m.cfg.BlockTokens
}

// extendKeys hashes keyed s's keys, in blocks of keyTokens, until it has n.
func (m *Manager) extendKeys(s *sequence.Sequence, n int) {
	bt := m.keyTokens()
	ns := prefix.Namespace{Adapter: s.Adapter, Salt: s.Salt}
	for i := len(s.Keys); i < n; i++ {
		parent := s.Root
		if i > 0 {
			parent = s.Keys[i-1]
		}
		s.Keys = append(s.Keys, m.keyer.Next(ns, i, parent, s.IDs[i*bt:(i+1)*bt]))
	}
}

// markTx is a MarkWritten under way in one arena. In a recurrent arena at a checkpoint, block
// holds a copy of the live state (NullBlock: none to make) and s.Keys reach the mark (keys is
// how many it had). Nothing a caller sees has changed yet: commit moves the mark and caches
// the checkpoint, abort puts the block back. The lock is held from prepareMark to either.
type markTx struct {
	m       *Manager
	s       *sequence.Sequence
	n       int
	keys    int
	block   sequence.Block
	skipped bool // no memory for the checkpoint: counted when the mark commits
}

// prepareMark prepares marking n tokens of s written; checkMark passed. Only a recurrent
// arena's checkpoint can fail: a driver error while mapping a page or copying the state (a
// *SequenceError), and then nothing has changed. Out of memory skips the checkpoint.
func (m *Manager) prepareMark(s *sequence.Sequence, n int) (markTx, error) {
	tx := markTx{m: m, s: s, n: n, keys: len(s.Keys), block: NullBlock}
	ct := m.cfg.CheckpointTokens
	if m.cfg.StateBytes == 0 || ct == 0 || !s.Keyed || n < s.Written {
		return tx, nil
	}
	m.extendKeys(s, n/ct)
	if n == 0 || n%ct != 0 || m.arena.Index().Get(s.Keys[n/ct-1]) != nil {
		return tx, nil
	}
	if m.asleep { // asleep, the arena keeps no cache and maps nothing (Sleep)
		tx.skipped = true
		return tx, nil
	}
	err := m.takeBlocks(1, -1)
	if err == nil {
		dst := m.newBlocks[0]
		if err = m.back.copyBlock(dst, s.Blocks[0]); err != nil {
			m.rollbackAfterCopy(dst)
			err = fmt.Errorf("copy state block %d: %w", s.Blocks[0], err)
		}
	}
	switch {
	case err == nil:
		tx.block = m.newBlocks[0]
	case errors.Is(err, ErrOutOfMemory):
		tx.skipped = true
	default:
		s.Keys = s.Keys[:tx.keys]
		return tx, &SequenceError{Op: "mark written", Seq: s.ID, Err: fmt.Errorf("checkpoint at %d tokens: %w", n, err)}
	}
	return tx, nil
}

// commit makes the mark: s's written mark moves to n, an attention arena caches the blocks that
// became written, and a recurrent arena caches the checkpoint prepareMark copied, idle.
func (tx markTx) commit() {
	m, s := tx.m, tx.s
	s.Written = max(s.Written, tx.n)
	switch {
	case tx.block != NullBlock:
		m.commitEvictions()
		m.arena.Cache(tx.block, s.Keys[tx.n/m.cfg.CheckpointTokens-1])
		m.arena.Unref(tx.block)
		m.counters.stored++
		m.counters.checkpoints++
	case tx.skipped:
		m.counters.checkpointsSkipped++
	case m.cfg.StateBytes == 0 && s.Keyed && m.keyable(s) > len(s.Keys):
		m.storeBlocks(s)
		m.publish()
	}
}

// abort undoes prepareMark: the checkpoint's block, pages and evictions go back, and s's keys
// are as they were.
func (tx markTx) abort() {
	if tx.block != NullBlock {
		tx.m.rollbackAfterCopy(tx.block)
	}
	tx.s.Keys = tx.s.Keys[:tx.keys]
}

// resumeTx is a start under way in a recurrent arena that resumes from checkpoint ckpt
// (NullBlock: none): block is a fresh block holding a copy of it, and ckpt is held meanwhile
// so that no eviction takes it. prev is the idle entry before ckpt's, to put it back in its
// place on abort. Nothing a caller sees has changed yet.
type resumeTx struct {
	m           *Manager
	ckpt, block sequence.Block
	prev        *keyindex.Entry[sequence.Block]
}

// prepareResume takes a live state for a start of seq that resumes from the checkpoint after
// f's first h keys (h == 0: none), and copies the checkpoint into it. The lock is held and
// f.serves(h) == h. A failure (out of memory, a driver error) is a *SequenceError, and nothing
// has changed.
func (m *Manager) prepareResume(seq SeqID, f *hitFinder, h int) (resumeTx, error) {
	tx := resumeTx{m: m, ckpt: NullBlock, block: NullBlock}
	if m.cfg.StateBytes == 0 || m.cfg.CheckpointTokens == 0 || h == 0 {
		return tx, nil
	}
	ck := f.get(h - 1)
	prev := m.arena.Entry(ck).Prev()
	m.arena.Hold(ck)
	err := m.takeBlocks(1, -1)
	if err != nil { // takeBlocks has rolled back
		m.arena.Unhold(ck, prev)
	} else {
		dst := m.newBlocks[0]
		if err = m.back.copyBlock(dst, ck); err != nil {
			m.rollback()
			m.arena.Unhold(ck, prev)
			m.dropCopied(dst) // after the unhold: the entry before ck may be the one dst held
			err = fmt.Errorf("copy checkpoint block %d: %w", ck, err)
		}
	}
	if err != nil {
		tokens := h * m.cfg.CheckpointTokens
		return tx, &SequenceError{Op: "start", Seq: seq, Err: &BlocksError{Tokens: tokens, Blocks: 1, Bytes: m.cfg.BlockStride(),
			Free: m.freeBlocks(), Max: m.maxBlocks, Bound: m.bound(), Err: err}}
	}
	tx.ckpt, tx.block, tx.prev = ck, m.newBlocks[0], prev
	return tx, nil
}

// commit gives s the resumed state and lets the checkpoint go idle again, as the most recently
// used.
func (tx resumeTx) commit(s *sequence.Sequence) {
	m := tx.m
	m.commitEvictions()
	s.Blocks = append(s.Blocks, tx.block)
	m.arena.Unref(tx.ckpt)
	m.counters.resumed++
	if m.spare() < m.cfg.ReservePages {
		m.kick()
	}
}

// abort undoes prepareResume: the block, pages and evictions go back, and the checkpoint is
// idle at its place.
func (tx resumeTx) abort() {
	if tx.ckpt == NullBlock {
		return
	}
	tx.m.rollback()
	tx.m.arena.Unhold(tx.ckpt, tx.prev)
	tx.m.dropCopied(tx.block) // after the unhold: the entry before the checkpoint may be the one block held
}

// startState creates keyed sequence seq in a recurrent arena: empty, or, with tx, holding the
// first h*CheckpointTokens tokens of p and a copy of the checkpoint after them. The lock is
// held and checkStart passed; only the registry can refuse it (a nil one), and tx is aborted
// then.
func (m *Manager) startState(seq SeqID, p Prompt, root prefix.Key, f *hitFinder, h int, tx resumeTx) (int, error) {
	s, err := m.seqs.Add(seq)
	if err != nil {
		tx.abort()
		return 0, &SequenceError{Op: "start", Seq: seq, Err: err}
	}
	s.Keyed, s.Root, s.Adapter, s.Salt = true, root, p.Namespace.Adapter, p.Namespace.Salt
	if tx.ckpt != NullBlock {
		tx.commit(s)
		s.Keys = append(s.Keys, f.keys[:h]...)
		s.Tokens = h * m.cfg.CheckpointTokens
		s.IDs = append(s.IDs, p.Tokens[:s.Tokens]...)
		s.Written, s.Hit = s.Tokens, s.Tokens
	}
	m.counters.queryTokens += uint64(len(p.Tokens))
	m.counters.hitTokens += uint64(s.Tokens)
	return s.Tokens, nil
}

// startResume is StartSequence for a recurrent arena with checkpoints: it resumes from the
// latest checkpoint of p's prefix (at most all but its last token). root is the namespace's.
func (m *Manager) startResume(seq SeqID, p Prompt, root prefix.Key) (int, error) {
	ct := m.cfg.CheckpointTokens
	keys := promptKeys(prefix.NewKeyer(m.cfg.KeyScheme), p, root, ct, ct, nil) // outside the lock: hashing
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.checkStart(seq); err != nil {
		return 0, err
	}
	var f hitFinder
	f.reset(m, keys)
	h := f.serves(len(keys))
	tx, err := m.prepareResume(seq, &f, h)
	if err != nil {
		return 0, err
	}
	return m.startState(seq, p, root, &f, h, tx)
}
