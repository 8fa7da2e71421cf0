package kernels_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/devtest"
	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/vmm"
)

// stage maps one buffer holding each part at a 256-byte aligned offset and returns the parts'
// addresses.
func stage(t *testing.T, dev vmm.Device, parts ...[]byte) []vmm.Addr {
	t.Helper()
	total := uint64(0)
	offs := make([]uint64, len(parts))
	for i, p := range parts {
		offs[i] = total
		total += (uint64(len(p)) + 255) / 256 * 256
	}
	base := devtest.Mapped(t, dev, max(total, 1))
	addrs := make([]vmm.Addr, len(parts))
	for i, p := range parts {
		addrs[i] = base + vmm.Addr(offs[i])
		if len(p) > 0 {
			require.NoError(t, dev.CopyIn(addrs[i], p))
		}
	}
	return addrs
}

func slotBytes(slots []int64) []byte {
	b := make([]byte, 8*len(slots))
	for i, s := range slots {
		binary.LittleEndian.PutUint64(b[8*i:], uint64(s))
	}
	return b
}

// encode8 converts x to the fp8 format f with the exported encoders.
func encode8(f kernels.Format, x float32) uint8 {
	if f == kernels.FP8E4M3 {
		return kernels.E4M3FromFloat32(x)
	}
	return kernels.E5M2FromFloat32(x)
}

// halfs returns n random fp16 values in [-amp, amp].
func halfs(r *rand.Rand, n int, amp float64) []byte {
	b := make([]byte, 2*n)
	for i := range n {
		binary.LittleEndian.PutUint16(b[2*i:], kernels.HalfFromFloat32(float32(amp*(2*r.Float64()-1))))
	}
	return b
}

// isNaN8 reports whether b is a NaN of the fp8 format.
func isNaN8(f kernels.Format, b uint8) bool {
	if f == kernels.FP8E4M3 {
		return b&0x7f == 0x7f
	}
	return b&0x7f > 0x7c
}

// Every fp16 value is written as fp8 of x/scale, K and V each with their own scale, bit for bit
// what the Go encoders give (NaN as any NaN): on the GPU this checks the CUDA conversion against
// the Go one. Rows land at their slots, a padding slot writes nothing, and nothing else changes.
func TestWriteFP8(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device, k *kernels.Kernels) {
		const rowBytes, blockTokens = 512, 16 // 256 fp16 elements per input row, 256 bytes cached
		const tokens = (1 << 16) * 2 / rowBytes
		const cacheRow = rowBytes / 2
		const blockBytes = blockTokens * cacheRow
		const stride = 2*blockBytes + 256
		in := make([]byte, (tokens+1)*rowBytes) // every fp16 value, then the padding token's row of 1s
		for h := range 1 << 16 {
			binary.LittleEndian.PutUint16(in[2*h:], uint16(h))
		}
		for e := range rowBytes / 2 {
			binary.LittleEndian.PutUint16(in[tokens*rowBytes+2*e:], 0x3c00)
		}
		r := rand.New(rand.NewPCG(3, 3))
		perm := r.Perm(tokens)
		slots := make([]int64, tokens+1)
		for i := range tokens {
			slots[i] = int64(perm[i])
		}
		slots[tokens] = -1 // padding
		nblocks := tokens / blockTokens
		for _, f := range []kernels.Format{kernels.FP8E4M3, kernels.FP8E5M2} {
			for _, sc := range [][2]float32{{1, 1}, {0.37, 3.1e-3}} {
				addrs := stage(t, dev, make([]byte, nblocks*stride), in, bytes.Clone(in), slotBytes(slots))
				arena := addrs[0]
				w := kernels.KVWrite{KBase: arena, VBase: arena + blockBytes, Key: addrs[1], Value: addrs[2], SlotMapping: addrs[3],
					NumTokens: tokens + 1, RowBytes: rowBytes, BlockTokens: blockTokens, BlockStride: stride, Format: f, KScale: sc[0], VScale: sc[1]}
				require.NoError(t, k.Write(0, w))
				require.NoError(t, k.Synchronize(0))
				got := make([]byte, nblocks*stride)
				require.NoError(t, dev.CopyOut(got, arena))
				want := make([]byte, len(got))
				for i := range tokens {
					s := int(slots[i])
					for kv, scale := range sc {
						off := s/blockTokens*stride + kv*blockBytes + s%blockTokens*cacheRow
						for e := range cacheRow {
							h := binary.LittleEndian.Uint16(in[i*rowBytes+2*e:])
							want[off+e] = encode8(f, kernels.HalfToFloat32(h)/scale)
							if isNaN8(f, want[off+e]) && isNaN8(f, got[off+e]) {
								got[off+e] = want[off+e]
							}
						}
					}
				}
				require.True(t, bytes.Equal(want, got), "%s scales %v: the cache differs from the Go conversion", f, sc)
			}
		}
	})
}

// A K-only write (Value and VBase 0) writes K rows, fp16 or fp8, and leaves the rest alone; a
// padding slot writes nothing.
func TestWriteKOnly(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device, k *kernels.Kernels) {
		const rowBytes, blockTokens, nblocks = 1152, 4, 8 // MLA: 512+64 fp16 elements
		slots := []int64{9, -1, 0, 31}
		key := pattern(5, len(slots)*rowBytes)
		for _, f := range []kernels.Format{kernels.FP16, kernels.FP8E4M3} {
			row := rowBytes / 2 * uint64(f.Bytes())
			stride := blockTokens * row
			addrs := stage(t, dev, make([]byte, nblocks*stride), key, slotBytes(slots))
			w := kernels.KVWrite{KBase: addrs[0], Key: addrs[1], SlotMapping: addrs[2], NumTokens: len(slots),
				RowBytes: rowBytes, BlockTokens: blockTokens, BlockStride: stride, Format: f}
			if f != kernels.FP16 {
				w.KScale = 0.5
			}
			require.NoError(t, k.Write(0, w))
			require.NoError(t, k.Synchronize(0))
			got := make([]byte, nblocks*stride)
			require.NoError(t, dev.CopyOut(got, addrs[0]))
			want := make([]byte, len(got))
			for i, s := range slots {
				if s < 0 {
					continue
				}
				src, dst := key[i*rowBytes:(i+1)*rowBytes], want[uint64(s/blockTokens)*stride+uint64(s%blockTokens)*row:]
				if f == kernels.FP16 {
					copy(dst, src)
					continue
				}
				for e := range row {
					dst[e] = encode8(f, kernels.HalfToFloat32(binary.LittleEndian.Uint16(src[2*e:]))/0.5)
				}
			}
			require.True(t, bytes.Equal(want, got), "%s", f)
		}
		// WriteKV with value and vBase 0 is the same K-only write.
		addrs := stage(t, dev, make([]byte, nblocks*blockTokens*rowBytes), key, slotBytes(slots))
		require.NoError(t, k.WriteKV(0, addrs[0], 0, addrs[1], 0, addrs[2], len(slots), rowBytes, blockTokens, blockTokens*rowBytes))
		require.NoError(t, k.Synchronize(0))
		got := make([]byte, rowBytes)
		require.NoError(t, dev.CopyOut(got, addrs[0]+vmm.Addr(31/blockTokens*blockTokens*rowBytes+31%blockTokens*rowBytes)))
		require.Equal(t, key[3*rowBytes:], got)
	})
}

// attnCase is one attention configuration: masks, format, MLA, and the sequences' lengths.
type attnCase struct {
	name                        string
	heads, kvHeads, dim, latent int
	blockTokens                 int
	format                      kernels.Format
	window, sinks, chunk        int
	lens                        []int
	// scalesAt passes the fp8 scales as device addresses (KScaleAt, VScaleAt) to the write and
	// the attention, instead of by value.
	scalesAt bool
}

// attends is the mask, from its definition: the query at position L-1 sees p.
func (c attnCase) attends(L, p int) bool {
	switch {
	case c.window > 0:
		return p >= L-c.window || p < c.sinks
	case c.chunk > 0:
		return p/c.chunk == (L-1)/c.chunk
	}
	return true
}

// elemValue reads element i of a cache row in the case's format, from the formats'
// definitions: fp16 through HalfToFloat32 (tested on its own), fp8 from its bit fields.
func elemValue(f kernels.Format, row []byte, i int) float64 {
	if f == kernels.FP16 {
		return float64(kernels.HalfToFloat32(binary.LittleEndian.Uint16(row[2*i:])))
	}
	spec := fp8Specs[0]
	if f == kernels.FP8E5M2 {
		spec = fp8Specs[1]
	}
	v := spec.value(row[i] & 0x7f)
	if row[i]&0x80 != 0 {
		v = -v
	}
	return v
}

func TestAttentionModes(t *testing.T) {
	cases := []attnCase{
		{name: "full GQA", heads: 4, kvHeads: 2, dim: 64, blockTokens: 4, lens: []int{0, 1, 7, 37}},
		{name: "window", heads: 4, kvHeads: 2, dim: 64, blockTokens: 4, window: 8, lens: []int{1, 5, 8, 9, 37}},
		{name: "window with sinks", heads: 2, kvHeads: 1, dim: 64, blockTokens: 4, window: 8, sinks: 3, lens: []int{2, 8, 10, 11, 12, 37}},
		{name: "sinks past the window", heads: 2, kvHeads: 2, dim: 32, blockTokens: 4, window: 4, sinks: 6, lens: []int{5, 9, 10, 37}},
		{name: "chunk", heads: 4, kvHeads: 4, dim: 32, blockTokens: 4, chunk: 12, lens: []int{1, 11, 12, 13, 24, 25, 40}},
		{name: "fp8 e4m3", heads: 4, kvHeads: 2, dim: 64, blockTokens: 4, format: kernels.FP8E4M3, lens: []int{1, 13, 37}},
		{name: "fp8 e5m2 window", heads: 4, kvHeads: 2, dim: 64, blockTokens: 4, format: kernels.FP8E5M2, window: 10, lens: []int{3, 10, 37}},
		{name: "fp8 e5m2 chunk", heads: 2, kvHeads: 1, dim: 32, blockTokens: 8, format: kernels.FP8E5M2, chunk: 8, lens: []int{3, 8, 17, 37}},
		{name: "MLA", heads: 8, kvHeads: 1, dim: 72, latent: 64, blockTokens: 4, lens: []int{0, 1, 9, 37}},
		{name: "MLA 512+64 fp8 e4m3", heads: 2, kvHeads: 1, dim: 576, latent: 512, blockTokens: 16, format: kernels.FP8E4M3, lens: []int{3, 40}},
		{name: "MLA window", heads: 4, kvHeads: 1, dim: 72, latent: 64, blockTokens: 4, window: 16, sinks: 2, lens: []int{5, 40}},
		{name: "fp8 e4m3 scales in device memory", heads: 4, kvHeads: 2, dim: 64, blockTokens: 4, format: kernels.FP8E4M3, window: 10,
			lens: []int{1, 13, 37}, scalesAt: true},
		{name: "MLA fp8 e5m2 scales in device memory", heads: 2, kvHeads: 1, dim: 576, latent: 512, blockTokens: 16,
			format: kernels.FP8E5M2, lens: []int{3, 40}, scalesAt: true},
	}
	backends(t, func(t *testing.T, dev vmm.Device, k *kernels.Kernels) {
		for i, c := range cases {
			t.Run(c.name, func(t *testing.T) { checkAttentionCase(t, dev, k, c, uint64(i)) })
		}
	})
}

// checkAttentionCase writes random K and V through Write into blocks in shuffled order, runs
// PagedAttention through the block table, and compares with softmax attention computed here in
// float64 from the cache's contents, over the positions the mask allows.
func checkAttentionCase(t *testing.T, dev vmm.Device, k *kernels.Kernels, c attnCase, seed uint64) {
	r := rand.New(rand.NewPCG(seed, 11))
	mla := c.latent > 0
	esize := c.format.Bytes()
	inRow, cacheRow := 2*c.kvHeads*c.dim, esize*c.kvHeads*c.dim
	blockBytes := c.blockTokens * cacheRow
	kvs := 2
	if mla {
		kvs = 1
	}
	stride := kvs*blockBytes + 64
	var kScale, vScale float32
	if c.format != kernels.FP16 {
		kScale, vScale = 1.0/64, 1.0/32
		if mla {
			vScale = 0
		}
	}

	// Blocks: each sequence takes ceil(len/B) blocks from a shuffled list.
	numSeqs := len(c.lens)
	nblocks, maxBlocks := 2, 1
	for _, n := range c.lens {
		nblocks += (n + c.blockTokens - 1) / c.blockTokens
		maxBlocks = max(maxBlocks, (n+c.blockTokens-1)/c.blockTokens)
	}
	perm := r.Perm(nblocks)
	blocks := make([][]int, numSeqs)
	table := make([]byte, 4*numSeqs*maxBlocks)
	var slots []int64
	next := 0
	for s, n := range c.lens {
		for range (n + c.blockTokens - 1) / c.blockTokens {
			b := perm[next]
			next++
			binary.LittleEndian.PutUint32(table[4*(s*maxBlocks+len(blocks[s])):], uint32(b))
			blocks[s] = append(blocks[s], b)
		}
		for p := range n {
			slots = append(slots, int64(blocks[s][p/c.blockTokens]*c.blockTokens+p%c.blockTokens))
		}
	}
	total := len(slots)
	key, value := halfs(r, total*c.kvHeads*c.dim, 1), halfs(r, total*c.kvHeads*c.dim, 1)
	q := halfs(r, numSeqs*c.heads*c.dim, 1)
	seqLens := make([]byte, 4*numSeqs)
	for s, n := range c.lens {
		binary.LittleEndian.PutUint32(seqLens[4*s:], uint32(n))
	}
	vDim := c.dim
	if mla {
		vDim = c.latent
	}
	outLen := 4 * numSeqs * c.heads * vDim
	scales := binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(nil, math.Float32bits(kScale)), math.Float32bits(vScale))
	addrs := stage(t, dev, make([]byte, nblocks*stride), key, value, slotBytes(slots), q, table, seqLens, make([]byte, outLen), scales)
	arena := addrs[0]
	w := kernels.KVWrite{KBase: arena, VBase: arena + vmm.Addr(blockBytes), Key: addrs[1], Value: addrs[2], SlotMapping: addrs[3],
		NumTokens: total, RowBytes: uint64(inRow), BlockTokens: c.blockTokens, BlockStride: uint64(stride),
		Format: c.format, KScale: kScale, VScale: vScale}
	var kAt, vAt vmm.Addr
	if c.scalesAt {
		kAt, vAt = addrs[8], addrs[8]+4
		if mla {
			vAt = 0
		}
		w.KScale, w.VScale, w.KScaleAt, w.VScaleAt = 0, 0, kAt, vAt
	}
	if mla {
		w.VBase, w.Value = 0, 0
	}
	require.NoError(t, k.Write(0, w))
	scale := float32(0.5)
	a := kernels.Attention{Out: addrs[7], Q: addrs[4], KBase: w.KBase, VBase: w.VBase, BlockTables: addrs[5], SeqLens: addrs[6],
		NumSeqs: numSeqs, MaxBlocks: maxBlocks, NumHeads: c.heads, KVHeads: c.kvHeads, HeadDim: c.dim, BlockTokens: c.blockTokens,
		BlockStride: uint64(stride), Scale: scale, Window: c.window, Sinks: c.sinks, Chunk: c.chunk,
		Format: c.format, KScale: kScale, VScale: vScale, LatentDim: c.latent}
	if c.scalesAt {
		a.KScale, a.VScale, a.KScaleAt, a.VScaleAt = 0, 0, kAt, vAt
	}
	require.NoError(t, k.PagedAttention(0, a))
	require.NoError(t, k.Synchronize(0))
	outB := make([]byte, outLen)
	require.NoError(t, dev.CopyOut(outB, a.Out))
	cache := make([]byte, nblocks*stride)
	require.NoError(t, dev.CopyOut(cache, arena))

	// row returns the dequantised row of KV head g of token p of sequence s (kv 0: K, 1: V),
	// read from the cache at the block the test gave the token, and checks it against the input.
	tokenIndex := 0
	firstToken := make([]int, numSeqs)
	for s, n := range c.lens {
		firstToken[s] = tokenIndex
		tokenIndex += n
	}
	row := func(s, p, g, kv int) []float64 {
		off := blocks[s][p/c.blockTokens]*stride + kv*blockBytes + (p%c.blockTokens*c.kvHeads+g)*c.dim*esize
		src := key
		sc := float64(kScale)
		if kv == 1 {
			src, sc = value, float64(vScale)
		}
		out := make([]float64, c.dim)
		for d := range c.dim {
			v := elemValue(c.format, cache[off:], d)
			x := float64(kernels.HalfToFloat32(binary.LittleEndian.Uint16(src[2*((firstToken[s]+p)*c.kvHeads*c.dim+g*c.dim+d):])))
			if c.format == kernels.FP16 {
				if v != x {
					require.Equal(t, x, v, "stored fp16 element")
				}
				out[d] = v
				continue
			}
			// Round to nearest: within half a unit in the last place of x/scale (in subnormals,
			// half the smallest step).
			spec := fp8Specs[int(c.format)-1]
			y := x / sc
			ulp := math.Max(math.Abs(y)*math.Pow(2, -float64(spec.mant)), math.Pow(2, float64(1-spec.bias-spec.mant)))
			if math.Abs(v-y) > ulp/2 {
				require.LessOrEqual(t, math.Abs(v-y), ulp/2, "stored %s element %g for %g", c.format, v, y)
			}
			out[d] = v * sc
		}
		return out
	}

	worst := 0.0
	for s, L := range c.lens {
		for h := range c.heads {
			g := h / (c.heads / c.kvHeads)
			qv := make([]float64, c.dim)
			for d := range qv {
				qv[d] = float64(kernels.HalfToFloat32(binary.LittleEndian.Uint16(q[2*((s*c.heads+h)*c.dim+d):])))
			}
			var ps []int
			var scores []float64
			mx := math.Inf(-1)
			for p := range L {
				if !c.attends(L, p) {
					continue
				}
				kr := row(s, p, g, 0)
				dot := 0.0
				for d := range qv {
					dot += qv[d] * kr[d]
				}
				ps, scores = append(ps, p), append(scores, float64(scale)*dot)
				mx = max(mx, float64(scale)*dot)
			}
			want := make([]float64, vDim)
			sum := 0.0
			for i, p := range ps {
				e := math.Exp(scores[i] - mx)
				sum += e
				vr := row(s, p, g, 0) // MLA: V is the latent, the first LatentDim elements of the row
				if !mla {
					vr = row(s, p, g, 1)
				}
				for d := range want {
					want[d] += e * vr[d]
				}
			}
			for d := range want {
				if sum > 0 {
					want[d] /= sum
				}
				got := float64(math.Float32frombits(binary.LittleEndian.Uint32(outB[4*((s*c.heads+h)*vDim+d):])))
				diff := math.Abs(got - want[d])
				worst = max(worst, diff)
				require.InDelta(t, want[d], got, 1e-4*(1+math.Abs(want[d])), "sequence %d (length %d) head %d dim %d", s, L, h, d)
			}
		}
	}
	t.Logf("largest difference from float64: %.2g", worst)
}

// The masks matter: on the same data, a window or chunk gives a different output than full
// attention (so the comparison above could not pass with the mask ignored).
func TestAttentionMaskChangesOutput(t *testing.T) {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{})
	require.NoError(t, err)
	k, err := kernels.For(dev)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, k.Close()); require.NoError(t, dev.Close()) })
	const L, dim = 20, 16
	r := rand.New(rand.NewPCG(4, 4))
	key, value, q := halfs(r, L*dim, 1), halfs(r, L*dim, 1), halfs(r, dim, 1)
	out := func(window, sinks, chunk int) []byte {
		slots := make([]int64, L)
		for i := range slots {
			slots[i] = int64(i)
		}
		table := make([]byte, 4*5)
		for i := range 5 {
			binary.LittleEndian.PutUint32(table[4*i:], uint32(i))
		}
		lens := binary.LittleEndian.AppendUint32(nil, L)
		addrs := stage(t, dev, make([]byte, 5*2*4*2*dim), key, value, slotBytes(slots), q, table, lens, make([]byte, 4*dim))
		require.NoError(t, k.WriteKV(0, addrs[0], addrs[0]+4*2*dim, addrs[1], addrs[2], addrs[3], L, 2*dim, 4, 2*4*2*dim))
		require.NoError(t, k.PagedAttention(0, kernels.Attention{Out: addrs[7], Q: addrs[4], KBase: addrs[0], VBase: addrs[0] + 4*2*dim,
			BlockTables: addrs[5], SeqLens: addrs[6], NumSeqs: 1, MaxBlocks: 5, NumHeads: 1, KVHeads: 1, HeadDim: dim, BlockTokens: 4,
			BlockStride: 2 * 4 * 2 * dim, Scale: 0.5, Window: window, Sinks: sinks, Chunk: chunk}))
		b := make([]byte, 4*dim)
		require.NoError(t, dev.CopyOut(b, addrs[7]))
		return b
	}
	full := out(0, 0, 0)
	assert.Equal(t, full, out(L, 0, 0), "a window of the whole sequence is full attention")
	assert.Equal(t, full, out(4, 16, 0), "sinks that cover what the window drops give full attention")
	assert.NotEqual(t, full, out(4, 0, 0))
	assert.NotEqual(t, out(4, 0, 0), out(4, 2, 0))
	assert.NotEqual(t, full, out(0, 0, 8))
}

// Every field is validated before anything is read or launched: a combination that means
// nothing is ErrInvalidArgument naming the numbers, never a panic; the zero value of the new
// fields is accepted.
func TestAttentionInvalid(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device, k *kernels.Kernels) {
		base := kernels.Attention{Out: 0x10000, Q: 0x20000, KBase: 0x30000, VBase: 0x40000, BlockTables: 0x50000, SeqLens: 0x60000,
			NumSeqs: 0, MaxBlocks: 4, NumHeads: 8, KVHeads: 2, HeadDim: 64, BlockTokens: 16, BlockStride: 1 << 16, Scale: 0.125}
		mla := base
		mla.VBase, mla.KVHeads, mla.HeadDim, mla.LatentDim = 0, 1, 576, 512
		fp8 := base
		fp8.Format, fp8.KScale, fp8.VScale = kernels.FP8E4M3, 0.5, 0.25
		for _, ok := range []kernels.Attention{base, mla, fp8,
			with(base, func(a *kernels.Attention) { a.Window, a.Sinks = 128, 4 }),
			with(base, func(a *kernels.Attention) { a.Chunk = 8192 }),
			with(mla, func(a *kernels.Attention) { a.Format, a.KScale = kernels.FP8E5M2, 2 }),
			with(fp8, func(a *kernels.Attention) { a.KScale, a.VScale, a.KScaleAt, a.VScaleAt = 0, 0, 0x70000, 0x70004 }),
			with(mla, func(a *kernels.Attention) { a.Format, a.KScaleAt = kernels.FP8E5M2, 0x70000 }),
			with(fp8, func(a *kernels.Attention) { a.BlockStride = 16 * 2 * 64 }), // fp8 rows are half as long
		} {
			require.NoError(t, k.PagedAttention(0, ok), "%+v", ok)
		}
		nan, inf := float32(math.NaN()), float32(math.Inf(1))
		for _, c := range []struct {
			a    kernels.Attention
			says string
		}{
			{with(base, func(a *kernels.Attention) { a.Window, a.Chunk = 8, 4 }), "window 8 and chunk 4"},
			{with(base, func(a *kernels.Attention) { a.Sinks = 4 }), "4 sinks without a window"},
			{with(base, func(a *kernels.Attention) { a.Window = -1 }), "window -1"},
			{with(base, func(a *kernels.Attention) { a.Chunk = 1 << 40 }), "chunk 1099511627776"},
			{with(base, func(a *kernels.Attention) { a.Format = 3 }), "format 3"},
			{with(base, func(a *kernels.Attention) { a.KScale = 1 }), "fp16 with K scale 1"},
			{with(fp8, func(a *kernels.Attention) { a.KScale = 0 }), "K scale 0"},
			{with(fp8, func(a *kernels.Attention) { a.KScale = nan }), "K scale NaN"},
			{with(fp8, func(a *kernels.Attention) { a.VScale = -1 }), "V scale -1"},
			{with(fp8, func(a *kernels.Attention) { a.VScale = inf }), "V scale +Inf"},
			{with(mla, func(a *kernels.Attention) { a.VBase = 0x40000 }), "V base 0x40000"},
			{with(mla, func(a *kernels.Attention) { a.KVHeads, a.NumHeads = 2, 8 }), "2 KV heads"},
			{with(mla, func(a *kernels.Attention) { a.LatentDim = 600 }), "latent dim 600 in rows of 576"},
			{with(mla, func(a *kernels.Attention) { a.LatentDim = -1 }), "latent dim -1"},
			{with(mla, func(a *kernels.Attention) { a.Format, a.KScale, a.VScale = kernels.FP8E4M3, 1, 1 }), "V scale 1"},
			{with(fp8, func(a *kernels.Attention) { a.VScaleAt = 0x70000 }), "at 0x0 and 0x70000"},
			{with(mla, func(a *kernels.Attention) { a.Format, a.KScaleAt, a.VScaleAt = kernels.FP8E4M3, 0x70000, 0x70004 }), "at 0x70000 and 0x70004"},
			{with(base, func(a *kernels.Attention) { a.VBase = 0 }), "V base 0x0"},
			{with(base, func(a *kernels.Attention) { a.KBase++ }), "K base 0x30001"},
			{with(base, func(a *kernels.Attention) { a.HeadDim = 2048 }), "head dim 2048"},
			{with(base, func(a *kernels.Attention) { a.NumHeads = 7 }), "7 heads"},
			{with(base, func(a *kernels.Attention) { a.BlockStride = 2048 }), "block stride 2048: it holds 16 tokens of 2 fp16 rows of 64 elements"},
			{with(mla, func(a *kernels.Attention) { a.BlockStride = 16 * 1024 }), "block stride 16384: it holds 16 tokens of 1 fp16 rows of 576 elements"},
		} {
			err := k.PagedAttention(0, c.a)
			require.ErrorIs(t, err, vmm.ErrInvalidArgument, "%+v", c.a)
			assert.Contains(t, err.Error(), c.says)
		}
	})
}

func with[T any](v T, f func(*T)) T {
	f(&v)
	return v
}

func TestWriteInvalid(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device, k *kernels.Kernels) {
		base := kernels.KVWrite{KBase: 0x10000, VBase: 0x20000, Key: 0x30000, Value: 0x40000, SlotMapping: 0x50000,
			NumTokens: 0, RowBytes: 1024, BlockTokens: 16, BlockStride: 1 << 16}
		fp8 := with(base, func(w *kernels.KVWrite) { w.Format, w.KScale, w.VScale, w.KBase = kernels.FP8E5M2, 0.5, 0.5, 0x10008 })
		kOnly := with(base, func(w *kernels.KVWrite) { w.VBase, w.Value = 0, 0 })
		for _, ok := range []kernels.KVWrite{base, fp8, kOnly,
			with(kOnly, func(w *kernels.KVWrite) { w.Format, w.KScale = kernels.FP8E4M3, 1 }),
			with(fp8, func(w *kernels.KVWrite) { w.BlockStride = 16 * 512 }), // fp8 rows are half the input's
			with(fp8, func(w *kernels.KVWrite) { w.KScale, w.KScaleAt = 0, 0x70000 }),
			with(fp8, func(w *kernels.KVWrite) { w.KScale, w.VScale, w.KScaleAt, w.VScaleAt = 0, 0, 0x70000, 0x70004 }),
		} {
			require.NoError(t, k.Write(0, ok), "%+v", ok)
		}
		nan := float32(math.NaN())
		for _, c := range []struct {
			w    kernels.KVWrite
			says string
		}{
			{with(base, func(w *kernels.KVWrite) { w.Value = 0 }), "value 0x0 and V base 0x20000"},
			{with(base, func(w *kernels.KVWrite) { w.VBase = 0 }), "value 0x40000 and V base 0x0"},
			{with(base, func(w *kernels.KVWrite) { w.RowBytes = 100 }), "of 100 bytes"},
			{with(base, func(w *kernels.KVWrite) { w.NumTokens = -1 }), "-1 tokens"},
			{with(base, func(w *kernels.KVWrite) { w.BlockStride = 16*1024 - 16 }), "block stride 16368"},
			{with(base, func(w *kernels.KVWrite) { w.Format = 9 }), "format 9"},
			{with(base, func(w *kernels.KVWrite) { w.VScale = 1 }), "fp16 with K scale 0 and V scale 1"},
			{with(fp8, func(w *kernels.KVWrite) { w.KScale = 0 }), "K scale 0"},
			{with(fp8, func(w *kernels.KVWrite) { w.VScale = nan }), "V scale NaN"},
			{with(fp8, func(w *kernels.KVWrite) { w.KScale = -2 }), "K scale -2"},
			{with(fp8, func(w *kernels.KVWrite) { w.KBase = 0x10004 }), "K base 0x10004"},
			{with(kOnly, func(w *kernels.KVWrite) { w.Format, w.KScale, w.VScale = kernels.FP8E4M3, 1, 1 }), "V scale 1"},
			{with(base, func(w *kernels.KVWrite) { w.KBase = 0x10008 }), "K base 0x10008"},
			{with(fp8, func(w *kernels.KVWrite) { w.KScaleAt = 0x70000 }), "K scale 0.5 and V scale 0.5 (in device memory at 0x70000 and 0x0)"},
			{with(fp8, func(w *kernels.KVWrite) { w.KScale, w.KScaleAt = 0, 0x70002 }), "at 0x70002 and 0x0"},
			{with(base, func(w *kernels.KVWrite) { w.VScaleAt = 0x70000 }), "fp16 with K scale 0 and V scale 0 (in device memory at 0x0 and 0x70000)"},
			{with(kOnly, func(w *kernels.KVWrite) { w.Format, w.KScale, w.VScaleAt = kernels.FP8E4M3, 1, 0x70000 }), "at 0x0 and 0x70000"},
			{with(base, func(w *kernels.KVWrite) { w.SlotMapping = 0 }), "slot mapping 0x0"},
		} {
			err := k.Write(0, c.w)
			require.ErrorIs(t, err, vmm.ErrInvalidArgument, "%+v", c.w)
			assert.Contains(t, err.Error(), c.says)
		}
	})
}

// A slot whose block lies past the end of the address space is refused before any row is
// written: 2^52 blocks of 4 KiB wrap to block 0, where the Go implementation wrote the row. The
// CUDA kernel reads the slots only when it runs (see the report on write_kv), so this is the Go
// implementation's check.
func TestWriteSlotPastAddressSpace(t *testing.T) {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{})
	require.NoError(t, err)
	k, err := kernels.For(dev)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, k.Close()); require.NoError(t, dev.Close()) })
	const rowBytes, blockTokens, stride = 256, 4, 4 << 10
	for _, f := range []kernels.Format{kernels.FP16, kernels.FP8E5M2} {
		for _, bad := range []int64{1 << 54, math.MaxInt64} {
			slots := []int64{1, bad}
			addrs := stage(t, dev, make([]byte, 4*stride), pattern(1, 2*rowBytes), pattern(2, 2*rowBytes), slotBytes(slots))
			w := kernels.KVWrite{KBase: addrs[0], VBase: addrs[0] + stride/2, Key: addrs[1], Value: addrs[2], SlotMapping: addrs[3],
				NumTokens: len(slots), RowBytes: rowBytes, BlockTokens: blockTokens, BlockStride: stride, Format: f}
			if f != kernels.FP16 {
				w.KScale, w.VScale = 1, 1
			}
			err := k.Write(0, w)
			require.ErrorIs(t, err, vmm.ErrInvalidArgument, "%s slot %d", f, bad)
			assert.Contains(t, err.Error(), fmt.Sprintf("token 1: slot %d", bad))
			got := make([]byte, 4*stride)
			require.NoError(t, dev.CopyOut(got, addrs[0]))
			require.Equal(t, make([]byte, 4*stride), got, "%s slot %d: the cache changed", f, bad)
		}
	}
}

// A sequence longer than its table row, or a table entry that is not a block where a sequence
// attends, is refused before any output is written: the Go implementation wrote the outputs of
// the sequences before it, and read a block id whose offset wrapped (2^24 blocks of 2^40 bytes)
// as block 0. The CUDA kernel reads lengths and tables only when it runs (see the report on
// paged_attention_decode), so these are the Go implementation's checks.
func TestAttentionBadTableLeavesOut(t *testing.T) {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{})
	require.NoError(t, err)
	k, err := kernels.For(dev)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, k.Close()); require.NoError(t, dev.Close()) })
	const dim, blockTokens, maxBlocks = 16, 4, 2
	const blockBytes = blockTokens * 2 * dim
	r := rand.New(rand.NewPCG(6, 6))
	for _, c := range []struct {
		name   string
		stride uint64
		lens   [2]uint32
		second [maxBlocks]int32
		says   string
		is     error
	}{
		{"too long", 4 * blockBytes, [2]uint32{4, 9}, [maxBlocks]int32{2, 3}, "sequence 1", vmm.ErrOutOfRange},
		{"negative block", 4 * blockBytes, [2]uint32{4, 6}, [maxBlocks]int32{2, -1}, "sequence 1: table block 1 is -1", vmm.ErrInvalidArgument},
		{"block past the address space", 1 << 40, [2]uint32{4, 3}, [maxBlocks]int32{1 << 24, 3}, "sequence 1: table block 0 is 16777216", vmm.ErrInvalidArgument},
	} {
		t.Run(c.name, func(t *testing.T) {
			table := binary.LittleEndian.AppendUint32(nil, 0)
			table = binary.LittleEndian.AppendUint32(table, 1)
			for _, b := range c.second {
				table = binary.LittleEndian.AppendUint32(table, uint32(b))
			}
			lens := binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(nil, c.lens[0]), c.lens[1])
			out := pattern(7, 2*4*dim)
			addrs := stage(t, dev, halfs(r, 4*4*blockBytes/2, 1), halfs(r, 2*dim, 1), table, lens, out)
			a := kernels.Attention{Out: addrs[4], Q: addrs[1], KBase: addrs[0], VBase: addrs[0] + blockBytes,
				BlockTables: addrs[2], SeqLens: addrs[3], NumSeqs: 2, MaxBlocks: maxBlocks, NumHeads: 1, KVHeads: 1, HeadDim: dim,
				BlockTokens: blockTokens, BlockStride: c.stride, Scale: 0.25}
			err := k.PagedAttention(0, a)
			require.ErrorIs(t, err, c.is)
			assert.Contains(t, err.Error(), c.says)
			got := make([]byte, len(out))
			require.NoError(t, dev.CopyOut(got, a.Out))
			require.Equal(t, out, got, "the output changed")
		})
	}
}

// A token whose score is -Inf (a K row holding an infinity) has weight 0, also when it is the
// first attended token: the kernel takes the maximum over its tile of tokens before it weighs
// them, and the Go implementation, which weighed the first token against a maximum of -Inf, got
// exp(-Inf - -Inf), NaN, for the whole output.
func TestAttentionNegInfScore(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device, k *kernels.Kernels) {
		const dim, L, blockTokens = 8, 3, 4
		const stride = 2 * blockTokens * 2 * dim
		h := func(b []byte, f float32) []byte {
			return binary.LittleEndian.AppendUint16(b, kernels.HalfFromFloat32(f))
		}
		var key, value, q []byte
		for p := range L {
			for d := range dim {
				x := float32(d+p) / 8
				if p == 0 && d == 0 {
					x = float32(math.Inf(-1))
				}
				key, value = h(key, x), h(value, float32(p+1))
			}
		}
		for range dim {
			q = h(q, 1)
		}
		addrs := stage(t, dev, make([]byte, stride), key, value, slotBytes([]int64{0, 1, 2}), q,
			binary.LittleEndian.AppendUint32(nil, 0), binary.LittleEndian.AppendUint32(nil, L), make([]byte, 4*dim))
		require.NoError(t, k.WriteKV(0, addrs[0], addrs[0]+blockTokens*2*dim, addrs[1], addrs[2], addrs[3], L, 2*dim, blockTokens, stride))
		require.NoError(t, k.PagedAttention(0, kernels.Attention{Out: addrs[7], Q: addrs[4], KBase: addrs[0], VBase: addrs[0] + blockTokens*2*dim,
			BlockTables: addrs[5], SeqLens: addrs[6], NumSeqs: 1, MaxBlocks: 1, NumHeads: 1, KVHeads: 1, HeadDim: dim, BlockTokens: blockTokens,
			BlockStride: stride, Scale: 1}))
		require.NoError(t, k.Synchronize(0))
		out := make([]byte, 4*dim)
		require.NoError(t, dev.CopyOut(out, addrs[7]))
		// Tokens 1 and 2 score sum(d+p)/8 over d: 28/8+p; token 0 weighs nothing.
		e1, e2 := math.Exp(28.0/8+1), math.Exp(28.0/8+2)
		want := (2*e1 + 3*e2) / (e1 + e2)
		for d := range dim {
			require.InDelta(t, want, math.Float32frombits(binary.LittleEndian.Uint32(out[4*d:])), 1e-5, "dim %d", d)
		}
	})
}
