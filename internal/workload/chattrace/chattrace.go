// Package chattrace replays multi-turn chat traffic against a prefix cache: conversations that
// share system prompts, each turn re-sending the whole conversation (as chat APIs do), with a
// fixed number running at once. It drives pagedkv's manager and, as the yardstick, a plain LRU
// over blocks (vLLM's eviction policy, with a cap on idle cached blocks as kvcached adds one),
// through one small interface, so both see exactly the same requests.
package chattrace

import (
	"fmt"
	"math/rand/v2"

	"github.com/pagedkv/pagedkv/prefix"
)

// Options shape the trace.
type Options struct {
	Conversations int // in all
	Concurrent    int // running at once
	SystemPrompts int // in the pool conversations draw from
	// Token counts, each drawn uniformly from [Min, Max].
	MinSystem, MaxSystem int
	MinTurns, MaxTurns   int
	MinUser, MaxUser     int
	MinAnswer, MaxAnswer int
	Seed                 uint64
	// A part of the trace: the steps before Skip generate their requests without the cache (a
	// process started half-way, which rebuilds the conversations but not their cache), the
	// figures count only steps from Count on (and from Skip), and the replay ends after Stop
	// steps (0: at the end).
	Skip, Count, Stop int
}

// Issue returns the trace of the prefix-cache issue: 2,000 conversations of 4-8 turns (50-300
// user and 100-400 answer tokens a turn) over 20 system prompts of 500-2,000 tokens, 256 at once.
func Issue() Options {
	return Options{Conversations: 2000, Concurrent: 256, SystemPrompts: 20, MinSystem: 500, MaxSystem: 2000,
		MinTurns: 4, MaxTurns: 8, MinUser: 50, MaxUser: 300, MinAnswer: 100, MaxAnswer: 400, Seed: 1}
}

// Source draws a trace's sizes and fresh token ids, in the order a replay asks for them: the
// same seed gives the same trace.
type Source struct {
	rng  *rand.Rand
	next prefix.Token
}

// NewSource returns the source of trace o.
func NewSource(o Options) *Source {
	return &Source{rng: rand.New(rand.NewPCG(o.Seed, 0x5eed)), next: 1}
}

// Between returns a size drawn uniformly from [lo, hi].
func (s *Source) Between(lo, hi int) int { return lo + s.rng.IntN(hi-lo+1) }

// IntN returns an index drawn uniformly from [0, n).
func (s *Source) IntN(n int) int { return s.rng.IntN(n) }

// Fresh returns n token ids never returned before.
func (s *Source) Fresh(n int) []prefix.Token {
	t := make([]prefix.Token, n)
	for i := range t {
		t[i] = s.next
		s.next++
	}
	return t
}

// Systems draws trace o's system prompts.
func (s *Source) Systems(o Options) [][]prefix.Token {
	systems := make([][]prefix.Token, o.SystemPrompts)
	for i := range systems {
		systems[i] = s.Fresh(s.Between(o.MinSystem, o.MaxSystem))
	}
	return systems
}

// Cache is what the trace drives: a prefix cache over blocks.
type Cache interface {
	// Start begins a request for prompt and returns how many of its tokens were cached.
	Start(id uint64, prompt []prefix.Token) (int, error)
	// Append adds tokens whose K/V the request computed.
	Append(id uint64, ids []prefix.Token) error
	// Free ends a request.
	Free(id uint64) error
	// Blocks returns the blocks requests hold and the idle cached blocks.
	Blocks() (held, idle int)
	// MappedPages returns the pages the cache holds memory for.
	MappedPages() int
}

// Result is what a replay saw.
type Result struct {
	Steps            int
	Requests         int
	QueryTokens      int64 // prompt tokens
	HitTokens        int64 // of those, found cached
	PeakHeldBlocks   int   // the most blocks requests held at once
	PeakMappedPages  int
	PeakWorkingBlock int // the most blocks the running requests' contexts needed at once (no sharing)
}

// HitRate returns HitTokens / QueryTokens.
func (r Result) HitRate() float64 {
	if r.QueryTokens == 0 {
		return 0
	}
	return float64(r.HitTokens) / float64(r.QueryTokens)
}

type conversation struct {
	id      uint64
	history []prefix.Token // system prompt and every earlier turn
	turns   int
	turn    int
	answer  int // tokens of this turn's answer still to decode
	running bool
	request uint64
}

// Run replays the trace on c. blockTokens is the cache's block size (for the working set).
// Each step, every running conversation either starts its next turn (the whole conversation
// as the prompt: the cached part found, the rest appended) or decodes one answer token; a turn
// ends with its request freed, a conversation after its last turn, and another takes its
// place.
func Run(c Cache, o Options, blockTokens int) (Result, error) {
	src := NewSource(o)
	between, fresh, rng := src.Between, src.Fresh, src
	systems := src.Systems(o)
	var res Result
	started := 0
	slots := make([]*conversation, o.Concurrent)
	newConversation := func() *conversation {
		started++
		return &conversation{id: uint64(started), history: append([]prefix.Token(nil), systems[rng.IntN(len(systems))]...),
			turns: between(o.MinTurns, o.MaxTurns)}
	}
	for i := range slots {
		slots[i] = newConversation()
	}
	request := uint64(0)
	for active := true; active && (o.Stop == 0 || res.Steps < o.Stop); res.Steps++ {
		active = false
		held := 0
		c := c
		if res.Steps < o.Skip {
			c = mute{}
		}
		counting := res.Steps >= max(o.Skip, o.Count)
		for i, cv := range slots {
			if cv == nil {
				continue
			}
			active = true
			if !cv.running { // start a turn: the whole conversation and a new user message
				cv.history = append(cv.history, fresh(between(o.MinUser, o.MaxUser))...)
				request++
				cv.request, cv.running, cv.answer = request, true, between(o.MinAnswer, o.MaxAnswer)
				hit, err := c.Start(cv.request, cv.history)
				if err != nil {
					return res, fmt.Errorf("chattrace: start: %w", err)
				}
				if counting {
					res.Requests++
					res.QueryTokens += int64(len(cv.history))
					res.HitTokens += int64(hit)
				}
				if err := c.Append(cv.request, cv.history[hit:]); err != nil {
					return res, fmt.Errorf("chattrace: prefill: %w", err)
				}
			} else { // decode one token
				tok := fresh(1)
				cv.history = append(cv.history, tok...)
				if err := c.Append(cv.request, tok); err != nil {
					return res, fmt.Errorf("chattrace: decode: %w", err)
				}
				if cv.answer--; cv.answer == 0 {
					if err := c.Free(cv.request); err != nil {
						return res, fmt.Errorf("chattrace: free: %w", err)
					}
					cv.running = false
					if cv.turn++; cv.turn == cv.turns {
						slots[i] = nil
						if started < o.Conversations {
							slots[i] = newConversation()
						}
						continue
					}
				}
			}
			if cv.running {
				held += (len(cv.history) + blockTokens - 1) / blockTokens
			}
		}
		h, _ := c.Blocks()
		res.PeakHeldBlocks = max(res.PeakHeldBlocks, h)
		res.PeakWorkingBlock = max(res.PeakWorkingBlock, held)
		res.PeakMappedPages = max(res.PeakMappedPages, c.MappedPages())
	}
	return res, nil
}

// mute is the cache of the steps a replay skips: it holds nothing.
type mute struct{}

func (mute) Start(uint64, []prefix.Token) (int, error) { return 0, nil }
func (mute) Append(uint64, []prefix.Token) error       { return nil }
func (mute) Free(uint64) error                         { return nil }
func (mute) Blocks() (int, int)                        { return 0, 0 }
func (mute) MappedPages() int                          { return 0 }
