package vmm

import (
	"errors"
	"fmt"
	"math"
	"sync"

	"github.com/google/btree"

	"github.com/pagedkv/pagedkv/internal/checked"
)

// PoolConfig describes an elastic pool: a large virtual reservation that physical pages are
// mapped into on demand.
type PoolConfig struct {
	// Capacity is the virtual size to reserve, rounded up to a whole page. Reserving costs no
	// physical memory, so it may exceed the device's memory (128 GiB on an 80 GiB GPU is fine).
	Capacity uint64
	// PageSize is the unit of mapping; 0 means the device granularity. It must be a multiple of
	// the granularity (an *AlignmentError otherwise).
	PageSize uint64
	// CacheLimit is how many bytes of physical handles Unmap may keep for reuse instead of
	// releasing them, so that the next Map pays only map + access. 0 keeps none.
	CacheLimit uint64
}

// PoolStats is a snapshot of a pool.
type PoolStats struct {
	VirtualBytes  uint64 // size of the reservation
	PageSize      uint64
	MappedPages   int
	MappedBytes   uint64
	Mappings      int    // driver mappings: a run mapped as one counts once
	CachedHandles int    // unmapped physical handles kept for reuse
	CachedBytes   uint64 // physical bytes in those handles
	PhysicalBytes uint64 // MappedBytes + CachedBytes: what the pool holds of the device
	// Fragmentation is the fraction of pages below the highest mapped page that are not mapped:
	// 0 when the mapped pages are packed at the bottom of the reservation (so everything above
	// them could be returned as one range), approaching 1 as mapped pages scatter.
	Fragmentation float64
	// Counts of driver calls the pool made since it was created.
	Creates, Releases, Maps, Unmaps uint64
	// CacheHits counts Maps served by a cached handle (no cuMemCreate).
	CacheHits uint64
	// ReleaseFailures counts handles the driver refused to release after an Unmap; they stay in
	// the cache, still owned and counted, and Trim or Close try again.
	ReleaseFailures uint64
}

// Pool is an elastic memory pool: a reservation of Capacity bytes of virtual address space on
// one Device, into which physical pages are mapped and unmapped on demand. It is the Go form of
// candle-cuda-vmm's VirtualMemoryPool, with typed errors and all-or-nothing operations.
//
// The pool owns its reservation, every handle it created and every mapping it made; Close
// returns them all. It borrows the Device, which must outlive it. Its bookkeeping is one B-tree
// entry per mapping, whatever the size of the reservation. Safe for concurrent use; a nil Pool,
// or one not made by NewPool, returns ErrInvalidArgument.
type Pool struct {
	mu      sync.Mutex
	dev     Device
	base    Addr
	page    uint64
	npages  int
	extents *btree.BTreeG[extent] // mappings by first page
	cache   map[int][]Handle      // unmapped handles by size in pages
	cached  struct {
		n int
		b uint64
	} // their count and bytes
	limit    uint64
	hostKept []Handle // host handles the driver refused to release: never reused, Trim retries them
	nmapped  int
	counters struct{ creates, releases, maps, unmaps, hits, relFail uint64 }
	closed   bool
}

// extent is one driver mapping: pages [first, first+count) backed by handle h (of host memory
// when host).
type extent struct {
	first, count int
	h            Handle
	host         bool
}

// NewPool reserves cfg.Capacity bytes on dev. Nothing is mapped yet.
func NewPool(dev Device, cfg PoolConfig) (*Pool, error) {
	if dev == nil {
		return nil, fmt.Errorf("new pool: %w: nil device", ErrInvalidArgument)
	}
	gran := dev.Info().Granularity
	page := cfg.PageSize
	if page == 0 {
		page = gran
	}
	if err := checkAligned("page size", page, gran); err != nil {
		return nil, fmt.Errorf("new pool: %w", err)
	}
	if cfg.Capacity == 0 {
		return nil, fmt.Errorf("new pool: %w", &AlignmentError{What: "capacity", Value: 0, Align: page})
	}
	size, ok := checked.RoundUp(cfg.Capacity, page)
	if !ok || size/page > math.MaxInt32 {
		return nil, fmt.Errorf("new pool: %w: capacity %d is more than %d pages of %d bytes", ErrTooLarge, cfg.Capacity, math.MaxInt32, page)
	}
	npages := size / page
	base, err := dev.Reserve(size)
	if err != nil {
		return nil, fmt.Errorf("new pool: %w", err)
	}
	return &Pool{
		dev:     dev,
		base:    base,
		page:    page,
		npages:  int(npages),
		extents: btree.NewG(16, func(a, b extent) bool { return a.first < b.first }),
		cache:   make(map[int][]Handle),
		limit:   cfg.CacheLimit,
	}, nil
}

// made reports whether p was made by NewPool; every method checks it first.
func (p *Pool) made() bool { return p != nil && p.dev != nil }

var errPoolNotMade = fmt.Errorf("pool: %w: nil pool, or one not made by NewPool", ErrInvalidArgument)

// Device returns the device the pool borrows (nil for a nil pool).
func (p *Pool) Device() Device {
	if !p.made() {
		return nil
	}
	return p.dev
}

// Base returns the address of the first byte of the reservation. It never changes.
func (p *Pool) Base() Addr {
	if !p.made() {
		return 0
	}
	return p.base
}

// Capacity returns the reserved virtual bytes.
func (p *Pool) Capacity() uint64 {
	if !p.made() {
		return 0
	}
	return uint64(p.npages) * p.page
}

// PageSize returns the mapping unit.
func (p *Pool) PageSize() uint64 {
	if !p.made() {
		return 0
	}
	return p.page
}

// Pages returns the number of pages in the reservation.
func (p *Pool) Pages() int {
	if !p.made() {
		return 0
	}
	return p.npages
}

// lock locks a pool made by NewPool, or reports that it was not (then nothing is locked).
func (p *Pool) lock() error {
	if !p.made() {
		return errPoolNotMade
	}
	p.mu.Lock()
	return nil
}

// pageRange validates [offset, offset+size) and returns it in pages.
func (p *Pool) pageRange(offset, size uint64) (first, n int, err error) {
	if p.closed {
		return 0, 0, fmt.Errorf("pool: %w", ErrClosed)
	}
	if offset%p.page != 0 {
		return 0, 0, &AlignmentError{What: "offset", Value: offset, Align: p.page}
	}
	if err := checkAligned("size", size, p.page); err != nil {
		return 0, 0, err
	}
	if offset+size < offset || offset+size > p.Capacity() {
		return 0, 0, &RangeError{Offset: offset, Size: size, Limit: p.Capacity()}
	}
	return int(offset / p.page), int(size / p.page), nil
}

// Map backs [offset, offset+size) with physical memory as ONE driver mapping (one handle, one
// cuMemMap, one cuMemSetAccess, whatever the size: the cost of growing is per mapping, not per
// byte) and returns its address. offset and size are multiples of the page size. A cached
// handle of the same size is used when there is one. On any error nothing has changed.
func (p *Pool) Map(offset, size uint64) (Addr, error) { return p.mapRange(offset, size, false) }

// MapHost is Map with pinned host memory (the device must be a HostAllocator; ErrNotSupported
// otherwise): the device reaches it at the returned address like device memory. Host handles
// are never cached: Unmap releases them.
func (p *Pool) MapHost(offset, size uint64) (Addr, error) { return p.mapRange(offset, size, true) }

func (p *Pool) mapRange(offset, size uint64, host bool) (Addr, error) {
	if err := p.lock(); err != nil {
		return 0, err
	}
	defer p.mu.Unlock()
	first, n, err := p.pageRange(offset, size)
	if err != nil {
		return 0, fmt.Errorf("pool map: %w", err)
	}
	if p.anyMapped(first, n) {
		return 0, fmt.Errorf("pool map [%d, %d): %w", offset, offset+size, ErrAlreadyMapped)
	}
	var h Handle
	fromCache := false
	if host {
		ha, ok := p.dev.(HostAllocator)
		if !ok {
			return 0, fmt.Errorf("pool map host: %w: %s has no host memory", ErrNotSupported, p.dev.Info().Name)
		}
		if h, err = ha.CreateHost(size); err != nil {
			return 0, fmt.Errorf("pool map host: %w", err)
		}
		p.counters.creates++
	} else if h, fromCache, err = p.takeHandle(n); err != nil {
		return 0, fmt.Errorf("pool map: %w", err)
	}
	a := p.base + Addr(offset)
	if err := p.mapHandle(a, size, h); err != nil {
		return 0, errors.Join(fmt.Errorf("pool map: %w", err), p.returnHandle(h, n, fromCache, host))
	}
	if fromCache {
		p.counters.hits++
	}
	p.extents.ReplaceOrInsert(extent{first: first, count: n, h: h, host: host})
	p.setMapped(n, true)
	return a, nil
}

// mapHandle maps h at a and grants access, undoing the map if the grant fails.
func (p *Pool) mapHandle(a Addr, size uint64, h Handle) error {
	if err := p.dev.Map(a, size, h); err != nil {
		return err
	}
	p.counters.maps++
	if err := p.dev.SetAccess(a, size); err != nil {
		if uerr := p.dev.Unmap(a, size); uerr != nil {
			return errors.Join(err, fmt.Errorf("undo map: %w", uerr))
		}
		p.counters.unmaps++
		return err
	}
	return nil
}

func (p *Pool) takeHandle(pages int) (Handle, bool, error) {
	if hs := p.cache[pages]; len(hs) > 0 {
		h := hs[len(hs)-1]
		p.cache[pages] = hs[:len(hs)-1]
		p.cached.n--
		p.cached.b -= uint64(pages) * p.page
		return h, true, nil
	}
	h, err := p.dev.Create(uint64(pages) * p.page)
	if err != nil {
		return 0, false, err
	}
	p.counters.creates++
	return h, false, nil
}

// returnHandle puts a handle back where takeHandle got it. A handle the driver refuses to
// release stays owned: a device handle in the cache, a host handle apart, so that no Map is
// ever served host memory.
func (p *Pool) returnHandle(h Handle, pages int, toCache, host bool) error {
	if toCache {
		p.cacheHandle(h, pages)
		return nil
	}
	if err := p.dev.Release(h); err != nil {
		p.counters.relFail++
		if host {
			p.hostKept = append(p.hostKept, h)
		} else {
			p.cacheHandle(h, pages)
		}
		return fmt.Errorf("release (handle kept): %w", err)
	}
	p.counters.releases++
	return nil
}

func (p *Pool) cacheHandle(h Handle, pages int) {
	p.cache[pages] = append(p.cache[pages], h)
	p.cached.n++
	p.cached.b += uint64(pages) * p.page
}

// Unmap returns [offset, offset+size) to the device. The range must consist of whole mappings
// made by Map (a run mapped as one is unmapped as one: the driver cannot split it); several
// adjacent mappings may go in one call. Their handles are kept for reuse while the cache is
// under CacheLimit and released otherwise.
//
// On an error from the unmaps nothing has changed (mappings already undone are mapped back, with
// their contents, from the handles still held). A release failing after the unmaps is not an
// error of Unmap: the handle stays cached, counted in Stats().ReleaseFailures, and Trim or Close
// try again.
func (p *Pool) Unmap(offset, size uint64) error {
	if err := p.lock(); err != nil {
		return err
	}
	defer p.mu.Unlock()
	first, n, err := p.pageRange(offset, size)
	if err != nil {
		return fmt.Errorf("pool unmap: %w", err)
	}
	exts, err := p.wholeExtents(first, n)
	if err != nil {
		return fmt.Errorf("pool unmap [%d, %d): %w", offset, offset+size, err)
	}
	for i, e := range exts {
		if err := p.dev.Unmap(p.extentAddr(e)); err != nil {
			return fmt.Errorf("pool unmap: %w", errors.Join(err, p.remap(exts[:i])))
		}
		p.counters.unmaps++
	}
	for _, e := range exts {
		p.extents.Delete(e)
		p.setMapped(e.count, false)
		bytes := uint64(e.count) * p.page
		keep := !e.host && p.cached.b+bytes <= p.limit
		// A release failure keeps the handle cached and counts it; see the doc comment.
		_ = p.returnHandle(e.h, e.count, keep, e.host)
	}
	return nil
}

// remap restores mappings that an Unmap took down before a later unmap failed.
func (p *Pool) remap(exts []extent) error {
	var errs []error
	for _, e := range exts {
		a, size := p.extentAddr(e)
		if err := p.mapHandle(a, size, e.h); err != nil {
			errs = append(errs, fmt.Errorf("restore mapping at page %d: %w", e.first, err))
		}
	}
	return errors.Join(errs...)
}

func (p *Pool) extentAddr(e extent) (Addr, uint64) {
	return p.base + Addr(uint64(e.first)*p.page), uint64(e.count) * p.page
}

// wholeExtents returns the mappings that exactly tile pages [first, first+n).
func (p *Pool) wholeExtents(first, n int) ([]extent, error) {
	var out []extent
	next := first
	var err error
	p.extents.DescendLessOrEqual(extent{first: first}, func(e extent) bool {
		if e.first < first && e.first+e.count > first {
			err = fmt.Errorf("%w: page %d is inside a mapping of pages [%d, %d); unmap it whole", ErrInvalidArgument, first, e.first, e.first+e.count)
		}
		return false
	})
	if err != nil {
		return nil, err
	}
	p.extents.AscendRange(extent{first: first}, extent{first: first + n}, func(e extent) bool {
		if e.first != next {
			err = fmt.Errorf("%w: page %d", ErrNotMapped, next)
			return false
		}
		if e.first+e.count > first+n {
			err = fmt.Errorf("%w: the mapping of pages [%d, %d) extends past the range; unmap it whole", ErrInvalidArgument, e.first, e.first+e.count)
			return false
		}
		out = append(out, e)
		next = e.first + e.count
		return true
	})
	if err == nil && next != first+n {
		err = fmt.Errorf("%w: page %d", ErrNotMapped, next)
	}
	return out, err
}

// IsMapped reports whether every page of [offset, offset+size) is mapped. Invalid ranges are
// not mapped.
func (p *Pool) IsMapped(offset, size uint64) bool {
	if p.lock() != nil {
		return false
	}
	defer p.mu.Unlock()
	first, n, err := p.pageRange(offset, size)
	if err != nil {
		return false
	}
	// The mappings that cover pages [first, first+n) must follow each other without a gap.
	next := first
	p.extents.DescendLessOrEqual(extent{first: first}, func(e extent) bool {
		if e.first+e.count > first {
			next = e.first + e.count
		}
		return false
	})
	if next == first {
		return false
	}
	p.extents.AscendRange(extent{first: next}, extent{first: first + n}, func(e extent) bool {
		if e.first != next {
			return false
		}
		next = e.first + e.count
		return true
	})
	return next >= first+n
}

// anyMapped reports whether a mapping overlaps pages [first, first+n).
func (p *Pool) anyMapped(first, n int) bool {
	overlap := false
	p.extents.DescendLessOrEqual(extent{first: first}, func(e extent) bool {
		overlap = e.first+e.count > first
		return false
	})
	p.extents.AscendRange(extent{first: first}, extent{first: first + n}, func(extent) bool {
		overlap = true
		return false
	})
	return overlap
}

// setMapped counts n pages mapped or unmapped.
func (p *Pool) setMapped(n int, on bool) {
	if on {
		p.nmapped += n
	} else {
		p.nmapped -= n
	}
}

// Precreate creates count handles of size bytes (a multiple of the page size) and caches them,
// so that the next count Maps of that size pay only map + access. Precreated handles do not
// count against CacheLimit. On error the handles made by this call are released again.
func (p *Pool) Precreate(size uint64, count int) error {
	if err := p.lock(); err != nil {
		return err
	}
	defer p.mu.Unlock()
	if _, _, err := p.pageRange(0, size); err != nil {
		return fmt.Errorf("pool precreate: %w", err)
	}
	if count < 0 {
		return fmt.Errorf("pool precreate: %w: count %d", ErrInvalidArgument, count)
	}
	pages := int(size / p.page)
	var made []Handle // count may be anything; memory runs out long before MaxInt handles
	for range count {
		h, err := p.dev.Create(size)
		if err != nil {
			var errs []error
			for _, m := range made {
				if rerr := p.dev.Release(m); rerr != nil {
					errs = append(errs, rerr)
					p.counters.relFail++
					p.cacheHandle(m, pages)
				} else {
					p.counters.releases++
				}
			}
			return fmt.Errorf("pool precreate: %w", errors.Join(append([]error{err}, errs...)...))
		}
		p.counters.creates++
		made = append(made, h)
	}
	for _, h := range made {
		p.cacheHandle(h, pages)
	}
	return nil
}

// Trim releases every cached handle, and the host handles whose release the driver refused
// before. Handles it refuses again stay owned.
func (p *Pool) Trim() error {
	if err := p.lock(); err != nil {
		return err
	}
	defer p.mu.Unlock()
	if p.closed {
		return fmt.Errorf("pool trim: %w", ErrClosed)
	}
	return p.trim()
}

func (p *Pool) trim() error {
	var errs []error
	for pages, hs := range p.cache {
		var n int
		p.cache[pages], n, errs = p.releaseAll(hs, errs)
		p.cached.n -= n
		p.cached.b -= uint64(n) * uint64(pages) * p.page
	}
	p.hostKept, _, errs = p.releaseAll(p.hostKept, errs)
	if len(errs) > 0 {
		return fmt.Errorf("pool trim: %w", errors.Join(errs...))
	}
	return nil
}

// releaseAll releases every handle of hs and returns those the device refused, kept in hs's
// array for the next try, how many it released, and errs with the refusals' errors appended.
func (p *Pool) releaseAll(hs []Handle, errs []error) (kept []Handle, released int, _ []error) {
	kept = hs[:0]
	for _, h := range hs {
		if err := p.dev.Release(h); err != nil {
			errs = append(errs, err)
			p.counters.relFail++
			kept = append(kept, h)
			continue
		}
		p.counters.releases++
		released++
	}
	return kept, released, errs
}

// Stats returns a snapshot of the pool.
func (p *Pool) Stats() PoolStats {
	if p.lock() != nil {
		return PoolStats{}
	}
	defer p.mu.Unlock()
	s := PoolStats{
		VirtualBytes:    p.Capacity(),
		PageSize:        p.page,
		MappedPages:     p.nmapped,
		MappedBytes:     uint64(p.nmapped) * p.page,
		Mappings:        p.extents.Len(),
		CachedHandles:   p.cached.n,
		CachedBytes:     p.cached.b,
		Creates:         p.counters.creates,
		Releases:        p.counters.releases,
		Maps:            p.counters.maps,
		Unmaps:          p.counters.unmaps,
		CacheHits:       p.counters.hits,
		ReleaseFailures: p.counters.relFail,
	}
	s.PhysicalBytes = s.MappedBytes + s.CachedBytes
	if top, ok := p.extents.Max(); ok {
		span := top.first + top.count
		s.Fragmentation = float64(span-p.nmapped) / float64(span)
	}
	return s
}

// MappedPages calls fn for each mapped page index, in increasing order, until fn returns
// false. A nil fn is a no-op.
func (p *Pool) MappedPages(fn func(page int) bool) {
	if fn == nil || p.lock() != nil {
		return
	}
	defer p.mu.Unlock()
	p.extents.Ascend(func(e extent) bool {
		for i := e.first; i < e.first+e.count; i++ {
			if !fn(i) {
				return false
			}
		}
		return true
	})
}

// Close unmaps everything, releases every handle and frees the reservation. It tries every step
// even when one fails and returns all failures. After a failure the pool stays open, owning the
// mappings and handles the driver refused to give back and its reservation, and Close may be
// called again.
func (p *Pool) Close() error {
	if err := p.lock(); err != nil {
		return err
	}
	defer p.mu.Unlock()
	if p.closed {
		return fmt.Errorf("pool close: %w", ErrClosed)
	}
	var errs []error
	var unmapped []extent
	p.extents.Ascend(func(e extent) bool {
		a, size := p.extentAddr(e)
		if err := p.dev.Unmap(a, size); err != nil {
			errs = append(errs, err)
			return true
		}
		p.counters.unmaps++
		unmapped = append(unmapped, e)
		return true
	})
	for _, e := range unmapped {
		p.extents.Delete(e)
		p.setMapped(e.count, false)
		// A refused release keeps the handle, so that the trim below tries it again.
		_ = p.returnHandle(e.h, e.count, false, e.host)
	}
	if err := p.trim(); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 { // the reservation stays, around what the pool still holds
		return fmt.Errorf("pool close: %w", errors.Join(errs...))
	}
	if err := p.dev.FreeReservation(p.base, p.Capacity()); err != nil {
		return fmt.Errorf("pool close: %w", err)
	}
	p.closed = true
	return nil
}
