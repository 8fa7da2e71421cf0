package blocktable

import (
	"fmt"

	"github.com/pagedkv/pagedkv/internal/errdefs"
)

// ErrTooLarge reports a row or batch that does not fit the table's buffers.
var ErrTooLarge = errdefs.ErrTooLarge

// SizeError reports what did not fit: Need against Cap of What. It matches ErrTooLarge.
type SizeError struct {
	What      string
	Need, Cap int
}

// Error describes the failure with its numbers.
func (e *SizeError) Error() string {
	return fmt.Sprintf("pagedkv: %s: need %d, capacity %d", e.What, e.Need, e.Cap)
}

// Is reports whether target is ErrTooLarge.
func (e *SizeError) Is(target error) bool { return target == ErrTooLarge }

// VLLM is a batch's block table in vLLM's layout. The caller owns it; NewVLLM allocates its
// buffers once and Reset/AppendRow reuse them. Rows [0, Rows) of BlockTables and SeqLens are
// valid after the appends.
type VLLM struct {
	MaxSeqs   int
	MaxBlocks int   // row stride of BlockTables (max_blocks_per_seq)
	Pad       int32 // value of unused entries of a row (vLLM uses 0 or -1)

	BlockTables []int32 // [MaxSeqs*MaxBlocks], row-major
	SeqLens     []int32 // [MaxSeqs]
	Rows        int
}

// NewVLLM allocates a table for up to maxSeqs rows of up to maxBlocks blocks.
func NewVLLM(maxSeqs, maxBlocks int, pad int32) *VLLM {
	return &VLLM{
		MaxSeqs: maxSeqs, MaxBlocks: maxBlocks, Pad: pad,
		BlockTables: make([]int32, maxSeqs*maxBlocks),
		SeqLens:     make([]int32, maxSeqs),
	}
}

// Reset empties the table without freeing its buffers.
func (t *VLLM) Reset() { t.Rows = 0 }

// AppendRow writes one sequence's blocks and length as the next row, padding the rest of the
// row. On a *SizeError the table is unchanged.
func (t *VLLM) AppendRow(blocks []int32, tokens int) error {
	if t.Rows >= t.MaxSeqs {
		return &SizeError{What: "vLLM block table rows", Need: t.Rows + 1, Cap: t.MaxSeqs}
	}
	if len(blocks) > t.MaxBlocks {
		return &SizeError{What: "vLLM block table row", Need: len(blocks), Cap: t.MaxBlocks}
	}
	row := t.BlockTables[t.Rows*t.MaxBlocks : (t.Rows+1)*t.MaxBlocks]
	n := copy(row, blocks)
	for i := n; i < len(row); i++ {
		row[i] = t.Pad
	}
	t.SeqLens[t.Rows] = int32(tokens)
	t.Rows++
	return nil
}

// Table returns the valid rows of BlockTables.
func (t *VLLM) Table() []int32 { return t.BlockTables[:t.Rows*t.MaxBlocks] }

// Lens returns the valid entries of SeqLens.
func (t *VLLM) Lens() []int32 { return t.SeqLens[:t.Rows] }

// AppendSlots appends to dst the slot of each token in [from, to) of a sequence whose blocks are
// given: block_id*blockTokens + offset, vLLM's slot_mapping.
func AppendSlots(dst []int64, blocks []int32, blockTokens, from, to int) []int64 {
	for t := from; t < to; t++ {
		dst = append(dst, int64(blocks[t/blockTokens])*int64(blockTokens)+int64(t%blockTokens))
	}
	return dst
}
