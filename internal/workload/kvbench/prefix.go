package kvbench

import (
	"testing"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
)

// PromptTokens is the prompt of the start benchmarks: 4,096 tokens, 256 blocks of 16.
const PromptTokens = 4096

// StartCached times StartSequence of a 4,096-token prompt that is cached whole (255 blocks
// found: the last token is always computed), the prompt's keys given when withKeys, hashed
// otherwise. The FreeSequence that ends each iteration is not timed.
func StartCached(b *testing.B, withKeys bool) {
	cfg := Config()
	cfg.PrefixCacheBytes = PromptTokens / uint64(cfg.BlockTokens) * cfg.BlockStride() // the prompt stays cached
	e := setupWith(b, 0, cfg)
	p := make([]prefix.Token, PromptTokens)
	for i := range p {
		p[i] = prefix.Token(i*7919 + 13)
	}
	if _, err := e.m.AppendTokenIDs(0, p, nil); err != nil {
		b.Fatal(err)
	}
	if err := e.m.FreeSequence(0); err != nil {
		b.Fatal(err)
	}
	prompt := kvcache.Prompt{Tokens: p}
	if withKeys {
		prompt.Keys = prefix.Keys(nil, prefix.Namespace{}, e.bt, p)
	}
	b.ReportAllocs()
	for b.Loop() {
		hit, err := e.m.StartSequence(1, prompt)
		if err != nil || hit != PromptTokens-e.bt {
			b.Fatalf("start: %d tokens hit, %v", hit, err)
		}
		b.StopTimer()
		if err := e.m.FreeSequence(1); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/1e3, "us/start")
}

// Decode times the decode step of a batch of 256 sequences, one token each call, with ids
// (AppendTokenIDs, every id new: a 0% hit rate, so each filled block is hashed and cached and,
// once the batch restarts, evicted) or without (AppendTokens). Every 1,024 tokens a
// sequence ends and another takes its place (untimed), so the cache churns as a server's does.
// It reports ns/token; the difference between the two is what prefix caching costs.
func Decode(b *testing.B, live int, withIDs bool) {
	e := setup(b, live)
	slots := make([]int64, 0, 64)
	id := make([]prefix.Token, 1)
	next := prefix.Token(1)
	step := func(s kvcache.SeqID) {
		var err error
		if withIDs {
			id[0] = next
			next++
			slots, err = e.m.AppendTokenIDs(s, id, slots[:0])
		} else {
			slots, err = e.m.AppendTokens(s, 1, slots[:0])
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	for s := range Batch {
		step(kvcache.SeqID(s))
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		step(kvcache.SeqID(i % Batch))
		i++
		if i == Batch*1024 {
			b.StopTimer()
			for s := range Batch {
				if err := e.m.FreeSequence(kvcache.SeqID(s)); err != nil {
					b.Fatal(err)
				}
				step(kvcache.SeqID(s))
			}
			i = 0
			b.StartTimer()
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N), "ns/token")
}
