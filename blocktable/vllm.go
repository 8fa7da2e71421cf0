package blocktable

import (
	"fmt"
	"math"

	"github.com/pagedkv/pagedkv/internal/checked"
	"github.com/pagedkv/pagedkv/internal/errdefs"
)

// Sentinel errors; the same values in every pagedkv package. Match them with errors.Is.
var (
	ErrTooLarge        = errdefs.ErrTooLarge
	ErrInvalidArgument = errdefs.ErrInvalidArgument
	ErrClosed          = errdefs.ErrClosed
)

// MaxEntries bounds the entries one table may hold (rows times row stride for vLLM, block ids
// for FlashInfer): 2^28 int32s, 1 GiB, far beyond any batch (vLLM's defaults make 1024 x 8192
// = 2^23), and small enough that asking for more fails with ErrTooLarge instead of exhausting
// memory.
const MaxEntries = 1 << 28

// MaxTokens is the most tokens a row may describe: seq_lens and kv_last_page_len are int32.
const MaxTokens = math.MaxInt32

// MaxSlots bounds the slots one AppendSlots call writes (16M, 128 MiB of int64): a step's
// slot_mapping holds a batch's new tokens, thousands to tens of thousands.
const MaxSlots = 1 << 24

// CountError reports a count that is negative or larger than allowed; it matches
// ErrInvalidArgument. It is the same type as kvcache.CountError.
type CountError = errdefs.CountError

// SizeError reports what did not fit: Need against Cap of What. It matches ErrTooLarge.
type SizeError struct {
	What      string
	Need, Cap int
}

// Error describes the failure with its numbers.
func (e *SizeError) Error() string {
	if e == nil {
		return "<nil>"
	}
	return fmt.Sprintf("%s: need %d, capacity %d", e.What, e.Need, e.Cap)
}

// Is reports whether target is ErrTooLarge.
func (e *SizeError) Is(target error) bool { return e != nil && target == ErrTooLarge }

// entries returns a*b when both are non-negative and the product is at most MaxEntries.
func entries(what string, a, b int) (int, error) {
	if a < 0 {
		return 0, &CountError{What: what, N: a}
	}
	if b < 0 {
		return 0, &CountError{What: what, N: b}
	}
	n, ok := checked.MulN(MaxEntries, a, b)
	if !ok {
		return 0, &SizeError{What: what + " (entries)", Need: -1, Cap: MaxEntries}
	}
	return int(n), nil
}

// VLLM is a batch's block table in vLLM's layout. The caller owns it; NewVLLM allocates its
// buffers once and Reset/AppendRow reuse them. Rows [0, Rows) of BlockTables and SeqLens are
// valid after the appends. A VLLM whose fields were set by hand is checked on every AppendRow:
// buffers shorter than MaxSeqs x MaxBlocks get ErrInvalidArgument, never a panic.
type VLLM struct {
	MaxSeqs   int
	MaxBlocks int   // row stride of BlockTables (max_blocks_per_seq)
	Pad       int32 // value of unused entries of a row (vLLM uses 0 or -1)

	BlockTables []int32 // [MaxSeqs*MaxBlocks], row-major
	SeqLens     []int32 // [MaxSeqs]
	Rows        int
}

// NewVLLM allocates a table for up to maxSeqs rows of up to maxBlocks blocks. Negative sizes
// are a *CountError (ErrInvalidArgument); more than MaxEntries entries a *SizeError
// (ErrTooLarge).
func NewVLLM(maxSeqs, maxBlocks int, pad int32) (*VLLM, error) {
	n, err := entries("vLLM table", maxSeqs, maxBlocks)
	if err != nil {
		return nil, fmt.Errorf("blocktable: new vLLM table %d x %d: %w", maxSeqs, maxBlocks, err)
	}
	if maxSeqs > MaxEntries {
		return nil, fmt.Errorf("blocktable: new vLLM table: %w", &SizeError{What: "vLLM rows", Need: maxSeqs, Cap: MaxEntries})
	}
	return &VLLM{
		MaxSeqs: maxSeqs, MaxBlocks: maxBlocks, Pad: pad,
		BlockTables: make([]int32, n),
		SeqLens:     make([]int32, maxSeqs),
	}, nil
}

// Reset empties the table without freeing its buffers. A nil table stays nil.
func (t *VLLM) Reset() {
	if t != nil {
		t.Rows = 0
	}
}

// check reports whether the table's fields describe buffers that hold rows + more rows.
func (t *VLLM) check(more int) error {
	if t == nil {
		return fmt.Errorf("%w: nil vLLM table", ErrInvalidArgument)
	}
	if t.Rows < 0 || t.MaxBlocks < 0 || t.MaxSeqs < 0 {
		return fmt.Errorf("%w: vLLM table with %d rows of %d, stride %d", ErrInvalidArgument, t.Rows, t.MaxSeqs, t.MaxBlocks)
	}
	if t.Rows+more > t.MaxSeqs {
		return &SizeError{What: "vLLM block table rows", Need: t.Rows + more, Cap: t.MaxSeqs}
	}
	need, ok := checked.MulN(math.MaxInt, t.Rows+more, t.MaxBlocks)
	if !ok || uint64(len(t.BlockTables)) < need || len(t.SeqLens) < t.Rows+more {
		return fmt.Errorf("%w: vLLM buffers of %d and %d entries cannot hold %d rows of stride %d (make tables with NewVLLM)",
			ErrInvalidArgument, len(t.BlockTables), len(t.SeqLens), t.Rows+more, t.MaxBlocks)
	}
	return nil
}

// AppendRow writes one sequence's blocks and length as the next row, padding the rest of the
// row. A full table or a row longer than MaxBlocks is a *SizeError (ErrTooLarge); a negative
// length or one over MaxTokens a *CountError. On any error the table is unchanged.
func (t *VLLM) AppendRow(blocks []int32, tokens int) error {
	if err := t.check(1); err != nil {
		return fmt.Errorf("blocktable: vLLM row: %w", err)
	}
	if len(blocks) > t.MaxBlocks {
		return fmt.Errorf("blocktable: vLLM row: %w", &SizeError{What: "blocks of the row", Need: len(blocks), Cap: t.MaxBlocks})
	}
	if tokens < 0 || tokens > MaxTokens {
		return fmt.Errorf("blocktable: vLLM row: %w", &CountError{What: "sequence length", N: tokens, Max: MaxTokens})
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

// Table returns the valid rows of BlockTables (nil if the fields are inconsistent).
func (t *VLLM) Table() []int32 {
	if t.check(0) != nil {
		return nil
	}
	return t.BlockTables[:t.Rows*t.MaxBlocks]
}

// Lens returns the valid entries of SeqLens (nil if the fields are inconsistent).
func (t *VLLM) Lens() []int32 {
	if t.check(0) != nil {
		return nil
	}
	return t.SeqLens[:t.Rows]
}

// AppendSlots appends to dst the slot of each token in [from, to) of a sequence whose blocks are
// given: block_id*blockTokens + offset, vLLM's slot_mapping. A range the blocks do not hold
// (past their end, or in a negative id such as a null block's -1), or a blockTokens that is not positive or over MaxTokens, is an error matching
// ErrInvalidArgument, more than MaxSlots slots a *SizeError (ErrTooLarge); dst comes back
// unchanged. The bound on blockTokens keeps every slot within an int64: an int32 block id times
// a larger block size would wrap.
func AppendSlots(dst []int64, blocks []int32, blockTokens, from, to int) ([]int64, error) {
	if blockTokens <= 0 || blockTokens > MaxTokens || from < 0 || from > to {
		return dst, fmt.Errorf("blocktable: slots [%d, %d) with %d tokens per block: %w", from, to, blockTokens, ErrInvalidArgument)
	}
	if to-from > MaxSlots {
		return dst, fmt.Errorf("blocktable: %w", &SizeError{What: "slots of one call", Need: to - from, Cap: MaxSlots})
	}
	if to > from && (to-1)/blockTokens >= len(blocks) {
		held, ok := checked.Int(len(blocks), blockTokens)
		if !ok {
			held = math.MaxInt
		}
		return dst, fmt.Errorf("blocktable: slots of %d blocks: %w", len(blocks), &CountError{What: "token", N: to, Max: held})
	}
	for i := from / blockTokens; to > from && i <= (to-1)/blockTokens; i++ {
		if blocks[i] < 0 { // a null block (-1) or padding: its tokens have no slot
			return dst, fmt.Errorf("blocktable: slots: token %d in block %d: %w", max(from, i*blockTokens), i,
				&CountError{What: "block id", N: int(blocks[i]), Max: math.MaxInt32})
		}
	}
	for t := from; t < to; t++ {
		dst = append(dst, int64(blocks[t/blockTokens])*int64(blockTokens)+int64(t%blockTokens))
	}
	return dst, nil
}
