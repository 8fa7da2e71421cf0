package kernels_test

import (
	"math"
	"reflect"
	"testing"

	"github.com/pagedkv/pagedkv/internal/testutil/apitest"
	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/vmm"
)

// TestAPIProperty calls every exported function and method of kernels with extreme arguments
// (the Go implementation, on the host backend): nothing panics, every error is typed, and no
// call allocates in proportion to counts it was given rather than to memory that exists.
func TestAPIProperty(t *testing.T) {
	hostDev := func() (vmm.Device, vmm.Addr, func() error) {
		dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 32 << 10, Capacity: 64 << 20})
		if err != nil {
			panic(err)
		}
		pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: 4 * (32 << 10)})
		if err != nil {
			panic(err)
		}
		base, err := pool.Map(0, pool.Capacity())
		if err != nil {
			panic(err)
		}
		return dev, base, func() error { _ = pool.Close(); return dev.Close() }
	}
	s := &apitest.Suite{
		Dir: ".",
		Funcs: []any{kernels.For, kernels.LoadTime, kernels.HalfFromFloat32, kernels.HalfToFloat32,
			kernels.E4M3FromFloat32, kernels.E4M3ToFloat32, kernels.E5M2FromFloat32, kernels.E5M2ToFloat32},
		Types: []any{(*kernels.Kernels)(nil), (*kernels.Mark)(nil), kernels.Format(0)},
		Values: func(t reflect.Type) []apitest.Maker {
			val := func(x any) apitest.Maker {
				return func() apitest.Object { return apitest.Object{V: reflect.ValueOf(x)} }
			}
			switch t {
			case reflect.TypeFor[*kernels.Kernels]():
				return []apitest.Maker{func() apitest.Object {
					dev, _, closeDev := hostDev()
					k, err := kernels.For(dev)
					if err != nil {
						panic(err)
					}
					return apitest.Object{V: reflect.ValueOf(k), Close: func() error { _ = k.Close(); return closeDev() }}
				}, val(&kernels.Kernels{})}
			case reflect.TypeFor[vmm.Device]():
				return []apitest.Maker{func() apitest.Object {
					dev, _, closeDev := hostDev()
					return apitest.Object{V: reflect.ValueOf(&dev).Elem(), Close: closeDev}
				}}
			case reflect.TypeFor[kernels.Attention]():
				return []apitest.Maker{
					val(kernels.Attention{NumSeqs: math.MaxInt32, MaxBlocks: math.MaxInt32, NumHeads: 8, KVHeads: 8, HeadDim: 128, BlockTokens: 16, BlockStride: 1 << 20, Scale: 1}),
					val(kernels.Attention{NumSeqs: 1 << 40, MaxBlocks: 1, NumHeads: 1 << 20, KVHeads: 1, HeadDim: 1 << 20, BlockTokens: -1, BlockStride: math.MaxUint64}),
					val(kernels.Attention{NumSeqs: 1, MaxBlocks: 1, NumHeads: 1, KVHeads: 1, HeadDim: 8, BlockTokens: 1, BlockStride: 16}),
					val(kernels.Attention{Out: 1 << 40, Q: 1 << 40, KBase: 1 << 40, BlockTables: 1 << 40, SeqLens: 1 << 40, NumSeqs: 1, MaxBlocks: 1,
						NumHeads: 128, KVHeads: 1, HeadDim: 576, LatentDim: 512, BlockTokens: 64, BlockStride: 1 << 20, Window: math.MaxInt32,
						Sinks: math.MaxInt32, Format: kernels.FP8E4M3, KScale: math.MaxFloat32, Scale: float32(math.Inf(1))}),
					val(kernels.Attention{NumSeqs: 1, MaxBlocks: 1, NumHeads: 1, KVHeads: 1, HeadDim: 8, BlockTokens: 1, BlockStride: 16,
						Window: 1, Chunk: 1, Sinks: -1, Format: 255, KScale: float32(math.NaN()), LatentDim: math.MinInt}),
				}
			case reflect.TypeFor[kernels.KVWrite]():
				return []apitest.Maker{
					val(kernels.KVWrite{KBase: 1 << 40, VBase: 1 << 40, Key: 1 << 40, Value: 1 << 40, SlotMapping: 1 << 40, NumTokens: math.MaxInt32,
						RowBytes: kernels.MaxRowBytes, BlockTokens: math.MaxInt32, BlockStride: math.MaxInt64 &^ 15}),
					val(kernels.KVWrite{KBase: 16, Key: 16, SlotMapping: 8, NumTokens: 1, RowBytes: 1152, BlockTokens: 64, BlockStride: 576 * 64,
						Format: kernels.FP8E5M2, KScale: float32(math.SmallestNonzeroFloat32)}),
					val(kernels.KVWrite{KBase: 16, VBase: 16, Key: 16, SlotMapping: 8, NumTokens: 1 << 40, RowBytes: 16, BlockTokens: -1,
						Format: kernels.FP8E4M3, KScale: float32(math.Inf(1)), VScale: -1}),
				}
			case reflect.TypeFor[[]int64]():
				return []apitest.Maker{val([]int64{0, 1, 2, 3}), val([]int64{math.MinInt64, math.MaxInt64}), val([]int64{-1, 1 << 40})}
			}
			return nil
		},
		MaxCalls: 1000,
	}
	s.Check(t)
}
