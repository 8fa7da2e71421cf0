package cuda

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/ebitengine/purego"
	"golang.org/x/sys/unix"
)

// Fake is a driver made of Go functions. InstallFake puts it in place of libcuda's entry points,
// so that the CUDA paths of the packages above run on a machine without a GPU. It hands out
// numbers for contexts, reservations, handles, mappings, streams, events and modules, touches no
// memory, and records every break of the rules the real driver relies on: a call with no
// context current on its OS thread, a context used after its last release, a context released
// while another call runs in it. It has one device (ordinal 0) with 80 GiB and a 2 MiB
// granularity.
type Fake struct {
	// Hook, when set, runs at the start of every entry point with the symbol's plain name
	// ("cuMemCreate"). A result other than Success is returned without doing the call. It may
	// block; it runs with no lock of the Fake held.
	Hook func(name string) Result

	mu       sync.Mutex
	next     uint64
	retained int            // references to the primary context
	current  map[int]uint64 // OS thread id -> current context
	inFlight int
	calls    map[string]int
	objects  map[string]map[uint64]uint64 // kind -> id or address -> size
	misuse   []string
}

const (
	fakeCtx   = 0xc0de0000
	fakeGran  = 2 << 20
	fakeTotal = 80 << 30
)

var (
	active    atomic.Pointer[Fake]
	fakeOnce  sync.Once
	fakeProcs procTable
)

// InstallFake makes f the driver of this process until restore is called: Load succeeds and
// every entry point calls f. Tests that install a fake must not run in parallel with tests that
// use the real driver.
func InstallFake(f *Fake) (restore func()) {
	fakeOnce.Do(func() {
		for _, s := range symbolTable(&fakeProcs) {
			name := strings.TrimSuffix(s.names[0], "_v2")
			*s.dst = purego.NewCallback(func(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10 uintptr) uintptr {
				f := active.Load()
				if f == nil {
					return uintptr(ErrorDeinitialized)
				}
				return f.call(name, [11]uintptr{a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10})
			})
		}
	})
	f.mu.Lock()
	f.current = map[int]uint64{}
	f.calls = map[string]int{}
	f.objects = map[string]map[uint64]uint64{}
	f.mu.Unlock()
	saved := procs
	procs = fakeProcs
	active.Store(f)
	return func() {
		active.Store(nil)
		procs = saved
	}
}

// Misuse returns the rule breaks seen so far, one sentence each.
func (f *Fake) Misuse() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.misuse...)
}

// Live returns how many objects of a kind exist: "context" (references to the primary
// context), "reservation", "handle", "mapping", "stream", "event" or "module".
func (f *Fake) Live(kind string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	if kind == "context" {
		return f.retained
	}
	return len(f.objects[kind])
}

// Calls returns how many times the entry point with the given plain name was called.
func (f *Fake) Calls(name string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[name]
}

func (f *Fake) call(name string, a [11]uintptr) uintptr {
	f.mu.Lock()
	f.inFlight++
	f.calls[name]++
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		f.inFlight--
		f.mu.Unlock()
	}()
	if f.Hook != nil {
		if r := f.Hook(name); r != Success {
			return uintptr(r)
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.device(name, a); r != nil {
		return uintptr(*r)
	}
	if r := f.checkContext(name); r != Success {
		return uintptr(r)
	}
	return uintptr(f.inContext(name, a))
}

// device runs the calls that need no context; nil for the others.
func (f *Fake) device(name string, a [11]uintptr) *Result {
	r := Success
	switch name {
	case "cuInit":
	case "cuDriverGetVersion":
		put(a[0], int32(13000))
	case "cuDeviceGetCount":
		put(a[0], int32(1))
	case "cuDeviceGet":
		if int32(a[1]) != 0 {
			r = ErrorInvalidDevice
		}
		put(a[0], int32(0))
	case "cuDeviceGetAttribute":
		v := int32(1)
		switch int32(a[1]) {
		case AttrComputeCapabilityMajor:
			v = 9
		case AttrComputeCapabilityMinor:
			v = 0
		}
		put(a[0], v)
	case "cuDeviceGetName":
		copy(unsafe.Slice((*byte)(ptrAt(a[0])), int32(a[1])), "Fake GPU\x00")
	case "cuDeviceTotalMem":
		put(a[0], uint64(fakeTotal))
	case "cuDevicePrimaryCtxRetain":
		f.retained++
		put(a[0], uintptr(fakeCtx))
	case "cuDevicePrimaryCtxRelease":
		if f.retained == 0 {
			f.misuse = append(f.misuse, "primary context released more often than retained")
			r = ErrorInvalidContext
			break
		}
		if f.inFlight > 1 {
			f.misuse = append(f.misuse, fmt.Sprintf("primary context released while %d other call(s) run", f.inFlight-1))
		}
		f.retained--
	case "cuCtxSetCurrent":
		if a[0] != 0 && f.retained == 0 {
			f.misuse = append(f.misuse, "context made current after its last release")
			r = ErrorInvalidContext
			break
		}
		f.current[unix.Gettid()] = uint64(a[0])
	default:
		return nil
	}
	return &r
}

func (f *Fake) checkContext(name string) Result {
	c := f.current[unix.Gettid()]
	switch {
	case c == 0:
		f.misuse = append(f.misuse, name+" with no context current on its thread")
		return ErrorInvalidContext
	case f.retained == 0:
		f.misuse = append(f.misuse, name+" in a context after its last release")
		return ErrorInvalidContext
	}
	return Success
}

// inContext runs the calls that need a context.
func (f *Fake) inContext(name string, a [11]uintptr) Result {
	switch name {
	case "cuMemGetInfo":
		var used uint64
		for _, n := range f.objects["handle"] {
			used += n
		}
		put(a[0], uint64(fakeTotal)-min(used, fakeTotal))
		put(a[1], uint64(fakeTotal))
	case "cuMemGetAllocationGranularity":
		put(a[0], uint64(fakeGran))
	case "cuMemAddressReserve":
		f.next += (uint64(a[1]) + fakeGran) / fakeGran * fakeGran
		put(a[0], uint64(1<<40+f.next))
		f.add("reservation", 1<<40+f.next, uint64(a[1]))
	case "cuMemCreate", "cuMemAlloc", "cuMemAllocHost":
		return f.make(name, a[0], uint64(a[1]))
	case "cuStreamCreate":
		return f.make("stream", a[0], 0)
	case "cuEventCreate":
		return f.make("event", a[0], 0)
	case "cuModuleLoadData":
		return f.make("module", a[0], 0)
	case "cuModuleGetFunction":
		put(a[0], uintptr(0xf0))
	case "cuMemAddressFree":
		return f.drop("reservation", uint64(a[0]))
	case "cuMemRelease":
		return f.drop("handle", uint64(a[0]))
	case "cuMemFree", "cuMemFreeHost":
		return f.drop("alloc", uint64(a[0]))
	case "cuStreamDestroy":
		return f.drop("stream", uint64(a[0]))
	case "cuEventDestroy":
		return f.drop("event", uint64(a[0]))
	case "cuModuleUnload":
		return f.drop("module", uint64(a[0]))
	case "cuMemMap":
		f.add("mapping", uint64(a[0]), uint64(a[1]))
	case "cuMemUnmap":
		for p := range f.objects["mapping"] {
			if p >= uint64(a[0]) && p < uint64(a[0])+uint64(a[1]) {
				delete(f.objects["mapping"], p)
			}
		}
	case "cuEventElapsedTime":
		put(a[0], float32(1))
	}
	return Success
}

func (f *Fake) add(kind string, id, size uint64) {
	if f.objects[kind] == nil {
		f.objects[kind] = map[uint64]uint64{}
	}
	f.objects[kind][id] = size
}

// make hands out a new object and writes its id through out.
func (f *Fake) make(kind string, out uintptr, size uint64) Result {
	switch kind {
	case "cuMemCreate":
		kind = "handle"
	case "cuMemAlloc", "cuMemAllocHost":
		kind = "alloc"
	}
	f.next += fakeGran
	f.add(kind, f.next, size)
	put(out, f.next)
	return Success
}

func (f *Fake) drop(kind string, id uint64) Result {
	if _, ok := f.objects[kind][id]; !ok {
		return ErrorInvalidValue
	}
	delete(f.objects[kind], id)
	return Success
}

// ptrAt turns an address the caller passed as an argument back into a pointer. The memory is
// the caller's, kept alive by its //go:uintptrescapes call.
func ptrAt(p uintptr) unsafe.Pointer { return *(*unsafe.Pointer)(unsafe.Pointer(&p)) }

func put[T any](p uintptr, v T) { *(*T)(ptrAt(p)) = v }
