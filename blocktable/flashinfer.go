package blocktable

import (
	"fmt"

	"github.com/pagedkv/pagedkv/sequence"
)

// FlashInfer is a batch's paged-KV table in FlashInfer's CSR layout. The caller owns it;
// NewFlashInfer allocates its buffers once. After the appends, Indptr[:Rows+1],
// Indices[:Indptr[Rows]] and LastPageLen[:Rows] are valid. A FlashInfer whose fields were set
// by hand is checked on every AppendRow, never trusted.
type FlashInfer struct {
	BlockTokens int

	Indptr      []int32 // [maxSeqs+1]
	Indices     []int32 // [maxBlocks] over the whole batch
	LastPageLen []int32 // [maxSeqs]; 1..BlockTokens (0 for an empty sequence)
	Rows        int
}

// NewFlashInfer allocates a table for up to maxSeqs sequences holding maxBlocks blocks together.
// Negative sizes or a blockTokens that is not positive (or over MaxTokens) are a *CountError
// (ErrInvalidArgument); more than MaxEntries entries a *SizeError (ErrTooLarge).
func NewFlashInfer(maxSeqs, maxBlocks, blockTokens int) (*FlashInfer, error) {
	if _, err := entries("FlashInfer sequences", maxSeqs, 1); err != nil {
		return nil, fmt.Errorf("blocktable: new FlashInfer table: %w", err)
	}
	if _, err := entries("FlashInfer kv_indices", maxBlocks, 1); err != nil {
		return nil, fmt.Errorf("blocktable: new FlashInfer table: %w", err)
	}
	if maxSeqs >= MaxEntries {
		return nil, fmt.Errorf("blocktable: new FlashInfer table: %w", &SizeError{What: "FlashInfer sequences", Need: maxSeqs, Cap: MaxEntries - 1})
	}
	if blockTokens <= 0 || blockTokens > MaxTokens {
		return nil, fmt.Errorf("blocktable: new FlashInfer table: %w", &CountError{What: "tokens per block", N: blockTokens, Max: MaxTokens})
	}
	return &FlashInfer{
		BlockTokens: blockTokens,
		Indptr:      make([]int32, maxSeqs+1),
		Indices:     make([]int32, maxBlocks),
		LastPageLen: make([]int32, maxSeqs),
	}, nil
}

// Reset empties the table without freeing its buffers. A nil table stays nil.
func (f *FlashInfer) Reset() {
	if f != nil {
		f.Rows = 0
	}
}

// check reports whether the fields describe a consistent table of Rows rows with room for more.
func (f *FlashInfer) check(more int) error {
	if f == nil {
		return fmt.Errorf("%w: nil FlashInfer table", ErrInvalidArgument)
	}
	if f.Rows < 0 || f.BlockTokens <= 0 || f.BlockTokens > MaxTokens || len(f.Indptr) == 0 ||
		len(f.LastPageLen) < len(f.Indptr)-1 || f.Rows >= len(f.Indptr) {
		return fmt.Errorf("%w: FlashInfer table with %d rows, %d tokens per block, buffers %d/%d/%d (make tables with NewFlashInfer)",
			ErrInvalidArgument, f.Rows, f.BlockTokens, len(f.Indptr), len(f.Indices), len(f.LastPageLen))
	}
	if start := f.Indptr[f.Rows]; start < 0 || int(start) > len(f.Indices) {
		return fmt.Errorf("%w: kv_indptr[%d] = %d outside kv_indices of %d", ErrInvalidArgument, f.Rows, start, len(f.Indices))
	}
	if f.Rows+more >= len(f.Indptr) {
		return &SizeError{What: "FlashInfer sequences", Need: f.Rows + more, Cap: len(f.Indptr) - 1}
	}
	return nil
}

// checkRows checks what a table written by hand may break and a kernel reads unchecked:
// kv_indptr starts at 0 and never decreases, and each row's kv_last_page_len is in
// [1, BlockTokens] (0 for a row of no blocks). f.check(0) passed. A bad entry is a *CountError
// (ErrInvalidArgument) naming it.
func (f *FlashInfer) checkRows() error {
	if f.Indptr[0] != 0 {
		return &CountError{What: "kv_indptr[0]", N: int(f.Indptr[0]), Max: 0}
	}
	for i := range f.Rows {
		start, end := f.Indptr[i], f.Indptr[i+1]
		if end < start {
			return &CountError{What: fmt.Sprintf("kv_indptr[%d] after %d", i+1, start), N: int(end), Max: int(f.Indptr[f.Rows])}
		}
		empty := end == start
		if last := f.LastPageLen[i]; empty && last != 0 || !empty && (last < 1 || last > int32(f.BlockTokens)) {
			return &CountError{What: fmt.Sprintf("kv_last_page_len[%d] of a row of %d blocks", i, end-start), N: int(last), Max: f.BlockTokens}
		}
	}
	return nil
}

// AppendRow adds one sequence: blocks must be exactly the blocks tokens need
// (ceil(tokens/BlockTokens)), since kv_last_page_len is counted from the last one; anything
// else is a *CountError. A full table is a *SizeError (ErrTooLarge). On any error the table is
// unchanged.
func (f *FlashInfer) AppendRow(blocks []int32, tokens int) error {
	if err := f.check(1); err != nil {
		return fmt.Errorf("blocktable: FlashInfer row: %w", err)
	}
	if tokens < 0 || tokens > MaxTokens || sequence.BlocksFor(tokens, f.BlockTokens) != len(blocks) {
		return fmt.Errorf("blocktable: FlashInfer row of %d blocks of %d tokens: %w", len(blocks), f.BlockTokens,
			&CountError{What: "sequence length", N: tokens, Max: min(MaxTokens, len(blocks)*f.BlockTokens)})
	}
	start := int(f.Indptr[f.Rows])
	if len(blocks) > len(f.Indices)-start {
		return fmt.Errorf("blocktable: FlashInfer row: %w", &SizeError{What: "kv_indices", Need: start + len(blocks), Cap: len(f.Indices)})
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

// NNZ returns the number of valid entries of Indices (0 if the fields are inconsistent).
func (f *FlashInfer) NNZ() int {
	if f.check(0) != nil {
		return 0
	}
	return int(f.Indptr[f.Rows])
}
