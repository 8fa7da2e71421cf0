package blocktable_test

import (
	"math"
	"reflect"
	"testing"

	"github.com/pagedkv/pagedkv/blocktable"
	"github.com/pagedkv/pagedkv/internal/testutil/apitest"
	"github.com/pagedkv/pagedkv/vmm"
)

// copyOf returns a deep copy of a table's fields, so that a failed call can be seen to change
// nothing.
func copyOf[T any](p *T) any {
	v := reflect.ValueOf(p).Elem()
	out := reflect.New(v.Type()).Elem()
	for i := range v.NumField() {
		f := v.Field(i)
		if f.Kind() == reflect.Slice && !f.IsNil() {
			c := reflect.MakeSlice(f.Type(), f.Len(), f.Len())
			reflect.Copy(c, f)
			out.Field(i).Set(c)
		} else if out.Field(i).CanSet() {
			out.Field(i).Set(f)
		}
	}
	return out.Interface()
}

func apiValues(t reflect.Type) []apitest.Maker {
	val := func(x any) apitest.Maker {
		return func() apitest.Object { return apitest.Object{V: reflect.ValueOf(x)} }
	}
	switch t {
	case reflect.TypeFor[*blocktable.VLLM]():
		table := func(seqs, blocks int) apitest.Maker {
			return func() apitest.Object {
				v, err := blocktable.NewVLLM(seqs, blocks, -1)
				if err != nil {
					panic(err)
				}
				if seqs > 1 {
					_ = v.AppendRow([]int32{1, 2}, 20)
				}
				return apitest.Object{V: reflect.ValueOf(v), State: func() any { return copyOf(v) }}
			}
		}
		return []apitest.Maker{table(4, 4), table(1, 1), table(0, 0),
			val(&blocktable.VLLM{MaxSeqs: 9, MaxBlocks: 9}),
			val(&blocktable.VLLM{MaxSeqs: 2, MaxBlocks: 2, Rows: math.MaxInt, BlockTables: make([]int32, 4), SeqLens: make([]int32, 2)}),
			val(&blocktable.VLLM{MaxSeqs: math.MaxInt, MaxBlocks: math.MaxInt, BlockTables: make([]int32, 4), SeqLens: make([]int32, 2)}),
			val(&blocktable.VLLM{MaxSeqs: 2, MaxBlocks: -3, Rows: 1, BlockTables: make([]int32, 4), SeqLens: make([]int32, 2)})}
	case reflect.TypeFor[*blocktable.FlashInfer]():
		table := func(seqs, blocks, bt int) apitest.Maker {
			return func() apitest.Object {
				f, err := blocktable.NewFlashInfer(seqs, blocks, bt)
				if err != nil {
					panic(err)
				}
				if seqs > 1 {
					_ = f.AppendRow([]int32{1, 2}, 2*bt-1)
				}
				return apitest.Object{V: reflect.ValueOf(f), State: func() any { return copyOf(f) }}
			}
		}
		return []apitest.Maker{table(4, 8, 1), table(4, 8, 16), table(0, 0, 3),
			val(&blocktable.FlashInfer{BlockTokens: 4, Indptr: []int32{0, 99}, Rows: 1}),
			val(&blocktable.FlashInfer{BlockTokens: 4, Indptr: []int32{-5, 0}, Indices: make([]int32, 4), LastPageLen: make([]int32, 1)}),
			val(&blocktable.FlashInfer{BlockTokens: math.MaxInt, Indptr: make([]int32, 3), LastPageLen: make([]int32, 2)})}
	case reflect.TypeFor[*blocktable.DeviceTables]():
		return []apitest.Maker{func() apitest.Object {
			dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 32 << 10})
			if err != nil {
				panic(err)
			}
			d, err := blocktable.NewDeviceTables(dev, 4, 4, 64)
			if err != nil {
				panic(err)
			}
			state := func() any {
				return [6]vmm.Addr{d.BlockTables, d.SeqLens, d.SlotMapping, d.Indptr, d.Indices, d.LastPageLen}
			}
			return apitest.Object{V: reflect.ValueOf(d), State: state, Probe: func() { _ = d.UploadVLLM(nil, nil) },
				Close: func() error { _ = d.Close(); return dev.Close() }}
		}, val(&blocktable.DeviceTables{})}
	case reflect.TypeFor[vmm.Device]():
		return []apitest.Maker{func() apitest.Object {
			dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 32 << 10, Capacity: 64 << 20})
			if err != nil {
				panic(err)
			}
			var d vmm.Device = dev
			return apitest.Object{V: reflect.ValueOf(&d).Elem(), Close: dev.Close}
		}}
	case reflect.TypeFor[[]int32]():
		return []apitest.Maker{val([]int32{1, 2}), val([]int32{7}), val(make([]int32, 300))}
	}
	return nil
}

// TestAPIProperty calls every exported function and method of blocktable with extreme
// arguments, and tables whose fields were set by hand: nothing panics, every error is typed, and
// a failed call leaves the table as it was.
func TestAPIProperty(t *testing.T) {
	leakCheck(t)
	s := &apitest.Suite{
		Dir:      ".",
		Funcs:    []any{blocktable.NewVLLM, blocktable.NewFlashInfer, blocktable.AppendSlots, blocktable.NewDeviceTables},
		Types:    []any{(*blocktable.VLLM)(nil), (*blocktable.FlashInfer)(nil), (*blocktable.DeviceTables)(nil), (*blocktable.SizeError)(nil)},
		Values:   apiValues,
		MaxCalls: 2000,
	}
	s.Check(t)
}
