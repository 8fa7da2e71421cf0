package kvbench

import (
	"crypto/sha256"
	"encoding/binary"
	"testing"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
)

// PromptTokens is the prompt of the start benchmarks: 4,096 tokens, 256 blocks of 16.
const PromptTokens = 4096

// promptIDs returns the token ids of the start benchmarks' prompt.
func promptIDs() []prefix.Token {
	p := make([]prefix.Token, PromptTokens)
	for i := range p {
		p[i] = prefix.Token(i*7919 + 13)
	}
	return p
}

// StartCached times StartSequence of a 4,096-token prompt that is cached whole (255 blocks
// found: the last token is always computed), the prompt's keys given when withKeys, hashed
// otherwise. The FreeSequence that ends each iteration is not timed.
func StartCached(b *testing.B, withKeys bool) {
	cfg := Config()
	cfg.PrefixCacheBytes = PromptTokens / uint64(cfg.BlockTokens) * cfg.BlockStride() // the prompt stays cached
	e := setupWith(b, 0, cfg)
	p := promptIDs()
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

// The yardsticks of StartCached: what its two parts cost done the plainest way, measured in the
// same run, so that a target can be a ratio that holds on any machine. Each iteration stops and
// restarts the timer as StartCached's does, so both pay the same cost of the harness.

// MapLookups is the yardstick of StartCached with keys given: a Go map from the prompt's block
// keys to block ids, looked up once for each of the 255 blocks that StartSequence finds.
func MapLookups(b *testing.B) {
	keys := prefix.Keys(nil, prefix.Namespace{}, Config().BlockTokens, promptIDs())
	keys = keys[:len(keys)-1] // the last block holds the last token, which is never found
	index := make(map[prefix.Key]int32, len(keys))
	for i, k := range keys {
		index[k] = int32(i)
	}
	b.ReportAllocs()
	sum := int64(0)
	for b.Loop() {
		for _, k := range keys {
			sum += int64(index[k])
		}
		b.StopTimer()
		b.StartTimer()
	}
	if want := int64(len(keys)*(len(keys)-1)/2) * int64(b.N); sum != want {
		b.Fatalf("lookups summed to %d, want %d", sum, want)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/1e3, "us/op")
}

// HashBlocks is the yardstick of StartCached hashing: SHA-256 over each of the 255 blocks that
// StartSequence finds, chained from the namespace's root as prefix.Keys does, done the plainest
// way (append the parent key and the ids to a buffer, sha256.Sum256).
func HashBlocks(b *testing.B) {
	bt := Config().BlockTokens
	p := promptIDs()
	want := prefix.Keys(nil, prefix.Namespace{}, bt, p)[PromptTokens/bt-2]
	root := prefix.Root(prefix.Namespace{}, bt)
	var buf []byte
	b.ReportAllocs()
	for b.Loop() {
		parent := root
		for i := range PromptTokens/bt - 1 {
			buf = append(buf[:0], parent[:]...)
			for _, t := range p[i*bt : (i+1)*bt] {
				buf = binary.LittleEndian.AppendUint32(buf, uint32(t))
			}
			parent = sha256.Sum256(buf)
		}
		if parent != want {
			b.Fatal("the chain does not end at the key prefix.Keys gives")
		}
		b.StopTimer()
		b.StartTimer()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/1e3, "us/op")
}

// Decode times the decode step of a batch of 256 sequences, one token each call, with ids
// (AppendTokenIDs, every id new: a 0% hit rate, so each filled block is hashed and cached and,
// once the batch restarts, evicted) or without (AppendTokens). Every 1,024 tokens a
// sequence ends and another takes its place (untimed), so the cache churns as a server's does.
// It reports ns/token; the difference between the two is what prefix caching costs.
func Decode(b *testing.B, live int, withIDs bool) { decodeWith(b, live, withIDs, Config()) }

// decodeWith is Decode on a manager of cfg.
func decodeWith(b *testing.B, live int, withIDs bool, cfg kvcache.Config) {
	e := setupWith(b, live, cfg)
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
	decodeLoop(b, step, e.m.FreeSequence)
}

// DecodeSubscribed is Decode with ids on a manager whose KV events are subscribed: the
// subscription is drained every 4,096 steps, untimed, as a publisher's goroutine would. Its
// difference from Decode(b, live, true) is what building and queueing the events costs the
// append path.
func DecodeSubscribed(b *testing.B, live int) {
	e := setup(b, live)
	sub, err := e.m.Subscribe(1 << 16)
	if err != nil {
		b.Fatal(err)
	}
	slots := make([]int64, 0, 64)
	id := make([]prefix.Token, 1)
	next := prefix.Token(1)
	var events []prefix.Event
	n := 0
	step := func(s kvcache.SeqID) {
		id[0] = next
		next++
		var err error
		if slots, err = e.m.AppendTokenIDs(s, id, slots[:0]); err != nil {
			b.Fatal(err)
		}
		if n++; n%4096 == 0 {
			b.StopTimer()
			events = sub.Read(events[:0])
			b.StartTimer()
		}
	}
	decodeLoop(b, step, e.m.FreeSequence)
}

// decodeLoop times step on the sequences of the batch in turn, one token each call, after one
// untimed step each; every 1,024 tokens a sequence ends (free) and another takes its place
// (untimed). It reports ns/token.
func decodeLoop(b *testing.B, step func(kvcache.SeqID), free func(kvcache.SeqID) error) {
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
				if err := free(kvcache.SeqID(s)); err != nil {
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
