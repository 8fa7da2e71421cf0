package main

import (
	"encoding/binary"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/leakcheck"
	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/vmm"
)

func TestMain(m *testing.M) { leakcheck.Main(m) }

// The files are what check.py reads: recomputing every case from them alone, in float64 with
// check.py's mask and dequantisation, gives the kernel's output. So the format is proven before
// the GPU run, and a wrong row order, scale or mask in the files would fail here.
func TestFilesRecomputeTheOutput(t *testing.T) {
	leakcheck.Check(t)
	dev, err := vmm.NewHostDevice(vmm.HostOptions{})
	require.NoError(t, err)
	dir := t.TempDir()
	require.NoError(t, writeCases(dev, dir, cases))
	require.NoError(t, dev.Close())
	for _, want := range cases {
		t.Run(want.Name, func(t *testing.T) {
			d := filepath.Join(dir, want.Name)
			var c attnCase
			require.NoError(t, json.Unmarshal(read(t, d, "case.json"), &c))
			want.Image = string(kernels.ImageGo)
			require.Equal(t, want, c)
			worst := recompute(t, d, c)
			t.Logf("largest difference from float64: %.2g", worst)
		})
	}
}

// Each masked case has lengths below, at and above its window or chunk, and lengths that end
// inside a block, so that the GPU run covers the boundaries.
func TestCasesCoverTheBoundaries(t *testing.T) {
	for _, c := range cases {
		span := max(c.Window, c.Chunk)
		var below, at, above, partial bool
		for _, n := range c.Lens {
			below, at, above = below || n < span, at || n == span, above || n > span
			partial = partial || n%c.BlockTokens != 0
		}
		require.True(t, partial, c.Name)
		if span > 0 {
			require.True(t, below && at && above, "%s: lengths %v around %d", c.Name, c.Lens, span)
		}
	}
}

func read(t *testing.T, dir, name string) []byte {
	b, err := os.ReadFile(filepath.Join(dir, name))
	require.NoError(t, err)
	return b
}

// recompute checks out.bin against attention computed from q.bin, k.bin and v.bin and returns
// the largest difference.
func recompute(t *testing.T, d string, c attnCase) float64 {
	f, err := c.format()
	require.NoError(t, err)
	mla := c.LatentDim > 0
	tokens := 0
	for _, n := range c.Lens {
		tokens += n
	}
	rowElems := c.KVHeads * c.HeadDim
	q, out, k := read(t, d, "q.bin"), read(t, d, "out.bin"), read(t, d, "k.bin")
	v := k
	if !mla {
		v = read(t, d, "v.bin")
	}
	require.Len(t, q, 2*len(c.Lens)*c.Heads*c.HeadDim)
	require.Len(t, out, 4*len(c.Lens)*c.Heads*c.vDim())
	require.Len(t, k, f.Bytes()*tokens*rowElems)
	require.Len(t, v, len(k))
	elem := func(b []byte, i int, scale float32) float64 {
		switch f {
		case kernels.FP8E4M3:
			return float64(kernels.E4M3ToFloat32(b[i])) * float64(scale)
		case kernels.FP8E5M2:
			return float64(kernels.E5M2ToFloat32(b[i])) * float64(scale)
		}
		return float64(kernels.HalfToFloat32(binary.LittleEndian.Uint16(b[2*i:])))
	}
	vScale := c.VScale
	if mla {
		vScale = c.KScale
	}
	worst, start := 0.0, 0
	for s, L := range c.Lens {
		for h := range c.Heads {
			g := h / (c.Heads / c.KVHeads)
			acc := make([]float64, c.vDim())
			var weights []float64
			var ps []int
			mx := math.Inf(-1)
			for p := range L {
				if !attends(c, L, p) {
					continue
				}
				dot := 0.0
				for e := range c.HeadDim {
					qe := float64(kernels.HalfToFloat32(binary.LittleEndian.Uint16(q[2*((s*c.Heads+h)*c.HeadDim+e):])))
					dot += qe * elem(k, (start+p)*rowElems+g*c.HeadDim+e, c.KScale)
				}
				ps, weights = append(ps, p), append(weights, float64(c.Scale)*dot)
				mx = max(mx, float64(c.Scale)*dot)
			}
			sum := 0.0
			for i, p := range ps {
				w := math.Exp(weights[i] - mx)
				sum += w
				for e := range acc {
					acc[e] += w * elem(v, (start+p)*rowElems+g*c.HeadDim+e, vScale)
				}
			}
			for e := range acc {
				want := 0.0
				if sum > 0 {
					want = acc[e] / sum
				}
				got := float64(math.Float32frombits(binary.LittleEndian.Uint32(out[4*((s*c.Heads+h)*c.vDim()+e):])))
				worst = max(worst, math.Abs(got-want))
				require.InDelta(t, want, got, 1e-4, "sequence %d (length %d) head %d element %d", s, L, h, e)
			}
		}
		start += L
	}
	return worst
}

// attends is check.py's mask: whether the query at position L-1 sees position p.
func attends(c attnCase, L, p int) bool {
	switch {
	case c.Window > 0:
		return p >= L-c.Window || p < c.Sinks
	case c.Chunk > 0:
		return p >= (L-1)/c.Chunk*c.Chunk
	}
	return true
}
