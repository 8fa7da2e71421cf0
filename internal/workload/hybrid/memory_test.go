package hybrid_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/workload/hybrid"
	"github.com/pagedkv/pagedkv/kvcache"
)

const gib = float64(1 << 30)

func geometry(t *testing.T, name string) kvcache.Geometry {
	g, err := kvcache.GeometryFor(name)
	require.NoError(t, err)
	return g
}

// The yardsticks give the figures the issue and FACTS.md quote from the models' configs.
func TestYardsticks(t *testing.T) {
	scout := geometry(t, "llama-4-scout")
	require.InDelta(t, 45.8, float64(hybrid.GroupBytes(scout.Groups[1], 1_000_000))/gib, 0.05, "Scout's 12 global layers at 1M tokens")
	chunk := float64(hybrid.GroupBytes(scout.Groups[0], 1_000_000)) / gib
	require.Less(t, chunk, 1.13, "Scout's 36 chunked layers hold at most one chunk of 8,192 tokens")
	u, ok := hybrid.Uniform(scout, 1_000_000, 1)
	require.True(t, ok)
	require.InDelta(t, 183, float64(u)/gib, 0.5, "uniformly Scout needs 183 GiB")

	gemma := geometry(t, "gemma-3-27b")
	require.InDelta(t, 10.4, float64(hybrid.Minimum(gemma, 128<<10, 1))/gib, 0.05, "Gemma 3 at 128k: 10.0 global + 0.4 local")
	u, _ = hybrid.Uniform(gemma, 128<<10, 1)
	require.InDelta(t, 62, float64(u)/gib, 0.1)
	require.InDelta(t, 5.95, float64(u)/float64(hybrid.Minimum(gemma, 128<<10, 1)), 0.05)
	v, bt := hybrid.VLLM(gemma, 128<<10, 1)
	require.Equal(t, 16, bt)
	// 7 groups of 10 layers (8 of them padding): the local groups keep 60 layers' windows.
	want := 10*uint64(128<<10)*8192 + 60*uint64(1024/16)*16*8192 // the window is block-aligned at 128k
	require.Equal(t, want, v)

	oss := geometry(t, "gpt-oss-120b")
	u, _ = hybrid.Uniform(oss, 128<<10, 1)
	require.InDelta(t, 2.0, float64(u)/float64(hybrid.Minimum(oss, 128<<10, 1)), 0.01)

	ds := geometry(t, "deepseek-v3")
	require.InDelta(t, 1.89, float64(hybrid.Ollama(ds, 128<<10, 1))/float64(hybrid.Minimum(ds, 128<<10, 1)), 0.01, "MLA's V beside K")

	qwen := geometry(t, "qwen3-next-80b-a3b")
	_, ok = hybrid.Uniform(qwen, 1024, 1)
	require.False(t, ok, "a recurrent state cannot be described uniformly")
	_, bt = hybrid.VLLM(qwen, 1024, 1)
	require.Equal(t, 544, bt, "vLLM raises the attention block until it holds a DeltaNet state")
	require.EqualValues(t, 36*(32*128*128*2+3*8192*2), hybrid.Minimum(qwen, 0, 1), "one state a sequence before any token")
}

// A window keeps the blocks it reaches, and its sinks.
func TestGroupBlocks(t *testing.T) {
	w := kvcache.LayerGroup{Kind: kvcache.SlidingWindow, Window: 128, BlockTokens: 16}
	require.Equal(t, 1, hybrid.GroupBlocks(w, 1))
	require.Equal(t, 8, hybrid.GroupBlocks(w, 128))
	require.Equal(t, 9, hybrid.GroupBlocks(w, 129), "positions 1..128 span blocks 0..8")
	require.Equal(t, 8, hybrid.GroupBlocks(w, 144))
	w.Sinks = 4
	require.Equal(t, 9, hybrid.GroupBlocks(w, 144), "the sink block stays")
	require.Equal(t, 8, hybrid.GroupBlocks(w, 128), "the sinks lie in the window")
	c := kvcache.LayerGroup{Kind: kvcache.ChunkedAttention, Window: 64, BlockTokens: 16}
	require.Equal(t, 4, hybrid.GroupBlocks(c, 64))
	require.Equal(t, 1, hybrid.GroupBlocks(c, 65), "a new chunk begins")
	require.Equal(t, 0, hybrid.GroupBlocks(c, 0))
}

// Ollama's caches as its Go engine sizes them: gpt-oss's windows keep 4,096 tokens (and one
// batch), Gemma 3's plain window cache its 1,024, Llama 4's chunked cache every token, and
// Qwen3-Next's recurrent state is fp32 with 32 checkpoints reserved beside it.
func TestOllama(t *testing.T) {
	oss := geometry(t, "gpt-oss-120b")
	require.EqualValues(t, 18*8192*2048+18*(4096+512)*2048, hybrid.Ollama(oss, 8192, 1))
	require.EqualValues(t, 36*2048*2048, hybrid.Ollama(oss, 2048, 1), "a window memory past num_ctx keeps the context")

	gemma := geometry(t, "gemma-3-27b")
	require.EqualValues(t, 16*10*131072*8192+52*(16*1024+512)*8192, hybrid.Ollama(gemma, 128<<10, 16))

	scout := geometry(t, "llama-4-scout")
	u, _ := hybrid.Uniform(scout, 128<<10, 1)
	require.Equal(t, u, hybrid.Ollama(scout, 128<<10, 1), "the chunked cache masks, it keeps every token")

	qwen := geometry(t, "qwen3-next-80b-a3b")
	require.EqualValues(t, 12*8192*2048+36*33*2*(32*128*128*2+3*8192*2), hybrid.Ollama(qwen, 8192, 1))
}

// vLLM's group size is the smallest type's layer count unless the largest is within 1.25x.
func TestVLLMGroupSize(t *testing.T) {
	require.Equal(t, 10, hybrid.VLLMGroupSize(geometry(t, "gemma-3-27b")))
	require.Equal(t, 12, hybrid.VLLMGroupSize(geometry(t, "llama-4-scout")))
	require.Equal(t, 18, hybrid.VLLMGroupSize(geometry(t, "gpt-oss-120b")))
	g := kvcache.Geometry{Layers: 25, Groups: []kvcache.LayerGroup{
		{Layers: make([]int, 12), Kind: kvcache.SlidingWindow, Window: 128, KVHeads: 8, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
		{Layers: make([]int, 13), Kind: kvcache.FullAttention, KVHeads: 8, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
	}}
	require.Equal(t, 13, hybrid.VLLMGroupSize(g), "12 window + 13 full layers: two groups of 13, one padding layer")
	v, _ := hybrid.VLLM(g, 1024, 1)
	require.EqualValues(t, (8+64)*13*16*2048, v)
}
