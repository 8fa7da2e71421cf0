package blocktable

// FlashInfer is a batch's paged-KV table in FlashInfer's CSR layout. The caller owns it;
// NewFlashInfer allocates its buffers once. After the appends, Indptr[:Rows+1],
// Indices[:Indptr[Rows]] and LastPageLen[:Rows] are valid.
type FlashInfer struct {
	BlockTokens int

	Indptr      []int32 // [maxSeqs+1]
	Indices     []int32 // [maxBlocks] over the whole batch
	LastPageLen []int32 // [maxSeqs]; 1..BlockTokens (0 for an empty sequence)
	Rows        int
}

// NewFlashInfer allocates a table for up to maxSeqs sequences holding maxBlocks blocks together.
func NewFlashInfer(maxSeqs, maxBlocks, blockTokens int) *FlashInfer {
	return &FlashInfer{
		BlockTokens: blockTokens,
		Indptr:      make([]int32, maxSeqs+1),
		Indices:     make([]int32, maxBlocks),
		LastPageLen: make([]int32, maxSeqs),
	}
}

// Reset empties the table without freeing its buffers.
func (f *FlashInfer) Reset() { f.Rows = 0 }

// AppendRow adds one sequence. On a *SizeError the table is unchanged.
func (f *FlashInfer) AppendRow(blocks []int32, tokens int) error {
	if f.Rows+1 >= len(f.Indptr) {
		return &SizeError{What: "FlashInfer sequences", Need: f.Rows + 1, Cap: len(f.Indptr) - 1}
	}
	start := int(f.Indptr[f.Rows])
	if start+len(blocks) > len(f.Indices) {
		return &SizeError{What: "FlashInfer kv_indices", Need: start + len(blocks), Cap: len(f.Indices)}
	}
	copy(f.Indices[start:], blocks)
	f.Indptr[f.Rows+1] = int32(start + len(blocks))
	last := int32(0)
	if tokens > 0 {
		last = int32((tokens-1)%f.BlockTokens + 1)
	}
	f.LastPageLen[f.Rows] = last
	f.Rows++
	return nil
}

// NNZ returns the number of valid entries of Indices.
func (f *FlashInfer) NNZ() int { return int(f.Indptr[f.Rows]) }
