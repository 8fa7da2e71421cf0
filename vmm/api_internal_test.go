package vmm

import (
	"errors"
	"math"
	"reflect"
	"testing"

	"github.com/pagedkv/pagedkv/internal/cuda"
	"github.com/pagedkv/pagedkv/internal/testutil/apitest"
)

// ledgerState is a device's observable state: its reservations, mappings (with access) and
// handles, and the physical bytes they hold.
type ledgerState struct {
	Res, Maps []span
	Handles   map[Handle]handleRec
	Physical  uint64
}

func stateOfLedger(l *ledger) ledgerState {
	l.mu.Lock()
	defer l.mu.Unlock()
	st := ledgerState{Handles: map[Handle]handleRec{}, Physical: l.physical}
	l.res.Ascend(func(s span) bool { s.base = nil; st.Res = append(st.Res, s); return true })
	l.maps.Ascend(func(s span) bool { st.Maps = append(st.Maps, s); return true })
	for h, r := range l.handles {
		st.Handles[h] = *r
	}
	return st
}

// releaseAll returns whatever a call left on dev (mappings, handles, reservations) and closes it.
func releaseAll(dev Device, l *ledger) error {
	st := stateOfLedger(l)
	var errs []error
	for _, m := range st.Maps {
		errs = append(errs, dev.Unmap(m.addr, m.size))
	}
	for h, r := range st.Handles {
		if !r.released {
			errs = append(errs, dev.Release(h))
		}
	}
	for _, r := range st.Res {
		errs = append(errs, dev.FreeReservation(r.addr, r.size))
	}
	if err := dev.Close(); err != nil && !errors.Is(err, ErrClosed) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// hostFixture is a host device holding a reservation, one accessible mapping and one unmapped
// handle, so that calls meet live objects.
func hostFixture() (*HostDevice, func() error) {
	d, err := NewHostDevice(HostOptions{Granularity: 32 << 10, Capacity: 64 << 20})
	if err != nil {
		panic(err)
	}
	g := d.opts.Granularity
	base, err := d.Reserve(8 * g)
	if err != nil {
		panic(err)
	}
	h, err := d.Create(g)
	if err != nil {
		panic(err)
	}
	if err := errors.Join(d.Map(base, g, h), d.SetAccess(base, g)); err != nil {
		panic(err)
	}
	if _, err := d.Create(2 * g); err != nil {
		panic(err)
	}
	return d, func() error { return releaseAll(d, d.l) }
}

func deviceObject(d Device, l *ledger, closeFn func() error) apitest.Object {
	return apitest.Object{
		V:     reflect.ValueOf(d),
		State: func() any { return stateOfLedger(l) },
		Probe: func() { l.mu.Lock(); l.mu.Unlock() }, //nolint:staticcheck // the probe takes the lock
		Close: closeFn,
	}
}

// poolState is a pool's observable state: what is mapped (by extent) and cached, not the
// counters of calls made.
type poolState struct {
	Extents []extent
	Cached  map[int][]Handle
	Stats   PoolStats
}

func stateOfPool(p *Pool) poolState {
	p.mu.Lock()
	st := poolState{Cached: map[int][]Handle{}}
	p.extents.Ascend(func(e extent) bool { st.Extents = append(st.Extents, e); return true })
	for k, v := range p.cache {
		if len(v) > 0 {
			st.Cached[k] = append([]Handle(nil), v...)
		}
	}
	p.mu.Unlock()
	st.Stats = p.Stats()
	st.Stats.Creates, st.Stats.Releases, st.Stats.Maps, st.Stats.Unmaps, st.Stats.CacheHits, st.Stats.ReleaseFailures = 0, 0, 0, 0, 0, 0
	return st
}

// checkPool verifies the pool against its device: every extent is one accessible mapping of
// its handle, and the counts agree.
func checkPool(p *Pool, l *ledger) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	n := 0
	var err error
	p.extents.Ascend(func(e extent) bool {
		n += e.count
		a, size := p.extentAddr(e)
		l.mu.Lock()
		m, ok := l.maps.Get(span{addr: a})
		l.mu.Unlock()
		if !ok || m.size != size || m.handle != e.h || !m.access {
			err = errors.New("pool extent without its mapping")
			return false
		}
		return true
	})
	if err == nil && n != p.nmapped {
		err = errors.New("pool's mapped count disagrees with its extents")
	}
	return err
}

type fakeReclaimer struct{}

func (fakeReclaimer) Reclaim(need uint64, compact, wait bool) uint64 { return 0 }

func apiValues(t reflect.Type) []apitest.Maker {
	val := func(x any) apitest.Maker {
		return func() apitest.Object { return apitest.Object{V: reflect.ValueOf(x)} }
	}
	host := func() apitest.Object { d, c := hostFixture(); return deviceObject(d, d.l, c) }
	switch t {
	case reflect.TypeFor[*HostDevice]():
		return []apitest.Maker{host, func() apitest.Object { // closed
			d, _ := NewHostDevice(HostOptions{})
			_ = d.Close()
			return apitest.Object{V: reflect.ValueOf(d)}
		}, val(&HostDevice{})}
	case reflect.TypeFor[*CUDADevice]():
		out := []apitest.Maker{val(&CUDADevice{})}
		if cuda.Load() == nil && Supported(0) {
			out = append(out, func() apitest.Object {
				d, err := NewCUDADevice(0)
				if err != nil {
					panic(err)
				}
				return deviceObject(d, d.l, func() error { return releaseAll(d, d.l) })
			})
		}
		return out
	case reflect.TypeFor[*FaultDevice]():
		return []apitest.Maker{func() apitest.Object {
			d, c := hostFixture()
			f := InjectFaults(d)
			if err := f.FailNth(OpCreate, 2, nil); err != nil {
				panic(err)
			}
			return deviceObject(f, d.l, c)
		}, val(InjectFaults(nil))}
	case reflect.TypeFor[Device]():
		return []apitest.Maker{func() apitest.Object {
			d, c := hostFixture()
			o := deviceObject(d, d.l, c)
			var dev Device = d
			o.V = reflect.ValueOf(&dev).Elem()
			return o
		}}
	case reflect.TypeFor[*Pool]():
		return []apitest.Maker{func() apitest.Object {
			d, c := hostFixture()
			p, err := NewPool(d, PoolConfig{Capacity: 16 * (32 << 10), CacheLimit: 64 << 10})
			if err != nil {
				panic(err)
			}
			_, err1 := p.Map(0, 2*(32<<10))
			_, err2 := p.Map(4*(32<<10), 32<<10)
			if err := errors.Join(err1, err2, p.Unmap(4*(32<<10), 32<<10)); err != nil {
				panic(err)
			}
			return apitest.Object{
				V: reflect.ValueOf(p), State: func() any { return stateOfPool(p) }, Check: func() error { return checkPool(p, d.l) },
				Probe: func() { p.Stats() }, Close: func() error { _ = p.Close(); return c() },
			}
		}, func() apitest.Object { // closed
			d, c := hostFixture()
			p, _ := NewPool(d, PoolConfig{Capacity: 1 << 20})
			_ = p.Close()
			return apitest.Object{V: reflect.ValueOf(p), Close: c}
		}, val(&Pool{})}
	case reflect.TypeFor[*Budget]():
		return []apitest.Maker{func() apitest.Object {
			b := NewBudget(10 << 20)
			a, _ := b.Join("a", fakeReclaimer{})
			if err := a.TryAcquire(4 << 20); err != nil {
				panic(err)
			}
			return apitest.Object{V: reflect.ValueOf(b), State: func() any { return [2]uint64{b.Limit(), b.Used()} }, Probe: func() { b.Used() }}
		}, val(&Budget{})}
	case reflect.TypeFor[*BudgetMember]():
		return []apitest.Maker{func() apitest.Object {
			b := NewBudget(10 << 20)
			a, _ := b.Join("a", fakeReclaimer{})
			if err := a.TryAcquire(4 << 20); err != nil {
				panic(err)
			}
			return apitest.Object{V: reflect.ValueOf(a), State: func() any { return [3]uint64{b.Limit(), b.Used(), a.Used()} }, Probe: func() { b.Used() }}
		}, val(&BudgetMember{})}
	case reflect.TypeFor[Reclaimer]():
		return []apitest.Maker{val(fakeReclaimer{})}
	case reflect.TypeFor[PoolConfig]():
		return []apitest.Maker{val(PoolConfig{Capacity: math.MaxUint64}), val(PoolConfig{Capacity: 1 << 40, PageSize: 3}),
			val(PoolConfig{Capacity: 64 << 20, PageSize: 32 << 10, CacheLimit: math.MaxUint64})}
	case reflect.TypeFor[HostOptions]():
		return []apitest.Maker{val(HostOptions{Granularity: 1}), val(HostOptions{Granularity: math.MaxUint64}),
			val(HostOptions{Granularity: 32 << 10, Capacity: 1}), val(HostOptions{Capacity: math.MaxUint64}), val(HostOptions{Granularity: 1 << 40})}
	case reflect.TypeFor[Op]():
		return []apitest.Maker{val(OpMap), val(OpCopy), val(Op("bogus"))}
	case reflect.TypeFor[string]():
		return []apitest.Maker{val("host"), val("cuda"), val("cuda:-1"), val("cuda:99999999999999999999"), val("auto")}
	case reflect.TypeFor[func(int) bool]():
		return []apitest.Maker{val(func(int) bool { return true })}
	case reflect.TypeFor[error]():
		return []apitest.Maker{val(ErrOutOfMemory)}
	case reflect.TypeFor[External]():
		return []apitest.Maker{val(External{Addr: math.MaxUint64, Size: math.MaxUint64, Device: -1, Kind: -1})}
	case reflect.TypeFor[Region]():
		return []apitest.Maker{val(Region{Addr: 1, Len: math.MaxUint64, DeviceID: math.MinInt, Kind: 7})}
	}
	return nil
}

// TestAPIProperty calls every exported function and method of vmm with extreme arguments:
// nothing panics, every error is typed, a failed call leaves its receiver (a device's objects, a
// pool's mappings and cache, a budget's accounts) as it was, and no lock stays held.
func TestAPIProperty(t *testing.T) {
	s := &apitest.Suite{
		Dir:   ".",
		Funcs: []any{NewHostDevice, NewCUDADevice, Open, Probe, Supported, NewPool, NewBudget, InjectFaults, ReclaimNow},
		Types: []any{(*HostDevice)(nil), (*CUDADevice)(nil), (*FaultDevice)(nil), (*Pool)(nil), (*Budget)(nil),
			(*BudgetMember)(nil), MemoryKind(0), External{}, Region{},
			(*CapacityError)(nil), (*AlignmentError)(nil), (*RangeError)(nil)},
		Values:   apiValues,
		MaxCalls: 1500,
	}
	s.Check(t)
}
