package kvcache_test

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/pagedkv/pagedkv/blocktable"
	"github.com/pagedkv/pagedkv/internal/testutil/apitest"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/ledger"
	"github.com/pagedkv/pagedkv/vmm"
)

// managerState is what a failed call must leave unchanged: the shape of the stats, every
// sequence's tokens and blocks, the regions and whether it sleeps.
type managerState struct {
	Stats   kvcache.Stats
	Seqs    map[kvcache.SeqID][]int32
	Lens    map[kvcache.SeqID]int
	Gen     uint64
	Regions []vmm.Region
	Asleep  bool
}

// apiSeqs are the sequences the fixtures hold: 1 (10 tokens), 2 (a fork of 1) and 3 (5 tokens).
// The generic candidate ids 0, 1, 3, MaxUint64, ... hit some and miss others.
var apiSeqs = []kvcache.SeqID{1, 2, 3}

func stateOf(m *kvcache.Manager) managerState {
	st := managerState{Stats: shape(m.Stats()), Seqs: map[kvcache.SeqID][]int32{}, Lens: map[kvcache.SeqID]int{},
		Gen: m.MapGeneration(), Regions: m.Regions(nil), Asleep: m.Asleep()}
	for id := kvcache.SeqID(0); id < 8; id++ {
		if b, err := m.Blocks(id, nil); err == nil {
			st.Seqs[id] = b
			st.Lens[id], _ = m.Len(id)
		}
	}
	return st
}

// apiDevice is a host device for one call, closed with whatever the call left on it released.
func apiDevice() (vmm.Device, func() error) {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 32 << 10, Capacity: 64 << 20})
	if err != nil {
		panic(err)
	}
	return dev, dev.Close // fails if a call left memory behind that its owner did not return
}

// managerObject is a manager holding apiSeqs, made by build.
func managerObject(build func(dev vmm.Device) (*kvcache.Manager, func() error)) apitest.Maker {
	return func() apitest.Object {
		dev, closeDev := apiDevice()
		m, closeM := build(dev)
		for _, step := range []error{
			func() error { _, err := m.AppendTokens(1, 10, nil); return err }(),
			m.Fork(1, 2),
			func() error { _, err := m.AppendTokens(3, 5, nil); return err }(),
		} {
			if step != nil {
				panic(step)
			}
		}
		return apitest.Object{
			V:     reflect.ValueOf(m),
			State: func() any { return stateOf(m) },
			Check: m.Verify,
			Probe: func() { m.Stats() },
			Close: func() error { _ = closeM(); return closeDev() },
		}
	}
}

func apiHybridConfig() kvcache.HybridConfig {
	return kvcache.HybridConfig{Geometry: smallHybrid(true), Limit: 16 << 20, Capacity: 2 << 20, NoBackground: true, HostTokens: 256, HostSequences: 4}
}

func apiConfig() kvcache.Config {
	c := tinyConfig()
	c.Capacity, c.HostBlocks, c.HostPrefixCache = 16*c.PageSize, 8, true
	return c
}

func apiManagers() []apitest.Maker {
	return []apitest.Maker{
		managerObject(func(dev vmm.Device) (*kvcache.Manager, func() error) { // elastic
			m, err := kvcache.New(dev, apiConfig())
			if err != nil {
				panic(err)
			}
			return m, m.Close
		}),
		managerObject(func(dev vmm.Device) (*kvcache.Manager, func() error) { // elastic, asleep after set-up is not possible; a tight limit
			c := apiConfig()
			c.MemoryLimit = 3 * c.PageSize
			m, err := kvcache.New(dev, c)
			if err != nil {
				panic(err)
			}
			return m, m.Close
		}),
		managerObject(func(dev vmm.Device) (*kvcache.Manager, func() error) { // in a shared pool
			s, err := kvcache.NewShared(dev, kvcache.SharedConfig{Limit: 8 << 20, CompactOnPressure: true})
			if err != nil {
				panic(err)
			}
			m, err := s.Register("a", apiConfig())
			if err != nil {
				panic(err)
			}
			return m, s.Close
		}),
		managerObject(func(dev vmm.Device) (*kvcache.Manager, func() error) { // static, over memory the test maps
			pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: 8 * (32 << 10), PageSize: 8 * (32 << 10)})
			if err != nil {
				panic(err)
			}
			a, err := pool.Map(0, pool.Capacity())
			if err != nil {
				panic(err)
			}
			c := apiConfig()
			c.HostBlocks, c.HostPrefixCache = 0, false // static memory has no host tier
			m, err := kvcache.NewStatic(dev, c, vmm.External{Addr: a, Size: pool.Capacity(), Kind: vmm.MemoryHost})
			if err != nil {
				panic(err)
			}
			return m, func() error { _ = m.Close(); return pool.Close() }
		}),
		func() apitest.Object { // on two devices, heads split
			dev, closeDev := apiDevice()
			dev2, closeDev2 := apiDevice()
			c := apiConfig()
			c.KVHeads, c.PageSize = 4, 2*c.PageSize // a 32 KiB page on each device
			c.Capacity = 16 * c.PageSize
			m, err := kvcache.NewMulti([]vmm.Device{dev, dev2}, c, kvcache.Split{TensorParallel: 2})
			if err != nil {
				panic(err)
			}
			o := managerObject(func(vmm.Device) (*kvcache.Manager, func() error) { return m, m.Close })()
			closeM := o.Close
			o.Close = func() error { _ = closeM(); return errors.Join(closeDev(), closeDev2()) }
			return o
		},
		func() apitest.Object { // closed
			dev, closeDev := apiDevice()
			m, err := kvcache.New(dev, apiConfig())
			if err != nil {
				panic(err)
			}
			_, _ = m.AppendTokens(1, 10, nil)
			_ = m.Close()
			return apitest.Object{V: reflect.ValueOf(m), Close: closeDev}
		},
		func() apitest.Object { return apitest.Object{V: reflect.ValueOf(&kvcache.Manager{})} }, // zero
	}
}

func apiValues(t reflect.Type) []apitest.Maker {
	val := func(x any) apitest.Maker {
		return func() apitest.Object { return apitest.Object{V: reflect.ValueOf(x)} }
	}
	switch t {
	case reflect.TypeFor[*kvcache.Manager]():
		return apiManagers()
	case reflect.TypeFor[*kvcache.SharedPool]():
		return []apitest.Maker{func() apitest.Object {
			dev, closeDev := apiDevice()
			s, err := kvcache.NewShared(dev, kvcache.SharedConfig{Limit: 8 << 20})
			if err != nil {
				panic(err)
			}
			m, err := s.Register("a", apiConfig())
			if err != nil {
				panic(err)
			}
			if _, err := m.AppendTokens(1, 10, nil); err != nil {
				panic(err)
			}
			return apitest.Object{
				V: reflect.ValueOf(s),
				State: func() any {
					st := s.Stats()
					for i := range st.Models {
						st.Models[i].Stats = shape(st.Models[i].Stats)
					}
					return st
				},
				Probe: func() { s.Stats() },
				Close: func() error { _ = s.Close(); return closeDev() },
			}
		}, func() apitest.Object { return apitest.Object{V: reflect.ValueOf(&kvcache.SharedPool{})} }}
	case reflect.TypeFor[vmm.Device]():
		return []apitest.Maker{func() apitest.Object {
			dev, closeDev := apiDevice()
			return apitest.Object{V: reflect.ValueOf(&dev).Elem(), Close: closeDev}
		}}
	case reflect.TypeFor[[]vmm.Device]():
		two := func(same bool) apitest.Maker {
			return func() apitest.Object {
				dev, closeDev := apiDevice()
				dev2, closeDev2 := apiDevice()
				devs := []vmm.Device{dev, dev2}
				if same {
					devs[1] = dev
				}
				return apitest.Object{V: reflect.ValueOf(devs), Close: func() error { return errors.Join(closeDev(), closeDev2()) }}
			}
		}
		return []apitest.Maker{two(false), two(true), val([]vmm.Device{nil, nil})}
	case reflect.TypeFor[kvcache.Split]():
		return []apitest.Maker{val(kvcache.Split{TensorParallel: 2}), val(kvcache.Split{PipelineParallel: 2}),
			val(kvcache.Split{TensorParallel: -2, PipelineParallel: -1}), val(kvcache.Split{TensorParallel: math.MaxInt, PipelineParallel: math.MaxInt})}
	case reflect.TypeFor[kvcache.Config]():
		big := kvcache.Config{Layers: 1 << 30, KVHeads: 1, HeadDim: 1 << 30, ElemSize: 2, BlockTokens: 16}
		maxed := kvcache.Config{Layers: math.MaxInt, KVHeads: math.MaxInt, HeadDim: math.MaxInt, ElemSize: math.MaxInt, BlockTokens: math.MaxInt,
			Capacity: math.MaxUint64, PageSize: math.MaxUint64, ReservePages: math.MaxInt, HighWatermark: math.MaxInt, MemoryLimit: math.MaxUint64}
		neg := kvcache.Config{Layers: -1, KVHeads: math.MinInt, HeadDim: 1, ElemSize: 1, BlockTokens: 1, ReservePages: math.MinInt, HighWatermark: -1}
		hugeCap := apiConfig()
		hugeCap.Capacity = math.MaxUint64
		oddPage := apiConfig()
		oddPage.PageSize = apiConfig().PageSize + 1
		reserveAll := apiConfig()
		reserveAll.ReservePages, reserveAll.HighWatermark = math.MaxInt, math.MaxInt
		fineBlocks := kvcache.Config{Layers: 1, KVHeads: 1, HeadDim: 8, ElemSize: 2, BlockTokens: 1, NoBackground: true} // 32-byte blocks
		return []apitest.Maker{val(apiConfig()), val(big), val(maxed), val(neg), val(hugeCap), val(oddPage), val(reserveAll), val(fineBlocks)}
	case reflect.TypeFor[kvcache.CompactOptions]():
		return []apitest.Maker{val(kvcache.CompactOptions{MaxBytes: math.MaxUint64}), val(kvcache.CompactOptions{MaxBytes: 1}),
			val(kvcache.CompactOptions{MaxBytes: 8 << 10})}
	case reflect.TypeFor[kvcache.SharedConfig]():
		withLedger := func(closed bool) apitest.Maker {
			return func() apitest.Object {
				dir, err := os.MkdirTemp("", "kvcache-api")
				if err != nil {
					panic(err)
				}
				l, err := ledger.Open(filepath.Join(dir, "l"), ledger.Options{Limit: 8 << 20})
				if err != nil {
					panic(err)
				}
				if closed {
					l.Close()
				}
				return apitest.Object{V: reflect.ValueOf(kvcache.SharedConfig{Ledger: l, CompactOnPressure: true}),
					Close: func() error { l.Close(); return os.RemoveAll(dir) }}
			}
		}
		return []apitest.Maker{val(kvcache.SharedConfig{Limit: math.MaxUint64, CompactOnPressure: true}), val(kvcache.SharedConfig{Limit: 1}),
			val(kvcache.SharedConfig{Limit: 8 << 20, Split: kvcache.Split{TensorParallel: 2}}), withLedger(false), withLedger(true)}
	case reflect.TypeFor[vmm.External]():
		return []apitest.Maker{val(vmm.External{Addr: 1 << 40, Size: math.MaxUint64}), val(vmm.External{Addr: 256, Size: 1 << 30}),
			val(vmm.External{Addr: math.MaxUint64 - 255, Size: 1 << 20})}
	case reflect.TypeFor[*blocktable.VLLM]():
		return []apitest.Maker{
			func() apitest.Object {
				v, _ := blocktable.NewVLLM(4, 4, -1)
				return apitest.Object{V: reflect.ValueOf(v)}
			},
			func() apitest.Object {
				v, _ := blocktable.NewVLLM(1, 1, 0)
				return apitest.Object{V: reflect.ValueOf(v)}
			},
			val(&blocktable.VLLM{MaxSeqs: 9, MaxBlocks: 9}),
			val(&blocktable.VLLM{MaxSeqs: 9, MaxBlocks: 9, Rows: -1, BlockTables: make([]int32, 81), SeqLens: make([]int32, 9)}),
		}
	case reflect.TypeFor[*blocktable.FlashInfer]():
		return []apitest.Maker{
			func() apitest.Object {
				f, _ := blocktable.NewFlashInfer(4, 16, 4)
				return apitest.Object{V: reflect.ValueOf(f)}
			},
			func() apitest.Object {
				f, _ := blocktable.NewFlashInfer(4, 16, 16)
				return apitest.Object{V: reflect.ValueOf(f)}
			},
			val(&blocktable.FlashInfer{BlockTokens: 4, Indptr: []int32{0, 99}, Rows: 1}),
		}
	case reflect.TypeFor[[]kvcache.SeqID]():
		return []apitest.Maker{val([]kvcache.SeqID{1, 3}), val([]kvcache.SeqID{1, 1, 2}), val([]kvcache.SeqID{99}), val([]kvcache.SeqID{math.MaxUint64})}
	case reflect.TypeFor[string]():
		return []apitest.Maker{val("a"), val("b"), val("gemma-3-27b")}
	case reflect.TypeFor[*kvcache.Hybrid]():
		made := func(closed, multi bool) apitest.Maker {
			return func() apitest.Object {
				dev, closeDev := apiDevice()
				h, err := kvcache.NewHybrid(dev, apiHybridConfig())
				if multi { // every group's heads, or its state, divided between two devices
					_ = h.Close()
					dev2, closeDev2 := apiDevice()
					h, err = kvcache.NewHybridMulti([]vmm.Device{dev, dev2}, apiHybridConfig(), kvcache.Split{TensorParallel: 2})
					closeOne := closeDev
					closeDev = func() error { return errors.Join(closeOne(), closeDev2()) }
				}
				if err != nil {
					panic(err)
				}
				dst := make([][]int64, h.Groups())
				if _, err := h.AppendTokens(1, 10, dst); err != nil {
					panic(err)
				}
				if err := h.Fork(1, 2); err != nil {
					panic(err)
				}
				if _, err := h.AppendTokens(3, 40, dst); err != nil {
					panic(err)
				}
				if closed {
					_ = h.Close()
				}
				return apitest.Object{
					V: reflect.ValueOf(h),
					State: func() any {
						var st []managerState
						for g := range h.Groups() {
							s := stateOf(h.Group(g))
							s.Gen = 0 // a rolled-back page counts in MapGeneration
							st = append(st, s)
						}
						return st
					},
					Check: func() error {
						if closed {
							return nil
						}
						return h.Verify()
					},
					Probe: func() { h.Stats() },
					Close: func() error { _ = h.Close(); return closeDev() },
				}
			}
		}
		return []apitest.Maker{made(false, false), made(true, false), made(false, true),
			func() apitest.Object { return apitest.Object{V: reflect.ValueOf(&kvcache.Hybrid{})} }}
	case reflect.TypeFor[kvcache.HybridConfig]():
		bad := apiHybridConfig()
		bad.Geometry.Groups[1].Window = 0
		huge := apiHybridConfig()
		huge.Capacity, huge.Limit = math.MaxUint64, math.MaxUint64
		return []apitest.Maker{val(apiHybridConfig()), val(bad), val(huge), val(kvcache.HybridConfig{})}
	case reflect.TypeFor[[][]int64]():
		return []apitest.Maker{val(make([][]int64, 5)), val(make([][]int64, 2)), val([][]int64(nil))}
	case reflect.TypeFor[kvcache.Geometry]():
		var out []apitest.Maker
		for _, name := range kvcache.Models() {
			g, _ := kvcache.GeometryFor(name)
			out = append(out, val(g))
		}
		bad, _ := kvcache.GeometryFor("gpt-oss-20b")
		bad.Groups[0].Layers = append(bad.Groups[0].Layers, 1, math.MaxInt, math.MinInt)
		bad.Groups[1].Window, bad.Groups[1].BlockTokens, bad.Groups[1].KScales = math.MaxInt, math.MinInt, []float32{float32(math.Inf(1))}
		return append(out, val(bad), val(kvcache.Geometry{Layers: math.MaxInt, Groups: []kvcache.LayerGroup{{Layers: []int{0}}}}))
	}
	return nil
}

// TestAPIProperty calls every exported function and method of kvcache with extreme arguments:
// nothing panics, every error is typed, a failed call changes nothing observable, Verify holds
// after every call, and no lock stays held.
func TestAPIProperty(t *testing.T) {
	s := &apitest.Suite{
		Dir:   ".",
		Funcs: []any{kvcache.New, kvcache.NewStatic, kvcache.NewShared, kvcache.NewMulti, kvcache.NewSharedMulti, kvcache.GeometryFor, kvcache.Models, kvcache.NewHybrid, kvcache.NewHybridMulti},
		Types: []any{(*kvcache.Manager)(nil), (*kvcache.SharedPool)(nil), kvcache.Config{}, kvcache.Layout{}, kvcache.Shard{}, (*kvcache.Swap)(nil),
			(*kvcache.SequenceError)(nil), (*kvcache.BlocksError)(nil), (*kvcache.ConfigError)(nil), (*kvcache.TooSmallError)(nil), (*kvcache.SwapError)(nil),
			kvcache.Geometry{}, kvcache.LayerGroup{}, kvcache.AttentionKind(0), kvcache.DType(0), (*kvcache.GroupError)(nil),
			(*kvcache.Hybrid)(nil), (*kvcache.GroupOpError)(nil), (*kvcache.HybridSwap)(nil)},
		Values:   apiValues,
		MaxCalls: 1500,
	}
	s.Check(t)
}
