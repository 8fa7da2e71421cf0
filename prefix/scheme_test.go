package prefix

import (
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A Keyer computes pagedkv's chain under the zero Scheme and vLLM's under a VLLM one, the
// namespace mapped to vLLM's extra keys: the adapter's LoRA name on every block (its decimal id
// when unnamed), the salt on the first block only.
func TestKeyerSchemes(t *testing.T) {
	tokens := make([]Token, 40)
	for i := range tokens {
		tokens[i] = Token(i*37 + 1)
	}
	ns := Namespace{Adapter: 3, Salt: "tenant-a"}
	assert.Equal(t, Keys(nil, ns, 8, tokens), NewKeyer(Scheme{}).Keys(nil, ns, 8, tokens))
	assert.Equal(t, Keys(nil, ns, 8, tokens), (*Keyer)(nil).Keys(nil, ns, 8, tokens), "a nil Keyer is the zero Scheme")

	k := NewKeyer(Scheme{VLLM: true, Seed: "0", LoRANames: map[uint64]string{3: "sql-lora"}})
	none := VLLMNoneHash("0")
	assert.Equal(t, none, k.Root(ns, 8))
	assert.Equal(t, VLLMKeys(nil, none, VLLMExtra{LoRAName: "sql-lora", CacheSalt: "tenant-a"}, 8, tokens), k.Keys(nil, ns, 8, tokens))
	assert.Equal(t, VLLMKeys(nil, none, VLLMExtra{LoRAName: "9"}, 8, tokens), k.Keys(nil, Namespace{Adapter: 9}, 8, tokens), "an unnamed adapter")
	assert.Equal(t, VLLMKeys(nil, none, VLLMExtra{}, 8, tokens), k.Keys(nil, Namespace{}, 8, tokens), "the base model")
	assert.NotEqual(t, k.Keys(nil, Namespace{Salt: "a"}, 8, tokens)[0], k.Keys(nil, Namespace{Salt: "b"}, 8, tokens)[0], "salts separate")
	assert.NotEqual(t, k.Keys(nil, Namespace{Salt: "a"}, 8, tokens)[1], k.Keys(nil, Namespace{Salt: "b"}, 8, tokens)[1], "and so does the chain after them")
	var x Keyer
	x.Next(ns, 0, Key{}, tokens[:8])
	k.Next(Namespace{Adapter: 9}, 0, Key{}, tokens[:8])
	assert.Zero(t, testing.AllocsPerRun(50, func() {
		x.Next(ns, 1, Key{}, tokens[:8])
		k.Next(Namespace{Adapter: 9, Salt: "s"}, 0, Key{}, tokens[:8])
	}), "a warm Keyer allocates nothing")
}

// A Keyer names the adapters missing from LoRANames once each, and keeps a bounded number of
// those names: a manager's Keyer lives as long as the manager, and the adapter ids come from
// its callers' prompts, so one name kept per id ever seen would grow without end.
func TestKeyerNamesBounded(t *testing.T) {
	k := NewKeyer(Scheme{VLLM: true, Seed: "0"})
	tokens := []Token{1, 2, 3, 4}
	none := VLLMNoneHash("0")
	for a := uint64(1); a <= 4*maxNamed; a++ {
		ns := Namespace{Adapter: a}
		want := VLLMKeys(nil, none, VLLMExtra{LoRAName: strconv.FormatUint(a, 10)}, 4, tokens)
		require.Equal(t, want, k.Keys(nil, ns, 4, tokens), "adapter %d", a)
		require.LessOrEqual(t, len(k.named), maxNamed, "adapter %d", a)
	}
	k.Next(Namespace{Adapter: 7}, 0, Key{}, tokens)
	assert.Zero(t, testing.AllocsPerRun(50, func() { k.Next(Namespace{Adapter: 7}, 0, Key{}, tokens) }),
		"an adapter named since the last clearing allocates nothing")
}
