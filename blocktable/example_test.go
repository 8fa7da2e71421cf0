package blocktable_test

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/pagedkv/pagedkv/blocktable"
	"github.com/pagedkv/pagedkv/vmm"
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

// Tables at fixed device addresses: a CUDA graph captured against BlockTables, SeqLens and
// SlotMapping stays valid while each step uploads new contents in place.
func ExampleDeviceTables() {
	dev, err := vmm.Open("host") // "cuda" on a GPU
	if err != nil {
		panic(err)
	}
	defer dev.Close()
	dt, err := blocktable.NewDeviceTables(dev, 2, 3, 8) // 2 sequences of up to 3 blocks, 8 new tokens a step
	if err != nil {
		panic(err)
	}
	defer dt.Close()
	captured := dt.BlockTables // what the graph was captured with

	t, _ := blocktable.NewVLLM(2, 3, -1) // MaxBlocks must be the DeviceTables' maxBlocks
	for step, slots := range [][]int64{{19, 32}, {20, 33}} {
		t.Reset()
		_ = t.AppendRow([]int32{0, 1}, 20+step)
		_ = t.AppendRow([]int32{2}, 1+step)
		if err := dt.UploadVLLM(t, slots); err != nil {
			panic(err)
		}
	}

	// Read the device arrays back, as the kernel sees them.
	table := make([]byte, 4*6)
	lens := make([]byte, 4*2)
	slots := make([]byte, 8*2)
	_ = dev.CopyOut(table, dt.BlockTables)
	_ = dev.CopyOut(lens, dt.SeqLens)
	_ = dev.CopyOut(slots, dt.SlotMapping)
	var row []int32
	for i := 0; i < len(table); i += 4 {
		row = append(row, int32(binary.LittleEndian.Uint32(table[i:])))
	}
	fmt.Println("same address:", dt.BlockTables == captured)
	fmt.Println("block_tables:", row)
	fmt.Println("seq_lens:", binary.LittleEndian.Uint32(lens), binary.LittleEndian.Uint32(lens[4:]),
		"slot_mapping:", binary.LittleEndian.Uint64(slots), binary.LittleEndian.Uint64(slots[8:]))
	// Output:
	// same address: true
	// block_tables: [0 1 -1 2 -1 -1]
	// seq_lens: 21 2 slot_mapping: 20 33
}
