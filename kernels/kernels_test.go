package kernels_test

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"math"
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/cuda"
	"github.com/pagedkv/pagedkv/internal/leakcheck"
	"github.com/pagedkv/pagedkv/internal/testutil/devtest"
	"github.com/pagedkv/pagedkv/internal/testutil/gputest"
	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/vmm"
)

func TestMain(m *testing.M) { leakcheck.Main(m) }

func sha(t *testing.T, path string) string {
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// The embedded PTX and cubins must have been made from the kernels.cu in the tree: regenerate
// them with scripts/gen-kernels on the GPU machine when this fails.
func TestGeneratedFilesAreFresh(t *testing.T) {
	f, err := os.Open("gen/MANIFEST")
	require.NoError(t, err)
	defer f.Close()
	outputs := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		w := strings.Fields(sc.Text())
		switch {
		case len(w) >= 4 && w[0] == "source":
			require.Equal(t, w[3], sha(t, "kernels.cu"), "kernels.cu changed since gen/ was made: run scripts/gen-kernels")
		case len(w) >= 4 && w[0] == "output":
			require.Equal(t, w[3], sha(t, "gen/"+w[1]), "gen/%s does not match MANIFEST", w[1])
			outputs++
		}
	}
	assert.Equal(t, 3, outputs)
	ptx, err := os.ReadFile("gen/kernels.ptx")
	require.NoError(t, err)
	first, _, _ := bytes.Cut(ptx, []byte("\n"))
	assert.Contains(t, string(first), sha(t, "kernels.cu"), "the PTX header names its source hash")
	assert.Contains(t, string(first), "nvcc -ptx")
}

func TestHalf(t *testing.T) {
	cases := map[float32]uint16{0: 0, 1: 0x3c00, -2: 0xc000, 65504: 0x7bff, 0.5: 0x3800,
		float32(math.Ldexp(1, -24)): 0x0001, float32(math.Ldexp(1, -14)): 0x0400, 1e-9: 0, 70000: 0x7c00,
		1 + float32(math.Ldexp(1, -11)): 0x3c00, 1 + 3*float32(math.Ldexp(1, -11)): 0x3c02}
	for f, h := range cases {
		assert.Equal(t, h, kernels.HalfFromFloat32(f), "%g", f)
	}
	for h := range 0x7c00 { // every finite positive half round-trips
		f := kernels.HalfToFloat32(uint16(h))
		require.Equal(t, uint16(h), kernels.HalfFromFloat32(f), "%#x -> %g", h, f)
		require.Equal(t, uint16(h)|0x8000, kernels.HalfFromFloat32(-f))
	}
	assert.True(t, math.IsNaN(float64(kernels.HalfToFloat32(kernels.HalfFromFloat32(float32(math.NaN()))))))
}

// backends runs fn on the host (the Go implementation) and on the GPU (the CUDA kernels).
func backends(t *testing.T, fn func(t *testing.T, dev vmm.Device, k *kernels.Kernels)) {
	run := func(t *testing.T, dev vmm.Device) {
		k, err := kernels.For(dev)
		require.NoError(t, err)
		t.Cleanup(func() { // after the pools the test maps (cleanups run last-in first-out)
			require.NoError(t, k.Close())
			require.NoError(t, dev.Close())
		})
		fn(t, dev, k)
	}
	t.Run("host", func(t *testing.T) {
		leakcheck.Check(t)
		dev, err := vmm.NewHostDevice(vmm.HostOptions{})
		require.NoError(t, err)
		run(t, dev)
	})
	t.Run("cuda", func(t *testing.T) {
		ord := gputest.Require(t)
		leakcheck.Check(t)
		dev, err := vmm.NewCUDADevice(ord)
		require.NoError(t, err)
		run(t, dev)
	})
}

func pattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func TestCopyBlocks(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device, k *kernels.Kernels) {
		const stride, nblocks = 64 << 10, 64
		base := devtest.Mapped(t, dev, stride*nblocks)
		for b := range nblocks {
			require.NoError(t, dev.CopyIn(base+vmm.Addr(b*stride), pattern(uint64(b), stride)))
		}
		pairs := []int64{3, 40, 0, 63, 17, 18, 5, 6} // 5->6 reads a block another pair does not write
		require.NoError(t, k.CopyBlocks(0, base, pairs, stride))
		require.NoError(t, k.Synchronize(0))
		want := map[int]uint64{40: 3, 63: 0, 18: 17, 6: 5}
		got := make([]byte, stride)
		for b := range nblocks {
			src, moved := want[b]
			if !moved {
				src = uint64(b)
			}
			require.NoError(t, dev.CopyOut(got, base+vmm.Addr(b*stride)))
			require.True(t, bytes.Equal(pattern(src, stride), got), "block %d", b)
		}
		require.ErrorIs(t, k.CopyBlocks(0, base, []int64{1}, stride), vmm.ErrInvalidArgument)
		require.ErrorIs(t, k.CopyBlocks(0, base, pairs, 100), vmm.ErrInvalidArgument)
	})
}

// Copies queued back to back on two streams that do not wait for each other each copy their own
// pairs: the second does not overwrite the pairs the first still reads.
func TestCopyBlocksOnTwoStreams(t *testing.T) {
	ord := gputest.Require(t)
	leakcheck.Check(t)
	dev, err := vmm.NewCUDADevice(ord)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, dev.Close()) }) // last: after the mapping below is gone
	k, err := kernels.For(dev)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, k.Close()) })
	ctx := dev.Context()
	var streams [2]cuda.Stream
	for i := range streams {
		streams[i], err = ctx.StreamCreate(cuda.StreamNonBlocking)
		require.NoError(t, err)
		defer ctx.StreamDestroy(streams[i])
	}
	const stride, n = 64 << 10, 2048 // the first copy moves 128 MiB: long enough to overlap
	base := devtest.Mapped(t, dev, 4*n*stride)
	for b := range 4 * n {
		require.NoError(t, dev.Memset(base+vmm.Addr(b*stride), byte(b%251), stride))
	}
	pairs := func(from int) []int64 { // blocks [from, from+n) to [from+n, from+2n)
		p := make([]int64, 0, 2*n)
		for i := range n {
			p = append(p, int64(from+i), int64(from+n+i))
		}
		return p
	}
	require.NoError(t, k.CopyBlocks(kernels.Stream(streams[0]), base, pairs(0), stride))
	require.NoError(t, k.CopyBlocks(kernels.Stream(streams[1]), base, pairs(2*n), stride))
	for _, s := range streams {
		require.NoError(t, k.Synchronize(kernels.Stream(s)))
	}
	got := make([]byte, 16)
	for _, from := range []int{0, 2 * n} {
		for i := range n {
			require.NoError(t, dev.CopyOut(got, base+vmm.Addr((from+n+i)*stride+stride-16)))
			require.Equal(t, bytes.Repeat([]byte{byte((from + i) % 251)}, 16), got, "block %d", from+n+i)
		}
	}
}

func TestWriteKV(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device, k *kernels.Kernels) {
		const tokenBytes, blockTokens, layers = 256, 4, 2
		const blockBytes = tokenBytes * blockTokens
		const stride = 2 * layers * blockBytes
		arena := devtest.Mapped(t, dev, 16*stride)
		require.NoError(t, dev.Memset(arena, 0, 16*stride))
		slots := []int64{5, -1, 12, 0, 63}
		n := len(slots)
		stage := devtest.Mapped(t, dev, uint64(2*n*tokenBytes+8*n))
		key, value, slotAddr := stage, stage+vmm.Addr(n*tokenBytes), stage+vmm.Addr(2*n*tokenBytes)
		require.NoError(t, dev.CopyIn(key, pattern(1, n*tokenBytes)))
		require.NoError(t, dev.CopyIn(value, pattern(2, n*tokenBytes)))
		sb := make([]byte, 8*n)
		for i, s := range slots {
			binary.LittleEndian.PutUint64(sb[8*i:], uint64(s))
		}
		require.NoError(t, dev.CopyIn(slotAddr, sb))
		const layer = 1
		kBase, vBase := arena+vmm.Addr(2*layer*blockBytes), arena+vmm.Addr((2*layer+1)*blockBytes)
		require.NoError(t, k.WriteKV(0, kBase, vBase, key, value, slotAddr, n, tokenBytes, blockTokens, stride))
		require.NoError(t, k.Synchronize(0))
		got := make([]byte, tokenBytes)
		written := 0
		for i, s := range slots {
			if s < 0 {
				continue
			}
			off := vmm.Addr(s/blockTokens*stride + s%blockTokens*tokenBytes)
			require.NoError(t, dev.CopyOut(got, kBase+off))
			require.Equal(t, pattern(1, n*tokenBytes)[i*tokenBytes:(i+1)*tokenBytes], got, "K of token %d", i)
			require.NoError(t, dev.CopyOut(got, vBase+off))
			require.Equal(t, pattern(2, n*tokenBytes)[i*tokenBytes:(i+1)*tokenBytes], got, "V of token %d", i)
			written++
		}
		// Nothing else changed: the arena holds exactly 2*written non-zero token rows.
		all := make([]byte, 16*stride)
		require.NoError(t, dev.CopyOut(all, arena))
		rows := 0
		for r := 0; r < len(all); r += tokenBytes {
			if !bytes.Equal(all[r:r+tokenBytes], make([]byte, tokenBytes)) {
				rows++
			}
		}
		assert.Equal(t, 2*written, rows)
		require.ErrorIs(t, k.WriteKV(0, kBase, vBase, key, value, slotAddr, 1, 100, 4, stride), vmm.ErrInvalidArgument)
	})
}

func TestModuleLoadedOncePerContext(t *testing.T) {
	ord := gputest.Require(t)
	dev, err := vmm.NewCUDADevice(ord)
	require.NoError(t, err)
	defer dev.Close()
	a, err := kernels.For(dev)
	require.NoError(t, err)
	b, err := kernels.For(dev)
	require.NoError(t, err)
	assert.Equal(t, kernels.ImageSM90, a.Image(), "an H100 runs the sm_90 cubin")
	assert.True(t, kernels.SameModule(a, b))
	require.NoError(t, a.Close())
	require.NoError(t, b.Close())
	for _, img := range []kernels.Image{kernels.ImageSM90, kernels.ImagePTX} {
		require.NoError(t, kernels.LoadTime(dev, img), "%s loads", img)
	}
}

// The copy kernel loads and stores 16 bytes at a time from base and reads the pairs as int64: a
// base not aligned to 16 (or 0) and pairs not aligned to 8 are refused before anything is copied,
// on the host as on the GPU, where the launch would fault with a misaligned address.
func TestCopyBlocksMisaligned(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device, k *kernels.Kernels) {
		const stride = 4 << 10
		base := devtest.Mapped(t, dev, 8*stride)
		for b := range 8 {
			require.NoError(t, dev.CopyIn(base+vmm.Addr(b*stride), pattern(uint64(b), stride)))
		}
		pairs := stage(t, dev, slotBytes([]int64{0, 1}), slotBytes([]int64{0, 1}))
		for _, c := range []struct {
			err  error
			says string
		}{
			{k.CopyBlocks(0, base+8, []int64{0, 1}, stride), "base 0x"},
			{k.CopyBlocks(0, 0, []int64{0, 1}, stride), "base 0x0"},
			{k.CopyBlocksDevice(0, base+8, pairs[0], 1, stride), "base 0x"},
			{k.CopyBlocksDevice(0, base, pairs[1]+4, 1, stride), "pairs 0x"},
			{k.CopyBlocksDevice(0, base, 0, 1, stride), "pairs 0x0"},
		} {
			require.ErrorIs(t, c.err, vmm.ErrInvalidArgument)
			assert.Contains(t, c.err.Error(), c.says)
		}
		got := make([]byte, 8*stride)
		require.NoError(t, dev.CopyOut(got, base))
		for b := range 8 {
			require.Equal(t, pattern(uint64(b), stride), got[b*stride:(b+1)*stride], "block %d", b)
		}
	})
}

// A block id that is negative, or whose block lies past the end of the address space (its
// offset wrapped to a block in the arena before), is refused before any pair is copied: on the
// GPU the kernel would copy at the wrapped address.
func TestCopyBlocksBadID(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device, k *kernels.Kernels) {
		const stride = 4 << 10
		const pairs = 4097 // the Go implementation of CopyBlocksDevice reads 4096 pairs at a time
		base := devtest.Mapped(t, dev, 2*pairs*stride)
		want := pattern(1, 2*pairs*stride)
		require.NoError(t, dev.CopyIn(base, want))
		inDevice := make([]int64, 0, 2*pairs)
		for i := range pairs - 1 {
			inDevice = append(inDevice, int64(i), int64(pairs+i))
		}
		for _, c := range []struct {
			bad  [2]int64
			says string
		}{
			{[2]int64{-1, 2}, "block -1"},
			{[2]int64{3, math.MinInt64}, "block -9223372036854775808"},
			{[2]int64{1 << 52, 2}, "block 4503599627370496"}, // 2^52 * 4 KiB wraps to 0: block 0
			{[2]int64{3, math.MaxInt64}, "block 9223372036854775807"},
		} {
			err := k.CopyBlocks(0, base, []int64{0, 1, c.bad[0], c.bad[1]}, stride)
			require.ErrorIs(t, err, vmm.ErrInvalidArgument, "%v", c.bad)
			assert.Contains(t, err.Error(), c.says)
			if k.Image() == kernels.ImageGo { // the kernel cannot see pairs in device memory before it runs
				pairsAt := stage(t, dev, slotBytes(append(inDevice, c.bad[0], c.bad[1])))[0]
				err = k.CopyBlocksDevice(0, base, pairsAt, pairs, stride)
				require.ErrorIs(t, err, vmm.ErrInvalidArgument, "%v", c.bad)
				assert.Contains(t, err.Error(), c.says)
			}
			got := make([]byte, len(want))
			require.NoError(t, dev.CopyOut(got, base))
			require.True(t, bytes.Equal(want, got), "%v: the arena changed", c.bad)
		}
	})
}

// A closed Kernels refuses every operation with ErrClosed. On a GPU it has given its module up:
// it must not fall back to the Go implementation, which copies synchronously on the null stream
// and ignores the caller's stream order.
func TestClosedKernels(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device, k *kernels.Kernels) {
		const stride = 4 << 10
		base := devtest.Mapped(t, dev, 2*stride)
		require.NoError(t, dev.CopyIn(base, pattern(1, 2*stride)))
		require.NoError(t, k.Close())
		require.ErrorIs(t, k.CopyBlocks(0, base, []int64{0, 1}, stride), vmm.ErrClosed)
		require.ErrorIs(t, k.CopyBlocksDevice(0, base, base, 1, stride), vmm.ErrClosed)
		require.ErrorIs(t, k.WriteKV(0, base, 0, base+stride, 0, base+stride, 1, 16, 1, 16), vmm.ErrClosed)
		require.ErrorIs(t, k.PagedAttention(0, kernels.Attention{Out: base, Q: base, KBase: base, VBase: base, BlockTables: base, SeqLens: base,
			NumSeqs: 1, MaxBlocks: 1, NumHeads: 1, KVHeads: 1, HeadDim: 8, BlockTokens: 1, BlockStride: 16}), vmm.ErrClosed)
		require.ErrorIs(t, k.Synchronize(0), vmm.ErrClosed)
		_, err := k.Mark(0)
		require.ErrorIs(t, err, vmm.ErrClosed)
		got := make([]byte, 2*stride)
		require.NoError(t, dev.CopyOut(got, base))
		require.Equal(t, pattern(1, 2*stride), got)
		require.NoError(t, k.Close(), "closing twice is a no-op")
	})
}

// A Mark made before its Kernels is closed can still be waited for, queried and closed.
func TestMarkOutlivesKernels(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device, k *kernels.Kernels) {
		mk, err := k.Mark(0)
		require.NoError(t, err)
		require.NoError(t, k.Close())
		require.NoError(t, mk.Wait())
		done, err := mk.Done()
		require.NoError(t, err)
		assert.True(t, done)
		require.NoError(t, mk.Close())
	})
}
