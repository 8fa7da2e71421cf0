// Package hybrid computes what a hybrid model's KV cache needs, and what the systems pagedkv is
// measured against would map for it: the yardsticks of the bench's "memory per model" section.
//
// All figures are bytes for S sequences of T tokens each, at one moment (decode at length T):
//   - Minimum: every group keeps what its layers can still read, rounded up to its own blocks:
//     full attention every token, a sliding window its last W tokens (and its sink tokens), a
//     chunked group the current chunk, a recurrent group one state; nothing else.
//   - Uniform: today's one-group Config: every layer full attention, K and V of the model's
//     widest head, 2-byte elements; a recurrent layer cannot be described (ok is false).
//   - VLLM: vLLM's hybrid allocator: layers grouped by type into groups of the smallest type's
//     layer count, or of the largest when it is under 1.25x the smallest (the last group of a
//     type padded with empty layers), every group's blocks from one pool of one page size,
//     attention block sizes raised until an attention page holds a recurrent state; windows keep
//     the blocks the window reaches. This is vLLM with its hybrid manager on, which for chunked
//     attention (Llama 4) needs VLLM_ALLOW_CHUNKED_LOCAL_ATTN_WITH_HYBRID_KV_CACHE on: its
//     default since vLLM PR #29627 (off before, when the chunked layers kept every token).
//   - Ollama: its Go engine's caches, sized for S sequences of num_ctx = T: full attention T
//     tokens; a window its memory (max(W, 4,096) where the model asks for more than the window,
//     as gpt-oss does; W otherwise, as Gemma 3's plain window cache) per sequence plus one batch
//     (512 tokens) for the cache; a chunked cache (Llama 4) every token, the chunk only masks;
//     MLA stores V (the latent without its rope part) beside K; a recurrent state (Qwen3-Next) in
//     fp32 with 32 checkpoint copies a sequence reserved beside it; no block rounding.
package hybrid

import (
	"strings"

	"github.com/pagedkv/pagedkv/kvcache"
)

// ceilDiv returns ceil(a/b) for a >= 0, b > 0.
func ceilDiv(a, b int) int { return (a + b - 1) / b }

// Reach returns the positions [from, T) a group's layers can still read at length T (beside its
// sink tokens [0, sinks) for a window).
func Reach(g kvcache.LayerGroup, tokens int) (from int) {
	switch g.Kind {
	case kvcache.SlidingWindow:
		return max(0, tokens-g.Window)
	case kvcache.ChunkedAttention:
		if tokens == 0 {
			return 0
		}
		return (tokens - 1) / g.Window * g.Window
	}
	return 0
}

// GroupBlocks returns the blocks one sequence of the group holds at length T: those that
// overlap the reach, and those of the sink tokens (none for a recurrent group).
func GroupBlocks(g kvcache.LayerGroup, tokens int) int {
	if g.Kind == kvcache.RecurrentState || tokens == 0 {
		return 0
	}
	b := g.BlockTokens
	first := Reach(g, tokens) / b
	n := ceilDiv(tokens, b) - first
	if g.Sinks > 0 {
		n += min(ceilDiv(g.Sinks, b), first) // sink blocks before the window
	}
	return n
}

// GroupBytes returns what one sequence of the group needs at length T: its blocks of all its
// layers, or its states.
func GroupBytes(g kvcache.LayerGroup, tokens int) uint64 {
	layers := uint64(len(g.Layers))
	if g.Kind == kvcache.RecurrentState {
		return layers * g.StateBytes
	}
	return uint64(GroupBlocks(g, tokens)) * uint64(g.BlockTokens) * g.TokenBytes() * layers
}

// Minimum returns the bytes S sequences of T tokens need: every group's own blocks.
func Minimum(geom kvcache.Geometry, tokens, seqs int) uint64 {
	var sum uint64
	for _, g := range geom.Groups {
		sum += GroupBytes(g, tokens)
	}
	return sum * uint64(seqs)
}

// Uniform returns what today's one-group Config maps: every layer full attention with K and V
// of the widest head at 2 bytes, in 16-token blocks. A model with recurrent layers cannot be
// described: ok is false.
func Uniform(geom kvcache.Geometry, tokens, seqs int) (bytes uint64, ok bool) {
	heads, dim := 0, 0
	for _, g := range geom.Groups {
		if g.Kind == kvcache.RecurrentState {
			return 0, false
		}
		heads, dim = max(heads, g.KVHeads), max(dim, g.KHeadDim, g.VHeadDim)
	}
	perToken := uint64(geom.Layers) * uint64(heads) * uint64(2*dim) * 2
	return uint64(ceilDiv(tokens, 16)*16) * perToken * uint64(seqs), true
}

// Ollama's sizes (ollama's kvcache/causal.go Causal.Init, model/models/*/model.go, and
// model/models/qwen3next/cache.go and checkpoints.go).
const (
	// ollamaBatch is the batch a window cache holds beside its sequences' memory (num_batch).
	ollamaBatch = 512
	// ollamaRecurrentCopies are a recurrent state and its checkpoints (checkpointCountDefault,
	// 32), all reserved for every sequence slot, each in fp32.
	ollamaRecurrentCopies = 1 + 32
)

// ollamaWindowMemory returns the tokens a sequence's window cache keeps in ollama: the memory
// size the model passes to NewSWAMemCache (gpt-oss: 4,096), or the window for NewSWACache
// (Gemma 3).
func ollamaWindowMemory(model string, window int) int {
	if strings.HasPrefix(strings.ToLower(model), "gpt-oss") {
		return max(window, 4096)
	}
	return window
}

// Ollama returns what ollama's Go engine maps for S sequences of num_ctx = T (see the package
// doc): full attention and chunked groups every token, a window its memory per sequence and
// one batch, MLA with V beside K, a recurrent state in fp32 with its checkpoints, no blocks.
func Ollama(geom kvcache.Geometry, tokens, seqs int) uint64 {
	var sum uint64
	for _, g := range geom.Groups {
		layers := uint64(len(g.Layers))
		switch g.Kind {
		case kvcache.RecurrentState:
			// The state is counted in bf16 by the preset; ollama keeps it in fp32.
			sum += layers * ollamaRecurrentCopies * 2 * g.StateBytes * uint64(seqs)
			continue
		case kvcache.SlidingWindow:
			cells := uint64(seqs) * uint64(tokens) // memory past num_ctx: the whole context
			if mem := ollamaWindowMemory(geom.Model, g.Window); mem <= tokens {
				cells = uint64(seqs)*uint64(mem) + ollamaBatch
			}
			sum += layers * cells * g.TokenBytes()
			continue
		}
		perToken := g.TokenBytes()
		if g.RopeDim > 0 { // V, the latent without its rope part, stored beside K
			perToken += uint64(g.KHeadDim-g.RopeDim) * uint64(g.DType.Size())
		}
		sum += layers * uint64(tokens) * uint64(seqs) * perToken
	}
	return sum
}

// VLLMGroupSize returns the layers of each of vLLM's KV cache groups (kv_cache_utils.py,
// _get_kv_cache_groups_uniform_page_size): the smallest type's layer count, or the largest
// type's when that is under 1.25x the smallest (fewer padding layers, e.g. 12 + 13 layers).
func VLLMGroupSize(geom kvcache.Geometry) int {
	least, most := geom.Layers, 0
	for _, g := range geom.Groups {
		least, most = min(least, len(g.Layers)), max(most, len(g.Layers))
	}
	if float64(most) < 1.25*float64(least) {
		return most
	}
	return least
}

// VLLM returns what vLLM's hybrid allocator maps (see the package doc), and the attention block
// size it settles on.
func VLLM(geom kvcache.Geometry, tokens, seqs int) (bytes uint64, blockTokens int) {
	groupSize := VLLMGroupSize(geom)
	var state uint64
	for _, g := range geom.Groups {
		if g.Kind == kvcache.RecurrentState {
			state = max(state, g.StateBytes)
		}
	}
	// One page size: an attention block of every group holds a recurrent state of one layer.
	bt := 0
	for _, g := range geom.Groups {
		if g.Kind != kvcache.RecurrentState {
			bt = max(bt, g.BlockTokens)
		}
	}
	var layerPage uint64
	for _, g := range geom.Groups {
		if g.Kind != kvcache.RecurrentState {
			layerPage = max(layerPage, uint64(bt)*g.TokenBytes())
		}
	}
	if state > layerPage && layerPage > 0 {
		perToken := layerPage / uint64(bt)
		bt = ceilDiv(int((state+perToken-1)/perToken), 16) * 16
		layerPage = uint64(bt) * perToken
	}
	layerPage = max(layerPage, state)
	var blocks uint64 // per sequence, over every group of groupSize layers
	for _, g := range geom.Groups {
		groups := uint64(ceilDiv(len(g.Layers), groupSize))
		if g.Kind == kvcache.RecurrentState {
			blocks += groups
			continue
		}
		w := g
		w.BlockTokens = bt
		blocks += groups * uint64(GroupBlocks(w, tokens))
	}
	return blocks * uint64(groupSize) * layerPage * uint64(seqs), bt
}
