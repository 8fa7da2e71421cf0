package kvevents

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/prefix"
)

// vLLM's fields of each event, in its order; the first required ones always go out, the rest
// only when set (msgspec's omit_defaults).
var fields = map[string]struct {
	names    []string
	required int
}{
	"BlockStored": {[]string{"block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
		"lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window"}, 7},
	"BlockRemoved":     {[]string{"block_hashes", "medium", "group_idx"}, 2},
	"AllBlocksCleared": {nil, 0},
}

// positional turns an event in its map form into vLLM's older array form: the tag, the
// required fields, then the optional ones up to the last one set, null where unset.
func positional(m map[string]any) []any {
	f := fields[m["type"].(string)]
	out := []any{m["type"]}
	last := f.required
	for i, name := range f.names {
		if _, ok := m[name]; ok {
			last = max(last, i+1)
		}
	}
	for _, name := range f.names[:last] {
		out = append(out, m[name])
	}
	return out
}

// wireEvents are events built by hand to reach every field: a sequence's first blocks, a
// later block of a named adapter in a sliding-window group on the host tier, an unnamed
// adapter in group 0, a group known by its kind alone, removals with and without a group, a
// clear, and an event of no kind (not sent). want gives each sent event in its map form, with
// hash(k) the wire form of key k.
func wireEvents(hash func(prefix.Key) any) (events []prefix.Event, want []map[string]any) {
	tokens := []prefix.Token{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, -1, 70000}
	root := prefix.Root(prefix.Namespace{}, 4)
	k := prefix.Keys(nil, prefix.Namespace{}, 4, tokens)
	ints := func(ts []prefix.Token) []any {
		out := make([]any, len(ts))
		for i, t := range ts {
			out[i] = int64(t)
		}
		return out
	}
	events = []prefix.Event{
		{Kind: prefix.BlockStored, Keys: k[:2], Parent: root, ParentIsRoot: true, Tokens: tokens[:8], BlockSize: 4, Medium: prefix.MediumGPU},
		{Kind: prefix.BlockStored, Keys: k[2:], Parent: k[1], Tokens: tokens[8:], BlockSize: 4, Adapter: 7, Medium: prefix.MediumCPU,
			HasGroup: true, Group: 1, GroupKind: "sliding_window", SlidingWindow: 128},
		{Kind: prefix.BlockStored, Keys: k[:1], Parent: root, ParentIsRoot: true, Tokens: tokens[:4], BlockSize: 4, Adapter: 1<<64 - 1,
			Medium: prefix.MediumGPU, HasGroup: true},
		{Kind: prefix.BlockStored, Keys: k[1:2], Parent: k[0], Tokens: tokens[4:8], BlockSize: 4, GroupKind: "full_attention"},
		{Kind: prefix.BlockRemoved, Keys: k[:2], Medium: "DISK"}, // a tier's eviction
		{Kind: prefix.BlockRemoved, Keys: k[2:], HasGroup: true, Group: 2},
		{Kind: prefix.AllBlocksCleared, Medium: prefix.MediumCPU},
		{},
	}
	want = []map[string]any{
		{"type": "BlockStored", "block_hashes": []any{hash(k[0]), hash(k[1])}, "parent_block_hash": nil,
			"token_ids": ints(tokens[:8]), "block_size": int64(4), "lora_id": nil, "medium": "GPU", "lora_name": nil},
		{"type": "BlockStored", "block_hashes": []any{hash(k[2])}, "parent_block_hash": hash(k[1]),
			"token_ids": ints(tokens[8:]), "block_size": int64(4), "lora_id": int64(7), "medium": "CPU", "lora_name": "sql-lora",
			"group_idx": int64(1), "kv_cache_spec_kind": "sliding_window", "kv_cache_spec_sliding_window": int64(128)},
		{"type": "BlockStored", "block_hashes": []any{hash(k[0])}, "parent_block_hash": nil,
			"token_ids": ints(tokens[:4]), "block_size": int64(4), "lora_id": uint64(1<<64 - 1), "medium": "GPU", "lora_name": nil,
			"group_idx": int64(0)},
		{"type": "BlockStored", "block_hashes": []any{hash(k[1])}, "parent_block_hash": hash(k[0]),
			"token_ids": ints(tokens[4:8]), "block_size": int64(4), "lora_id": nil, "medium": nil, "lora_name": nil,
			"kv_cache_spec_kind": "full_attention"},
		{"type": "BlockRemoved", "block_hashes": []any{hash(k[0]), hash(k[1])}, "medium": "DISK"},
		{"type": "BlockRemoved", "block_hashes": []any{hash(k[2])}, "medium": nil, "group_idx": int64(2)},
		{"type": "AllBlocksCleared"},
	}
	return events, want
}

// wireHash returns the wire form of a key as the tests decode it.
func wireHash(raw bool) func(prefix.Key) any {
	return func(k prefix.Key) any {
		if raw {
			return append([]byte(nil), k[:]...)
		}
		if h := Hash64(k); h <= 1<<63-1 {
			return int64(h)
		} else {
			return h
		}
	}
}

// Every field of every event, in both encodings and both hash forms, as an independent
// msgpack decoder reads them; a loss in the subscription goes out as AllBlocksCleared; the
// data-parallel rank rides in every batch.
func TestWireFormat(t *testing.T) {
	for _, enc := range []Encoding{Maps, Arrays} {
		for _, raw := range []bool{false, true} {
			t.Run(enc.String()+map[bool]string{false: "/hash64", true: "/raw"}[raw], func(t *testing.T) {
				cfg := loopback()
				cfg.DataParallelRank, cfg.Encoding, cfg.RawHashes = 3, enc, raw
				cfg.LoRANames = map[uint64]string{7: "sql-lora"} // a name for adapter 0 is refused (TestStartBadConfig)
				f, p := start(t, 8, cfg)
				assert.True(t, strings.HasPrefix(p.Addr(), "tcp://127.0.0.1:"), p.Addr())
				s := subscribe(t, p, "kv@")
				events, want := wireEvents(wireHash(raw))

				f.Publish(events...)
				require.NoError(t, p.Flush())
				seq, payload := s.recv(t, "kv@pod-1@llama")
				assert.Equal(t, uint64(0), seq)
				batch := decode(t, payload).([]any)
				require.Len(t, batch, 3, "[ts, events, data_parallel_rank]")
				assert.InDelta(t, float64(time.Now().UnixNano())/1e9, batch[0].(float64), 60)
				assert.Equal(t, int64(3), batch[2])
				got := batch[1].([]any)
				require.Len(t, got, len(want))
				for i := range want {
					if enc == Maps {
						assert.Equal(t, want[i], got[i], "event %d", i)
					} else {
						assert.Equal(t, positional(want[i]), got[i], "event %d", i)
					}
				}

				f.Publish(events[:5]...) // 5 events overflow the queue of 8 with 4 waiting
				f.Publish(events[:4]...)
				require.NoError(t, p.Flush())
				seq, payload = s.recv(t, "kv@pod-1@llama")
				assert.Equal(t, uint64(1), seq)
				clear := map[string]any{"type": "AllBlocksCleared"}
				if enc == Arrays {
					assert.Equal(t, []any{"AllBlocksCleared"}, decode(t, payload).([]any)[1].([]any)[0])
				} else {
					assert.Equal(t, clear, decode(t, payload).([]any)[1].([]any)[0])
				}
				st := p.Stats()
				assert.Equal(t, Stats{Batches: 2, Events: 8, Blocks: 8, Lost: 9, Buffered: 2}, st)

				seqs, payloads := replay(t, p, 0)
				require.Equal(t, []uint64{0, 1}, seqs)
				assert.Equal(t, payload, payloads[1], "replay sends the batch as it went out")
			})
		}
	}
}
