package kvcache

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/sequence"
	"github.com/pagedkv/pagedkv/vmm"
)

// A chunk group whose next token reads every block of the prompt (a prompt within one chunk)
// serves the leading run of cached blocks, as full attention does: a block missing in the
// middle ends the hit there, in every group.
func TestHybridChunkHitEndsAtTheFirstMissingBlock(t *testing.T) {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, dev.Close()) })
	grp := func(name string, layer int, kind AttentionKind, window int) LayerGroup {
		return LayerGroup{Name: name, Layers: []int{layer}, Kind: kind, Window: window, KVHeads: 1, KHeadDim: 64,
			VHeadDim: 64, DType: F16, BlockTokens: 16}
	}
	h, err := NewHybrid(dev, HybridConfig{Geometry: Geometry{Model: "chunks", Layers: 2, Groups: []LayerGroup{
		grp("full", 0, FullAttention, 0), grp("chunk", 1, ChunkedAttention, 256),
	}}, Limit: 64 << 20, Capacity: 16 << 20, PrefixCacheBytes: 1 << 20, NoBackground: true})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, h.Close()) })
	p := make([]TokenID, 200) // 12 whole blocks and 8 tokens, all in the first chunk
	for i := range p {
		p[i] = TokenID(i*31 + 7)
	}
	_, err = h.AppendTokenIDs(1, p, make([][]int64, 2))
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
