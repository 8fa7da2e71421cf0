package kvcache

import (
	"errors"
	"fmt"

	"github.com/pagedkv/pagedkv/kernels"
)

// HybridSleepResult says what Hybrid.Sleep did in each group.
type HybridSleepResult struct {
	// Groups holds each group's result, in group order.
	Groups []SleepResult
	// MappedBytes are the device bytes all groups still map after sleeping: what their live
	// sequences need.
	MappedBytes uint64
}

// Sleep puts every group to sleep (see Manager.Sleep): each drops its prefix cache, compacts
// its live blocks into the fewest pages and unmaps every free page, so that the Hybrid keeps
// only what its live sequences need, and nothing with none. Until Wake, appends, starts and
// swaps in fail with ErrAsleep (a *GroupOpError naming the first group); frees, forks,
// truncations, swaps out and exports still work.
//
// The groups sleep one after the other, each under its own locks. A group whose compaction
// fails (a driver error) sleeps all the same, its cache dropped and its live blocks where they
// were, and the other groups still sleep: the error joins a *GroupOpError for each group that
// failed, and the result holds what every group did. It allocates the Groups slice.
func (h *Hybrid) Sleep() (HybridSleepResult, error) {
	if !h.made() {
		return HybridSleepResult{}, fmt.Errorf("kvcache: sleep: %w", errHybridNotMade)
	}
	if h.groups[0].closedNow() {
		return HybridSleepResult{}, fmt.Errorf("kvcache: sleep: %w", ErrClosed)
	}
	res := HybridSleepResult{Groups: make([]SleepResult, len(h.groups))}
	var errs []error
	for i, m := range h.groups {
		r, err := m.Sleep()
		if err != nil {
			errs = append(errs, h.groupErr(i, err))
		}
		res.Groups[i] = r
		res.MappedBytes += m.Stats().MappedBytes
	}
	return res, errors.Join(errs...)
}

// Wake makes every group usable again (see Manager.Wake); each refills its reserve in the
// background, or at the next append or Settle with NoBackground.
func (h *Hybrid) Wake() error {
	if !h.made() {
		return fmt.Errorf("kvcache: wake: %w", errHybridNotMade)
	}
	for i, m := range h.groups {
		if err := m.Wake(); err != nil {
			return h.groupErr(i, err)
		}
	}
	return nil
}

// Asleep reports whether the Hybrid sleeps: whether any group does, so that appends fail.
func (h *Hybrid) Asleep() bool {
	if !h.made() {
		return false
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, m := range h.groups {
		if m.asleep {
			return true
		}
	}
	return false
}

// HybridSwap is a Hybrid's SwapOut or SwapIn under way: each group's Swap, every copy queued on
// the caller's stream. The bookkeeping is done when the call returns (see Swap). The caller
// owns it: Wait for the copies as the runtime needs, and Close it.
type HybridSwap struct {
	// Groups holds each group's Swap, in group order: its blocks copied, kept and bytes.
	Groups []*Swap
}

// Wait blocks until every group's copy is done.
func (sw *HybridSwap) Wait() error {
	if sw == nil {
		return nil
	}
	var errs []error
	for _, g := range sw.Groups {
		errs = append(errs, g.Wait())
	}
	return errors.Join(errs...)
}

// Done reports, without blocking, whether every group's copy is done.
func (sw *HybridSwap) Done() (bool, error) {
	if sw == nil {
		return true, nil
	}
	for _, g := range sw.Groups {
		if done, err := g.Done(); !done || err != nil {
			return false, err
		}
	}
	return true, nil
}

// Close releases every group's events (Swap.Close); a second Close does nothing.
func (sw *HybridSwap) Close() error {
	if sw == nil {
		return nil
	}
	var errs []error
	for _, g := range sw.Groups {
		errs = append(errs, g.Close())
	}
	return errors.Join(errs...)
}

// SwapOut moves the sequences to the host tier (HybridConfig.HostTokens) in every group, with
// one copy launch per group on stream s (see Manager.SwapOut): each group copies the blocks that
// leave its device, a window or chunk group only those it still holds, a recurrent group each
// sequence's state. All or nothing across groups: every group checks the sequences and
// reserves its host blocks, then every group queues its copy, then all commit. A group that
// refuses (no host tier: ErrNotSupported; an unknown, repeated or swapped-out sequence; a host
// tier too small: a *SwapError wrapping ErrOutOfMemory; each a *GroupOpError naming the group)
// leaves every group as it was, before any copy runs. A failed launch makes the groups that
// queued theirs wait for them, then give back what they reserved. An empty list is
// ErrInvalidArgument. Until SwapIn the sequences take no append, fork, truncation, mark or
// export in any group (ErrSwapped).
func (h *Hybrid) SwapOut(seqs []SeqID, s kernels.Stream) (*HybridSwap, error) {
	return h.swap(true, seqs, s)
}

// SwapIn brings the sequences back from the host tier in every group (see Manager.SwapIn), all
// or nothing as SwapOut: a sleeping Hybrid (ErrAsleep) or a group without room on its device
// (a *SwapError wrapping ErrOutOfMemory) leaves every group exactly as it was. After a failed
// launch every group is as it was too, except that cached blocks a queued copy may have
// overwritten (taken from the cache to make room) stay evicted. Block ids change: export every
// group's table again.
func (h *Hybrid) SwapIn(seqs []SeqID, s kernels.Stream) (*HybridSwap, error) {
	return h.swap(false, seqs, s)
}

// swap is SwapOut (out) and SwapIn: it prepares in every group, then launches every group's
// copy, then commits all; on a failure it aborts those it prepared, the last first.
func (h *Hybrid) swap(out bool, seqs []SeqID, s kernels.Stream) (*HybridSwap, error) {
	op := "swap in"
	if out {
		op = "swap out"
	}
	if !h.made() {
		return nil, fmt.Errorf("kvcache: %s: %w", op, errHybridNotMade)
	}
	if len(seqs) == 0 {
		return nil, fmt.Errorf("kvcache: %s: %w: no sequences", op, ErrInvalidArgument)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	defer func() { clear(h.swaps); h.swaps = h.swaps[:0] }() // their marks are closed, or sw's
	for i, m := range h.groups {
		prepare := m.prepareSwapIn
		if out {
			prepare = m.prepareSwapOut
		}
		tx, err := prepare(seqs)
		if err != nil {
			h.abortSwaps()
			return nil, h.groupErr(i, err)
		}
		h.swaps = append(h.swaps, tx)
	}
	for i := range h.swaps {
		if err := h.swaps[i].launch(s); err != nil {
			h.abortSwaps()
			return nil, h.groupErr(i, fmt.Errorf("kvcache: %s: %w", op, err))
		}
	}
	sw := &HybridSwap{Groups: make([]*Swap, len(h.swaps))}
	for i := range h.swaps {
		sw.Groups[i] = h.swaps[i].commit()
	}
	return sw, nil
}

// abortSwaps aborts the prepared swaps, the last first.
func (h *Hybrid) abortSwaps() {
	for j := len(h.swaps) - 1; j >= 0; j-- {
		h.swaps[j].abort()
	}
}

// Swapped reports whether the sequence is swapped out (in every group: they swap together).
func (h *Hybrid) Swapped(seq SeqID) (bool, error) {
	if !h.made() {
		return false, &SequenceError{Op: "swapped", Seq: seq, Err: errHybridNotMade}
	}
	return h.groups[0].Swapped(seq)
}
