// Package preempt replays the multi-turn chat trace (internal/chattrace's shape) on a device
// too small for its working set, with a scheduler that preempts requests when an append runs
// out of memory, and counts the prompt tokens computed again because of it. It compares the
// ways pagedkv offers: preemption by freeing (recompute, vLLM v1's default), by swapping to the
// host tier, and by freeing with the host prefix cache on (the preempted context is fetched
// back from pinned memory where the host kept it).
package preempt

import (
	"errors"
	"fmt"

	"github.com/pagedkv/pagedkv/internal/workload/chattrace"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
)

// Policy is how a request is preempted.
type Policy int

const (
	// Recompute frees the preempted request; it is started again later with its whole context
	// as the prompt, finding in the (device) prefix cache what is still there.
	Recompute Policy = iota
	// Swap swaps the preempted request out to the host tier and back in later (freeing it when
	// the host tier is full).
	Swap
	// HostCache frees the preempted request, with the host prefix cache on: its blocks are
	// written back on release and fetched back at its restart.
	HostCache
)

// String names the policy as the bench tables do.
func (p Policy) String() string {
	return [...]string{"preempt by free (recompute)", "preempt by swap", "free + host prefix cache"}[p]
}

// Result is what a replay counted.
type Result struct {
	Steps, Requests, Preemptions int
	Swaps                        int   // preemptions that swapped (the rest freed)
	PrefillTokens                int64 // prompt tokens computed, in all
	RecomputedTokens             int64 // of those, tokens of a conversation computed before:
	RecomputedPreempted          int64 // at the restart of a preempted request
	RecomputedTurns              int64 // at a new turn (its context left the cache between turns)
	HostBytes                    uint64
}

type request struct {
	conv      *conversation
	id        kvcache.SeqID
	answer    int // tokens still to decode
	swapped   bool
	preempted bool
}

type conversation struct {
	history  []prefix.Token
	users    [][]prefix.Token // each turn's user message
	answers  []int            // each turn's answer length
	turn     int
	computed int // tokens of history whose K/V was computed at some point
}

// Run replays trace o on m (a fresh manager) under policy p. m's Config says whether its host
// tier and host prefix cache are on; the policy only decides what a preemption does.
func Run(m *kvcache.Manager, p Policy, o chattrace.Options) (Result, error) {
	src := chattrace.NewSource(o)
	between, fresh := src.Between, src.Fresh
	systems := src.Systems(o)
	// Every conversation is drawn up front, so that every policy replays the same trace
	// whatever order its scheduling meets them in.
	convs := make([]*conversation, o.Conversations)
	for i := range convs {
		cv := &conversation{history: append([]prefix.Token(nil), systems[src.IntN(len(systems))]...)}
		for range between(o.MinTurns, o.MaxTurns) {
			cv.users = append(cv.users, fresh(between(o.MinUser, o.MaxUser)))
			cv.answers = append(cv.answers, between(o.MinAnswer, o.MaxAnswer))
		}
		convs[i] = cv
	}
	var res Result
	started, lastID := 0, kvcache.SeqID(0)
	var running, waiting []*request
	newTurn := func(cv *conversation) *request {
		cv.history = append(cv.history, cv.users[cv.turn]...)
		lastID++
		return &request{conv: cv, id: lastID, answer: cv.answers[cv.turn]}
	}
	newConversation := func() *request {
		started++
		return newTurn(convs[started-1])
	}
	for range min(o.Concurrent, o.Conversations) {
		waiting = append(waiting, newConversation())
	}
	var slots []int64
	// preempt frees or swaps r out and puts it at the head of the queue.
	preempt := func(r *request) error {
		res.Preemptions++
		r.preempted = true
		if p == Swap {
			sw, err := m.SwapOut([]kvcache.SeqID{r.id}, 0)
			if err == nil {
				res.Swaps++
				r.swapped = true
				waiting = append([]*request{r}, waiting...)
				return errors.Join(sw.Wait(), sw.Close())
			}
			if !errors.Is(err, kvcache.ErrOutOfMemory) {
				return err
			}
		}
		waiting = append([]*request{r}, waiting...)
		return m.FreeSequence(r.id)
	}
	// admit starts (or swaps in) r; it reports false, changing nothing, when memory is short.
	admit := func(r *request) (bool, error) {
		if r.swapped {
			sw, err := m.SwapIn([]kvcache.SeqID{r.id}, 0)
			if errors.Is(err, kvcache.ErrOutOfMemory) {
				return false, nil
			}
			if err != nil {
				return false, err
			}
			r.swapped = false
			return true, errors.Join(sw.Wait(), sw.Close())
		}
		cv := r.conv
		hit, err := m.StartSequence(r.id, kvcache.Prompt{Tokens: cv.history})
		if err != nil {
			return false, err
		}
		slots, err = m.AppendTokenIDs(r.id, cv.history[hit:], slots[:0])
		if errors.Is(err, kvcache.ErrOutOfMemory) {
			return false, m.FreeSequence(r.id)
		}
		if err != nil {
			return false, err
		}
		res.PrefillTokens += int64(len(cv.history) - hit)
		again := int64(max(0, cv.computed-hit))
		res.RecomputedTokens += again
		if r.preempted {
			res.RecomputedPreempted += again
		} else {
			res.RecomputedTurns += again
		}
		cv.computed = len(cv.history)
		res.Requests++
		return true, nil
	}
	for ; len(running)+len(waiting) > 0; res.Steps++ {
		// Decode one token for every running request, oldest first; out of memory, the newest
		// running request is preempted (itself, when it is the newest).
		for i := 0; i < len(running); i++ {
			r := running[i]
			tok := fresh(1)
			for {
				var err error
				slots, err = m.AppendTokenIDs(r.id, tok, slots[:0])
				if err == nil {
					r.conv.history = append(r.conv.history, tok...)
					r.conv.computed++
					break
				}
				if !errors.Is(err, kvcache.ErrOutOfMemory) {
					return res, fmt.Errorf("preempt: decode: %w", err)
				}
				victim := running[len(running)-1]
				running = running[:len(running)-1]
				if err := preempt(victim); err != nil {
					return res, fmt.Errorf("preempt: %w", err)
				}
				if victim == r { // r was the last one: the loop ends
					break
				}
			}
		}
		// Requests whose answer is complete end; their conversation queues its next turn.
		kept := running[:0]
		for _, r := range running {
			if r.answer--; r.answer > 0 {
				kept = append(kept, r)
				continue
			}
			if err := m.FreeSequence(r.id); err != nil {
				return res, fmt.Errorf("preempt: free: %w", err)
			}
			if r.conv.turn++; r.conv.turn < len(r.conv.users) {
				waiting = append(waiting, newTurn(r.conv))
			} else if started < o.Conversations {
				waiting = append(waiting, newConversation())
			}
		}
		running = kept
		// Admit from the head of the queue while memory lasts.
		for len(waiting) > 0 {
			ok, err := admit(waiting[0])
			if err != nil {
				return res, fmt.Errorf("preempt: admit: %w", err)
			}
			if !ok {
				if len(running) == 0 {
					return res, fmt.Errorf("preempt: a request of %d tokens does not fit the empty device", len(waiting[0].conv.history))
				}
				break
			}
			running = append(running, waiting[0])
			waiting = waiting[1:]
		}
	}
	st := m.Stats()
	res.HostBytes = (st.SwapOuts + st.SwapIns + st.Prefix.HostStored + st.Prefix.HostHitTokens/uint64(m.Config().BlockTokens)) *
		m.Config().BlockStride()
	return res, nil
}

// Geometry is the trace's block geometry: 16-token blocks of 4 KiB, 64 to a 256 KiB page (the
// chat trace's).
func Geometry() kvcache.Config {
	return kvcache.Config{Layers: 1, KVHeads: 1, HeadDim: 64, ElemSize: 2, BlockTokens: 16,
		PageSize: 256 << 10, ReservePages: 1, HighWatermark: 2, NoBackground: true}
}

// Config returns the manager configuration for policy p on trace o, and the trace's working set
// in blocks (the most blocks its running conversations' contexts need at once, from a cache
// that never runs out): a device arena of half the working set, and for Swap and HostCache a
// host tier of the whole working set.
func Config(o chattrace.Options, p Policy) (kvcache.Config, int) {
	cfg := Geometry()
	bt, bpp := cfg.BlockTokens, cfg.BlocksPerPage()
	ideal, err := chattrace.Run(chattrace.NewLRU(bt, bpp, 1<<30), o, bt)
	if err != nil {
		panic(err) // the LRU yardstick never fails
	}
	ws := ideal.PeakWorkingBlock
	cfg.Capacity = uint64((ws/2+bpp-1)/bpp) * cfg.PageSize
	if p != Recompute {
		cfg.HostBlocks = ws
	}
	cfg.HostPrefixCache = p == HostCache
	return cfg, ws
}
