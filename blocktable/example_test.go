package blocktable_test

import (
	"errors"
	"fmt"

	"github.com/pagedkv/pagedkv/blocktable"
)

// The same batch in vLLM's and FlashInfer's layouts.
func Example() {
	seqs := []struct {
		blocks []int32
		tokens int
	}{{[]int32{4, 9}, 20}, {[]int32{2}, 16}}

	v, err := blocktable.NewVLLM(2, 3, -1)
	if err != nil {
		panic(err)
	}
	f, err := blocktable.NewFlashInfer(2, 6, 16)
	if err != nil {
		panic(err)
	}
	for _, s := range seqs {
		if err := errors.Join(v.AppendRow(s.blocks, s.tokens), f.AppendRow(s.blocks, s.tokens)); err != nil {
			panic(err)
		}
	}
	fmt.Println("block_tables", v.Table(), "seq_lens", v.Lens())
	slots, err := blocktable.AppendSlots(nil, seqs[0].blocks, 16, 16, 20)
	if err != nil {
		panic(err)
	}
	fmt.Println("slot_mapping of tokens 16..19:", slots)
	fmt.Println("kv_indptr", f.Indptr[:f.Rows+1], "kv_indices", f.Indices[:f.NNZ()], "kv_last_page_len", f.LastPageLen[:f.Rows])
	// Output:
	// block_tables [4 9 -1 2 -1 -1] seq_lens [20 16]
	// slot_mapping of tokens 16..19: [144 145 146 147]
	// kv_indptr [0 2 3] kv_indices [4 9 2] kv_last_page_len [4 16]
}
