package kvcache

import (
	"slices"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/sequence"
)

// hitFinder finds, for one group of a Hybrid start, the longest prefix of a prompt the group
// serves, looking each block's key up at most once: keys are the prompt's block keys (the
// group's block size), found caches what the index said (NullBlock: not cached, onHost: only
// the host cache holds it, else the block) for the blocks asked already: those of the leading
// run and those marked in asked. The manager's lock is held.
//
// With host set (hybridhost.go) a block the group's host prefix cache holds counts as found
// (onHost): the finder then tells what a start could serve once those blocks are brought back.
// A start itself only ever uses a finder without host, whose found are all device blocks.
type hitFinder struct {
	m     *Manager
	keys  []prefix.Key
	found []sequence.Block
	asked []uint64 // a bit for each block asked outside the leading run
	run   int      // leading blocks cached, for a group that needs them all (-1: not known yet)
	host  bool     // the host cache counts too
}

// onHost marks in hitFinder.found a block only the host prefix cache holds.
const onHost sequence.Block = -3

// reset prepares f for keys, reusing its storage. It clears a bit for each key, not found
// itself: a fill of found cost a three-group start more than its window's lookups.
func (f *hitFinder) reset(m *Manager, keys []prefix.Key) {
	f.m, f.keys, f.run, f.host = m, keys, -1, false
	f.found = slices.Grow(f.found[:0], len(keys))[:len(keys)]
	words := (len(keys) + 63) / 64
	f.asked = slices.Grow(f.asked[:0], words)[:words]
	clear(f.asked)
}

// get returns block i of the prompt in the cache, or NullBlock: the index is asked only the
// first time (lookup).
func (f *hitFinder) get(i int) sequence.Block {
	if !f.has(i) {
		f.lookup(i)
	}
	return f.found[i]
}

// has reports whether found holds block i of the prompt: it was asked already.
func (f *hitFinder) has(i int) bool {
	return i <= f.run || f.asked[uint(i)/64]&(1<<(uint(i)%64)) != 0
}

// lookup asks the index for block i of the prompt and keeps the answer in found.
func (f *hitFinder) lookup(i int) {
	f.asked[uint(i)/64] |= 1 << (uint(i) % 64)
	f.found[i] = NullBlock
	if e := f.m.arena.Index().GetAt(&f.keys[i]); e != nil {
		f.found[i] = e.Block
	} else if f.host && f.m.host.cache.Get(f.keys[i]) != nil {
		f.found[i] = onHost
	}
}

// appendFound appends blocks [i, j) of the prompt in the cache (NullBlock where not) to dst: in
// one copy, once each is looked up (those of the leading run are).
func (f *hitFinder) appendFound(dst []sequence.Block, i, j int) []sequence.Block {
	for k := max(i, f.run); k < j; k++ {
		f.get(k)
	}
	return append(dst, f.found[i:j]...)
}

// serves returns the largest hit, at most h blocks, the group can serve: the blocks its next
// token reads (all of them for full attention; a window's or a chunk's, and the sink tokens'),
// cached. A recurrent group's "blocks" are its checkpoint intervals, and it serves up to the
// latest cached checkpoint: one state is all it needs (none without checkpoints).
func (f *hitFinder) serves(h int) int {
	m := f.m
	switch {
	case m.cfg.StateBytes > 0:
		h = min(h, len(f.keys))
		for h > 0 && f.get(h-1) == NullBlock {
			h--
		}
		return h
	case !m.bounded():
		return min(h, f.leadingRun())
	}
	bt := m.cfg.BlockTokens
	for h > 0 {
		first := m.reachFrom(h*bt) / bt
		if first == 0 { // the next token reads every block (a prompt within one chunk or window)
			return min(h, f.leadingRun())
		}
		missing := -1
		for i := range min(m.sinkBlocks(), first) {
			if f.get(i) == NullBlock {
				missing = i
				break
			}
		}
		for i := h - 1; missing < 0 && i >= first; i-- { // every shorter hit reads block i too
			if f.get(i) == NullBlock {
				missing = i
			}
		}
		if missing < 0 {
			return h
		}
		h = missing
	}
	return 0
}

// leadingRun returns how many of the prompt's leading blocks are cached, looked up the first
// time in runs (keyindex's GetRun), a host block between runs: what a group serves when its next
// token reads every block before it.
func (f *hitFinder) leadingRun() int {
	if f.run >= 0 {
		return f.run
	}
	index, i := f.m.arena.Index(), 0
	for {
		i += index.GetRun(f.keys[i:], f.found[i:])
		switch {
		case i == len(f.keys):
			f.run = i
			return i
		case f.host && f.m.host.cache.Get(f.keys[i]) != nil:
			f.found[i] = onHost
			i++
		default:
			f.found[i], f.run = NullBlock, i
			return i
		}
	}
}

// startFound creates keyed sequence seq holding the first h blocks f found, as start does: the
// blocks its next token reads and the sink tokens' are held, the others NullBlock. A recurrent
// group resumes from the checkpoint tx copied (startState). The lock is held, checkStart
// passed, f.serves(h) == h and tx is prepareResume's for h; a failure aborts tx.
func (m *Manager) startFound(seq SeqID, p Prompt, root prefix.Key, f *hitFinder, h int, tx resumeTx) (int, error) {
	if m.cfg.StateBytes > 0 {
		return m.startState(seq, p, root, f, h, tx)
	}
	if h == 0 {
		return m.start(seq, Prompt{Tokens: p.Tokens, Namespace: p.Namespace}, root, 0)
	}
	s, err := m.seqs.Add(seq)
	if err != nil {
		return 0, &SequenceError{Op: "start", Seq: seq, Err: err}
	}
	bt := m.cfg.BlockTokens
	s.Keyed, s.Root, s.Adapter, s.Salt = true, root, p.Namespace.Adapter, p.Namespace.Salt
	s.Keys = append(s.Keys, f.keys[:h]...)
	first := 0
	if m.bounded() {
		first = m.reachFrom(h*bt) / bt
	}
	sinks := min(m.sinkBlocks(), first)
	s.Blocks = f.appendFound(s.Blocks, 0, sinks)
	s.Blocks = appendNull(s.Blocks, first-sinks)
	s.Blocks = f.appendFound(s.Blocks, first, h)
	m.arena.HoldAll(s.Blocks[:sinks])
	m.arena.HoldAll(s.Blocks[first:])
	if first > m.sinkBlocks() {
		s.Dropped = first
	}
	s.IDs = append(s.IDs, p.Tokens[:h*bt]...)
	s.Tokens = h * bt
	s.Written, s.Hit = s.Tokens, s.Tokens
	m.dropOutOfReach(s) // drops nothing more; sets when the next block falls out
	m.counters.queryTokens += uint64(len(p.Tokens))
	m.counters.hitTokens += uint64(s.Tokens)
	m.counters.unheldHitTokens += uint64((first - sinks) * bt)
	m.publish()
	return s.Tokens, nil
}

// appendNull appends n NullBlocks to blocks (a window's start drops all but its last few blocks
// of a long prompt). It copies from nullBlocks: Go fills a slice with -1 one store at a time,
// and copies it many bytes at a time.
func appendNull(blocks []sequence.Block, n int) []sequence.Block {
	blocks = slices.Grow(blocks, n)
	for n > 0 {
		c := min(n, len(nullBlocks))
		blocks = append(blocks, nullBlocks[:c]...)
		n -= c
	}
	return blocks
}

// nullBlocks is what appendNull copies: NullBlocks only, never written after init.
var nullBlocks = func() (a [512]sequence.Block) {
	for i := range a {
		a[i] = NullBlock
	}
	return a
}()
