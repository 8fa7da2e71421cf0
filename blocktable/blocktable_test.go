package blocktable_test

import (
	"encoding/binary"
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/blocktable"
	"github.com/pagedkv/pagedkv/internal/leakcheck"
	"github.com/pagedkv/pagedkv/internal/testutil/devtest"
	"github.com/pagedkv/pagedkv/internal/testutil/gputest"
	"github.com/pagedkv/pagedkv/vmm"
)

func TestMain(m *testing.M) { leakcheck.Main(m) }

func leakCheck(t *testing.T) { leakcheck.Check(t) }

func TestVLLMRows(t *testing.T) {
	v := devtest.VLLM(t, 2, 3, 0)
	require.NoError(t, v.AppendRow([]int32{7}, 5))
	require.NoError(t, v.AppendRow([]int32{1, 2, 3}, 40))
	assert.Equal(t, []int32{7, 0, 0, 1, 2, 3}, v.Table())
	assert.Equal(t, []int32{5, 40}, v.Lens())
	err := v.AppendRow([]int32{1}, 1)
	require.ErrorIs(t, err, blocktable.ErrTooLarge)
	var se *blocktable.SizeError
	require.ErrorAs(t, err, &se)
	assert.Equal(t, 2, se.Cap)
	v.Reset()
	require.ErrorIs(t, v.AppendRow([]int32{1, 2, 3, 4}, 60), blocktable.ErrTooLarge)
	assert.Zero(t, v.Rows)
}

func TestFlashInferRows(t *testing.T) {
	f := devtest.FlashInfer(t, 3, 4, 16)
	require.NoError(t, f.AppendRow([]int32{4, 5}, 17))
	require.NoError(t, f.AppendRow([]int32{9}, 16))
	require.NoError(t, f.AppendRow(nil, 0))
	assert.Equal(t, []int32{0, 2, 3, 3}, f.Indptr)
	assert.Equal(t, []int32{4, 5, 9}, f.Indices[:f.NNZ()])
	assert.Equal(t, []int32{1, 16, 0}, f.LastPageLen)
	f.Reset()
	require.ErrorIs(t, f.AppendRow([]int32{1, 2, 3, 4, 5}, 70), blocktable.ErrTooLarge)
}

// A slot is block_id*blockTokens + offset in an int64: at the top of the int32 range it is
// exact, and a block size whose product with an int32 id could wrap is refused, dst unchanged.
func TestSlotsNeverWrap(t *testing.T) {
	const top = math.MaxInt32
	slots, err := blocktable.AppendSlots(nil, []int32{top}, blocktable.MaxTokens, top-2, top)
	require.NoError(t, err)
	assert.Equal(t, []int64{top*top + top - 2, top*top + top - 1}, slots)

	dst := []int64{7}
	for _, bt := range []int{blocktable.MaxTokens + 1, 1 << 33, math.MaxInt} {
		out, err := blocktable.AppendSlots(dst, []int32{top}, bt, 0, 1)
		require.ErrorIs(t, err, blocktable.ErrInvalidArgument, "%d tokens per block", bt)
		assert.Equal(t, []int64{7}, out, "%d tokens per block", bt)
	}
}

// A token in a null block (-1, a block freed out of a sliding window) has no slot: asking for
// one is an error naming the token and the block, never a negative slot a kernel would take as
// an address, and dst comes back unchanged.
func TestSlotsOfNullBlock(t *testing.T) {
	blocks := []int32{3, -1, 5}
	slots, err := blocktable.AppendSlots(nil, blocks, 4, 2, 4)
	require.NoError(t, err, "tokens before the null block")
	assert.Equal(t, []int64{14, 15}, slots)
	slots, err = blocktable.AppendSlots(nil, blocks, 4, 8, 10)
	require.NoError(t, err, "tokens after it")
	assert.Equal(t, []int64{20, 21}, slots)

	for _, r := range [][2]int{{4, 5}, {7, 8}, {2, 9}} {
		out, err := blocktable.AppendSlots([]int64{9}, blocks, 4, r[0], r[1])
		require.ErrorIs(t, err, blocktable.ErrInvalidArgument, "tokens [%d, %d)", r[0], r[1])
		var ce *blocktable.CountError
		require.ErrorAs(t, err, &ce)
		assert.Equal(t, -1, ce.N)
		assert.Equal(t, []int64{9}, out)
	}
}

func i32(b []byte) []int32 {
	out := make([]int32, len(b)/4)
	for i := range out {
		out[i] = int32(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return out
}

// Uploads land at addresses fixed at creation, so a captured CUDA graph sees each new batch.
func TestDeviceTablesKeepTheirAddresses(t *testing.T) {
	run := func(t *testing.T, dev vmm.Device) {
		leakcheck.Check(t)
		d, err := blocktable.NewDeviceTables(dev, 4, 8, 16)
		require.NoError(t, err)
		defer func() { require.NoError(t, d.Close()) }()
		addrs := [6]vmm.Addr{d.BlockTables, d.SeqLens, d.SlotMapping, d.Indptr, d.Indices, d.LastPageLen}
		for step := range 3 {
			v := devtest.VLLM(t, 4, 8, -1)
			require.NoError(t, v.AppendRow([]int32{int32(step), 11}, 20+step))
			require.NoError(t, d.UploadVLLM(v, []int64{int64(step*16 + 3)}))
			f := devtest.FlashInfer(t, 4, 32, 16)
			require.NoError(t, f.AppendRow([]int32{int32(step), 11}, 20+step))
			require.NoError(t, d.UploadFlashInfer(f))
			require.Equal(t, addrs, [6]vmm.Addr{d.BlockTables, d.SeqLens, d.SlotMapping, d.Indptr, d.Indices, d.LastPageLen})

			row := make([]byte, 4*8)
			require.NoError(t, dev.CopyOut(row, d.BlockTables))
			assert.Equal(t, []int32{int32(step), 11, -1, -1, -1, -1, -1, -1}, i32(row))
			lens := make([]byte, 4)
			require.NoError(t, dev.CopyOut(lens, d.SeqLens))
			assert.Equal(t, []int32{int32(20 + step)}, i32(lens))
			slot := make([]byte, 8)
			require.NoError(t, dev.CopyOut(slot, d.SlotMapping))
			assert.EqualValues(t, step*16+3, binary.LittleEndian.Uint64(slot))
			ip := make([]byte, 8)
			require.NoError(t, dev.CopyOut(ip, d.Indptr))
			assert.Equal(t, []int32{0, 2}, i32(ip))
			lp := make([]byte, 4)
			require.NoError(t, dev.CopyOut(lp, d.LastPageLen))
			assert.Equal(t, []int32{int32(4 + step)}, i32(lp))
		}
		big := devtest.VLLM(t, 4, 9, 0)
		require.ErrorIs(t, d.UploadVLLM(big, nil), blocktable.ErrTooLarge)
		_, err = blocktable.NewDeviceTables(dev, 0, 1, 1)
		require.ErrorIs(t, err, vmm.ErrInvalidArgument)
	}
	t.Run("host", func(t *testing.T) {
		dev, err := vmm.NewHostDevice(vmm.HostOptions{})
		require.NoError(t, err)
		defer dev.Close()
		run(t, dev)
	})
	t.Run("cuda", func(t *testing.T) {
		ord := gputest.Require(t)
		dev, err := vmm.NewCUDADevice(ord)
		require.NoError(t, err)
		defer dev.Close()
		run(t, dev)
	})
}

// A FlashInfer table written by hand that a kernel would read outside its rows is refused at
// upload with the entry named, and the device keeps the last good upload: kv_indptr not
// starting at 0 or going back, a kv_last_page_len outside [1, BlockTokens] (or not 0 for a row
// of no blocks).
func TestUploadFlashInferChecksRows(t *testing.T) {
	leakcheck.Check(t)
	dev, err := vmm.NewHostDevice(vmm.HostOptions{})
	require.NoError(t, err)
	defer func() { require.NoError(t, dev.Close()) }()
	d, err := blocktable.NewDeviceTables(dev, 4, 8, 16)
	require.NoError(t, err)
	defer func() { require.NoError(t, d.Close()) }()
	good := func() *blocktable.FlashInfer {
		f := devtest.FlashInfer(t, 4, 32, 16)
		require.NoError(t, f.AppendRow([]int32{3, 4}, 20))
		require.NoError(t, f.AppendRow(nil, 0))
		require.NoError(t, f.AppendRow([]int32{7}, 16))
		return f
	}
	require.NoError(t, d.UploadFlashInfer(good()))
	read := func() []int32 {
		b := make([]byte, 4*4)
		require.NoError(t, dev.CopyOut(b, d.Indptr))
		return i32(b)
	}
	require.Equal(t, []int32{0, 2, 2, 3}, read())
	for name, spoil := range map[string]func(f *blocktable.FlashInfer){
		"indptr[0]":            func(f *blocktable.FlashInfer) { f.Indptr[0] = 1 },
		"indptr going back":    func(f *blocktable.FlashInfer) { f.Indptr[2] = 1 },
		"indptr past the next": func(f *blocktable.FlashInfer) { f.Indptr[1] = 9 },
		"last page 0":          func(f *blocktable.FlashInfer) { f.LastPageLen[0] = 0 },
		"last page 17":         func(f *blocktable.FlashInfer) { f.LastPageLen[2] = 17 },
		"empty row's last":     func(f *blocktable.FlashInfer) { f.LastPageLen[1] = 1 },
	} {
		f := good()
		spoil(f)
		err := d.UploadFlashInfer(f)
		require.ErrorIs(t, err, blocktable.ErrInvalidArgument, name)
		var ce *blocktable.CountError
		require.ErrorAs(t, err, &ce, name)
		require.Equal(t, []int32{0, 2, 2, 3}, read(), "%s: the last good upload stays", name)
	}
}
