package vmm

import (
	"fmt"
	"math"
	"sync"
	"unsafe"

	"github.com/google/btree"

	"github.com/pagedkv/pagedkv/internal/leakcheck"
)

// ledger is the bookkeeping both backends share: which reservations, handles and mappings exist,
// whether a request is legal against them (so both backends reject the same bad input with the
// same typed errors, before any system call), and the leak counters. Callers hold mu around a
// check, the system call, and the commit.
type ledger struct {
	mu       sync.Mutex
	gran     uint64
	res      *btree.BTreeG[span] // reservations
	maps     *btree.BTreeG[span] // mappings
	handles  map[Handle]*handleRec
	physical uint64 // bytes of device memory alive (handles not both released and unmapped)
	host     uint64 // bytes of host memory made by CreateHost alive
	closed   bool
}

// span is a reservation or a mapping: [addr, addr+size).
type span struct {
	addr   Addr
	size   uint64
	handle Handle         // mappings: what is mapped
	access bool           // mappings: SetAccess done
	base   unsafe.Pointer // host reservations: the process address of addr
}

func (s span) end() Addr { return s.addr + Addr(s.size) }

type handleRec struct {
	size     uint64
	released bool
	mapped   int
	host     bool // made by CreateHost
}

func newLedger(gran uint64) *ledger {
	less := func(a, b span) bool { return a.addr < b.addr }
	return &ledger{
		gran:    gran,
		res:     btree.NewG(8, less),
		maps:    btree.NewG(8, less),
		handles: make(map[Handle]*handleRec),
	}
}

func (l *ledger) usable() error {
	if l == nil {
		return fmt.Errorf("device: %w: nil device, or one not made by its constructor", ErrInvalidArgument)
	}
	if l.closed {
		return fmt.Errorf("device: %w", ErrClosed)
	}
	return nil
}

// containing returns the span of t that contains [a, a+n).
func containing(t *btree.BTreeG[span], a Addr, n uint64) (span, bool) {
	var found span
	ok := false
	t.DescendLessOrEqual(span{addr: a}, func(s span) bool {
		found, ok = s, a+Addr(n) <= s.end() && a+Addr(n) >= a
		return false
	})
	return found, ok
}

func (l *ledger) checkSize(size uint64) error {
	if err := l.usable(); err != nil {
		return err
	}
	return checkAligned("size", size, l.gran)
}

func (l *ledger) checkFreeReservation(a Addr, size uint64) error {
	if err := l.usable(); err != nil {
		return err
	}
	r, ok := l.res.Get(span{addr: a})
	if !ok || r.size != size {
		return fmt.Errorf("free reservation %#x+%d: %w: not a reservation of this device", a, size, ErrWrongDevice)
	}
	inside := false
	l.maps.AscendRange(span{addr: a}, span{addr: r.end()}, func(span) bool { inside = true; return false })
	if inside {
		return fmt.Errorf("free reservation %#x: %w: it still has mappings", a, ErrAlreadyMapped)
	}
	return nil
}

func (l *ledger) handle(h Handle) (*handleRec, error) {
	if err := l.usable(); err != nil {
		return nil, err
	}
	rec, ok := l.handles[h]
	if !ok || rec.released {
		return nil, fmt.Errorf("handle %#x: %w: not a live handle of this device", uint64(h), ErrWrongDevice)
	}
	return rec, nil
}

func (l *ledger) checkMap(a Addr, size uint64, h Handle) (span, error) {
	rec, err := l.handle(h)
	if err != nil {
		return span{}, err
	}
	if err := checkAligned("size", size, l.gran); err != nil {
		return span{}, err
	}
	if err := checkAligned("address", uint64(a), l.gran); err != nil {
		return span{}, err
	}
	if size != rec.size {
		return span{}, fmt.Errorf("map %d bytes of a %d-byte handle: %w", size, rec.size, ErrInvalidArgument)
	}
	r, ok := containing(l.res, a, size)
	if !ok {
		return span{}, fmt.Errorf("map %#x+%d: %w: outside every reservation of this device", a, size, ErrOutOfRange)
	}
	overlap := false
	l.maps.DescendLessOrEqual(span{addr: a}, func(s span) bool { overlap = s.end() > a; return false })
	l.maps.AscendRange(span{addr: a}, span{addr: a + Addr(size)}, func(span) bool { overlap = true; return false })
	if overlap {
		return span{}, fmt.Errorf("map %#x+%d: %w", a, size, ErrAlreadyMapped)
	}
	return r, nil
}

func (l *ledger) commitMap(a Addr, size uint64, h Handle) {
	l.maps.ReplaceOrInsert(span{addr: a, size: size, handle: h})
	l.handles[h].mapped++
	leakcheck.Add(leakcheck.Mapping, 1)
}

// checkWraps reports a range [a, a+n) that wraps around the address space.
func checkWraps(a Addr, n uint64) error {
	if a+Addr(n) < a {
		return &RangeError{Offset: uint64(a), Size: n, Limit: math.MaxUint64}
	}
	return nil
}

// mappingsIn returns the mappings [a, a+size) covers, which must be whole and gap-free.
func (l *ledger) mappingsIn(a Addr, size uint64) ([]span, error) {
	if err := l.usable(); err != nil {
		return nil, err
	}
	if err := checkWraps(a, size); err != nil {
		return nil, err
	}
	var out []span
	next := a
	ok := true
	l.maps.AscendGreaterOrEqual(span{addr: a}, func(s span) bool {
		if s.addr >= a+Addr(size) {
			return false
		}
		if s.addr != next {
			ok = false
			return false
		}
		out = append(out, s)
		next = s.end()
		return true
	})
	if !ok || next != a+Addr(size) || size == 0 {
		return nil, fmt.Errorf("range %#x+%d: %w: not a run of whole mappings", a, size, ErrNotMapped)
	}
	return out, nil
}

func (l *ledger) commitAccess(ms []span) {
	for _, m := range ms {
		m.access = true
		l.maps.ReplaceOrInsert(m)
	}
}

func (l *ledger) commitUnmap(ms []span) {
	for _, m := range ms {
		l.maps.Delete(m)
		rec := l.handles[m.handle]
		rec.mapped--
		l.maybeFree(m.handle, rec)
		leakcheck.Add(leakcheck.Mapping, -1)
	}
}

func (l *ledger) commitCreate(h Handle, size uint64) { l.commitCreateOn(h, size, false) }

// commitCreateOn records a new handle of device or host memory.
func (l *ledger) commitCreateOn(h Handle, size uint64, host bool) {
	l.handles[h] = &handleRec{size: size, host: host}
	if host {
		l.host += size
	} else {
		l.physical += size
	}
	leakcheck.Add(leakcheck.Handle, 1)
}

func (l *ledger) commitRelease(h Handle) {
	rec := l.handles[h]
	rec.released = true
	l.maybeFree(h, rec)
	leakcheck.Add(leakcheck.Handle, -1)
}

func (l *ledger) maybeFree(h Handle, rec *handleRec) {
	if rec.released && rec.mapped == 0 {
		if rec.host {
			l.host -= rec.size
		} else {
			l.physical -= rec.size
		}
		delete(l.handles, h)
	}
}

func (l *ledger) commitReserve(a Addr, size uint64, base unsafe.Pointer) {
	l.res.ReplaceOrInsert(span{addr: a, size: size, base: base})
	leakcheck.Add(leakcheck.Reservation, 1)
}

func (l *ledger) commitFreeReservation(a Addr) {
	l.res.Delete(span{addr: a})
	leakcheck.Add(leakcheck.Reservation, -1)
}

// checkAccessible reports whether [a, a+n) lies inside accessible mappings of this device.
func (l *ledger) checkAccessible(a Addr, n uint64) error {
	if err := l.usable(); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	if err := checkWraps(a, n); err != nil {
		return err
	}
	next := a
	l.maps.DescendLessOrEqual(span{addr: a}, func(s span) bool {
		if s.end() > a && s.access {
			next = s.end()
		}
		return false
	})
	if next != a {
		l.maps.AscendRange(span{addr: next}, span{addr: a + Addr(n)}, func(s span) bool {
			if s.addr != next || !s.access {
				return false
			}
			next = s.end()
			return true
		})
	}
	if next < a+Addr(n) {
		return fmt.Errorf("access %#x+%d: %w: not inside accessible mappings of this device", a, n, ErrNotMapped)
	}
	return nil
}

// live returns the number of reservations, handles and mappings alive.
func (l *ledger) live() (res, handles, maps int) {
	n := 0
	for _, h := range l.handles {
		if !h.released {
			n++
		}
	}
	return l.res.Len(), n, l.maps.Len()
}

func (l *ledger) checkClose() error {
	if err := l.usable(); err != nil {
		return err
	}
	if r, h, m := l.live(); r+h+m > 0 {
		return fmt.Errorf("close device: %w: %d reservations, %d handles, %d mappings still live", ErrInvalidArgument, r, h, m)
	}
	return nil
}
