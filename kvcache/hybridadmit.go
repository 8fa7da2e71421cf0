package kvcache

import (
	"fmt"
	"math"
	"slices"

	"github.com/pagedkv/pagedkv/internal/checked"
	"github.com/pagedkv/pagedkv/sequence"
)

// HybridAdmission says what starting a prompt on a Hybrid, and appending the rest of it, would
// take now (Hybrid.Admit).
type HybridAdmission struct {
	// CachedTokens are the tokens StartSequence would find cached on the device in every group
	// (what only the host prefix cache or a storage tier holds counts as not cached: bringing
	// it back takes the same blocks as computing it).
	CachedTokens int
	// Groups are each group's part, in group order (an Admission each):
	//   - NeedBlocks: the most blocks the sequence holds at once in the group beyond the cached
	//     ones it starts with, while the rest of the prompt is appended (a window or chunk
	//     group drops blocks as appends go; a recurrent group's are its state slots);
	//   - Available: what appends could get in the group now, less the prompt's own idle cached
	//     blocks, its MappableBlocks as if the group alone took the budget's headroom;
	//   - Fits: NeedBlocks <= Available.Blocks, the group alone.
	Groups []Admission
	// NeedBytes is the memory the groups must map between them: each group's whole pages for
	// the blocks beyond its free and idle ones.
	NeedBytes uint64
	// HeadroomBytes is what the budget the groups share can still give them (math.MaxUint64
	// when only their arenas bound them; what other models of a shared pool could give back is
	// not counted).
	HeadroomBytes uint64
	// Fits says that the prompt fits now: every group's pages fit its arena and MemoryLimit, and
	// NeedBytes <= HeadroomBytes.
	Fits bool
}

// Admit says, changing nothing, how much of prompt p is cached and whether the rest fits now,
// appended in calls of at most chunk tokens each (0: the rest in one call): what a scheduler
// checks before it admits a request. The groups share one budget, so the answer is not any one
// group's Admit: each group's pages count against the same headroom. A window or chunk group
// needs the blocks of one call and of its reach, not the prompt's (an append first frees what
// the length before it no longer reads): a 128k-token prompt appended in 8,192-token calls needs
// a sliding-window group's blocks for 8,192 tokens and the window. The answer holds until the
// next call that changes the Hybrid.
//
// Groups is dst's array (grown to Groups() entries where short), so that a scheduler that passes
// the last answer's Groups allocates nothing. It errs on a prompt of more than
// MaxSequenceTokens tokens, more keys than its whole blocks, a negative chunk (*CountError
// each), a closed Hybrid (ErrClosed) or a sleeping one (ErrAsleep), as StartSequence does.
func (h *Hybrid) Admit(p Prompt, chunk int, dst []Admission) (HybridAdmission, error) {
	if !h.made() {
		return HybridAdmission{}, fmt.Errorf("kvcache: admit: %w", errHybridNotMade)
	}
	if len(p.Tokens) > MaxSequenceTokens {
		return HybridAdmission{}, fmt.Errorf("kvcache: admit: %w", &CountError{What: "prompt tokens", N: len(p.Tokens), Max: MaxSequenceTokens})
	}
	if keyBT := h.keyBlockTokens(); keyBT > 0 && len(p.Keys) > len(p.Tokens)/keyBT {
		return HybridAdmission{}, fmt.Errorf("kvcache: admit: %w", &CountError{What: "keys", N: len(p.Keys), Max: len(p.Tokens) / keyBT})
	}
	if chunk < 0 {
		return HybridAdmission{}, fmt.Errorf("kvcache: admit: %w", &CountError{What: "tokens per append", N: chunk, Max: MaxSequenceTokens})
	}
	sc := h.startScratch() // the key chains, hashed outside the lock as a start hashes them
	defer h.putScratch(sc)
	_, keys := sc.chains(h, p)
	h.mu.Lock()
	defer h.mu.Unlock()
	defer h.forgetKeys()
	for _, m := range h.groups {
		if m.closed {
			return HybridAdmission{}, fmt.Errorf("kvcache: admit: %w", ErrClosed)
		}
		if m.asleep { // a start is refused whatever the memory
			return HybridAdmission{}, fmt.Errorf("kvcache: admit: %w", ErrAsleep)
		}
	}
	if len(h.finders) < len(h.groups) {
		h.finders = make([]hitFinder, len(h.groups))
	}
	for i, m := range h.groups {
		h.finders[i].reset(m, keys[i])
	}
	hit := h.agree(maxPromptBlocks(len(p.Tokens), 1))
	n := len(h.groups)
	ad := HybridAdmission{CachedTokens: hit, HeadroomBytes: math.MaxUint64, Groups: slices.Grow(dst[:0], n)[:n], Fits: true}
	bounded := false // a group's budget reported its headroom
	for i, m := range h.groups {
		need, idleHits := m.admitNeed(&h.finders[i], hit, len(p.Tokens), chunk)
		av := m.availableLocked()
		av.IdleBlocks -= idleHits
		av.Blocks -= idleHits
		av.Tokens = av.Blocks * m.cfg.BlockTokens
		ad.Groups[i] = Admission{CachedTokens: hit, NeedBlocks: need, Available: av, Fits: need <= av.Blocks}
		if short := need - av.FreeBlocks - av.IdleBlocks; short > 0 {
			pages := (short + m.bpp - 1) / m.bpp
			ad.Fits = ad.Fits && pages <= m.ownMappable()
			bytes, ok := checked.Mul(uint64(pages), m.cfg.PageSize)
			sum, ok2 := checked.Add(ad.NeedBytes, bytes)
			if ad.NeedBytes = sum; !ok || !ok2 {
				ad.NeedBytes = math.MaxUint64
			}
		}
		// The groups share one budget. On several devices each group counts its room in whole
		// pages of its own (multi.headroom), so the largest answer is the nearest to the budget's.
		if room, ok := m.back.headroom(); ok && (!bounded || room > ad.HeadroomBytes) {
			ad.HeadroomBytes, bounded = room, true
		}
	}
	ad.Fits = ad.Fits && ad.NeedBytes <= ad.HeadroomBytes
	return ad, nil
}

// admitNeed returns the most blocks a sequence started on prompt p (total tokens) holds at once
// in this group beyond the hit tokens' cached blocks, while the rest is appended in calls of at
// most chunk tokens (0: one call), and how many of the cached blocks it would hold are idle
// now. It follows start and the appends: a start holds the cached blocks its next token reads
// (startFound); an append drops what the length before it no longer reads, then takes the
// blocks of all its tokens (appendTx.dropEarly). A recurrent group needs its
// state slot (a checkpoint with no room is skipped, never refused: prepareMark); a start that
// resumes holds the checkpoint while it takes that slot (prepareResume), so the checkpoint is
// an idle hit. f is the group's finder, which agreed on hit. The lock is held.
func (m *Manager) admitNeed(f *hitFinder, hit, total, chunk int) (need, idleHits int) {
	if m.cfg.StateBytes > 0 {
		if h := hit / m.keyTokens(); h > 0 && m.cfg.CheckpointTokens > 0 && m.arena.Refs(f.get(h-1)) == 0 {
			return 1, 1
		}
		return 1, 0
	}
	bt := m.cfg.BlockTokens
	h := hit / bt
	sinks, dropped := 0, 0 // blocks [sinks, dropped) are freed
	if m.bounded() {
		sinks = m.sinkBlocks()
		dropped = max(sinks, m.reachFrom(hit)/bt)
	}
	for i := range h { // the cached blocks start holds: the sinks' and those in reach
		if (i < sinks || i >= dropped) && m.arena.Refs(f.get(i)) == 0 {
			idleHits++
		}
	}
	for t := hit; t < total; {
		n := total - t
		if chunk > 0 {
			n = min(n, chunk)
		}
		if m.bounded() { // dropped before the take, what the length before the append no longer reads
			dropped = max(dropped, min(m.reachFrom(t)/bt, sequence.BlocksFor(t, bt)))
		}
		end := sequence.BlocksFor(t+n, bt)
		need = max(need, overlap(h, end, 0, sinks)+overlap(h, end, dropped, end))
		t += n
	}
	return need, idleHits
}

// overlap returns how many integers [a, b) and [c, d) have in common.
func overlap(a, b, c, d int) int { return max(0, min(b, d)-max(a, c)) }
