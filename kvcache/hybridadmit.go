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
	// CachedTokens are the tokens StartSequence would find cached in every group, on the device
	// or in a host prefix cache (brought back into new blocks). What only a storage tier below
	// the host holds counts as not cached: Admit does no I/O.
	CachedTokens int
	// Groups are each group's part, in group order (an Admission each):
	//   - NeedBlocks: the most blocks the sequence holds at once in the group beyond the device
	//     cached ones it starts with, while the rest of the prompt is appended (a window or
	//     chunk group drops blocks as appends go; a recurrent group's are its state slot and
	//     the checkpoints it would make where there is room);
	//   - Available: what appends could get in the group now, less the prompt's own idle cached
	//     blocks, its MappableBlocks as if the group alone took the budget's headroom;
	//   - Fits: the group alone has room for what it cannot do without (a checkpoint with no
	//     room is skipped).
	Groups []Admission
	// NeedBytes is the memory the groups would map between them where the budget lets them:
	// each group's whole pages for the blocks beyond its free ones and its idle ones beyond the
	// prefix cache's bound (a take maps before it evicts the cache within the bound).
	NeedBytes uint64
	// HeadroomBytes is what the budget the groups share can still give them (math.MaxUint64
	// when only their arenas bound them; what other models of a shared pool could give back is
	// not counted).
	HeadroomBytes uint64
	// Fits says that the prompt fits now: every group's pages fit its arena and MemoryLimit,
	// and the pages each group cannot do without (its cache within the bound evicted, no
	// checkpoint made) fit the headroom beside all the other groups may map first. Where
	// nothing has to yield (NeedBytes <= HeadroomBytes) that is exactly whether it goes in;
	// where the order of the groups' takes decides, Fits is the cautious answer.
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
	limit := maxPromptBlocks(len(p.Tokens), 1)
	hit := h.agree(limit)
	if hit < limit && h.hostCaching() { // as hostHits: what a host prefix cache holds is brought back
		for i, m := range h.groups {
			h.finders[i].reset(m, keys[i])
			h.finders[i].host = m.hostCaching()
		}
		hit = max(hit, h.agree(limit))
	}
	n := len(h.groups)
	ad := HybridAdmission{CachedTokens: hit, HeadroomBytes: math.MaxUint64, Groups: slices.Grow(dst[:0], n)[:n], Fits: true}
	if len(h.admits) < n {
		h.admits = make([]admitPart, n)
	}
	bounded := false   // a group's budget reported its headroom
	var adverse uint64 // what the groups may map between them, headroom permitting
	for i, m := range h.groups {
		want, least, idleHits := m.admitNeed(&h.finders[i], hit, len(p.Tokens), chunk)
		av := m.availableLocked()
		av.IdleBlocks -= idleHits
		av.Blocks -= idleHits
		av.Tokens = av.Blocks * m.cfg.BlockTokens
		ad.Groups[i] = Admission{CachedTokens: hit, NeedBlocks: want, Available: av, Fits: least <= av.Blocks}
		// A take uses free blocks and the idle ones beyond the cache's bound, then maps pages
		// while the budget lets it, and only then evicts the cache within the bound (takeBlocks).
		excess := max(0, av.IdleBlocks-m.idleAllowed())
		pages := sequence.BlocksFor(want-av.FreeBlocks-excess, m.bpp)
		leastPages := sequence.BlocksFor(least-av.FreeBlocks-av.IdleBlocks, m.bpp)
		own := m.ownMappable()
		ad.Fits = ad.Fits && leastPages <= own
		part := &h.admits[i]
		part.least = mulSat(uint64(leastPages), m.cfg.PageSize)
		ad.NeedBytes = addSat(ad.NeedBytes, mulSat(uint64(pages), m.cfg.PageSize))
		part.may = mulSat(uint64(min(pages, own)), m.cfg.PageSize)
		adverse = addSat(adverse, part.may)
		// The groups share one budget. On several devices each group counts its room in whole
		// pages of its own (multi.headroom), so the largest answer is the nearest to the budget's.
		if room, ok := m.back.headroom(); ok && (!bounded || room > ad.HeadroomBytes) {
			ad.HeadroomBytes, bounded = room, true
		}
	}
	// Each group's pages it cannot do without must fit beside all the others may map first (a
	// group maps rather than evict its cache within the bound, and a checkpoint maps where it
	// can): exact when nothing needs to yield, cautious where the order of the takes decides.
	for i := range n {
		part := &h.admits[i]
		others := adverse - part.may
		room := uint64(0)
		if ad.HeadroomBytes > others {
			room = ad.HeadroomBytes - others
		}
		ad.Fits = ad.Fits && part.least <= room
	}
	return ad, nil
}

// admitPart is one group's share of an admission (Hybrid.Admit's scratch): the bytes of the
// pages it cannot do without, and the bytes it may map if the budget lets it.
type admitPart struct {
	least, may uint64
}

// admitNeed returns the most blocks a sequence started on prompt p (total tokens) holds at once
// in this group beyond the cached blocks it starts with, while the rest is appended in calls of
// at most chunk tokens (0: one call): want with the checkpoints a recurrent group makes where
// it has room, least without; and how many of the cached blocks it would hold are idle now. It
// follows start and the appends: a start holds the cached blocks its next token reads and
// brings back those only the host cache holds (startFound, fetchHostBlocks: new blocks); an
// append drops what the length before it no longer reads, then takes the blocks of all its
// tokens (appendTx.dropEarly). A recurrent group needs its state slot; a start that resumes
// holds the checkpoint while it takes that slot (prepareResume), so the checkpoint is an idle
// hit, or a block of its own when it comes from the host; each call that ends at a multiple of
// the checkpoints copies the state where there is room (prepareMark), kept within the cache's
// bound, else evicted by the next. f is the group's finder, which agreed on hit. The lock is
// held.
func (m *Manager) admitNeed(f *hitFinder, hit, total, chunk int) (want, least, idleHits int) {
	if m.cfg.StateBytes > 0 {
		least = 1
		if h := hit / m.keyTokens(); h > 0 && m.cfg.CheckpointTokens > 0 {
			switch ck := f.get(h - 1); {
			case ck == onHost:
				least++
			case m.arena.Refs(ck) == 0:
				idleHits = 1
			}
		}
		kept := 1 + max(0, m.idleAllowed()-m.arena.Idle()) // checkpoints held at once
		return least + min(m.checkpointsMade(hit, total, chunk), kept), least, idleHits
	}
	bt := m.cfg.BlockTokens
	h := hit / bt
	sinks, dropped := 0, 0 // blocks [sinks, dropped) are freed
	if m.bounded() {
		sinks = m.sinkBlocks()
		dropped = max(sinks, m.reachFrom(hit)/bt)
	}
	// The blocks [0, h) start holds (the sinks' and those in reach): an idle cached one is an
	// idle hit, one only the host holds is fetched into a new block (at, in order).
	at := m.admitAt[:0]
	fetchedSinks := 0
	for i := range h {
		if i >= sinks && i < dropped {
			continue
		}
		switch b := f.get(i); {
		case b == onHost && i < sinks:
			fetchedSinks++
		case b == onHost:
			at = append(at, i)
		case m.arena.Refs(b) == 0:
			idleHits++
		}
	}
	m.admitAt = at
	for t := hit; t < total; {
		n := total - t
		if chunk > 0 {
			n = min(n, chunk)
		}
		if m.bounded() { // dropped before the take, what the length before the append no longer reads
			dropped = max(dropped, min(m.reachFrom(t)/bt, sequence.BlocksFor(t, bt)))
			for len(at) > 0 && at[0] < dropped {
				at = at[1:]
			}
		}
		end := sequence.BlocksFor(t+n, bt)
		want = max(want, fetchedSinks+len(at)+overlap(h, end, 0, sinks)+overlap(h, end, dropped, end))
		t += n
	}
	if total <= hit {
		want = fetchedSinks + len(at)
	}
	return want, want, idleHits
}

// checkpointsMade returns how many of the calls appending tokens hit to total, at most chunk
// each (0: one call), end at a multiple of the checkpoints (MarkWritten copies the state there).
func (m *Manager) checkpointsMade(hit, total, chunk int) int {
	k := m.cfg.CheckpointTokens
	if k == 0 || total <= hit {
		return 0
	}
	if chunk == 0 {
		return b2i(total%k == 0)
	}
	made := 0
	for t := hit + chunk; t < total; t += chunk {
		made += b2i(t%k == 0)
	}
	return made + b2i(total%k == 0)
}

// mulSat and addSat multiply and add, saturating at math.MaxUint64.
func mulSat(a, b uint64) uint64 {
	if v, ok := checked.Mul(a, b); ok {
		return v
	}
	return math.MaxUint64
}

func addSat(a, b uint64) uint64 {
	if v, ok := checked.Add(a, b); ok {
		return v
	}
	return math.MaxUint64
}

// overlap returns how many integers [a, b) and [c, d) have in common.
func overlap(a, b, c, d int) int { return max(0, min(b, d)-max(a, c)) }
