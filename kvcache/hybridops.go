package kvcache

import (
	"errors"
	"fmt"
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
// only what its live sequences need, and nothing with none. Until Wake, appends and starts fail
// with ErrAsleep (a *GroupOpError naming the first group); frees, forks, truncations, swaps and
// exports still work.
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
