package kernels

import (
	"fmt"
	"math"
)

// Format is the element format of a cache's K and V rows. The zero value is FP16.
type Format uint8

// The formats. The fp8 ones store each fp16 input x as fp8 of x/scale with a per-layer fp32
// scale the caller gives (vLLM's kv_cache_dtype fp8 with k_scale and v_scale). The conversion
// rounds to nearest even and saturates to the largest finite value, as CUDA's
// __nv_cvt_float_to_fp8 with __NV_SATFINITE does.
const (
	FP16    Format = iota // IEEE binary16, stored as given
	FP8E4M3               // fp8 e4m3fn: no infinity, 0x7f is NaN, finite up to ±448
	FP8E5M2               // fp8 e5m2: finite up to ±57344
)

// String names the format as vLLM's kv_cache_dtype does.
func (f Format) String() string {
	switch f {
	case FP16:
		return "fp16"
	case FP8E4M3:
		return "fp8_e4m3"
	case FP8E5M2:
		return "fp8_e5m2"
	}
	return fmt.Sprintf("Format(%d)", uint8(f))
}

// Bytes returns the bytes of one element in the format: 2 for FP16, 1 for the fp8 formats, 0 for
// a value that is no format.
func (f Format) Bytes() int {
	switch f {
	case FP16:
		return 2
	case FP8E4M3, FP8E5M2:
		return 1
	}
	return 0
}

func (f Format) fp8() bool { return f == FP8E4M3 || f == FP8E5M2 }

// encode converts x to the fp8 format f; f must be an fp8 format.
func (f Format) encode(x float32) uint8 {
	if f == FP8E4M3 {
		return E4M3FromFloat32(x)
	}
	return E5M2FromFloat32(x)
}

// decode converts an fp8 element of the format f to float32; f must be an fp8 format.
func (f Format) decode(b uint8) float32 {
	if f == FP8E4M3 {
		return E4M3ToFloat32(b)
	}
	return E5M2ToFloat32(b)
}

// E4M3FromFloat32 converts f to fp8 e4m3fn bits as __nv_cvt_float_to_fp8(f, __NV_SATFINITE,
// __NV_E4M3) does: round to nearest even, magnitudes past 448 (infinity included) saturate to
// ±448, zero keeps its sign, and NaN becomes 0x7f.
func E4M3FromFloat32(f float32) uint8 { return toFP8(f, 3, 7, 448) }

// E5M2FromFloat32 converts f to fp8 e5m2 bits as __nv_cvt_float_to_fp8(f, __NV_SATFINITE,
// __NV_E5M2) does: round to nearest even, magnitudes past 57344 (infinity included) saturate to
// ±57344, zero keeps its sign, and NaN becomes 0x7f.
func E5M2FromFloat32(f float32) uint8 { return toFP8(f, 2, 15, 57344) }

// E4M3ToFloat32 converts fp8 e4m3fn bits to float32 exactly; 0x7f and 0xff are NaN.
func E4M3ToFloat32(b uint8) float32 {
	if b&0x7f == 0x7f {
		return float32(math.NaN())
	}
	return fromFP8(b, 3, 7)
}

// E5M2ToFloat32 converts fp8 e5m2 bits to float32 exactly, infinities and NaN included.
func E5M2ToFloat32(b uint8) float32 {
	switch {
	case b&0x7f == 0x7c:
		return float32(math.Inf(1 - 2*int(b>>7)))
	case b&0x7f > 0x7c:
		return float32(math.NaN())
	}
	return fromFP8(b, 2, 15)
}

// toFP8 rounds f to the fp8 grid of mant explicit mantissa bits and exponent bias, saturating at
// maxFinite. float64 holds every step exactly: the scaling is by powers of two.
func toFP8(f float32, mant, bias int, maxFinite float64) uint8 {
	bits := math.Float32bits(f)
	if bits&0x7fffffff > 0x7f800000 {
		return 0x7f // CUDA's canonical NaN, its sign dropped
	}
	sign := uint8(bits>>24) & 0x80
	x := min(math.Abs(float64(f)), maxFinite) // what lies past the top rounds to it or saturates
	emin := 1 - bias                          // the exponent of the smallest normal
	_, e := math.Frexp(x)                     // x = frac * 2^e with frac in [0.5, 1)
	exp := max(e-1, emin)
	q := int(math.RoundToEven(math.Ldexp(x, mant-exp))) // x in units of the last place at exp
	if q == 1<<(mant+1) {                               // rounding carried into the next binade
		exp, q = exp+1, 1<<mant
	}
	if q < 1<<mant { // subnormal or zero: exponent field 0
		return sign | uint8(q)
	}
	return sign | uint8(exp+bias)<<mant | uint8(q)&(1<<mant-1)
}

// fromFP8 converts finite fp8 bits of mant mantissa bits and exponent bias to float32.
func fromFP8(b uint8, mant, bias int) float32 {
	e := int(b&0x7f) >> mant
	m := int(b) & (1<<mant - 1)
	var v float64
	if e == 0 {
		v = math.Ldexp(float64(m), 1-bias-mant)
	} else {
		v = math.Ldexp(float64(m|1<<mant), e-bias-mant)
	}
	if b&0x80 != 0 {
		v = -v
	}
	return float32(v)
}
