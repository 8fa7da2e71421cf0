// Package admit replays bursty, out-of-phase arrivals for several models and measures how long
// requests queue before admission: the figure behind "time to first token" when memory, not
// compute, is what a request waits for. Each model takes its turn being busy (a high arrival
// rate) while the others are quiet; a request is admitted, first come first served, only when
// its whole prompt fits (AppendTokens succeeds); a running request decodes one token per step
// and is preempted (freed and queued again at the front) when it cannot grow.
//
// The same trace runs on managers that each own a static share of memory, on one SharedPool,
// or (driven step by step through Model) on managers in separate processes joined by a ledger.
package admit

import (
	"errors"
	"math"
	"math/rand/v2"
	"slices"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// Options shape the trace.
type Options struct {
	Models     int     // how many models take turns
	Steps      int     // engine steps in all
	PhaseSteps int     // steps each busy phase lasts
	BusyRate   float64 // mean arrivals per step of the busy model
	QuietRate  float64 // mean arrivals per step of the others
	PromptMin  int     // prompt tokens, uniform in [PromptMin, PromptMax]
	PromptMax  int
	OutputMin  int // output tokens, uniform in [OutputMin, OutputMax]
	OutputMax  int
	Seed       uint64
}

// Default is the trace of the bench and its test: three models, busy in turn for 300 steps.
func Default() Options {
	return Options{Models: 3, Steps: 3600, PhaseSteps: 300, BusyRate: 0.25, QuietRate: 0.02,
		PromptMin: 400, PromptMax: 1600, OutputMin: 100, OutputMax: 300, Seed: 1}
}

type request struct {
	arrival, prompt, output, done int
	seq                           kvcache.SeqID
	admitted                      bool
}

// Model is one model's side of the trace: its arrivals, queue and running requests on one
// manager. Step it once per engine step, in step order.
type Model struct {
	m        *kvcache.Manager
	idx      int
	o        Options
	rng      *rand.Rand
	queue    []*request
	running  []*request
	next     kvcache.SeqID
	delays   []int
	preempts int
	slots    []int64
}

// NewModel returns model idx of the trace on m (empty); its arrivals depend only on o and idx.
func NewModel(m *kvcache.Manager, idx int, o Options) *Model {
	return &Model{m: m, idx: idx, o: o, rng: rand.New(rand.NewPCG(o.Seed, uint64(idx)+1)), next: 1}
}

// Step runs engine step s: arrivals, then admissions while the queue's head fits, then a
// decode token for every running request (preempting those that cannot grow), then the
// finished ones leave.
func (x *Model) Step(s int) error {
	rate := x.o.QuietRate
	if (s/x.o.PhaseSteps)%x.o.Models == x.idx {
		rate = x.o.BusyRate
	}
	for n := poisson(x.rng, rate); n > 0; n-- {
		x.queue = append(x.queue, &request{arrival: s,
			prompt: x.o.PromptMin + x.rng.IntN(x.o.PromptMax-x.o.PromptMin+1),
			output: x.o.OutputMin + x.rng.IntN(x.o.OutputMax-x.o.OutputMin+1)})
	}
	for len(x.queue) > 0 {
		r := x.queue[0]
		r.seq = x.next
		var err error
		if x.slots, err = x.m.AppendTokens(r.seq, r.prompt+r.done, x.slots[:0]); err != nil {
			if errors.Is(err, kvcache.ErrOutOfMemory) {
				break // first come, first served: the head waits for room
			}
			return err
		}
		x.next++
		if !r.admitted {
			r.admitted = true
			x.delays = append(x.delays, s-r.arrival)
		}
		x.queue = x.queue[1:]
		x.running = append(x.running, r)
	}
	kept := x.running[:0]
	var preempted []*request
	for _, r := range x.running {
		var err error
		x.slots, err = x.m.AppendTokens(r.seq, 1, x.slots[:0])
		switch {
		case errors.Is(err, kvcache.ErrOutOfMemory):
			preempted = append(preempted, r)
			x.preempts++
			if err := x.m.FreeSequence(r.seq); err != nil {
				return err
			}
			continue
		case err != nil:
			return err
		}
		r.done++
		if r.done >= r.output {
			if err := x.m.FreeSequence(r.seq); err != nil {
				return err
			}
			continue
		}
		kept = append(kept, r)
	}
	x.running = kept
	x.queue = append(preempted, x.queue...) // recomputed first: they were admitted already
	return nil
}

// Delays returns each admitted request's wait in steps, in admission order.
func (x *Model) Delays() []int { return x.delays }

// Preemptions returns how many times a running request had to be freed to make room.
func (x *Model) Preemptions() int { return x.preempts }

// Waiting returns the requests that have arrived and were never admitted.
func (x *Model) Waiting() int {
	n := 0
	for _, r := range x.queue {
		if !r.admitted {
			n++
		}
	}
	return n
}

// Result is the queueing delay over all models' admitted requests.
type Result struct {
	Admitted, Waiting, Preemptions int
	P50, P99, Mean                 float64 // steps from arrival to admission
}

// Summarize pools the models' figures.
func Summarize(ms []*Model) Result {
	var all []int
	var r Result
	for _, x := range ms {
		all = append(all, x.delays...)
		r.Waiting += x.Waiting()
		r.Preemptions += x.preempts
	}
	return FromDelays(all, r.Waiting, r.Preemptions)
}

// FromDelays summarizes delays gathered elsewhere (from other processes).
func FromDelays(all []int, waiting, preemptions int) Result {
	r := Result{Admitted: len(all), Waiting: waiting, Preemptions: preemptions}
	if len(all) == 0 {
		return r
	}
	s := slices.Clone(all)
	slices.Sort(s)
	sum := 0
	for _, d := range s {
		sum += d
	}
	r.Mean = float64(sum) / float64(len(s))
	r.P50 = float64(s[(len(s)-1)*50/100])
	r.P99 = float64(s[(len(s)-1)*99/100])
	return r
}

// Run replays the trace on one manager per model, stepping them in order each step.
func Run(ms []*kvcache.Manager, o Options) (Result, error) {
	models := make([]*Model, len(ms))
	for i, m := range ms {
		models[i] = NewModel(m, i, o)
	}
	for s := range o.Steps {
		for _, x := range models {
			if err := x.Step(s); err != nil {
				return Result{}, err
			}
		}
	}
	return Summarize(models), nil
}

// poisson draws from a Poisson distribution of mean lambda (Knuth's method: lambda is small).
func poisson(rng *rand.Rand, lambda float64) int {
	if lambda <= 0 {
		return 0
	}
	l, k, p := math.Exp(-lambda), 0, 1.0
	for {
		p *= rng.Float64()
		if p <= l {
			return k
		}
		k++
	}
}

// RunShares replays the trace on one manager per model on dev, each limited to an equal share
// of limit (cfg.MemoryLimit = limit/Models): the memory split statically, mapped on demand.
func RunShares(dev vmm.Device, cfg kvcache.Config, limit uint64, o Options) (Result, error) {
	var ms []*kvcache.Manager
	defer func() {
		for _, m := range ms {
			m.Close()
		}
	}()
	for range o.Models {
		c := cfg
		c.MemoryLimit = limit / uint64(o.Models)
		m, err := kvcache.New(dev, c)
		if err != nil {
			return Result{}, err
		}
		ms = append(ms, m)
	}
	return Run(ms, o)
}
