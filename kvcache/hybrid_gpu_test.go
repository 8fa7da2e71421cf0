package kvcache_test

import (
	"encoding/binary"
	"math"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/leakcheck"
	"github.com/pagedkv/pagedkv/internal/testutil/devtest"
	"github.com/pagedkv/pagedkv/internal/testutil/gputest"
	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// On one GPU: a 1,000,000-token request of Llama 4 Scout fits in 49 GiB (uniformly it would
// need 183 GiB and not fit), and a 128k-token Gemma 3 27B request in 10.9 GiB; K/V written
// through write_kv into one layer of each group reads back through the reference attention with
// the group's mask as attention computed here in float64.
func TestHybridLongContextOnGPU(t *testing.T) {
	ord := gputest.Require(t)
	leakcheck.Check(t)
	dev, err := vmm.NewCUDADevice(ord)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, dev.Close()) })
	for _, c := range []struct {
		model  string
		tokens int
		limit  float64 // GiB
	}{{"llama-4-scout", 1_000_000, 49}, {"gemma-3-27b", 128 << 10, 10.9}} {
		t.Run(c.model, func(t *testing.T) {
			g, err := kvcache.GeometryFor(c.model)
			require.NoError(t, err)
			h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: g, Limit: 120 << 30, NoBackground: true})
			require.NoError(t, err)
			defer func() { require.NoError(t, h.Close()) }()
			// The prompt in steps of 8,192 tokens (chunked prefill, as vLLM's scheduler feeds a
			// long prompt), then the first decoded token: a window or chunk holds what the next
			// step reads, never the whole prompt.
			dst := make([][]int64, h.Groups())
			var prompt, promptG []int64
			for done := 0; done < c.tokens; {
				n := min(8192, c.tokens-1-done)
				if done == c.tokens-1 {
					n = 1
				}
				for i := range dst {
					dst[i] = dst[i][:0]
				}
				dst, err = h.AppendTokens(1, n, dst)
				require.NoError(t, err, "after %d tokens", done)
				prompt, promptG = append(prompt, dst[0]...), append(promptG, dst[1]...)
				done += n
			}
			require.NoError(t, h.Settle()) // free pages beyond the watermark go back
			st := h.Stats()
			gib := float64(st.MappedBytes) / (1 << 30)
			t.Logf("%s, %d tokens: %.2f GiB mapped (goal %.1f); per group: %d and %d blocks held", c.model, c.tokens, gib, c.limit,
				st.Groups[0].LiveBlocks, st.Groups[1].LiveBlocks)
			require.LessOrEqual(t, gib, c.limit)
			k, err := kernels.For(dev)
			require.NoError(t, err)
			defer func() { require.NoError(t, k.Close()) }()
			for grp, slots := range [][]int64{prompt, promptG} {
				worst := writeAndAttend(t, dev, k, h, grp, slots)
				t.Logf("%s group %d (%s): max abs error %.2g against float64", c.model, grp, g.Groups[grp].Name, worst)
				require.Less(t, worst, 2e-3)
			}
		})
	}
}

// longValue is the fp16 value of element d of head hd of token pos (tag: K or V), from a hash.
func longValue(tag, pos, hd, d int) float32 {
	x := uint64(tag)<<56 ^ uint64(pos)<<20 ^ uint64(hd)<<12 ^ uint64(d)
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	return kernels.HalfToFloat32(kernels.HalfFromFloat32(float32(x>>40)/float32(1<<24) - 0.5))
}

// writeAndAttend writes the K and V of every token group grp holds (slots: every token's, in
// order) into the group's layer 0 in chunks through write_kv, runs the reference attention for
// the last token over the group's table with its mask, and returns the largest difference from
// attention computed here in float64 over the tokens the mask admits.
func writeAndAttend(t *testing.T, dev vmm.Device, k *kernels.Kernels, h *kvcache.Hybrid, grp int, slots []int64) float64 {
	m := h.Group(grp)
	c := m.Config()
	heads, dim := c.KVHeads, c.HeadDim
	row := uint64(heads * dim * 2)
	n := len(slots)
	from := 0 // the first token the group's mask admits
	switch {
	case c.Window > 0:
		from = max(0, n-c.Window)
	case c.Chunk > 0:
		from = (n - 1) / c.Chunk * c.Chunk
	}
	const chunk = 1 << 15
	stage := devtest.Mapped(t, dev, 2*chunk*row+8*chunk)
	kb, vb, sb := make([]byte, chunk*row), make([]byte, chunk*row), make([]byte, 8*chunk)
	for lo := from; lo < n; lo += chunk {
		hi := min(n, lo+chunk)
		for p := lo; p < hi; p++ {
			for hd := range heads {
				for d := range dim {
					o := uint64(p-lo)*row + uint64(hd*dim+d)*2
					binary.LittleEndian.PutUint16(kb[o:], kernels.HalfFromFloat32(longValue(0, p, hd, d)))
					binary.LittleEndian.PutUint16(vb[o:], kernels.HalfFromFloat32(longValue(1, p, hd, d)))
				}
			}
			binary.LittleEndian.PutUint64(sb[8*(p-lo):], uint64(slots[p]))
		}
		cnt := uint64(hi - lo)
		require.NoError(t, dev.CopyIn(stage, kb[:cnt*row]))
		require.NoError(t, dev.CopyIn(stage+vmm.Addr(chunk*row), vb[:cnt*row]))
		require.NoError(t, dev.CopyIn(stage+vmm.Addr(2*chunk*row), sb[:8*cnt]))
		require.NoError(t, k.Write(0, kernels.KVWrite{KBase: m.LayerBase(0, 0), VBase: m.LayerBase(0, 1), Key: stage,
			Value: stage + vmm.Addr(chunk*row), SlotMapping: stage + vmm.Addr(2*chunk*row), NumTokens: int(cnt), RowBytes: row,
			BlockTokens: c.BlockTokens, BlockStride: c.BlockStride(), Blocks: m.Layout().Blocks}))
	}
	require.NoError(t, k.Synchronize(0))

	blocks, err := m.Blocks(1, nil)
	require.NoError(t, err)
	vt := devtest.VLLM(t, 1, len(blocks), -1)
	require.NoError(t, m.ExportVLLM([]kvcache.SeqID{1}, vt))
	tables := devtest.Mapped(t, dev, uint64(4*len(blocks)+4))
	tb := make([]byte, 4*len(blocks)+4)
	for i, b := range vt.Table()[:len(blocks)] {
		binary.LittleEndian.PutUint32(tb[4*i:], uint32(b))
	}
	binary.LittleEndian.PutUint32(tb[4*len(blocks):], uint32(n))
	require.NoError(t, dev.CopyIn(tables, tb))
	q := make([]byte, 2*heads*dim)
	qf := make([]float64, heads*dim)
	for i := range qf {
		qf[i] = float64(longValue(2, 0, i/dim, i%dim))
		binary.LittleEndian.PutUint16(q[2*i:], kernels.HalfFromFloat32(float32(qf[i])))
	}
	io := devtest.Mapped(t, dev, uint64(2*len(q)+4*heads*dim))
	require.NoError(t, dev.CopyIn(io, q))
	scale := 1 / math.Sqrt(float64(dim))
	require.NoError(t, k.PagedAttention(0, kernels.Attention{Out: io + vmm.Addr(2*len(q)), Q: io, KBase: m.LayerBase(0, 0),
		VBase: m.LayerBase(0, 1), BlockTables: tables, SeqLens: tables + vmm.Addr(4*len(blocks)), NumSeqs: 1, MaxBlocks: len(blocks),
		NumHeads: heads, KVHeads: heads, HeadDim: dim, BlockTokens: c.BlockTokens, BlockStride: c.BlockStride(),
		Scale: float32(scale), Window: c.Window, Chunk: c.Chunk, Blocks: m.Layout().Blocks}))
	require.NoError(t, k.Synchronize(0))
	out := make([]byte, 4*heads*dim)
	require.NoError(t, dev.CopyOut(out, io+vmm.Addr(2*len(q))))

	worst := 0.0
	for hd := range heads {
		mx, sum := math.Inf(-1), 0.0
		scores := make([]float64, n-from)
		for p := from; p < n; p++ {
			dot := 0.0
			for d := range dim {
				dot += qf[hd*dim+d] * float64(longValue(0, p, hd, d))
			}
			scores[p-from] = dot * scale
			mx = max(mx, scores[p-from])
		}
		acc := make([]float64, dim)
		for p := from; p < n; p++ {
			w := math.Exp(scores[p-from] - mx)
			sum += w
			for d := range dim {
				acc[d] += w * float64(longValue(1, p, hd, d))
			}
		}
		for d := range dim {
			got := float64(math.Float32frombits(binary.LittleEndian.Uint32(out[4*(hd*dim+d):])))
			worst = max(worst, math.Abs(got-acc[d]/sum))
		}
	}
	return worst
}
