// Package burst replays a bursty two-model trace: each model is busy half the time, out of
// phase with the other. In its busy phase a model admits new sequences every step for as long as
// memory lets it and decodes a token for each of its live sequences; at the end of the phase it
// finishes them all and sits idle. The figure is how many sequences each model keeps live at its
// peak: under one shared elastic budget a busy model can use the memory the idle one gave back;
// with the memory split statically in halves it cannot.
package burst

import (
	"errors"

	"github.com/pagedkv/pagedkv/kvcache"
)

// Options shape the trace.
type Options struct {
	Phases       int // busy phases in all (alternating between the models)
	PhaseSteps   int // steps per phase
	AdmitPerStep int // new sequences a busy model tries to admit per step
	PromptTokens int // each new sequence's prompt
}

// Result is each model's peak of live sequences, and the admissions refused for want of memory.
type Result struct {
	PeakLive [2]int
	Refused  [2]int
}

// Run replays the trace on two managers, which must be empty.
func Run(models [2]*kvcache.Manager, o Options) (Result, error) {
	var res Result
	var live [2][]kvcache.SeqID
	next := kvcache.SeqID(1)
	var slots []int64
	for phase := range o.Phases {
		busy := phase % 2
		m := models[busy]
		for range o.PhaseSteps {
			for range o.AdmitPerStep {
				var err error
				slots, err = m.AppendTokens(next, o.PromptTokens, slots[:0])
				if errors.Is(err, kvcache.ErrOutOfMemory) {
					res.Refused[busy]++
					break
				}
				if err != nil {
					return res, err
				}
				live[busy] = append(live[busy], next)
				next++
			}
			for i := 0; i < len(live[busy]); i++ {
				var err error
				slots, err = m.AppendTokens(live[busy][i], 1, slots[:0])
				if errors.Is(err, kvcache.ErrOutOfMemory) { // no room to grow: preempt it
					if err := m.FreeSequence(live[busy][i]); err != nil {
						return res, err
					}
					live[busy] = append(live[busy][:i], live[busy][i+1:]...)
					i--
					continue
				}
				if err != nil {
					return res, err
				}
			}
			res.PeakLive[busy] = max(res.PeakLive[busy], len(live[busy]))
			for _, mm := range models {
				if err := mm.Settle(); err != nil && !errors.Is(err, kvcache.ErrOutOfMemory) {
					return res, err
				}
			}
		}
		for _, id := range live[busy] {
			if err := m.FreeSequence(id); err != nil {
				return res, err
			}
		}
		live[busy] = live[busy][:0]
		for _, mm := range models {
			if err := mm.Settle(); err != nil && !errors.Is(err, kvcache.ErrOutOfMemory) {
				return res, err
			}
		}
	}
	return res, nil
}
