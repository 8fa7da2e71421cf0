// Package apitest calls every exported function and method of a package with extreme
// arguments and checks what users rely on: no call panics, every error is typed (it matches one
// of pagedkv's sentinels), a failed call leaves its receiver's observable state as it was, the
// receiver's invariants hold afterwards, and no lock is left held.
//
// A package's test lists its functions and the types whose methods it covers; Coverage parses
// the package's source and fails the test when an exported function or method is not covered,
// so a new API cannot escape the check. Arguments come from Values: 0, 1, -1, the extremes of
// each integer type, 1<<40, nil and empty slices, nil pointers and interfaces, plus whatever the
// test registers for its own types (valid objects among them, so that calls get past the first
// check).
package apitest

import (
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/pagedkv/pagedkv/internal/errdefs"
)

// Sentinels is every sentinel error of pagedkv; a typed error matches one of them.
var Sentinels = []error{
	errdefs.ErrNoDriver, errdefs.ErrNotSupported, errdefs.ErrOutOfMemory, errdefs.ErrInvalidArgument,
	errdefs.ErrOutOfRange, errdefs.ErrAlreadyMapped, errdefs.ErrNotMapped, errdefs.ErrClosed,
	errdefs.ErrWrongDevice, errdefs.ErrDriver, errdefs.ErrUnknownSequence, errdefs.ErrSequenceExists,
	errdefs.ErrExists, errdefs.ErrNotFound, errdefs.ErrAsleep, errdefs.ErrTooLarge, errdefs.ErrInjected,
	errdefs.ErrSwapped, errdefs.ErrNeedsTokenIDs, errdefs.ErrNotClosed,
	errdefs.ErrUnavailable, errdefs.ErrCorrupt, errdefs.ErrMismatch, errdefs.ErrDenied, errdefs.ErrDamaged,
}

// Typed reports whether err matches one of Sentinels.
func Typed(err error) bool {
	for _, s := range Sentinels {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

// layers are the names with which an error text opens a layer ("kvcache: append sequence 2: ...").
var layers = []string{"kvcache", "vmm", "blocktable", "sequence", "prefix", "kernels", "ledger", "metrics", "kvevents", "cuda", "tier", "tier/disk", "tier/redis", "pagedkv"}

// Text checks what an error says: it names each layer once ("kvcache: append sequence 2: ...",
// not "kvcache: ...: kvcache: ...") and never says "pagedkv:" (a sentinel's text is its meaning
// alone; the package that returns it names itself).
func Text(err error) error {
	text := err.Error()
	for _, l := range layers {
		if n := strings.Count(" "+text, " "+l+": "); n > 1 || (l == "pagedkv" && n > 0) {
			return fmt.Errorf("error text %q names %q %d times", text, l, n)
		}
	}
	return nil
}

// Object is a value under test that has state: the receiver of the methods being called.
type Object struct {
	V reflect.Value // the value passed as receiver or argument
	// State returns the observable state, compared before and after a failed call (nil: none).
	State func() any
	// Check returns the object's broken invariants (nil: no check).
	Check func() error
	// Probe returns once the object's locks are free: it takes them (nil: no locks).
	Probe func()
	// Close releases the object whatever state the call left it in; an error fails the test
	// (a call left something behind that its owner could not return).
	Close func() error
}

// Maker makes one candidate value.
type Maker func() Object

// Suite describes one package's API.
type Suite struct {
	// Dir is the package's directory, for Coverage.
	Dir string
	// Funcs are the package's exported functions.
	Funcs []any
	// Types are values of the types whose methods are called: a nil pointer of each pointer type
	// ((*T)(nil)) and a zero value of each value type.
	Types []any
	// Values returns makers of candidate values of a type beyond the generic ones (objects with
	// state included), or nil when it has none. The maker of the chosen candidate is called
	// afresh for each call. The generic candidates of the type's kind are added unless Only is
	// set for the type.
	Values func(t reflect.Type) []Maker
	// Only names types whose only candidates are those Values returns.
	Only map[reflect.Type]bool
	// MaxCalls bounds the calls of one function or method: beyond it, argument combinations are
	// sampled (deterministically). 0 means 3000.
	MaxCalls int
	// Skip names functions or methods ("Name" or "Type.Name") not to call, each with a reason in
	// the map's value; Coverage accepts them.
	Skip map[string]string
}

// Check runs Coverage and Run, and fails t unless both failing and succeeding calls were seen
// (a suite whose candidates never get past the first check proves little).
func (s *Suite) Check(t *testing.T) Report {
	s.Coverage(t)
	rep := s.Run(t)
	t.Logf("%d calls: %d errors, %d successes", rep.Calls, rep.Errors, rep.Successes)
	if rep.Errors == 0 || rep.Successes == 0 {
		t.Errorf("%d calls: %d errors, %d successes; want both", rep.Calls, rep.Errors, rep.Successes)
	}
	return rep
}

// Report counts what Run did.
type Report struct {
	Calls, Errors, Successes int
}

// Run calls every function and method of the suite with every combination of candidate
// arguments (or a sample of MaxCalls), checking each call. It returns the counts.
func (s *Suite) Run(t *testing.T) Report {
	var rep Report
	for _, f := range s.Funcs {
		v := reflect.ValueOf(f)
		name := funcName(v)
		if s.skipped(name) {
			continue
		}
		t.Run(name, func(t *testing.T) { s.callAll(t, name, v, false, &rep) })
	}
	for _, x := range s.Types {
		typ := reflect.TypeOf(x)
		for i := range typ.NumMethod() {
			m := typ.Method(i)
			name := typeName(typ) + "." + m.Name
			if s.skipped(name) {
				continue
			}
			t.Run(name, func(t *testing.T) { s.callAll(t, name, m.Func, true, &rep) })
		}
	}
	return rep
}

func (s *Suite) skipped(name string) bool {
	_, ok := s.Skip[name]
	if !ok {
		if i := strings.LastIndex(name, "."); i >= 0 {
			_, ok = s.Skip[name[i+1:]]
		}
	}
	return ok
}

// callAll calls fn with every combination (or a sample) of candidate arguments.
func (s *Suite) callAll(t *testing.T, name string, fn reflect.Value, method bool, rep *Report) {
	ft := fn.Type()
	counts := make([]int, ft.NumIn())
	total := 1
	for i := range counts {
		counts[i] = len(s.candidates(ft.In(i)))
		if counts[i] == 0 {
			t.Fatalf("%s: no candidate values of %s", name, ft.In(i))
		}
		total = min(total*counts[i], math.MaxInt32)
	}
	limit := s.MaxCalls
	if limit == 0 {
		limit = 3000
	}
	rng := rand.New(rand.NewPCG(uint64(len(name)), 7))
	idx := make([]int, len(counts))
	for call := 0; call < min(total, limit); call++ {
		if total <= limit { // every combination, in order
			c := call
			for i := range idx {
				idx[i] = c % counts[i]
				c /= counts[i]
			}
		} else {
			for i := range idx {
				idx[i] = rng.IntN(counts[i])
			}
		}
		s.callOnce(t, name, fn, method, idx, rep)
	}
}

// callOnce makes the objects for one combination, calls fn and checks the call.
func (s *Suite) callOnce(t *testing.T, name string, fn reflect.Value, method bool, idx []int, rep *Report) {
	ft := fn.Type()
	args := make([]reflect.Value, len(idx))
	objs := make([]Object, len(idx))
	for i, j := range idx {
		objs[i] = s.candidates(ft.In(i))[j]()
		args[i] = objs[i].V
	}
	var out []reflect.Value
	stuck := false // a lock was left held: closing would block too
	defer func() {
		if stuck {
			return
		}
		// What a constructor made (a manager, a pool) is closed first, then the arguments.
		// Methods return what their receiver owns or borrows, which the receiver's Close covers.
		for _, v := range out {
			if c, ok := v.Interface().(interface{ Close() error }); ok && !method && !isNil(v) {
				_ = c.Close()
			}
		}
		for i := len(objs) - 1; i >= 0; i-- {
			if objs[i].Close != nil {
				if err := objs[i].Close(); err != nil {
					t.Fatalf("%s(%s): closing argument %d: %v", name, describe(args), i, err)
				}
			}
		}
	}()
	var before any
	if method && objs[0].State != nil {
		before = objs[0].State()
	}
	desc := func() string { return fmt.Sprintf("%s(%s)", name, describe(args)) }
	panicked := func() (p any) {
		defer func() { p = recover() }()
		if ft.IsVariadic() {
			out = fn.CallSlice(args)
		} else {
			out = fn.Call(args)
		}
		return nil
	}()
	rep.Calls++
	if panicked != nil {
		t.Fatalf("%s panicked: %v", desc(), panicked)
	}
	// Locks first: every later check takes them.
	for i, o := range objs {
		if o.Probe == nil {
			continue
		}
		done := make(chan struct{})
		go func() { o.Probe(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			stuck = true
			t.Fatalf("%s left a lock of argument %d held", desc(), i)
		}
	}
	var err error
	if n := ft.NumOut(); n > 0 && ft.Out(n-1) == reflect.TypeFor[error]() {
		err, _ = out[n-1].Interface().(error)
	}
	if err != nil {
		rep.Errors++
		if !Typed(err) {
			t.Fatalf("%s returned an untyped error: %v", desc(), err)
		}
		if terr := Text(err); terr != nil {
			t.Fatalf("%s: %v", desc(), terr)
		}
		if before != nil {
			if after := objs[0].State(); !reflect.DeepEqual(before, after) {
				t.Fatalf("%s failed (%v) and changed its receiver:\nbefore %+v\nafter  %+v", desc(), err, before, after)
			}
		}
	} else {
		rep.Successes++
	}
	for i, o := range objs {
		if o.Check != nil {
			if cerr := o.Check(); cerr != nil && (!method || i == 0) && !errors.Is(cerr, errdefs.ErrClosed) {
				t.Fatalf("%s (error %v) broke an invariant of argument %d: %v", desc(), err, i, cerr)
			}
		}
	}
}

// candidates returns the makers of the candidate values of t.
func (s *Suite) candidates(t reflect.Type) []Maker {
	var out []Maker
	if s.Values != nil {
		out = append(out, s.Values(t)...)
	}
	if s.Only[t] {
		return out
	}
	for _, v := range Generic(t) {
		out = append(out, func() Object { return Object{V: v} })
	}
	return out
}

// Generic returns the generic candidates of t's kind: extremes for numbers, nil and small
// slices, nil pointers and interfaces, the zero value of structs, a few strings.
func Generic(t reflect.Type) []reflect.Value {
	conv := func(xs ...any) []reflect.Value {
		var out []reflect.Value
		for _, x := range xs {
			out = append(out, reflect.ValueOf(x).Convert(t))
		}
		return out
	}
	switch t.Kind() {
	case reflect.Int, reflect.Int64:
		return conv(0, 1, 3, -1, math.MinInt64, math.MaxInt64, 1<<40, math.MaxInt32, math.MaxInt32+1)
	case reflect.Int32:
		return conv(int32(0), int32(1), int32(3), int32(-1), int32(math.MinInt32), int32(math.MaxInt32))
	case reflect.Int16, reflect.Int8:
		return conv(0, 1, -1)
	case reflect.Uint, reflect.Uint64, reflect.Uintptr:
		return conv(uint64(0), uint64(1), uint64(3), uint64(math.MaxUint64), uint64(1<<40), uint64(1<<63), uint64(2<<20))
	case reflect.Uint32:
		return conv(uint32(0), uint32(1), uint32(math.MaxUint32))
	case reflect.Uint16, reflect.Uint8:
		return conv(0, 1, 255)
	case reflect.Bool:
		return conv(false, true)
	case reflect.Float32, reflect.Float64:
		return conv(0.0, -1.0, math.NaN(), math.Inf(1), math.MaxFloat32)
	case reflect.String:
		return conv("", "x", strings.Repeat("z", 300))
	case reflect.Slice:
		out := []reflect.Value{reflect.Zero(t), reflect.MakeSlice(t, 0, 0)}
		for _, e := range Generic(t.Elem()) {
			one := reflect.MakeSlice(t, 1, 1)
			one.Index(0).Set(e)
			out = append(out, one)
		}
		return append(out, reflect.MakeSlice(t, 4096, 4096))
	case reflect.Pointer, reflect.Interface, reflect.Func, reflect.Map, reflect.Chan:
		return []reflect.Value{reflect.Zero(t)}
	case reflect.Struct, reflect.Array:
		return []reflect.Value{reflect.Zero(t)}
	}
	return []reflect.Value{reflect.Zero(t)}
}

// Coverage fails t when an exported function or method declared in the suite's package is
// neither called by the suite nor skipped with a reason.
func (s *Suite) Coverage(t *testing.T) {
	covered := map[string]bool{}
	for _, f := range s.Funcs {
		covered[funcName(reflect.ValueOf(f))] = true
	}
	for _, x := range s.Types {
		typ := reflect.TypeOf(x)
		for i := range typ.NumMethod() {
			covered[typeName(typ)+"."+typ.Method(i).Name] = true
		}
	}
	for name, why := range s.Skip {
		if why == "" {
			t.Errorf("skip of %s gives no reason", name)
		}
		covered[name] = true
	}
	fset := token.NewFileSet()
	files, err := filepath.Glob(filepath.Join(s.Dir, "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	for _, path := range files {
		if strings.HasSuffix(path, "_test.go") {
			continue
		}
		src, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		f, err := parser.ParseFile(fset, path, src, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range f.Decls {
			fd, ok := d.(*ast.FuncDecl)
			if !ok || !fd.Name.IsExported() {
				continue
			}
			name := fd.Name.Name
			if fd.Recv != nil {
				recv := fd.Recv.List[0].Type
				if st, ok := recv.(*ast.StarExpr); ok {
					recv = st.X
				}
				id, ok := recv.(*ast.Ident)
				if !ok || !id.IsExported() {
					continue
				}
				name = id.Name + "." + name
			}
			if !covered[name] {
				t.Errorf("%s: exported %s is not called by the API property test (add it to the suite)", filepath.Base(path), name)
			}
		}
	}
}

func isNil(v reflect.Value) bool {
	switch v.Kind() {
	case reflect.Pointer, reflect.Interface, reflect.Func, reflect.Map, reflect.Slice, reflect.Chan:
		return v.IsNil()
	}
	return false
}

// funcName returns a function's name without its package path: "New".
func funcName(v reflect.Value) string {
	full := runtime.FuncForPC(v.Pointer()).Name()
	return full[strings.LastIndex(full, ".")+1:]
}

// typeName returns a type's name without package or pointer: "Manager".
func typeName(t reflect.Type) string {
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	return t.Name()
}

// describe prints arguments briefly.
func describe(args []reflect.Value) string {
	parts := make([]string, len(args))
	for i, a := range args {
		switch a.Kind() {
		case reflect.Slice:
			if a.IsNil() {
				parts[i] = "nil"
			} else {
				parts[i] = fmt.Sprintf("%s[len %d]", a.Type(), a.Len())
			}
		case reflect.Pointer, reflect.Interface, reflect.Func, reflect.Map:
			if a.IsNil() {
				parts[i] = "nil"
			} else {
				parts[i] = fmt.Sprintf("%s@%p", a.Type(), a.Interface())
			}
		default:
			parts[i] = fmt.Sprintf("%v", a.Interface())
		}
	}
	return strings.Join(parts, ", ")
}
