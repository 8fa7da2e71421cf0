package kvcache_test

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/pyclient"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
)

// A manager keyed the vLLM way stores its blocks, and announces them in its events, under the
// block hashes vLLM computes from the same tokens (computed here in Python with hashlib and
// Debian's cbor2, by vLLM's definition): a named LoRA adapter with a cache salt, an unnamed
// adapter, the base model. A router's keys (prefix.VLLMKeys) are then accepted as Prompt.Keys.
func TestVLLMKeyedManagerMatchesVLLM(t *testing.T) {
	pyclient.Require(t, "cbor2")
	scheme := prefix.Scheme{VLLM: true, Seed: "0", LoRANames: map[uint64]string{3: "sql-lora"}}
	cfg := kvcache.Config{Layers: 1, KVHeads: 1, HeadDim: 64, ElemSize: 2, BlockTokens: 4,
		PageSize: 64 << 10, Capacity: 16 * (64 << 10), NoBackground: true, PrefixCacheBytes: 16 * (64 << 10), KeyScheme: scheme}
	m := newManager(t, hostDevice(t, 64<<10), cfg)
	events, err := m.Subscribe(1 << 10)
	require.NoError(t, err)

	type vector struct {
		Seed      string         `json:"seed"`
		LoRAName  *string        `json:"lora_name"`
		CacheSalt string         `json:"cache_salt"`
		BlockSize int            `json:"block_size"`
		Tokens    []prefix.Token `json:"tokens"`
	}
	str := func(s string) *string { return &s }
	prompts := []struct {
		ns   prefix.Namespace
		lora *string
	}{
		{prefix.Namespace{Adapter: 3, Salt: "tenant-a"}, str("sql-lora")},
		{prefix.Namespace{Adapter: 9}, str("9")},
		{prefix.Namespace{}, nil},
		{prefix.Namespace{Salt: "tenant-b"}, nil},
	}
	var vectors []vector
	var got [][]prefix.Key
	for i, p := range prompts {
		tokens := make([]prefix.Token, 23)
		for j := range tokens {
			tokens[j] = prefix.Token(1000*i + 7*j)
		}
		seq := kvcache.SeqID(i)
		hit, err := m.StartSequence(seq, kvcache.Prompt{Tokens: tokens, Namespace: p.ns})
		require.NoError(t, err)
		require.Zero(t, hit)
		_, err = m.AppendTokenIDs(seq, tokens, nil)
		require.NoError(t, err)
		var keys []prefix.Key
		for _, ev := range events.Read(nil) {
			require.Equal(t, prefix.BlockStored, ev.Kind)
			keys = append(keys, ev.Keys...)
		}
		got = append(got, keys)
		vectors = append(vectors, vector{Seed: "0", LoRAName: p.lora, CacheSalt: p.ns.Salt, BlockSize: 4, Tokens: tokens})

		// A router that follows vLLM replicas computes the same keys and hands them over.
		router := prefix.VLLMKeys(nil, prefix.VLLMNoneHash("0"), prefix.VLLMExtra{LoRAName: deref(p.lora), CacheSalt: p.ns.Salt}, 4, tokens)
		require.Equal(t, keys, router, "prompt %d: the manager's keys are the router's", i)
		hit, err = m.StartSequence(seq+100, kvcache.Prompt{Tokens: tokens, Namespace: p.ns, Keys: router})
		require.NoError(t, err)
		assert.Equal(t, 20, hit, "prompt %d: the router's keys hit every whole block but the last token's", i)
		events.Read(nil)
	}
	in, err := json.Marshal(vectors)
	require.NoError(t, err)
	var want [][]string
	require.NoError(t, json.Unmarshal(pyclient.Run(t, time.Minute, pyclient.VLLMHashPy, in), &want))
	for i := range prompts {
		require.Len(t, got[i], len(want[i]), "prompt %d", i)
		for j, k := range got[i] {
			assert.Equal(t, want[i][j], k.String(), "prompt %d block %d", i, j)
		}
	}
	require.NoError(t, m.Verify())
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// A LoRA name map that cannot mean what vLLM means is refused: a name for adapter 0 (the base
// model has none), and an empty name, which vLLM hashes as a LoRA's ([""] in the extra keys)
// while a key without a name would be the base model's, so the adapter's K/V would be served
// for base-model prompts.
func TestKeySchemeLoRANamesChecked(t *testing.T) {
	for name, names := range map[string]map[uint64]string{
		"adapter 0":  {0: "base"},
		"empty name": {3: "sql-lora", 4: ""},
	} {
		cfg := kvcache.Config{Layers: 1, KVHeads: 1, HeadDim: 64, ElemSize: 2, BlockTokens: 4,
			KeyScheme: prefix.Scheme{VLLM: true, Seed: "0", LoRANames: names}}
		var ce *kvcache.ConfigError
		require.ErrorAs(t, cfg.Validate(), &ce, name)
		require.Equal(t, "KeyScheme.LoRANames", ce.Field, name)
		require.ErrorIs(t, cfg.Validate(), kvcache.ErrInvalidArgument, name)
	}
}
