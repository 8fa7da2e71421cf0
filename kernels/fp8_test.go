package kernels_test

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kernels"
)

// fp8Spec is one fp8 format as the tests see it, written from the format's definition alone.
type fp8Spec struct {
	name       string
	mant, bias int
	maxCode    uint8 // the largest finite magnitude's code
	enc        func(float32) uint8
	dec        func(uint8) float32
}

var fp8Specs = []fp8Spec{
	{"e4m3", 3, 7, 0x7e, kernels.E4M3FromFloat32, kernels.E4M3ToFloat32},
	{"e5m2", 2, 15, 0x7b, kernels.E5M2FromFloat32, kernels.E5M2ToFloat32},
}

// value is the magnitude of a finite positive code c: (1.m) * 2^(e-bias), or 0.m * 2^(1-bias).
func (f fp8Spec) value(c uint8) float64 {
	e, m := int(c)>>f.mant, float64(int(c)&(1<<f.mant-1))/float64(int(1)<<f.mant)
	if e == 0 {
		return m * math.Pow(2, float64(1-f.bias))
	}
	return (1 + m) * math.Pow(2, float64(e-f.bias))
}

// values returns value(c) for every code c up to maxCode.
func (f fp8Spec) values() []float64 {
	v := make([]float64, f.maxCode+1)
	for c := range v {
		v[c] = f.value(uint8(c))
	}
	return v
}

// nearest is the obviously correct encoder: the finite code nearest to x, ties to the even code,
// beyond the largest finite value that value, zero and sign as the input's, NaN 0x7f. values
// is f.values().
func (f fp8Spec) nearest(values []float64, x float32) uint8 {
	if x != x {
		return 0x7f
	}
	a := math.Abs(float64(x))
	best := uint8(0)
	for c := uint8(1); c <= f.maxCode; c++ {
		d, bd := math.Abs(values[c]-a), math.Abs(values[best]-a)
		if d < bd || d == bd && c&1 == 0 {
			best = c
		}
	}
	if a > values[f.maxCode] { // saturation, infinity included
		best = f.maxCode
	}
	if math.Signbit(float64(x)) {
		best |= 0x80
	}
	return best
}

func TestFP8Edges(t *testing.T) {
	p := func(e int) float32 { return float32(math.Ldexp(1, e)) }
	nan, inf := float32(math.NaN()), float32(math.Inf(1))
	negNaN := math.Float32frombits(0xffc00000)
	e4m3 := map[float32]uint8{
		1: 0x38, -1: 0xb8, 448: 0x7e, -448: 0xfe, 240: 0x77,
		464: 0x7e, -464: 0xfe, 465: 0x7e, 1e9: 0x7e, inf: 0x7e, -inf: 0xfe, // saturate, never NaN
		p(-9): 0x01, p(-10): 0x00, -p(-10): 0x80, math.Nextafter32(p(-10), 1): 0x01, // min subnormal, tie to 0
		3 * p(-10): 0x02, 5 * p(-10): 0x02, 7 * p(-9): 0x07, 15 * p(-10): 0x08, p(-6): 0x08, // subnormal ties, min normal
		1.0625: 0x38, 1.1875: 0x3a, math.Nextafter32(1.0625, 2): 0x39, // ties to even
	}
	e5m2 := map[float32]uint8{
		1: 0x3c, -2: 0xc0, 57344: 0x7b, -57344: 0xfb, 61440: 0x7b, math.Nextafter32(61440, 0): 0x7b,
		65504: 0x7b, inf: 0x7b, -inf: 0xfb,
		p(-16): 0x01, p(-17): 0x00, -p(-17): 0x80, 3 * p(-17): 0x02, p(-14): 0x04,
		1.125: 0x3c, 1.375: 0x3e, math.Nextafter32(1.125, 2): 0x3d,
	}
	for x, want := range e4m3 {
		assert.Equal(t, want, kernels.E4M3FromFloat32(x), "e4m3 of %g", x)
	}
	for x, want := range e5m2 {
		assert.Equal(t, want, kernels.E5M2FromFloat32(x), "e5m2 of %g", x)
	}
	// Zero keeps its sign; NaN of either sign becomes 0x7f.
	for _, f := range fp8Specs {
		assert.Equal(t, uint8(0x00), f.enc(0), f.name)
		assert.Equal(t, uint8(0x80), f.enc(float32(math.Copysign(0, -1))), f.name)
		assert.Equal(t, uint8(0x7f), f.enc(nan), f.name)
		assert.Equal(t, uint8(0x7f), f.enc(negNaN), f.name)
	}
}

func TestFP8Decode(t *testing.T) {
	for _, f := range fp8Specs {
		for c := range 256 {
			b := uint8(c)
			got := f.dec(b)
			mag := b & 0x7f
			switch {
			case f.name == "e4m3" && mag == 0x7f, f.name == "e5m2" && mag > 0x7c:
				require.True(t, math.IsNaN(float64(got)), "%s %#x", f.name, b)
				continue
			case f.name == "e5m2" && mag == 0x7c:
				require.True(t, math.IsInf(float64(got), 1-2*int(b>>7)), "%s %#x", f.name, b)
				continue
			}
			want := f.value(mag)
			if b&0x80 != 0 {
				want = -want
			}
			require.Equal(t, want, float64(got), "%s %#x", f.name, b)
			require.Equal(t, b&0x80 != 0, math.Signbit(float64(got)), "%s %#x sign", f.name, b)
			require.Equal(t, b, f.enc(got), "%s %#x round-trips", f.name, b)
		}
	}
}

// The encoders agree with the nearest-value search on every fp16 value (what the cache is
// written from), on every midpoint between neighbouring fp8 values and its float32 neighbours,
// and on random float32 values of every magnitude.
func TestFP8AgainstNearest(t *testing.T) {
	r := rand.New(rand.NewPCG(8, 8))
	for _, f := range fp8Specs {
		var xs []float32
		for h := range 1 << 16 {
			xs = append(xs, kernels.HalfToFloat32(uint16(h)))
		}
		for c := uint8(0); c < f.maxCode; c++ {
			mid := float32((f.value(c) + f.value(c+1)) / 2)
			for _, x := range []float32{mid, math.Nextafter32(mid, 0), math.Nextafter32(mid, 1e9)} {
				xs = append(xs, x, -x)
			}
		}
		for range 20000 {
			xs = append(xs, math.Float32frombits(r.Uint32()), float32(math.Ldexp(2*r.Float64()-1, r.IntN(50)-25)))
		}
		values := f.values()
		for _, x := range xs {
			if got, want := f.enc(x), f.nearest(values, x); got != want {
				require.Equal(t, want, got, "%s of %g (%#x)", f.name, x, math.Float32bits(x))
			}
		}
	}
}

func TestFormat(t *testing.T) {
	for f, want := range map[kernels.Format]struct {
		name  string
		bytes int
	}{kernels.FP16: {"fp16", 2}, kernels.FP8E4M3: {"fp8_e4m3", 1}, kernels.FP8E5M2: {"fp8_e5m2", 1}, 7: {"Format(7)", 0}} {
		assert.Equal(t, want.name, f.String())
		assert.Equal(t, want.bytes, f.Bytes(), "%s", f)
	}
}
