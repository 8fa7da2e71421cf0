package disk_test

import (
	"context"
	"os"
	"reflect"
	"testing"

	"github.com/pagedkv/pagedkv/internal/testutil/apitest"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/tier/disk"
)

// TestAPIProperty calls every exported function and method of tier/disk with extreme
// arguments (nil and cancelled contexts, short and odd buffers, a closed store, options out of
// range): nothing panics, every error is typed, and a failed call leaves the store's counters of
// what it holds as they were.
func TestAPIProperty(t *testing.T) {
	const blockBytes = 4096
	pkg, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	t.Chdir(t.TempDir()) // the generic strings ("x") are relative directories that Open creates

	opt := disk.Options{Fingerprint: tier.Fingerprint{7}, BlockBytes: blockBytes, LimitBytes: 1 << 20}
	store := func(closed bool) apitest.Maker {
		return func() apitest.Object {
			dir, err := os.MkdirTemp("", "pagedkv-disk-api")
			if err != nil {
				t.Fatal(err)
			}
			s, err := disk.Open(dir, opt)
			if err != nil {
				t.Fatal(err)
			}
			b := tier.Block{Data: make([]byte, blockBytes)}
			b.Key[0] = 1
			if err := s.Put(context.Background(), []tier.Block{b}); err != nil {
				t.Fatal(err)
			}
			if closed {
				if err := s.Close(); err != nil {
					t.Fatal(err)
				}
			}
			return apitest.Object{V: reflect.ValueOf(s),
				State: func() any { st := s.Stats(); return [2]uint64{st.Blocks, st.Bytes} },
				Close: func() error {
					_ = s.Close() // a second Close is ErrClosed
					return os.RemoveAll(dir)
				}}
		}
	}
	val := func(x any) apitest.Maker {
		return func() apitest.Object { return apitest.Object{V: reflect.ValueOf(x)} }
	}
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	s := &apitest.Suite{
		Dir:   pkg,
		Funcs: []any{disk.Open},
		Types: []any{(*disk.Store)(nil), disk.Mode(0), (*disk.ArgumentError)(nil), (*disk.SizeError)(nil), (*disk.FitError)(nil)},
		Values: func(ty reflect.Type) []apitest.Maker {
			switch ty {
			case reflect.TypeFor[*disk.Store]():
				return []apitest.Maker{store(false), store(true)}
			case reflect.TypeFor[context.Context]():
				return []apitest.Maker{val(context.Background()), val(cancelled)}
			case reflect.TypeFor[disk.Options]():
				return []apitest.Maker{val(opt), val(disk.Options{BlockBytes: -1, LimitBytes: 1<<64 - 1}), val(disk.Options{BlockBytes: 1 << 62, Mode: 99})}
			case reflect.TypeFor[string]():
				return []apitest.Maker{func() apitest.Object {
					dir, err := os.MkdirTemp("", "pagedkv-disk-api")
					if err != nil {
						t.Fatal(err)
					}
					return apitest.Object{V: reflect.ValueOf(dir), Close: func() error { return os.RemoveAll(dir) }}
				}, val("/proc/version"), val("")}
			case reflect.TypeFor[[]tier.Block]():
				b := tier.Block{Data: make([]byte, blockBytes)}
				b.Key[0] = 2
				return []apitest.Maker{val([]tier.Block{b}), val([]tier.Block{{Data: make([]byte, 1)}})}
			case reflect.TypeFor[[]prefix.Key]():
				return []apitest.Maker{val([]prefix.Key{{1}, {2}}), val(make([]prefix.Key, 3))}
			case reflect.TypeFor[[][]byte]():
				return []apitest.Maker{val([][]byte{make([]byte, blockBytes), make([]byte, blockBytes)}), val([][]byte{make([]byte, 3)})}
			case reflect.TypeFor[*disk.ArgumentError]():
				return []apitest.Maker{val(&disk.ArgumentError{Name: "x"})}
			case reflect.TypeFor[*disk.SizeError]():
				return []apitest.Maker{val(&disk.SizeError{What: "x"})}
			case reflect.TypeFor[*disk.FitError]():
				return []apitest.Maker{val(&disk.FitError{})}
			}
			return nil
		},
		MaxCalls: 400,
	}
	s.Check(t)
}
