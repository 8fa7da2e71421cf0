// Package checked does the integer arithmetic on counts and sizes that must never wrap: each
// function reports whether the exact result fits, so callers turn an overflow into a typed
// error with the numbers instead of a silently wrong size.
package checked

import (
	"math"
	"math/bits"
)

// Mul returns a*b and whether it fits in a uint64.
func Mul(a, b uint64) (uint64, bool) {
	hi, lo := bits.Mul64(a, b)
	return lo, hi == 0
}

// Add returns a+b and whether it fits in a uint64.
func Add(a, b uint64) (uint64, bool) {
	s, carry := bits.Add64(a, b, 0)
	return s, carry == 0
}

// Over returns how far used+n exceeds limit (0 if it does not), saturating at MaxUint64
// instead of wrapping: the bytes a budget must find before it can grant n more.
func Over(used, n, limit uint64) uint64 {
	if used > limit {
		s, ok := Add(used-limit, n)
		if !ok {
			return math.MaxUint64
		}
		return s
	}
	if n > limit-used {
		return n - (limit - used)
	}
	return 0
}

// MulN multiplies every factor; ok is false if any factor is negative or the product exceeds
// max. An empty product is 1.
func MulN(max uint64, factors ...int) (uint64, bool) {
	p := uint64(1)
	for _, f := range factors {
		if f < 0 {
			return 0, false
		}
		var ok bool
		if p, ok = Mul(p, uint64(f)); !ok || p > max {
			return 0, false
		}
	}
	return p, true
}

// Int returns a*b as an int and whether it is exact and non-negative for non-negative a and b.
func Int(a, b int) (int, bool) {
	if a < 0 || b < 0 {
		return 0, false
	}
	p, ok := Mul(uint64(a), uint64(b))
	if !ok || p > math.MaxInt {
		return 0, false
	}
	return int(p), true
}

// RoundUp rounds v up to a multiple of align (> 0) and reports whether the result fits.
func RoundUp(v, align uint64) (uint64, bool) {
	if align == 0 {
		return 0, false
	}
	r := v % align
	if r == 0 {
		return v, true
	}
	return Add(v, align-r)
}
