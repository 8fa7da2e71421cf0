package kvevents

import (
	"reflect"
	"testing"
	"time"

	"github.com/pagedkv/pagedkv/internal/testutil/apitest"
	"github.com/pagedkv/pagedkv/prefix"
)

// TestAPIProperty calls every exported function and method of kvevents with extreme arguments:
// nothing panics, every error is typed and names each layer once, and a failed call leaves
// its publisher's figures as they were.
func TestAPIProperty(t *testing.T) {
	val := func(x any) apitest.Maker {
		return func() apitest.Object { return apitest.Object{V: reflect.ValueOf(x)} }
	}
	subscription := func() (*prefix.Feed, *prefix.Subscription) {
		f := &prefix.Feed{}
		s, err := f.Subscribe(4)
		if err != nil {
			panic(err)
		}
		f.Publish(stored(1), stored(2))
		return f, s
	}
	publisher := func(closed bool) apitest.Maker {
		return func() apitest.Object {
			_, s := subscription()
			p, err := Start(s, loopback())
			if err != nil {
				panic(err)
			}
			if closed {
				_ = p.Close()
			}
			return apitest.Object{V: reflect.ValueOf(p), State: func() any { return p.Stats() },
				Close: func() error { _ = p.Close(); return nil }}
		}
	}
	cfg := func(edit func(*Config)) apitest.Maker {
		c := loopback()
		edit(&c)
		return val(c)
	}
	s := &apitest.Suite{
		Dir:   ".",
		Funcs: []any{Start, Topic, Hash64},
		Types: []any{(*Publisher)(nil), Config{}, Batching(0), Encoding(0), (*ConfigError)(nil), (*EndpointError)(nil), (*RequestError)(nil)},
		Values: func(t reflect.Type) []apitest.Maker {
			switch t {
			case reflect.TypeFor[*Publisher]():
				return []apitest.Maker{publisher(false), publisher(true), val(&Publisher{})}
			case reflect.TypeFor[*prefix.Subscription]():
				return []apitest.Maker{func() apitest.Object {
					f, s := subscription()
					return apitest.Object{V: reflect.ValueOf(s), Close: func() error { f.Close(); return nil }}
				}}
			case reflect.TypeFor[Config]():
				return []apitest.Maker{
					cfg(func(*Config) {}),
					cfg(func(c *Config) {
						c.Batching, c.Interval, c.Encoding, c.RawHashes = EveryInterval, time.Hour, Arrays, true
					}),
					cfg(func(c *Config) { c.Endpoint = "" }),
					cfg(func(c *Config) { c.Pod = "a@b" }),
					cfg(func(c *Config) { c.ReplayBuffer, c.HWM, c.DataParallelRank = 1<<30, 1<<30, 1<<30 }),
					cfg(func(c *Config) { c.Interval = -time.Hour }),
				}
			case reflect.TypeFor[prefix.Key]():
				return []apitest.Maker{val(prefix.Key{31: 1}), val(prefix.Key{0: 0xff, 24: 0xff})}
			}
			return nil
		},
		MaxCalls: 200,
	}
	s.Check(t)
}
