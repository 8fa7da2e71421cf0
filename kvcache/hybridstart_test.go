package kvcache

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/sequence"
)

// A chunk group whose next token reads every block of the prompt (a prompt within one chunk)
// serves the leading run of cached blocks, as full attention does: a block missing in the
// middle ends the hit there, in every group.
func TestHybridChunkHitEndsAtTheFirstMissingBlock(t *testing.T) {
	h := newHostHybrid(t, "chunks", HybridConfig{Limit: 64 << 20, Capacity: 16 << 20, PrefixCacheBytes: 1 << 20, NoBackground: true},
		oneLayerGroup("full", 0, FullAttention, 0, 0), oneLayerGroup("chunk", 1, ChunkedAttention, 256, 0))
	p := make([]TokenID, 200) // 12 whole blocks and 8 tokens, all in the first chunk
	for i := range p {
		p[i] = TokenID(i*31 + 7)
	}
	_, err := h.AppendTokenIDs(1, p, make([][]int64, 2))
	require.NoError(t, err)
	chunk := h.groups[1]
	blocks, err := chunk.Blocks(1, nil)
	require.NoError(t, err)
	require.NoError(t, h.FreeSequence(1))
	hit, err := h.StartSequence(2, Prompt{Tokens: p})
	require.NoError(t, err)
	require.Equal(t, 192, hit, "every whole block cached")
	require.NoError(t, h.FreeSequence(2))
	h.mu.Lock()
	chunk.evictBlock(sequence.Block(blocks[5]), false)
	h.mu.Unlock()
	hit, err = h.StartSequence(3, Prompt{Tokens: p})
	require.NoError(t, err)
	require.Equal(t, 5*16, hit, "the chunk group lacks block 5, which token 192 reads")
	require.NoError(t, h.Verify())
}
