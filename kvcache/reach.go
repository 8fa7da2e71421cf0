package kvcache

import (
	"github.com/pagedkv/pagedkv/sequence"
)

// NullBlock stands in a sequence's blocks (Blocks, the exported tables) for a block that was
// freed because its layers can no longer read it: out of a sliding window, or of an earlier
// chunk. Attention with the group's mask never reads it. It is sequence.NullBlock, untyped so
// that it compares with the int32 ids of the tables and of Blocks as with a sequence.Block.
const NullBlock = -1

var _ = [1]struct{}{}[NullBlock-sequence.NullBlock] // the two stay one value

// bounded reports whether the layers read only some earlier tokens (a window or chunks), so
// that blocks fall out of reach.
func (m *Manager) bounded() bool { return m.cfg.Window > 0 || m.cfg.Chunk > 0 }

// reachFrom returns the first position the next token appended at length t reads, besides the
// sink tokens: t+1-Window for a sliding window, the start of t's chunk for chunked attention,
// 0 otherwise.
func (m *Manager) reachFrom(t int) int {
	switch {
	case m.cfg.Window > 0:
		return max(0, t+1-m.cfg.Window)
	case m.cfg.Chunk > 0:
		return t / m.cfg.Chunk * m.cfg.Chunk
	}
	return 0
}

// sinkBlocks returns the leading blocks that hold sink tokens and are never dropped.
func (m *Manager) sinkBlocks() int { return sequence.BlocksFor(m.cfg.Sinks, m.cfg.BlockTokens) }

// outOfReach returns the blocks [0, end) that lie wholly before what the next token of s reads.
func (m *Manager) outOfReach(s *sequence.Sequence) int {
	return m.reachFrom(s.Tokens) / m.cfg.BlockTokens
}

// reachMoved reports whether s has blocks to drop before its next append: the cheap test of the
// append fast path (a length against NextDrop, which dropOutOfReach keeps).
func (m *Manager) reachMoved(s *sequence.Sequence) bool {
	return m.bounded() && s.Tokens >= s.NextDrop
}

// nextDrop returns the length at which block i falls out of reach: the first t whose next token
// reads nothing before block i+1.
func (m *Manager) nextDrop(i int) int {
	end := (i + 1) * m.cfg.BlockTokens
	if m.cfg.Window > 0 {
		return end + m.cfg.Window - 1 // reachFrom(t) = t+1-Window >= end
	}
	c := m.cfg.Chunk
	return (end + c - 1) / c * c // t's chunk starts at or after end
}

// dropOutOfReach frees the blocks of s that its layers can no longer read (a sliding window's
// past, an old chunk), after the sink blocks, leaving NullBlock in their places. It runs with the
// length before an append, before the append takes its blocks (appendTx.dropEarly) or when it
// commits: the runtime's attention for the tokens it appends reads back that far, and nothing
// further back is read again (the tokens before were computed before this call).
func (m *Manager) dropOutOfReach(s *sequence.Sequence) {
	if !m.bounded() {
		return
	}
	end := min(m.outOfReach(s), len(s.Blocks))
	for i := max(s.Dropped, m.sinkBlocks()); i < end; i++ {
		if b := s.Blocks[i]; b != NullBlock {
			m.arena.Unref(b)
			s.Blocks[i] = NullBlock
		}
	}
	s.Dropped = max(s.Dropped, end)
	s.NextDrop = m.nextDrop(max(s.Dropped, m.sinkBlocks()))
}

// keptBlocks returns how many of s's blocks it holds (not NullBlock).
func keptBlocks(s *sequence.Sequence, sinkBlocks int) int {
	n := len(s.Blocks)
	if s.Dropped > sinkBlocks {
		n -= s.Dropped - sinkBlocks
	}
	return n
}

// minLength returns the shortest length s may be truncated to: one whose next token still reads
// nothing that was dropped.
func (m *Manager) minLength(s *sequence.Sequence) int {
	if !m.bounded() || s.Dropped <= m.sinkBlocks() {
		return 0
	}
	first := s.Dropped * m.cfg.BlockTokens // the first position still held after the sinks
	if m.cfg.Window > 0 {
		return first + m.cfg.Window - 1 // reachFrom(t) = t+1-Window must not fall below first
	}
	c := m.cfg.Chunk // reachFrom(t), t's chunk start, must not fall below first
	return (first + c - 1) / c * c
}

// firstDropped returns the first token of [from, to) whose block s dropped, or -1.
func firstDropped(s *sequence.Sequence, from, to, bt int) int {
	if s.Dropped == 0 {
		return -1
	}
	for i := from / bt; i < len(s.Blocks) && i*bt < to; i++ {
		if s.Blocks[i] == NullBlock {
			return max(from, i*bt)
		}
	}
	return -1
}
