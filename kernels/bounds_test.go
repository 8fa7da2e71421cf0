package kernels_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/vmm"
)

// A slot or table entry in a block at or past KVWrite.Blocks / Attention.Blocks (the arena's
// size) never reaches memory outside the arena. The CUDA kernels skip the slot and give the
// sequence with the bad table NaN outputs, computing the others as usual; the Go
// implementation refuses the call and changes nothing. The test maps four blocks and says the
// arena has two, so that a kernel that wrote or read past Blocks would do so visibly.
func TestBlocksBoundWrites(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device, k *kernels.Kernels) {
		_, onGPU := dev.(*vmm.CUDADevice)
		const dim, blockTokens, blocks = 16, 4, 2
		const row = 2 * dim
		const stride = 2 * blockTokens * row // K then V, one layer
		r := rand.New(rand.NewPCG(9, 9))
		arena := halfs(r, 4*stride/2, 1) // finite K and V: a NaN output can only be the bound's
		key, value := halfs(r, 3*dim, 1), halfs(r, 3*dim, 1)
		var slots []byte
		for _, s := range []int64{1, 2 * blockTokens, blockTokens + 3} { // the second is in block 2
			slots = binary.LittleEndian.AppendUint64(slots, uint64(s))
		}
		addrs := stage(t, dev, arena, key, value, slots)
		w := kernels.KVWrite{KBase: addrs[0], VBase: addrs[0] + blockTokens*row, Key: addrs[1], Value: addrs[2],
			SlotMapping: addrs[3], NumTokens: 3, RowBytes: row, BlockTokens: blockTokens, BlockStride: stride, Blocks: blocks}
		err := k.Write(0, w)
		require.NoError(t, k.Synchronize(0))
		got := make([]byte, len(arena))
		require.NoError(t, dev.CopyOut(got, addrs[0]))
		if !onGPU {
			require.ErrorIs(t, err, vmm.ErrInvalidArgument)
			require.Contains(t, err.Error(), "token 1: slot 8 in block 2: blocks are 0 to 1")
			require.Equal(t, arena, got, "a refused write changes nothing")
		} else {
			require.NoError(t, err)
			require.Equal(t, arena[2*stride:], got[2*stride:], "nothing past the arena's blocks is written")
			for i, slot := range []int{1, blockTokens + 3} { // tokens 0 and 2
				tok := []int{0, 2}[i]
				off := slot/blockTokens*stride + slot%blockTokens*row
				require.Equal(t, key[tok*row:(tok+1)*row], got[off:off+row])
				require.Equal(t, value[tok*row:(tok+1)*row], got[off+blockTokens*row:off+blockTokens*row+row])
			}
		}

		// Attention: sequence 0 reads blocks 0 and 1, sequence 1 block 1 and then block 2.
		table := binary.LittleEndian.AppendUint32(nil, 0)
		table = binary.LittleEndian.AppendUint32(table, 1)
		table = binary.LittleEndian.AppendUint32(table, 1)
		table = binary.LittleEndian.AppendUint32(table, 2)
		lens := binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(nil, 6), 6)
		out := pattern(7, 2*4*dim)
		at := stage(t, dev, halfs(r, 2*dim, 1), table, lens, out)
		a := kernels.Attention{Out: at[3], Q: at[0], KBase: addrs[0], VBase: addrs[0] + blockTokens*row, BlockTables: at[1],
			SeqLens: at[2], NumSeqs: 2, MaxBlocks: 2, NumHeads: 1, KVHeads: 1, HeadDim: dim, BlockTokens: blockTokens,
			BlockStride: stride, Scale: 0.25, Blocks: blocks}
		err = k.PagedAttention(0, a)
		require.NoError(t, k.Synchronize(0))
		res := make([]byte, len(out))
		require.NoError(t, dev.CopyOut(res, a.Out))
		if !onGPU {
			require.ErrorIs(t, err, vmm.ErrInvalidArgument)
			require.Contains(t, err.Error(), "sequence 1: table block 1 is 2: blocks are 0 to 1")
			require.Equal(t, out, res, "a refused attention writes no output")
			return
		}
		require.NoError(t, err)
		for d := range dim {
			require.True(t, math.IsNaN(float64(math.Float32frombits(binary.LittleEndian.Uint32(res[4*(dim+d):])))), "sequence 1 is NaN")
		}
		a.Blocks = 0 // unbounded: sequence 0 comes out the same, so the bound changed only sequence 1
		require.NoError(t, k.PagedAttention(0, a))
		require.NoError(t, k.Synchronize(0))
		free := make([]byte, len(out))
		require.NoError(t, dev.CopyOut(free, a.Out))
		require.True(t, bytes.Equal(free[:4*dim], res[:4*dim]), "sequence 0 as without the bound")
		require.False(t, math.IsNaN(float64(math.Float32frombits(binary.LittleEndian.Uint32(free[4*dim:])))))
	})
}

// A Blocks bound of -1, MinInt or MaxInt is ErrInvalidArgument before anything is read, on
// either call, with the number in the text; a closed Kernels is ErrClosed whatever the bound.
func TestBlocksBoundRefused(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device, k *kernels.Kernels) {
		for _, b := range []int{-1, math.MinInt, math.MaxInt} {
			w := kernels.KVWrite{KBase: 1 << 40, Key: 1 << 41, SlotMapping: 1 << 42, NumTokens: 1, RowBytes: 16,
				BlockTokens: 1, BlockStride: 16, Blocks: b}
			err := k.Write(0, w)
			require.ErrorIs(t, err, vmm.ErrInvalidArgument, "%d", b)
			require.Contains(t, err.Error(), fmt.Sprintf("%d blocks", b))
			a := kernels.Attention{Out: 1 << 40, Q: 1 << 40, KBase: 1 << 40, VBase: 1 << 41, BlockTables: 1 << 40, SeqLens: 1 << 40,
				NumSeqs: 1, MaxBlocks: 1, NumHeads: 1, KVHeads: 1, HeadDim: 8, BlockTokens: 1, BlockStride: 16, Blocks: b}
			err = k.PagedAttention(0, a)
			require.ErrorIs(t, err, vmm.ErrInvalidArgument, "%d", b)
			require.Contains(t, err.Error(), fmt.Sprintf("%d blocks", b))
		}
		require.NoError(t, k.Close())
		require.ErrorIs(t, k.Write(0, kernels.KVWrite{Blocks: -1}), vmm.ErrClosed)
		require.ErrorIs(t, k.PagedAttention(0, kernels.Attention{Blocks: math.MaxInt}), vmm.ErrClosed)
	})
}
