package ledger_test

import (
	"math"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/pagedkv/pagedkv/internal/testutil/apitest"
	"github.com/pagedkv/pagedkv/ledger"
)

// apiState is what a failed call must not change: the limit and who holds what.
func apiState(l *ledger.Ledger) func() any {
	return func() any {
		s, err := l.Snapshot()
		if err != nil {
			return err.Error()
		}
		type member struct {
			Name   string
			Mapped uint64
		}
		out := []any{s.Limit, s.Used}
		for _, m := range s.Members {
			out = append(out, member{m.Name, m.Mapped})
		}
		return out
	}
}

// apiLedger opens a ledger of 16 units in a directory of its own, with member "a" holding 4.
func apiLedger() (*ledger.Ledger, *ledger.Member, *holder, func() error) {
	dir, err := os.MkdirTemp("", "ledger-api")
	if err != nil {
		panic(err)
	}
	l, err := ledger.Open(filepath.Join(dir, "l"), ledger.Options{Limit: 16 * unit, RequestTimeout: 50 * time.Millisecond})
	if err != nil {
		panic(err)
	}
	h := &holder{free: 2 * unit, cached: 3}
	m, err := l.Join("a", h, ledger.JoinOptions{AllowCompact: true})
	if err != nil {
		panic(err)
	}
	h.m = m
	if err := m.Acquire(4*unit, false); err != nil {
		panic(err)
	}
	return l, m, h, func() error { l.Close(); return os.RemoveAll(dir) }
}

// apiCut makes the object of apiLedger that pick chooses, with the ledger's file cut short by
// "another process": every call that reads the file fails, and none changes it.
func apiCut(pick func(*ledger.Ledger, *ledger.Member) any) apitest.Maker {
	return func() apitest.Object {
		l, m, _, closeAll := apiLedger()
		if err := os.Truncate(l.Path(), 0); err != nil {
			panic(err)
		}
		return apitest.Object{V: reflect.ValueOf(pick(l, m)), State: apiState(l), Probe: func() { l.Snapshot() }, Close: closeAll}
	}
}

func apiValues(t reflect.Type) []apitest.Maker {
	val := func(x any) apitest.Maker {
		return func() apitest.Object { return apitest.Object{V: reflect.ValueOf(x)} }
	}
	switch t {
	case reflect.TypeFor[*ledger.Ledger]():
		open := func() apitest.Object {
			l, _, _, closeAll := apiLedger()
			return apitest.Object{V: reflect.ValueOf(l), State: apiState(l), Check: l.Check, Probe: func() { l.Snapshot() }, Close: closeAll}
		}
		closed := func() apitest.Object {
			l, _, _, closeAll := apiLedger()
			l.Close()
			return apitest.Object{V: reflect.ValueOf(l), Close: closeAll}
		}
		return []apitest.Maker{open, closed, apiCut(func(l *ledger.Ledger, _ *ledger.Member) any { return l }), val(&ledger.Ledger{})}
	case reflect.TypeFor[*ledger.Member]():
		joined := func() apitest.Object {
			l, m, _, closeAll := apiLedger()
			return apitest.Object{V: reflect.ValueOf(m), State: apiState(l), Check: l.Check, Probe: func() { l.Snapshot() }, Close: closeAll}
		}
		left := func() apitest.Object {
			_, m, _, closeAll := apiLedger()
			m.Leave()
			return apitest.Object{V: reflect.ValueOf(m), Close: closeAll}
		}
		return []apitest.Maker{joined, left, apiCut(func(_ *ledger.Ledger, m *ledger.Member) any { return m }), val(&ledger.Member{})}
	case reflect.TypeFor[*ledger.FaultError]():
		return []apitest.Maker{val(&ledger.FaultError{Op: "acquire", Path: "/dev/shm/l", Size: 0, Want: 8192})}
	case reflect.TypeFor[ledger.Holder]():
		return []apitest.Maker{func() apitest.Object {
			var h ledger.Holder = &holder{}
			return apitest.Object{V: reflect.ValueOf(&h).Elem()}
		}}
	case reflect.TypeFor[ledger.Options]():
		return []apitest.Maker{val(ledger.Options{Limit: math.MaxUint64, DeviceBytes: math.MaxUint64}), val(ledger.Options{Limit: 1, RequestTimeout: -1}),
			val(ledger.Options{Limit: 1 << 20, RequestTimeout: time.Millisecond, Mode: os.ModeDir | 0o777})}
	case reflect.TypeFor[ledger.JoinOptions]():
		return []apitest.Maker{val(ledger.JoinOptions{AllowCompact: true})}
	case reflect.TypeFor[string]():
		path := func() apitest.Object {
			dir, err := os.MkdirTemp("", "ledger-api")
			if err != nil {
				panic(err)
			}
			return apitest.Object{V: reflect.ValueOf(filepath.Join(dir, "l")), Close: func() error { return os.RemoveAll(dir) }}
		}
		return []apitest.Maker{path, val("a"), val("b"), val(os.TempDir()), val(string(make([]byte, ledger.MaxName+1)))}
	}
	return nil
}

// TestAPIProperty calls every exported function and method of ledger with extreme arguments:
// nothing panics, every error is typed, a failed call changes nothing, the ledger's invariants
// hold after every call, and no lock stays held.
func TestAPIProperty(t *testing.T) {
	src, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	t.Chdir(t.TempDir()) // Open("a") creates ./a: not in the source tree
	s := &apitest.Suite{
		Dir:      src,
		Funcs:    []any{ledger.Open},
		Types:    []any{(*ledger.Ledger)(nil), (*ledger.Member)(nil), ledger.Usage{}, (*ledger.FaultError)(nil)},
		Values:   apiValues,
		MaxCalls: 400,
	}
	s.Check(t)
}
