// Package churn replays a serving trace against a kvcache.Manager and measures how much memory
// the arena maps beyond what its live blocks need: the page overhead
// mapped pages / ceil(live blocks / blocks per page).
//
// The trace: Sequences requests with log-normal lengths around MedianTokens tokens; each arrives
// with a prompt of 20-80% of its length (one AppendTokens), then decodes one token per step
// until its length, then is freed; a few are aborted early at random. Up to Concurrent run at
// once; a new one arrives as soon as one leaves. It is deterministic for a given Seed.
package churn

import (
	"math"
	"math/rand/v2"
	"slices"

	"github.com/pagedkv/pagedkv/kvcache"
)

// Options shape a trace.
type Options struct {
	Sequences    int     // requests in the whole trace (10,000)
	Concurrent   int     // running at once (128)
	MedianTokens float64 // median length (500)
	Sigma        float64 // log-normal sigma of the length (0.6)
	AbortRate    float64 // chance per step that a running request is cancelled (0.001)
	Seed         uint64
	// Step, when set, runs after every step (Settle, Verify, ...); an error stops the trace.
	Step func() error
	// Measure, when set, sees the manager's stats at every measured step.
	Measure func(kvcache.Stats)
	// StopAfter, when positive, ends the trace after that many steps and leaves the running
	// requests live (for compacting mid-trace); otherwise the trace runs to the end and frees
	// everything.
	StopAfter int
}

// Each step admits new requests, appends one token to every running request, measures, then
// frees the requests that finished or were aborted.
//
// Result summarises the steady part of the trace: the steps while requests still arrive, so
// that the final drain, where a handful of stragglers hold a handful of pages, does not count.
type Result struct {
	Steps          int
	Appends        int // AppendTokens calls
	PeakLiveBlocks int
	MaxOverhead    float64 // worst page overhead over the steady steps
	MeanOverhead   float64
	P99Overhead    float64
}

// Run replays the trace on m, which must be empty, and frees every sequence at the end (unless
// StopAfter ends it early).
func Run(m *kvcache.Manager, o Options) (Result, error) {
	rng := rand.New(rand.NewPCG(o.Seed, 0x5eed))
	type req struct {
		id     kvcache.SeqID
		target int
		tokens int
	}
	var running []req
	var res Result
	var overheads []float64
	started := 0
	var slots []int64
	for started < o.Sequences || len(running) > 0 {
		for len(running) < o.Concurrent && started < o.Sequences {
			l := int(math.Round(o.MedianTokens * math.Exp(o.Sigma*rng.NormFloat64())))
			l = max(16, min(l, 16*int(o.MedianTokens)))
			prompt := max(1, int(float64(l)*(0.2+0.6*rng.Float64())))
			r := req{id: kvcache.SeqID(started + 1), target: l, tokens: prompt}
			var err error
			if slots, err = m.AppendTokens(r.id, prompt, slots[:0]); err != nil {
				return res, err
			}
			res.Appends++
			running = append(running, r)
			started++
		}
		// Decode: every running request gets one token, then the step is measured (this is the
		// memory the batch runs with), then finished and aborted requests leave.
		for i := range running {
			r := &running[i]
			if r.tokens < r.target {
				var err error
				if slots, err = m.AppendTokens(r.id, 1, slots[:0]); err != nil {
					return res, err
				}
				res.Appends++
				r.tokens++
			}
		}
		if started < o.Sequences && started >= o.Concurrent {
			st := m.Stats()
			res.PeakLiveBlocks = max(res.PeakLiveBlocks, st.LiveBlocks)
			overheads = append(overheads, st.PageOverhead)
			if o.Measure != nil {
				o.Measure(st)
			}
		}
		for i := 0; i < len(running); i++ {
			if r := running[i]; r.tokens >= r.target || rng.Float64() < o.AbortRate {
				if err := m.FreeSequence(r.id); err != nil {
					return res, err
				}
				running = slices.Delete(running, i, i+1)
				i--
			}
		}
		if o.Step != nil {
			if err := o.Step(); err != nil {
				return res, err
			}
		}
		res.Steps++
		if o.StopAfter > 0 && res.Steps >= o.StopAfter {
			break
		}
	}
	if len(overheads) > 0 {
		sum := 0.0
		for _, x := range overheads {
			sum += x
		}
		res.MeanOverhead = sum / float64(len(overheads))
		slices.Sort(overheads)
		res.MaxOverhead = overheads[len(overheads)-1]
		res.P99Overhead = overheads[len(overheads)*99/100]
	}
	return res, nil
}
