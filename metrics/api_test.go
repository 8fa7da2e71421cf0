package metrics_test

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pagedkv/pagedkv/internal/testutil/apitest"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/ledger"
	"github.com/pagedkv/pagedkv/metrics"
	"github.com/pagedkv/pagedkv/vmm"
)

// collected counts what c collects now: the observable state of a collector.
func collected(c *metrics.Collector) int {
	ch := make(chan prometheus.Metric, 4096)
	c.Collect(ch)
	close(ch)
	return len(ch)
}

func apiValues(t reflect.Type) []apitest.Maker {
	val := func(x any) apitest.Maker {
		return func() apitest.Object { return apitest.Object{V: reflect.ValueOf(x)} }
	}
	manager := func(closed bool) apitest.Maker {
		return func() apitest.Object {
			dev, err := vmm.NewHostDevice(vmm.HostOptions{})
			if err != nil {
				panic(err)
			}
			m, err := kvcache.New(dev, cfg())
			if err != nil {
				panic(err)
			}
			if _, err := m.AppendTokens(1, 10, nil); err != nil {
				panic(err)
			}
			if closed {
				m.Close()
			}
			return apitest.Object{V: reflect.ValueOf(m), Close: func() error { m.Close(); return dev.Close() }}
		}
	}
	switch t {
	case reflect.TypeFor[*metrics.Collector]():
		full := func() apitest.Object {
			c := metrics.NewCollector()
			obj := manager(false)()
			if err := c.AddManager("m", obj.V.Interface().(*kvcache.Manager)); err != nil {
				panic(err)
			}
			return apitest.Object{V: reflect.ValueOf(c), State: func() any { return collected(c) }, Close: obj.Close}
		}
		return []apitest.Maker{full, val(metrics.NewCollector()), val(&metrics.Collector{})}
	case reflect.TypeFor[*kvcache.Manager]():
		return []apitest.Maker{manager(false), manager(true)}
	case reflect.TypeFor[*kvcache.SharedPool]():
		pool := func(closed bool) apitest.Maker {
			return func() apitest.Object {
				dev, err := vmm.NewHostDevice(vmm.HostOptions{})
				if err != nil {
					panic(err)
				}
				p, err := kvcache.NewShared(dev, kvcache.SharedConfig{Limit: 8 << 20})
				if err != nil {
					panic(err)
				}
				if closed {
					p.Close()
				}
				return apitest.Object{V: reflect.ValueOf(p), Close: func() error { p.Close(); return dev.Close() }}
			}
		}
		return []apitest.Maker{pool(false), pool(true)}
	case reflect.TypeFor[*kvcache.Hybrid]():
		hybrid := func(closed bool) apitest.Maker {
			return func() apitest.Object {
				dev, err := vmm.NewHostDevice(vmm.HostOptions{})
				if err != nil {
					panic(err)
				}
				h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: hybridGeometry(), Limit: 64 << 20, Capacity: 16 << 20, NoBackground: true})
				if err != nil {
					panic(err)
				}
				if closed {
					h.Close()
				}
				return apitest.Object{V: reflect.ValueOf(h), Close: func() error { h.Close(); return dev.Close() }}
			}
		}
		return []apitest.Maker{hybrid(false), hybrid(true)}
	case reflect.TypeFor[*ledger.Ledger]():
		led := func(closed bool) apitest.Maker {
			return func() apitest.Object {
				dir, err := os.MkdirTemp("", "metrics-api")
				if err != nil {
					panic(err)
				}
				l, err := ledger.Open(filepath.Join(dir, "l"), ledger.Options{Limit: 1 << 20})
				if err != nil {
					panic(err)
				}
				if closed {
					l.Close()
				}
				return apitest.Object{V: reflect.ValueOf(l), Close: func() error { l.Close(); return os.RemoveAll(dir) }}
			}
		}
		return []apitest.Maker{led(false), led(true)}
	case reflect.TypeFor[chan<- prometheus.Metric]():
		return []apitest.Maker{func() apitest.Object {
			return apitest.Object{V: reflect.ValueOf((chan<- prometheus.Metric)(make(chan prometheus.Metric, 4096)))}
		}}
	case reflect.TypeFor[chan<- *prometheus.Desc]():
		return []apitest.Maker{func() apitest.Object {
			return apitest.Object{V: reflect.ValueOf((chan<- *prometheus.Desc)(make(chan *prometheus.Desc, 256)))}
		}}
	case reflect.TypeFor[string]():
		return []apitest.Maker{val("m"), val("other"), val(""), val("bad\xffutf8")}
	}
	return nil
}

// TestAPIProperty calls every exported function and method of metrics with extreme arguments
// (nil and closed objects, nil channels, empty and taken names): nothing panics or blocks, every
// error is typed, and a failed call changes nothing the collector reports.
func TestAPIProperty(t *testing.T) {
	s := &apitest.Suite{
		Dir:      ".",
		Funcs:    []any{metrics.NewCollector},
		Types:    []any{(*metrics.Collector)(nil)},
		Values:   apiValues,
		MaxCalls: 300,
	}
	s.Check(t)
}
