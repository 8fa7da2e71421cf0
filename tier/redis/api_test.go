package redis_test

import (
	"context"
	"reflect"
	"testing"
	"time"

	"github.com/pagedkv/pagedkv/internal/testutil/apitest"
	"github.com/pagedkv/pagedkv/internal/testutil/redistest"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/tier/redis"
)

// TestAPIProperty calls every exported function and method of tier/redis with extreme
// arguments (nil and cancelled contexts, short and odd buffers, a closed store, a store whose
// server is gone, options out of range): nothing panics, every error is typed, and nothing is
// left held.
func TestAPIProperty(t *testing.T) {
	srv := redistest.Start(t)
	const blockBytes = 1024
	opt := redis.Options{Addrs: []string{srv.Addr}, Model: "api", Fingerprint: tier.Fingerprint{3}, BlockBytes: blockBytes, Timeout: time.Second}
	gone := opt
	gone.Addrs, gone.Timeout = []string{"127.0.0.1:1"}, 50*time.Millisecond
	store := func(o redis.Options, closed bool) apitest.Maker {
		return func() apitest.Object {
			s, err := redis.Open(o)
			if err != nil {
				t.Fatal(err)
			}
			if closed {
				if err := s.Close(); err != nil {
					t.Fatal(err)
				}
			}
			return apitest.Object{V: reflect.ValueOf(s), Close: func() error { _ = s.Close(); return nil }}
		}
	}
	val := func(x any) apitest.Maker {
		return func() apitest.Object { return apitest.Object{V: reflect.ValueOf(x)} }
	}
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	s := &apitest.Suite{
		Dir:   ".",
		Funcs: []any{redis.Open},
		Types: []any{(*redis.Store)(nil), (*redis.Options)(nil), (*redis.CallError)(nil), (*redis.SizeError)(nil), (*redis.OptionError)(nil)},
		Values: func(ty reflect.Type) []apitest.Maker {
			switch ty {
			case reflect.TypeFor[*redis.Store]():
				watch := opt
				watch.Evictions = true
				return []apitest.Maker{store(opt, false), store(opt, true), store(gone, false), store(watch, false)}
			case reflect.TypeFor[context.Context]():
				return []apitest.Maker{val(context.Background()), val(cancelled)}
			case reflect.TypeFor[redis.Options]():
				return []apitest.Maker{val(opt), val(redis.Options{URL: "redis://%zz", BlockBytes: -1}), val(redis.Options{Addrs: []string{"x"}, BlockBytes: 1 << 62, Timeout: -1})}
			case reflect.TypeFor[*redis.Options]():
				return []apitest.Maker{val(&opt), val(&redis.Options{Model: "bad model"}), val(&redis.Options{Addrs: []string{"a:1", "b:1"}, Evictions: true})}
			case reflect.TypeFor[[]tier.Block]():
				b := tier.Block{Data: make([]byte, blockBytes)}
				b.Key[0] = 2
				return []apitest.Maker{val([]tier.Block{b}), val([]tier.Block{{Data: make([]byte, 1)}})}
			case reflect.TypeFor[[]prefix.Key]():
				return []apitest.Maker{val([]prefix.Key{{2}, {3}}), val(make([]prefix.Key, 3))}
			case reflect.TypeFor[[][]byte]():
				return []apitest.Maker{val([][]byte{make([]byte, blockBytes), make([]byte, blockBytes)}), val([][]byte{make([]byte, 3)})}
			case reflect.TypeFor[*redis.CallError]():
				return []apitest.Maker{val(&redis.CallError{Op: "get", Err: tier.ErrUnavailable})}
			case reflect.TypeFor[*redis.SizeError]():
				return []apitest.Maker{val(&redis.SizeError{What: "x"})}
			case reflect.TypeFor[*redis.OptionError]():
				return []apitest.Maker{val(&redis.OptionError{Field: "x"})}
			}
			return nil
		},
		MaxCalls: 300,
	}
	s.Check(t)
}
